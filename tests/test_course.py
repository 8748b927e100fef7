"""The course kit: the student handout and the grader (CPU; GPU-only cases skip).

Runs the real tools in subprocesses, as a student or an instructor would.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "course"))

import grade  # noqa: E402
import handout  # noqa: E402

BROKEN = {k: v for k, v in json.loads((ROOT / "tests/submissions/broken.json").read_text()).items() if k[0] != "_"}
HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def starter(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("handout")
    assert handout.write_handout(dest) == ["block range", "masking", "online softmax"]
    return dest


def test_handout_hides_the_solution(starter):
    text = (starter / "solution.py").read_text()
    assert "SOLUTION" not in text
    for part in ("block range", "masking", "online softmax"):
        assert f"# TODO(student): {part}" in text
        assert f"not implemented: {part}" in text
    for line in ("first_key = maximum(", "T.reduce_max(s, m_tile", "m_safe[i] = T.if_then_else"):
        assert line not in text, f"solution line left in the handout: {line}"
    for name in ("test.py", "reference.py", "bench.py", "Makefile", "configs/assignment.json"):
        assert (starter / name).read_bytes() == (ROOT / name).read_bytes(), f"{name} changed"


def test_handout_imports_and_fails_clearly(starter):
    """CPU tests run; the ones that need a TODO fail with 'not implemented', nothing crashes."""
    subprocess.run([sys.executable, "-c", "import solution"], cwd=starter, check=True)
    p = subprocess.run(
        [sys.executable, "-m", "pytest", "test.py", "-q", "-p", "no:cacheprovider", "-m", "not gpu"],
        cwd=starter,
        capture_output=True,
        text=True,
    )
    assert p.returncode == 1, p.stdout[-2000:]  # tests failed, no collection error or crash
    assert "NotImplementedError: not implemented: block range" in p.stdout
    assert "test_launcher_rejects_bad_input" not in p.stdout.split("short test summary")[-1]  # validation still works
    assert " passed" in p.stdout.splitlines()[-1]


def test_grader_gives_the_solution_full_marks():
    """Every test line full marks; the speedup line passes with the band its measured speedup earns."""
    lines = grade.grade(ROOT / "solution.py", has_cuda=HAS_CUDA)
    for line in lines:
        if line.status == "skipped":
            continue
        assert line.status == "pass", line
        if line.item != grade.SPEEDUP:
            assert line.points == line.max_points, line
    assert sum(ln.max_points for ln in lines) == 100


def test_grader_grades_only_what_is_asked():
    lines = {ln.item: ln for ln in grade.grade(ROOT / "solution.py", has_cuda=False, only=["test_compiles"])}
    assert lines["test_compiles"].status == "pass"
    assert {ln.status for item, ln in lines.items() if item not in ("submission", "test_compiles")} == {"skipped"}


def test_grader_scores_the_handout_without_crashing(starter):
    lines = {ln.item: ln for ln in grade.grade(starter / "solution.py", has_cuda=False)}
    assert lines["submission"].status == "pass"
    assert lines["test_kv_tile_range_matches_brute_force"].points == 0
    assert "not implemented" in lines["test_kv_tile_range_matches_brute_force"].detail
    assert lines["test_launcher_rejects_bad_input"].status == "pass"


def broken_submission(name: str, tmp_path: Path) -> Path:
    source = (ROOT / "solution.py").read_text()
    for find, replace in BROKEN[name]["edits"]:
        assert source.count(find) == 1, f"{name}: the mutation no longer applies to solution.py: {find!r}"
        source = source.replace(find, replace)
    path = tmp_path / "solution.py"
    path.write_text(source)
    return path


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_grader_catches_broken_submission(name, tmp_path):
    case = BROKEN[name]
    if case["gpu"] and not HAS_CUDA:
        pytest.skip("this defect shows only on a CUDA GPU")
    # A short limit makes the hang quick to catch; GPU cases compile kernels and need the real
    # one, and grade only the item that must catch them (a full GPU grading takes minutes).
    timeout, only = (None, [case["expect"]["item"]]) if case["gpu"] else (15, None)
    path = broken_submission(name, tmp_path)
    lines = {ln.item: ln for ln in grade.grade(path, timeout=timeout, has_cuda=HAS_CUDA, only=only)}
    caught = lines[case["expect"]["item"]]
    assert caught.status == case["expect"]["status"], caught
    assert caught.points < caught.max_points or caught.max_points == 0
    assert case["expect"]["detail"] in caught.detail, caught
    if caught.item == "submission":  # nothing else is graded
        assert all(ln.points == 0 for ln in lines.values())


def test_grader_cli_writes_both_reports(tmp_path):
    out = tmp_path / "report"
    path = broken_submission("syntax_error", tmp_path)
    subprocess.run([sys.executable, str(ROOT / "course/grade.py"), str(path), "--out", str(out)], check=True)
    report = json.loads((out / "report.json").read_text())
    assert report["points"] == 0 and report["max_points"] == 100
    assert "syntax error" in (out / "report.md").read_text()
