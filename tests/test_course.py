"""The course kit: the student handout and the grader (CPU; GPU-only cases skip without CUDA).

Runs the real tools, as a student or an instructor would. Each hostile
submission of tests/submissions/hostile/ tries one way to score what it did
not earn (issue 21): the grader must give it nothing for that, name what it
saw, and leave the repository and the report as they were. On a CUDA card the
same submissions go through the GPU steps too. `-m slow` adds the full CPU
grading of the solution (four kernel compiles), the handout's `make ci` on
the starter and on the solution, and the hostile submissions not needed to
cover each mechanism in the quick run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "course"))

import grade  # noqa: E402
import handout  # noqa: E402
import sandbox  # noqa: E402

BROKEN = {k: v for k, v in json.loads((ROOT / "tests/submissions/broken.json").read_text()).items() if k[0] != "_"}
HOSTILE = {k: v for k, v in json.loads((ROOT / "tests/submissions/hostile.json").read_text()).items() if k[0] != "_"}
# Enough to cover every mechanism quickly; the others run with -m slow (CI runs both).
QUICK_HOSTILE = {"forge_results", "import_instructor", "stand_in", "detached_rewriter"}
HAS_CUDA = torch.cuda.is_available()
CPU_ITEMS = [grade.KV, grade.COMPILES, grade.SIGNATURE, grade.LAUNCHER]
MARKER = "swattn-hostile"  # the process name hostile children take (PR_SET_NAME), so that survivors show


def unique_marker() -> str:
    """A process name of this test's own (15 bytes at most): under xdist another test's children,
    alive during their own grading, must not count as this one's survivors."""
    return "swh-" + secrets.token_hex(5)


@pytest.fixture(scope="module")
def starter(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("handout")
    assert handout.write_handout(dest) == ["block range", "masking", "online softmax"]
    return dest


def make(repo: Path, *targets: str, **variables: str) -> subprocess.CompletedProcess:
    """``make TARGET`` in a handout, with this interpreter (its venv is taken as built)."""
    (repo / ".venv").mkdir(exist_ok=True)
    (repo / ".venv" / ".ready").touch()  # newer than pyproject.toml: `setup` has nothing to do
    args = [f"{k}={v}" for k, v in {"PY": sys.executable, **variables}.items()]
    return subprocess.run(["make", "-s", *targets, *args], cwd=repo, capture_output=True, text=True)


def _started(pid: str) -> float:
    """Seconds since boot when ``pid`` started."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rpartition(")")[2].split()[19]) / os.sysconf("SC_CLK_TCK")


def survivors(since: float = 0.0, marker: str = MARKER) -> list[int]:
    """Hostile children (by their process name) started after ``since`` (seconds since boot) and still alive."""
    out = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and (d / "comm").read_text().strip() == marker and _started(d.name) >= since:
                out.append(int(d.name))
        except OSError:
            continue
    return out


def uptime() -> float:
    return float(Path("/proc/uptime").read_text().split()[0])


def fingerprint(root: Path) -> dict:
    """Hashes of the files a submission must not change: the card's files, the configs, the course kit."""
    files = [root / n for n in ("test.py", "solution.py", "reference.py", "bench.py")]
    files += sorted((root / "configs").glob("*.json")) + sorted((root / "course").rglob("*.py"))
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}


def kit_copy(dest: Path) -> Path:
    """The course kit alone, as an instructor's repository: what the CLI tests grade from."""
    dest.mkdir(parents=True)
    for name in ("test.py", "solution.py", "reference.py", "bench.py"):
        shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(ROOT / "configs", dest / "configs")
    shutil.copytree(ROOT / "course", dest / "course", ignore=shutil.ignore_patterns("__pycache__"))
    return dest


# --- the handout: a repository of its own ------------------------------------------------------


def test_handout_hides_the_solution(starter):
    text = (starter / "solution.py").read_text()
    assert "SOLUTION" not in text
    for part in ("block range", "masking", "online softmax"):
        assert f"# TODO(student): {part}" in text
        assert f"not implemented: {part}" in text
    for line in ("first_key = maximum(", "T.reduce_max(s, m_tile", "m_safe[i] = T.if_then_else"):
        assert line not in text, f"solution line left in the handout: {line}"
    for name in handout.COPIED:
        assert (starter / name).read_bytes() == (ROOT / name).read_bytes(), f"{name} changed"
    for name, target in handout.OWN.items():
        assert (starter / target).read_bytes() == (ROOT / "course/handout_files" / name).read_bytes()
    assert os.access(starter / ".ci/run", os.X_OK)
    # Nothing of the project beyond the card: the handout's tests need none of it.
    assert not (starter / "swattn").exists() and not (starter / "tests").exists()


def test_handout_pyproject_matches_the_project():
    """Same pins and lint rules as the repository: the handout is the same project, cut down."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    own = tomllib.loads((ROOT / "course/handout_files/pyproject.toml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert own["project"]["dependencies"][:2] == project["project"]["dependencies"][:2]  # tilelang pin, torch
    assert own["tool"]["ruff"]["lint"]["select"] == project["tool"]["ruff"]["lint"]["select"]
    assert own["tool"]["ruff"]["line-length"] == project["tool"]["ruff"]["line-length"]


def test_handout_make_test_runs_and_fails_clearly(starter):
    """`make test` there: CPU tests run; those that need a TODO fail with 'not implemented', nothing crashes."""
    subprocess.run([sys.executable, "-c", "import solution"], cwd=starter, check=True)
    p = make(starter, "test")
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]  # make's code for a failed recipe
    assert "no tests ran" not in p.stdout and "not found" not in p.stdout + p.stderr
    assert "NotImplementedError: not implemented: block range" in p.stdout
    assert "test_launcher_rejects_bad_input" not in p.stdout.split("short test summary")[-1]  # validation works
    assert " passed" in p.stdout.splitlines()[-1]


def test_handout_lint_passes_and_keeps_the_placeholders(starter):
    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff is not installed here (a dev extra)")
    p = make(starter, "lint")
    assert p.returncode == 0, p.stdout + p.stderr
    # No rule asks to delete the buffers the TODOs will use (the repository's rules would: F841).
    q = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--config", str(ROOT / "pyproject.toml"), "solution.py"],
        cwd=starter,
        capture_output=True,
        text=True,
    )
    assert "F841" in q.stdout, "the starter no longer has placeholders: drop the per-file ignore"


def test_handout_ci_counts_todos_as_expected_failures_only(starter, tmp_path):
    """`make ci`'s option: a test stopped by a TODO is xfail; a wrong answer still fails."""
    wrong = tmp_path / "wrong"
    shutil.copytree(starter, wrong, ignore=shutil.ignore_patterns(".venv", "__pycache__"))
    source = (wrong / "solution.py").read_text()
    stub = 'raise NotImplementedError("not implemented: block range (see the TODO in solution.py)")'
    assert source.count(stub) == 1
    (wrong / "solution.py").write_text(source.replace(stub, "return 0, 0"))
    run = [sys.executable, "-m", "pytest", "test.py", "-q", "-p", "no:cacheprovider", "--todo-xfail", "-k", "kv_tile"]
    p = subprocess.run(run, cwd=starter, capture_output=True, text=True)
    assert p.returncode == 0 and "5 xfailed" in p.stdout, p.stdout[-1500:]
    p = subprocess.run(run, cwd=wrong, capture_output=True, text=True)
    assert p.returncode == 1 and "5 failed" in p.stdout, p.stdout[-1500:]
    ci = (starter / ".ci/run").read_text()
    assert "torch==2.13.0" in ci and "make ci" in ci


@pytest.mark.slow
@pytest.mark.parametrize("which", ["starter", "solution"])
def test_handout_ci_passes(starter, tmp_path, which):
    """.ci/run's checks (`make ci`) pass on the unfilled starter, by design, and on a correct solution."""
    repo = tmp_path / which
    shutil.copytree(starter, repo, ignore=shutil.ignore_patterns(".venv", "__pycache__", "grade-report"))
    if which == "solution":
        shutil.copy2(ROOT / "solution.py", repo / "solution.py")
    p = make(repo, "ci")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert ("xfailed" in p.stdout) == (which == "starter"), p.stdout[-500:]


def test_handout_grades_its_own_solution(starter):
    """`make grade` there: the course's grader, on the student's solution.py, report in grade-report/."""
    p = make(starter, "grade")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    report = json.loads((starter / "grade-report/report.json").read_text())
    lines = {ln["item"]: ln for ln in report["lines"]}
    assert report["max_points"] == 100 and lines[grade.LAUNCHER]["status"] == "pass"
    assert "not implemented" in lines[grade.KV]["detail"]
    assert report["points"] == lines[grade.LAUNCHER]["points"] == 5
    shutil.rmtree(starter / "grade-report")


# --- the grader on honest submissions ---------------------------------------------------------------


def test_grader_gives_the_solution_its_marks_on_what_is_asked():
    """The CPU items that need no compile, alone: full marks; everything else reported as not selected."""
    only = [grade.KV, grade.LAUNCHER, grade.SIGNATURE]
    lines = {ln.item: ln for ln in grade.grade(ROOT / "solution.py", has_cuda=HAS_CUDA, only=only)}
    for item in only:
        assert lines[item].status == "pass" and lines[item].points == lines[item].max_points, lines[item]
    assert lines["integrity"].status == "pass", lines["integrity"]
    others = {ln.status for item, ln in lines.items() if item not in (*only, "submission", "sandbox", "integrity")}
    assert others == {"skipped"}


@pytest.mark.slow
@pytest.mark.gpu  # on a CUDA card (`make test-gpu`): every GPU item and the speedup, through the sandbox
def test_grader_gives_the_solution_full_marks():
    """Every test line full marks; the speedup line passes with the band its measured speedup earns."""
    lines = grade.grade(ROOT / "solution.py", has_cuda=HAS_CUDA)
    for line in lines:
        if line.status == "skipped" or line.item == "sandbox":
            continue
        assert line.status == "pass", line
        if line.item != grade.SPEEDUP:
            assert line.points == line.max_points, line
    assert sum(ln.max_points for ln in lines) == 100
    assert not HAS_CUDA or all(ln.status != "skipped" for ln in lines)


def test_grader_scores_the_handout_without_crashing(starter):
    lines = {ln.item: ln for ln in grade.grade(starter / "solution.py", has_cuda=False)}
    assert lines["submission"].status == "pass"
    assert lines[grade.KV].points == 0
    assert "not implemented" in lines[grade.KV].detail
    assert lines[grade.LAUNCHER].status == "pass"
    assert sum(ln.points for ln in lines.values()) == 5


def broken_submission(name: str, tmp_path: Path) -> Path:
    source = (ROOT / "solution.py").read_text()
    for find, replace in BROKEN[name]["edits"]:
        assert source.count(find) == 1, f"{name}: the mutation no longer applies to solution.py: {find!r}"
        source = source.replace(find, replace)
    path = tmp_path / "solution.py"
    path.write_text(source)
    return path


@pytest.mark.parametrize("name", [pytest.param(n, marks=(pytest.mark.gpu,) * BROKEN[n]["gpu"]) for n in sorted(BROKEN)])
def test_grader_catches_broken_submission(name, tmp_path):
    case = BROKEN[name]
    if case["gpu"] and not HAS_CUDA:
        pytest.skip("this defect shows only on a CUDA GPU")
    # Only the item that must catch it is graded (a full grading compiles many kernels); a short
    # limit makes the hang quick to catch, GPU cases compile kernels and keep the real one.
    item = case["expect"]["item"]
    timeout, only = (None, [item]) if case["gpu"] else (10, None if item == "submission" else [item])
    path = broken_submission(name, tmp_path)
    lines = {ln.item: ln for ln in grade.grade(path, timeout=timeout, has_cuda=HAS_CUDA, only=only)}
    caught = lines[item]
    assert caught.status == case["expect"]["status"], caught
    assert caught.points < caught.max_points or caught.max_points == 0
    assert case["expect"]["detail"] in caught.detail, caught
    if caught.item == "submission":  # nothing else is graded
        assert all(ln.points == 0 for ln in lines.values())


def test_grader_cli_writes_both_reports(tmp_path):
    out = tmp_path / "report"
    path = broken_submission("syntax_error", tmp_path)
    p = subprocess.run(
        [sys.executable, str(ROOT / "course/grade.py"), str(path), "--out", str(out)], capture_output=True, text=True
    )
    assert p.returncode == 0, p.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["points"] == 0 and report["max_points"] == 100
    assert "syntax error" in (out / "report.md").read_text()
    assert "**Total: 0 / 100**" in p.stdout


# --- the grader on hostile submissions ---------------------------------------------------------------


def hostile_submission(name: str, dest: Path, marker: str = MARKER) -> Path:
    base = HOSTILE[name]["base"]
    source = {
        "starter": lambda: handout.strip_solution((ROOT / "solution.py").read_text())[0],
        "solution": lambda: (ROOT / "solution.py").read_text(),
        "none": lambda: "",
    }[base]()
    path = dest / "solution.py"
    hostile = (ROOT / f"tests/submissions/hostile/{name}.py").read_text().replace(MARKER, marker)
    path.write_text(source + "\n\n" + hostile)
    return path


def hostile_params():
    for name in sorted(HOSTILE):
        yield pytest.param(name, marks=() if name in QUICK_HOSTILE else pytest.mark.slow)


@pytest.mark.parametrize("name", hostile_params())
def test_grader_gives_hostile_submissions_nothing_they_did_not_earn(name, tmp_path):
    """CPU grading (CI): what each one earned at most, what it was flagged for, nothing changed, nothing left."""
    check_hostile(name, tmp_path, has_cuda=False)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_grader_gives_hostile_submissions_no_gpu_marks(name, tmp_path):
    """The same on a CUDA card: the GPU steps run, and none of them scores a GPU item it did not earn."""
    lines = check_hostile(name, tmp_path, has_cuda=True)
    assert all(lines[n].points == 0 for n in grade.GPU_ITEMS if n in lines), [lines[n] for n in grade.GPU_ITEMS]


def check_hostile(name: str, tmp_path: Path, has_cuda: bool) -> dict:
    case, expect = HOSTILE[name], HOSTILE[name]["expect"]
    sub_dir = tmp_path / "submission"
    sub_dir.mkdir()
    marker = unique_marker()
    path = hostile_submission(name, sub_dir, marker)
    before, since = fingerprint(ROOT), uptime() - 1
    t0 = time.monotonic()
    if case.get("cli"):
        # Through the CLI, from a copy of the kit (the instructor's repository, to this submission):
        # the report on disk and the copy's files must stay as the grader left them.
        kit = kit_copy(tmp_path / "kit")
        kit_before, out = fingerprint(kit), tmp_path / "report"
        cmd = [sys.executable, str(kit / "course/grade.py"), str(path), "--out", str(out), "--hide", str(ROOT)]
        env = os.environ if has_cuda else {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=kit, env=env)
        assert p.returncode == 0, p.stderr[-2000:]
        written = (out / "report.json").read_bytes()
        report = json.loads(written)
        lines = {ln["item"]: grade.Line(**ln) for ln in report["lines"]}
        assert f"**Total: {report['points']:g} / 100**" in p.stdout
        time.sleep(3)  # a daemon would rewrite the report once the grader is gone
        assert (out / "report.json").read_bytes() == written, "the report changed after the grader exited"
        strong = lines["sandbox"].status == "pass"
        if strong:
            assert fingerprint(kit) == kit_before, "the submission changed the instructor's files"
        elif fingerprint(kit) != kit_before:
            pytest.skip("no namespaces and no root here: the worker runs as the grader's user (report: weak)")
    else:
        graded = grade.grade(path, has_cuda=has_cuda, only=case["only"], timeout=60, memory_gib=case.get("memory_gib"))
        lines = {ln.item: ln for ln in graded}
    elapsed = time.monotonic() - t0
    total = sum(ln.points for ln in lines.values())
    assert total <= expect["max_points"], [ln for ln in lines.values() if ln.points]
    if "flag" in expect:
        integrity = lines["integrity"]
        assert integrity.status == "flagged" and expect["flag"] in integrity.detail, integrity
        assert total == 0
    for item, (status, words) in expect.get("lines", {}).items():
        assert lines[item].status == status and words in lines[item].detail, lines[item]
    assert fingerprint(ROOT) == before, "the repository changed"
    assert not survivors(since, marker), "a process of the submission outlived its grading"
    assert elapsed < 240, f"grading took {elapsed:.0f} s: a child of the submission held it up"
    return lines


# --- the sandbox itself (no torch in the worker: quick) -------------------------------------------------


def run_in_sandbox(tmp_path: Path, code: str, mode: str = "auto", **limits) -> sandbox.Outcome:
    box = sandbox.Sandbox(hide=[ROOT, tmp_path], mode=mode)
    box.probe(tmp_path / "probe")
    tree = tmp_path / "tree"
    tree.mkdir(exist_ok=True)
    (tree / "step.py").write_text(code)
    argv = [box.exe, "-I", "-S", "-B", "{tree}/step.py", "{fd}"]
    return box.start(argv, tree, tmp_path / "step", sandbox.Limits(**({"wall_s": 60} | limits))).finish()


WHAT_IT_SEES = f"""
import json, os, socket, sys
seen = {{"uid": os.getuid(), "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit())}}
seen["repo"] = os.path.exists({str(ROOT / "solution.py")!r})
for name, path in (("tree", "step.py"), ("usr", "/usr/x"), ("repo_w", {str(ROOT / "x")!r})):
    try:
        open(path, "a").close()
        seen[name] = "written"
    except OSError as e:
        seen[name] = e.strerror
try:
    socket.create_connection(("1.1.1.1", 53), timeout=2)
    seen["net"] = "connected"
except OSError:
    seen["net"] = "none"
try:
    import swattn  # noqa
    seen["swattn"] = swattn.__file__
except ImportError:
    seen["swattn"] = None
print(json.dumps(seen))
"""


def test_sandbox_hides_the_repository_and_the_grader(tmp_path):
    outcome = run_in_sandbox(tmp_path, WHAT_IT_SEES)
    assert outcome.returncode == 0, outcome.log_tail
    seen = json.loads(outcome.log_tail.strip().splitlines()[-1])
    assert seen["swattn"] is None  # no site processing: the editable install never loads
    assert seen["tree"] != "written" and seen["repo_w"] != "written"
    if outcome.isolation.get("mode") == "basic":
        pytest.skip(f"no namespaces here ({outcome.isolation}): the rest needs them")
    assert not seen["repo"], "the repository is visible"
    assert seen["usr"] != "written" and seen["net"] == "none"
    assert os.getpid() not in seen["pids"] and len(seen["pids"]) <= 3, seen["pids"]  # its own PID namespace
    if os.geteuid() == 0:
        assert seen["uid"] == 65534 and outcome.isolation["user"] == "nobody"


DAEMON = """
import ctypes, os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        ctypes.CDLL(None).prctl(15, b"MARKER", 0, 0, 0)
        for fd in (0, 1, 2):
            os.close(fd)
        time.sleep(60)
    os._exit(0)
time.sleep(0.5)  # the daemon is on its own now
"""


@pytest.mark.parametrize("mode", ["auto", "basic"])
def test_sandbox_leaves_no_process_behind(tmp_path, mode):
    t0, since = time.monotonic(), uptime() - 1
    marker = unique_marker()
    outcome = run_in_sandbox(tmp_path, DAEMON.replace("MARKER", marker), mode=mode)
    assert outcome.returncode == 0, outcome.log_tail
    assert time.monotonic() - t0 < 30, "the step waited for its daemon"
    time.sleep(0.2)
    assert not survivors(since, marker), f"the daemon outlived its step ({outcome.isolation})"


def test_sandbox_limits_memory(tmp_path):
    code = "blocks = []\nfor _ in range(64):\n    blocks.append(bytearray(64 << 20))\nprint('survived')"
    outcome = run_in_sandbox(tmp_path, code, memory_bytes=1 << 30, wall_s=120)
    assert outcome.oom or "MemoryError" in outcome.log_tail, outcome
    assert "survived" not in outcome.log_tail


def test_sandbox_limits_output_and_time(tmp_path):
    flood = "import os\ntry:\n    for _ in range(256):\n        os.write(1, bytes(1 << 20))\nexcept OSError:\n    pass"
    outcome = run_in_sandbox(tmp_path, flood, file_bytes=8 << 20)
    assert outcome.log_bytes <= 8 << 20
    outcome = run_in_sandbox(tmp_path / "hang", "import time\ntime.sleep(600)", wall_s=3)
    assert outcome.timed_out and outcome.wall_s < 30


def test_sandbox_never_exposes_the_repository_through_its_library_path(monkeypatch):
    """PYTHONPATH=. (the repository) must not come back as a library folder; its venv's site-packages may."""
    monkeypatch.setenv("PYTHONPATH", f"{ROOT}{os.pathsep}{ROOT / 'tools'}")
    box = sandbox.Sandbox(hide=[ROOT])
    exposed = [Path(d) for d in box._exposed()]
    assert ROOT not in exposed and ROOT / "tools" not in exposed
    assert all(p.name in ("site-packages", "dist-packages") for p in exposed if sandbox._under(p, ROOT))


def test_result_channel_reports_garbage():
    import channel

    p = channel.Parser()
    assert p.feed(channel.frame({"type": "begin", "task": "kv"}) + channel.frame({"a": 1}, b"xyz")) == [
        ({"type": "begin", "task": "kv"}, b""),
        ({"a": 1}, b"xyz"),
    ]
    assert p.feed(b"SWG1 junk\n") == [] and "after frame 2" in p.error
    assert p.feed(channel.frame({"later": 1})) == [({"later": 1}, b"")]  # what comes after still arrives
    q = channel.Parser()
    assert q.feed(b"SWG1 10 999999\n" + channel.frame({"x": 1})) == []  # a frame claiming more than comes
    assert not q.error and q.finish() == [({"x": 1}, b"")] and "truncated" in q.error


# --- the grader's own logic: cases, records, GPU scoring (CPU, synthetic outputs) ---------------------


def test_cases_match_test_py():
    """harness/cases.py holds test.py's cases: the graded items check what the tests check."""
    spec = importlib.util.spec_from_file_location("card_tests", ROOT / "test.py")
    card_tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(card_tests)
    cases = grade.cases
    assert cases.shapes(grade.CARD) == card_tests.SHAPES
    assert cases.gpu_cases(grade.CARD, grade.TILES) == card_tests.GPU_CASES
    assert {k: (v[1].__name__, v[2]) for k, v in card_tests.BAD_INPUTS.items()} == cases.BAD_INPUTS
    marks = {m.name: m for m in card_tests.test_kv_tile_range_matches_brute_force.pytestmark}
    assert [tuple(v) for v in marks["parametrize"].args[1]] == cases.KV_BLOCKS
    names = {n for n in dir(card_tests) if n.startswith("test_")}
    assert set(grade.GRADING["tests"]) <= names


def test_grader_refuses_records_that_reach_outside_the_kernel():
    ok = {"target": {"kind": "cuda", "arch": "sm_90a"}, "pass_configs": {"tl.enable_fast_math": True}}
    assert grade.record_problem(ok) is None
    assert grade.record_problem(ok | {"compile_flags": ["-ccbin=/tmp/x"]})
    assert grade.record_problem(ok | {"target_host": "llvm"})
    assert grade.record_problem(ok | {"target": "c"})
    assert grade.record_problem(ok | {"target": {"kind": "cuda", "arch": "sm_90a", "host": "llvm"}})
    assert grade.record_problem(ok | {"pass_configs": {"tl.device_compile_flags": "-Xcompiler x"}})
    assert grade.record_arch(ok) == "sm_90a" and grade.record_arch({"target": "cuda -arch=sm_80"}) == "sm_80"


def _fake_phase_b(seed: int, ref, corrupt: bool):
    """What phase B would send for a correct kernel, computed here from the reference; ``corrupt``:
    one case of each of match, bounds and window made wrong."""
    b = grade.Phase(ready={"cuda": True})

    def put(task, result, **tensors):
        buf = io.BytesIO()
        torch.save(tensors, buf)
        b.results[task] = (result, buf.getvalue(), 0)

    for i, (n, w, _, dtype) in enumerate(grade.cases.gpu_cases(grade.CARD, grade.TILES)):
        q, k, v = grade.make_qkv(n, getattr(torch, dtype), seed + 100 + i)
        out = ref.sliding_window_attention_ref(q, k, v, w).float()
        if corrupt and i == 1:
            out[-1] = float("nan")  # an unwritten row
        put(f"match:{i}", {"torch_err": 1e-3}, out=out)
    for j, (n, _) in enumerate(grade.cases.BOUNDS):
        buf = torch.full((n + 2 * grade.cases.BOUNDS_PAD, 64), 12345.0)
        buf[grade.cases.BOUNDS_PAD : grade.cases.BOUNDS_PAD + n] = 0.5
        if corrupt and j == 0:
            buf[0, 0] = 1.0  # a store before the output
        put(f"bounds:{j}", {}, buf=buf)
    for j, (n, _) in enumerate(grade.cases.WINDOW):
        rows = {}
        for i in grade.cases.window_rows(n):
            base = torch.rand(64)
            outside = base + 1 if corrupt and j == 1 else base.clone()  # a key outside the window counted
            rows[i] = {"base": base, "outside": outside, "value": base + 1, "key": base + 2, "j": min(i + 1, n - 1)}
        put(f"window:{j}", {}, rows=rows)
    b.results["memory"] = ({"peaks": {n: n * 64 * 4 for n in grade.cases.MEMORY_SEQS}}, b"", 0)
    q, k, v = grade.make_qkv(grade.CARD["seq_len"], torch.float16, seed + 7)
    put("card_run", {}, out=ref.sliding_window_attention_ref(q, k, v, grade.CARD["window"]).float())
    q, k, v = grade.make_qkv(grade.CARD["seq_len"], torch.float16, seed + 1)
    out = ref.sliding_window_attention_ref(q, k, v, grade.CARD["window"]).float()
    put("speedup", {"speedup": 3.5, "env": "synthetic"}, out=out)
    return b


@pytest.mark.parametrize("corrupt", [False, True])
def test_grader_scores_gpu_outputs_itself(corrupt, monkeypatch):
    """The GPU items' scoring, on outputs phase B would send (no kernel runs here; fewer shapes
    than test.py's, the scoring being the same for each)."""
    all_cases = grade.cases.gpu_cases(grade.CARD, grade.TILES)
    monkeypatch.setattr(grade.cases, "gpu_cases", lambda card, tiles: [all_cases[0], all_cases[1], all_cases[-1]])
    seed, ref = 1234, grade._load_reference()
    configs = [tuple(c) for c in grade.cases.launch_configs(grade.CARD, grade.TILES)]
    config_key, records = dict.fromkeys(configs, "r0"), {"r0": {}}
    todo = set(grade.GPU_ITEMS)
    tasks = grade._gpu_tasks(todo, config_key, records, seed, has_card=True)
    assert {t["kind"] for t in tasks} == {"match", "bounds", "window", "memory", "card_run", "speedup"}
    b = _fake_phase_b(seed, ref, corrupt)

    def b_out(task):
        res = b.result(task)
        return (res, "") if res is not None else (None, "not run")

    items = {n: t["points"] for n, t in grade.GRADING["tests"].items()} | {grade.SPEEDUP: 15}
    a = grade.Phase(card=b"{}")
    lines = grade._score_gpu(todo, items, a, b, b_out, config_key, records, seed, ref, torch)
    for item, line in lines.items():
        if corrupt and item in (grade.MATCH, grade.BOUNDS, grade.WINDOW):
            assert line.status == "partial" and 0 < line.points < line.max_points, line
        else:
            assert line.status == "pass" and line.points == line.max_points, line
    if corrupt:
        assert "non-finite" in lines[grade.MATCH].detail and "outside the output" in lines[grade.BOUNDS].detail
        assert "outside its window" in lines[grade.WINDOW].detail
        # A launcher that ran no TileLang kernel earns no GPU point, whatever its outputs.
        no_kernel = dict.fromkeys(configs, "the launcher ran no kernel compiled by tilelang.compile")
        lines = grade._score_gpu(todo - {grade.CARD_RUNS}, items, a, b, b_out, no_kernel, records, seed, ref, torch)
        assert all(ln.points == 0 for ln in lines.values()), lines
