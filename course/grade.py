"""`make grade SUBMISSION=path`: score a submitted solution.py.

The submission is copied, alone, into a fresh temporary tree beside pristine
copies of the tests, the reference, the benchmark and the configs, so nothing
it ships can replace them. Then, each step in its own process with a time
limit so that a crash or a hang costs only that step:

  1. static checks: it parses (syntax), and imports none of the grading files
     (reference, test, bench, pytest);
  2. it imports;
  3. each graded test function of test.py (configs/grading.json) runs on its
     own; a parametrized test scores the share of its cases that pass; GPU
     tests are skipped, with no points, on a machine without CUDA;
  4. on a GPU, `bench.py --assignment` measures the speedup over the fastest
     full attention, scored by the bands of configs/grading.json.

The report goes to stdout as Markdown and to --out as report.md and
report.json. The grader never raises on a bad submission: every failure
becomes a report line with zero points.

    python course/grade.py SUBMISSION [--out DIR] [--timeout SECONDS]
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEEDUP = "speedup over full attention"  # the report line of the speedup bands
GRADING = json.loads((ROOT / "configs" / "grading.json").read_text())
PRISTINE = ["test.py", "reference.py", "bench.py", "pyproject.toml", "configs"]
FORBIDDEN_IMPORTS = {"reference", "test", "bench", "pytest", "_pytest", "conftest"}
MAX_BYTES = 1 << 20


@dataclass
class Line:
    item: str
    points: float
    max_points: float
    status: str  # pass | partial | fail | skipped | error
    detail: str = ""


def _tail(text: str, n: int = 1) -> str:
    lines = [s for s in text.strip().splitlines() if s.strip()]
    return " | ".join(lines[-n:])[:300] if lines else ""


def _head(text: str) -> str:
    lines = [s for s in text.strip().splitlines() if s.strip()]
    return lines[0][:300] if lines else ""


def _run(cmd: list[str], cwd: Path, timeout: float) -> tuple[int | None, str]:
    """Run a step; (exit code or None on timeout, combined output)."""
    # The tree first; inherited entries (an unpacked tilelang, say) after it, minus
    # this repository, whose solution.py must never stand in for the submission's.
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != ROOT]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(cwd), *inherited]), PYTHONDONTWRITEBYTECODE="1")
    try:
        p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"") + (e.stderr or b"")
        return None, out.decode(errors="replace") if isinstance(out, bytes) else out


def static_problem(source: str) -> str | None:
    """Why the source cannot be graded, or None."""
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        return f"syntax error: line {e.lineno}: {e.msg}"
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            if name.split(".")[0] in FORBIDDEN_IMPORTS:
                return f"forbidden import {name!r}: a submission may not touch the grading files"
    return None


def score_junit(xml_path: Path, name: str, spec: dict) -> Line:
    cases = ET.parse(xml_path).getroot().iter("testcase")
    passed = failed = skipped = 0
    first_failure = ""
    for case in cases:
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            failed += 1
            first_failure = first_failure or _head(bad.get("message", "") or (bad.text or ""))
        elif case.find("skipped") is not None:
            skipped += 1
        else:
            passed += 1
    run = passed + failed
    if run == 0:
        return Line(name, 0, spec["points"], "skipped", f"{skipped} cases skipped")
    points = spec["points"] * passed / run
    status = "pass" if failed == 0 else ("partial" if passed else "fail")
    return Line(name, round(points, 2), spec["points"], status, f"{passed}/{run} cases pass. {first_failure}".strip())


def grade_test(tree: Path, name: str, spec: dict, timeout: float, has_cuda: bool) -> Line:
    if spec["gpu"] and not has_cuda:
        return Line(name, 0, spec["points"], "skipped", "needs a CUDA GPU")
    xml_path = tree / f".junit-{name}.xml"
    cmd = [sys.executable, "-m", "pytest", f"test.py::{name}", "-q", "-p", "no:cacheprovider", f"--junitxml={xml_path}"]
    code, out = _run(cmd, tree, timeout)
    if code is None:
        return Line(name, 0, spec["points"], "error", f"timed out after {timeout:.0f} s")
    if not xml_path.exists() or code not in (0, 1):
        return Line(name, 0, spec["points"], "error", f"crashed (exit code {code}): {_tail(out, 2)}")
    return score_junit(xml_path, name, spec)


def grade_speedup(tree: Path, timeout: float, has_cuda: bool) -> Line:
    spec = GRADING["speedup"]
    if not has_cuda:
        return Line(SPEEDUP, 0, spec["points"], "skipped", "needs a CUDA GPU")
    result = tree / ".speedup.json"
    code, out = _run([sys.executable, "bench.py", "--assignment", "--json", str(result)], tree, timeout)
    if code is None:
        return Line(SPEEDUP, 0, spec["points"], "error", f"timed out after {timeout:.0f} s")
    if not result.exists():
        return Line(SPEEDUP, 0, spec["points"], "error", f"no result: {_tail(out, 2)}")
    r = json.loads(result.read_text())
    if not r["ok"]:
        detail = f"wrong output (rel err {r['rel_err']:.1e})"
        return Line(SPEEDUP, 0, spec["points"], "fail", detail)
    band = max((pts for least, pts in spec["bands"] if r["speedup"] >= least), default=0)
    detail = f"{r['speedup']:.2f}x the fastest full attention ({r['env']})"
    return Line(SPEEDUP, band, spec["points"], "pass" if band else "fail", detail)


def grade(
    submission: Path, timeout: float | None = None, has_cuda: bool | None = None, only: list[str] | None = None
) -> list[Line]:
    """Every report line for ``submission``; never raises on a bad submission.

    ``only``: grade just these items (test names or the speedup line); the
    others are reported as skipped. A GPU grading of everything compiles many
    kernels (minutes); re-grading one item after a fix need not."""
    timeout = timeout or GRADING["timeout_s"]
    if has_cuda is None:
        code, out = _run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"], ROOT, 120)
        has_cuda = code == 0 and out.strip().endswith("True")
    tests = GRADING["tests"]
    all_zero = [Line(n, 0, t["points"], "error", "") for n, t in tests.items()]
    all_zero.append(Line(SPEEDUP, 0, GRADING["speedup"]["points"], "error", ""))

    def failed(why: str) -> list[Line]:
        return [Line("submission", 0, 0, "error", why)] + [
            Line(ln.item, 0, ln.max_points, "error", "not graded: " + why.split(":")[0]) for ln in all_zero
        ]

    if not submission.is_file():
        return failed(f"no such file: {submission}")
    if submission.stat().st_size > MAX_BYTES:
        return failed(f"file too large: {submission.stat().st_size} bytes")
    source = submission.read_text(errors="replace")
    problem = static_problem(source)
    if problem:
        return failed(problem)
    with tempfile.TemporaryDirectory(prefix="swattn-grade-") as tmp:
        tree = Path(tmp)
        for name in PRISTINE:
            src = ROOT / name
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, tree / name)
        (tree / "solution.py").write_text(source)
        code, out = _run([sys.executable, "-c", "import solution"], tree, min(timeout, 300))
        if code != 0:
            return failed("import timed out" if code is None else f"import failed: {_tail(out)}")
        lines = [Line("submission", 0, 0, "pass", "parses and imports")]
        for name, spec in tests.items():
            if only is None or name in only:
                lines.append(grade_test(tree, name, spec, timeout, has_cuda))
            else:
                lines.append(Line(name, 0, spec["points"], "skipped", "not selected"))
        if only is None or SPEEDUP in only:
            lines.append(grade_speedup(tree, timeout, has_cuda))
        else:
            lines.append(Line(SPEEDUP, 0, GRADING["speedup"]["points"], "skipped", "not selected"))
        return lines


def markdown(submission: Path, lines: list[Line]) -> str:
    got = sum(ln.points for ln in lines)
    available = sum(ln.max_points for ln in lines if ln.status != "skipped")
    total = sum(ln.max_points for ln in lines)
    rows = [f"# Grade: {submission}", "", "| item | points | max | status | detail |", "|---|---:|---:|---|---|"]
    rows += [f"| {ln.item} | {ln.points:g} | {ln.max_points:g} | {ln.status} | {ln.detail} |" for ln in lines]
    rows += ["", f"**Total: {got:g} / {total:g}** ({available:g} available on this machine; skipped items need a GPU)"]
    return "\n".join(rows) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("submission", type=Path)
    p.add_argument("--out", type=Path, default=Path("grade-report"))
    p.add_argument("--timeout", type=float, help="seconds per step (default: configs/grading.json)")
    p.add_argument("--only", nargs="+", metavar="ITEM", help=f"grade only these tests (or {SPEEDUP!r})")
    args = p.parse_args()
    lines = grade(args.submission, args.timeout, only=args.only)
    report = markdown(args.submission, lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text(report)
    total = {"points": sum(ln.points for ln in lines), "max_points": sum(ln.max_points for ln in lines)}
    (args.out / "report.json").write_text(
        json.dumps({"submission": str(args.submission), "lines": [asdict(ln) for ln in lines]} | total, indent=2)
    )
    print(report)


if __name__ == "__main__":
    main()
