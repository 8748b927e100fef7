"""`make grade SUBMISSION=path`: score a submitted solution.py without trusting anything it does.

    python course/grade.py SUBMISSION [--out DIR] [--timeout S] [--only ITEM ...] [--seed N]

The submission never runs in this process, and this process never runs what
the submission sends. Each step runs in the sandbox of course/sandbox.py (its
own session and namespaces, ``nobody`` when the grader is root, read-only
view, the repository and this folder hidden, no network, CPU, memory, file
and wall-clock limits, every process killed when the step ends), from a fresh
temporary tree holding only the harness, the configs and, in phase A, the
submission:

  0. static checks here: it parses, and no plain ``import`` names a grading
     file (cheap and early; the real check is the sandbox's);
  A. ``harness/probe.py`` imports the submission and calls it: the answers of
     ``kv_tile_range`` and of the launcher's input checks, and every PrimFunc
     it gives ``tilelang.compile`` (serialised TIR) or exposes as the card's
     ``sliding_window_attention``. It also reports, the moment it sees them,
     imports of grading or project modules under any name, reads of other
     processes or of the hidden folders, and monkeypatching of torch,
     TileLang or the harness: any of those scores zero for everything;
  B. ``harness/verify.py`` (no submission code at all) checks that each
     recorded function is a TileLang PrimFunc that calls nothing outside the
     kernel, compiles it with TileLang, and on a GPU runs it on inputs drawn
     from this grading's seed, sending raw outputs back.

Scores come only from what this process computes: its own brute force for the
tile ranges, its own float64 reference (on the CPU, from the same seed) for
every output, its own comparison of every row and buffer. Each graded item
mirrors the test of the same name in test.py (harness/cases.py holds the
cases; tests/test_course.py keeps them in step); the speedup line is
``bench.py --assignment``'s measurement, taken in phase B. A step that hangs,
crashes, runs out of memory or floods its output costs only the task it was
in (the step restarts for the rest); the report is written after every
process of every step is gone, into a folder no step could see.

Every value a submission sends is checked, so forging results buys nothing;
what remains possible is listed in course/README.md.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.util
import io
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COURSE = ROOT / "course"
HARNESS = COURSE / "harness"
sys.path[:0] = [str(HARNESS), str(COURSE)]
import cases  # noqa: E402
import sandbox  # noqa: E402

SPEEDUP = "speedup over full attention"  # the report line of the speedup bands
GRADING = json.loads((ROOT / "configs" / "grading.json").read_text())
CARD = json.loads((ROOT / "configs" / "assignment.json").read_text())
TILES = sorted(k for k in json.loads((ROOT / "configs" / "tiles.json").read_text()) if not k.startswith("_"))
FORBIDDEN_IMPORTS = {"reference", "test", "bench", "pytest", "_pytest", "conftest"}
# Modules a submission may not load under any name, by any mechanism (checked in the sandbox):
# the grading files, the project's own op and tools, the grader.
PROJECT_MODULES = FORBIDDEN_IMPORTS | {
    "bench_op",
    "swattn",
    "ops",
    "online",
    "backward",
    "distributed",
    "train",
    "tools",
    "scripts",
    "grade",
    "handout",
    "sandbox",
    "probe",
    "verify",
}
MAX_BYTES = 1 << 20
KV, COMPILES, SIGNATURE, LAUNCHER = (
    "test_kv_tile_range_matches_brute_force",
    "test_compiles",
    "test_card_prim_func_has_the_starter_signature",
    "test_launcher_rejects_bad_input",
)
MATCH, CARD_RUNS, WINDOW, BOUNDS, MEMORY = (
    "test_kernel_matches_reference",
    "test_card_prim_func_runs",
    "test_window_constraint",
    "test_no_writes_outside_the_output",
    "test_memory_grows_linearly",
)
GPU_ITEMS = {MATCH, CARD_RUNS, WINDOW, BOUNDS, MEMORY, SPEEDUP}


@dataclass
class Line:
    item: str
    points: float
    max_points: float
    status: str  # pass | partial | fail | skipped | error (integrity: pass | note | flagged)
    detail: str = ""


class Report(list):
    """The report lines, plus ``meta``: seed, isolation reached, detections."""

    meta: dict


def _tail(text: str, n: int = 1) -> str:
    lines = [s for s in text.strip().splitlines() if s.strip()]
    return " | ".join(lines[-n:])[:300] if lines else ""


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


def _load_reference():
    """The oracle, this repository's reference.py, under a name of its own."""
    spec = importlib.util.spec_from_file_location("swattn_grader_reference", ROOT / "reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --- running a phase ------------------------------------------------------------------------------


@dataclass
class Phase:
    """What one phase's steps sent, and how each task ended."""

    results: dict = field(default_factory=dict)  # task -> (result dict, payload bytes, round)
    failures: dict = field(default_factory=dict)  # task -> why it has no result
    records: dict = field(default_factory=dict)  # (round, rid) -> (options, TIR json bytes)
    card: bytes = b""
    detections: list = field(default_factory=list)  # (kind, what)
    isolation: dict = field(default_factory=dict)
    ready: dict = field(default_factory=dict)
    log: str = ""
    seconds: dict = field(default_factory=dict)  # task -> seconds from begin to end; "step" -> wall of all rounds

    def result(self, task: str) -> dict | None:
        r = self.results.get(task)
        return r[0] if r and isinstance(r[0], dict) else None


class _Round:
    """The frames of one process of a phase, folded into the phase as they arrive."""

    def __init__(self, ph: Phase, remaining: list[str], rnd: int):
        self.ph, self.remaining, self.rnd = ph, remaining, rnd
        self.current, self.began, self.progress, self.seen = None, 0.0, False, 0

    def absorb(self, frames: list) -> None:
        ph = self.ph
        for t, h, p in frames[self.seen :]:
            self.seen += 1
            kind, task = h.get("type"), h.get("task")
            if self.seen == 1 and kind == "sandbox":  # sent by init before the worker existed
                ph.isolation = ph.isolation or h
            elif kind == "begin" and task in self.remaining:
                self.current, self.began, self.progress = task, t, True
            elif kind == "end" and task in self.remaining and task not in ph.results and task not in ph.failures:
                ph.results[task] = (h.get("result"), p, self.rnd)
                ph.seconds[task] = round(t - self.began, 2) if self.current == task else None
                self.current = None if self.current == task else self.current
                self.progress = True
            elif kind == "detect" and h.get("kind") in ("violation", "note"):
                ph.detections.append((h["kind"], str(h.get("what"))[:300]))
            elif kind == "record":
                ph.records[(self.rnd, h.get("rid"))] = (h.get("options"), p)
            elif kind == "card":
                ph.card = p
            elif kind == "ready":
                ph.ready = h
            elif kind == "sandbox":
                ph.detections.append(("violation", "sent a frame posing as the sandbox's"))


def run_phase(box, work: Path, label: str, tree: Path, script: str, tasks: list[str], inputs: dict, limits: dict):
    """Run ``script`` over ``tasks`` in the sandbox, restarting after a task that hangs or crashes.

    A task gets ``limits["timeout"]`` seconds from its "begin" frame; the
    process gets ``limits["startup"]`` seconds to send its first one."""
    ph, remaining, rnd = Phase(), list(tasks), 0
    timeout, startup = limits["timeout"], limits["startup"]
    while remaining and rnd <= len(tasks):
        name = f"input-{label}{rnd}.json"
        (tree / "_harness" / name).write_text(json.dumps(inputs | {"tasks": remaining}))
        argv = [box.exe, "-I", "-S", "-B", f"{{tree}}/_harness/{script}", f"{{tree}}/_harness/{name}", "{fd}"]
        wall = startup + timeout * (len(remaining) + 1)
        run = box.start(argv, tree, work / f"{label}{rnd}", sandbox.Limits(wall, limits["memory"], limits["file"]))
        r, why = _Round(ph, remaining, rnd), ""
        while run.poll():
            r.absorb(run.frames())
            if r.current and time.monotonic() - r.began > timeout:
                run.stop()
                ph.failures[r.current] = f"timed out after {timeout:g} s"
                r.current = None
                break
            if not r.progress and run.elapsed() > startup:
                run.stop()
                why = f"did not start a task within {startup:g} s"
                break
            time.sleep(0.05)
        outcome = run.finish()
        r.absorb(outcome.frames)
        ph.seconds["step"] = round(ph.seconds.get("step", 0) + outcome.wall_s, 2)
        ph.log = outcome.log_tail
        if outcome.channel_error:
            ph.detections.append(("violation", outcome.channel_error))
        if outcome.log_bytes >= limits["file"]:
            ph.detections.append(("note", f"flooded its output: cut at {limits['file'] >> 20} MiB"))
        tail = _tail(outcome.log_tail, 2)[:160]
        if r.current and r.current not in ph.results:
            ph.failures[r.current] = f"ended before finishing ({outcome.why()}): {tail}".strip(": ")
        if "import" in tasks and "import" not in ph.results:
            ph.failures.setdefault("import", why or f"the step ended ({outcome.why()}): {tail}")
        remaining = [t for t in remaining if t not in ph.results and t not in ph.failures]
        if "import" in tasks and ("import" in ph.failures or "error" in (ph.result("import") or {})):
            break  # nothing else can run without the submission
        if remaining and not r.progress:
            for t in remaining:
                ph.failures[t] = why or f"the step ended ({outcome.why()}) before this task: {tail}"
            break
        rnd += 1
    for t in remaining:
        ph.failures.setdefault(t, "not run: the step kept failing")
    return ph


def run_groups(box, work: Path, label: str, tree: Path, script: str, groups: list[list[str]], inputs: dict, limits):
    """``run_phase`` over independent groups of tasks, several processes at a time where cores allow.

    Phase B compiles one kernel per group; on a many-core grader the compiles overlap."""
    from concurrent.futures import ThreadPoolExecutor

    workers = max(1, min(len(groups), (os.cpu_count() or 1) // 4, 8))
    with ThreadPoolExecutor(workers) as ex:
        futures = [
            ex.submit(run_phase, box, work, f"{label}{i}-", tree, script, g, inputs, limits)
            for i, g in enumerate(groups)
            if g
        ]
        phases = [f.result() for f in futures]
    merged = Phase()
    for ph in phases:
        merged.results.update(ph.results)
        merged.failures.update(ph.failures)
        merged.detections += ph.detections
        merged.isolation = merged.isolation or ph.isolation
        merged.ready = merged.ready or ph.ready
        for k, v in ph.seconds.items():
            merged.seconds[k] = round((merged.seconds.get(k) or 0) + (v or 0), 2)
    return merged


# --- validating what phase A recorded ---------------------------------------------------------------

TARGET_ARCH = re.compile(r"^sm_\d{2,3}[a-z]?$")
PASS_CONFIG_KEY = re.compile(r"^(tl|tir)\.[A-Za-z0-9_.]+$")


def record_problem(options) -> str | None:
    """Why a recorded tilelang.compile call cannot be compiled by the grader, or None.

    Phase B compiles with the recorded target and pass configs only: nvcc flags,
    a host target or string-valued configs could run anything at compile time."""
    if not isinstance(options, dict):
        return "malformed record"
    for key in ("compile_flags", "target_host"):
        if options.get(key):
            return f"{key} is not allowed"
    target = options.get("target")
    if isinstance(target, dict):
        if (
            set(target) - {"kind", "arch"}
            or target.get("kind") != "cuda"
            or not TARGET_ARCH.match(str(target.get("arch", "sm_90a")))
        ):
            return f"unsupported target {target!r}"
    elif not (isinstance(target, str) and re.match(r"^cuda( -arch=sm_\d{2,3}[a-z]?)?$", target)):
        return f"unsupported target {target!r}"
    configs = options.get("pass_configs") or {}
    if not isinstance(configs, dict):
        return "pass_configs must be a dict"
    for k, v in configs.items():
        if not PASS_CONFIG_KEY.match(k) or not isinstance(v, (bool, int)):
            return f"pass config {k!r}={v!r} is not allowed (tl.*/tir.* booleans and integers only)"
    return None


def record_arch(options: dict) -> str:
    target = options.get("target")
    if isinstance(target, dict):
        return str(target.get("arch", ""))
    m = re.search(r"-arch=(\S+)", target or "")
    return m[1] if m else ""


# --- scoring ------------------------------------------------------------------------------------


def share(name: str, points: float, outcomes: list[tuple[bool, str]], what: str = "cases") -> Line:
    """A line scoring the share of passing cases; ``outcomes``: (passed, why not)."""
    passed = sum(ok for ok, _ in outcomes)
    run = len(outcomes)
    if run == 0:
        return Line(name, 0, points, "error", f"no {what} ran")
    first = next((why for ok, why in outcomes if not ok), "")
    status = "pass" if passed == run else ("partial" if passed else "fail")
    return Line(name, round(points * passed / run, 2), points, status, f"{passed}/{run} {what} pass. {first}".strip())


def score_kv(result: dict | None, groups: list[dict], ref) -> list[tuple[bool, str]]:
    got = {g.get("name"): g for g in (result or {}).get("groups", []) if isinstance(g, dict)}
    masks: dict = {}
    outcomes = []
    for group in groups:
        g = got.get(group["name"], {})
        values = g.get("values") if isinstance(g.get("values"), list) else []
        if g.get("error"):
            outcomes.append((False, str(g["error"])[:300]))
            continue
        if len(values) != len(group["cases"]):
            outcomes.append((False, f"{group['name']}: {len(values)} answers for {len(group['cases'])} questions"))
            continue
        bad = ""
        for (qt, seq, w, bm, bn), val in zip(group["cases"], values, strict=True):
            if not (isinstance(val, list) and len(val) == 2 and all(type(x) is int for x in val)):
                bad = f"{group['name']}: answer {str(val)[:40]} is not two integers"
                break
            if not 0 <= val[0] <= val[1] <= seq // bn + 1:  # before range(): a huge answer must not cost memory
                bad = f"{group['name']}: seq_len {seq}, window {w}, query tile {qt}: [{val[0]}, {val[1]}) out of range"
                break
            if (seq, w) not in masks:
                masks[(seq, w)] = ref.window_mask(seq, w)
            rows = masks[(seq, w)][qt * bm : (qt + 1) * bm]
            needed = set((rows.any(0).nonzero().flatten() // bn).tolist())
            if set(range(*val)) != needed:
                bad = (
                    f"{group['name']}: seq_len {seq}, window {w}, query tile {qt}: "
                    f"got [{val[0]}, {val[1]}), needs tiles {sorted(needed)}"
                )
                break
        outcomes.append((not bad, bad))
    return outcomes


def score_launcher(result: dict | None) -> list[tuple[bool, str]]:
    got = (result or {}).get("cases", {}) if isinstance((result or {}).get("cases"), dict) else {}
    outcomes = []
    for name, (error, words) in cases.BAD_INPUTS.items():
        r = got.get(name)
        if not isinstance(r, dict):
            outcomes.append((False, f"{name}: no answer"))
        elif r.get("returned"):
            outcomes.append((False, f"{name}: no exception (expected {error})"))
        elif f"builtins.{error}" not in (r.get("mro") or []):
            outcomes.append((False, f"{name}: raised {(r.get('mro') or ['?'])[0]}, expected {error}"))
        elif not re.search(words, str(r.get("message", ""))):
            outcomes.append((False, f"{name}: message {str(r.get('message'))[:80]!r} does not mention {words!r}"))
        else:
            outcomes.append((True, ""))
    return outcomes


def rel_err(out, expected) -> float:
    out, expected = out.double(), expected.double()
    return ((out - expected).norm() / expected.norm()).item()


def make_qkv(seq_len: int, dtype, seed: int):
    """verify.make_qkv on the CPU: the same draws from the same seed."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(seq_len, cases.HEAD_DIM, generator=g).to(dtype=dtype) for _ in range(3)]


def load_tensors(payload: bytes) -> dict:
    import torch

    obj = torch.load(io.BytesIO(payload), weights_only=True)
    return obj if isinstance(obj, dict) else {}


# --- the grading ----------------------------------------------------------------------------------


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _copy_configs(dest: Path) -> None:
    dest.mkdir(parents=True)
    for p in (ROOT / "configs").glob("*.json"):
        shutil.copy2(p, dest / p.name)


def _harness(tree: Path, script: str) -> None:
    (tree / "_harness").mkdir(parents=True)
    for name in ("channel.py", "cases.py", script):
        shutil.copy2(HARNESS / name, tree / "_harness" / name)


def grade(submission: Path, timeout: float | None = None, has_cuda: bool | None = None, only=None, **kw) -> Report:
    """Every report line for ``submission``; never raises on a bad submission.

    ``only``: grade just these items (test names or the speedup line); the
    others are reported as skipped. Keywords: ``seed``, the inputs' seed
    (random by default; the report names it); ``memory_gib``, a step's memory
    limit; ``hide``, more folders no step may see; ``isolation``, "auto" (the
    strongest this machine allows) or "basic"."""
    try:
        return _grade(Path(submission), timeout, has_cuda, only, **kw)
    except Exception as e:  # a bug of the grader's own: still a report, saying so, and no points
        import traceback

        items = [*GRADING["tests"], SPEEDUP]
        points = {**{n: t["points"] for n, t in GRADING["tests"].items()}, SPEEDUP: GRADING["speedup"]["points"]}
        report = Report([Line("grader", 0, 0, "error", f"internal error: {type(e).__name__}: {e}"[:300])])
        report.extend(Line(n, 0, points[n], "error", "not graded: internal error") for n in items)
        report.meta = {"traceback": traceback.format_exc()[-4000:]}
        return report


def _grade(
    submission: Path,
    timeout: float | None,
    has_cuda: bool | None,
    only: list[str] | None,
    *,
    seed: int | None = None,
    memory_gib: float | None = None,
    hide: tuple = (),
    isolation: str = "auto",
) -> Report:
    import torch

    timeout = float(timeout or GRADING["timeout_s"])
    seed = secrets.randbelow(1 << 30) if seed is None else int(seed)
    has_cuda = _has_cuda() if has_cuda is None else has_cuda
    tests = GRADING["tests"]
    items = {**{n: t["points"] for n, t in tests.items()}, SPEEDUP: GRADING["speedup"]["points"]}
    gpu = {n for n, t in tests.items() if t["gpu"]} | {SPEEDUP}
    wanted = {n for n in items if only is None or n in only}
    report = Report()
    report.meta = {"seed": seed, "isolation": {}, "detections": [], "has_cuda": has_cuda}

    def failed(why: str) -> Report:
        report[:] = [Line("submission", 0, 0, "error", why)]
        report.extend(Line(n, 0, p, "error", "not graded: " + why.split(":")[0]) for n, p in items.items())
        return report

    if not submission.is_file():
        return failed(f"no such file: {submission}")
    if submission.stat().st_size > MAX_BYTES:
        return failed(f"file too large: {submission.stat().st_size} bytes")
    source = submission.read_text(errors="replace")
    problem = static_problem(source)
    if problem:
        return failed(problem)

    ref = _load_reference()
    limits = {
        "timeout": timeout,
        "startup": float(GRADING.get("startup_s", 300)),
        "memory": int((memory_gib or GRADING.get("memory_gib", 6)) * (1 << 30)),
        "file": int(GRADING.get("output_limit_mib", 64)) << 20,
    }
    secret = [ROOT, submission.resolve().parent, *map(Path, hide)]
    if Path.home() != Path("/"):
        secret.append(Path.home())
    box = sandbox.Sandbox(hide=secret, cuda=has_cuda, mode=isolation)
    lines: dict[str, Line] = {}

    def skip(name: str, why: str) -> None:
        lines[name] = Line(name, 0, items[name], "skipped", why)

    for name in items:
        if name not in wanted:
            skip(name, "not selected")
        elif name in gpu and not has_cuda:
            skip(name, "needs a CUDA GPU")
    todo = {n for n in items if n not in lines}
    run_gpu = bool(todo & GPU_ITEMS)

    with tempfile.TemporaryDirectory(prefix="swattn-grade-", ignore_cleanup_errors=True) as tmp:
        work = Path(tmp)
        # --- phase A: the submission, alone with the harness and the configs
        box.probe(work)
        tree_a = work / "a"
        _harness(tree_a, "probe.py")
        _copy_configs(tree_a / "configs")
        (tree_a / "solution.py").write_text(source)
        tasks_a = ["import"]
        tasks_a += ["kv"] * (KV in todo) + ["launcher"] * (LAUNCHER in todo) + ["compile"] * (COMPILES in todo)
        tasks_a += ["card"] * bool(todo & {SIGNATURE, CARD_RUNS}) + ["launch"] * run_gpu
        groups = cases.kv_groups(seed)
        compile_keys = [
            [CARD["seq_len"], CARD["head_dim"], CARD["window"], tile, CARD["dtype"], arch]
            for tile in TILES
            for arch in cases.ARCHS
        ]
        launch = [list(c) for c in cases.launch_configs(CARD, TILES)]
        inputs_a = {
            "site": box.site_dirs,
            "kv": groups,
            "compile_keys": compile_keys,
            "launch_configs": launch,
            "forbidden": sorted(PROJECT_MODULES),
            "secret": [str(p) for p in box.hide],
            "runtime": box._exposed(),
        }
        a = run_phase(box, work, "a", tree_a, "probe.py", tasks_a, inputs_a, limits)
        report.meta["isolation"] = a.isolation
        report.meta["detections"] = [f"{k}: {w}" for k, w in a.detections]
        violations = [w for k, w in a.detections if k == "violation"]
        notes = [w for k, w in a.detections if k == "note"]
        head = [_sandbox_line(a.isolation, box.fallback)]
        if violations:
            failed("integrity: " + "; ".join(violations)[:600])
            report[1:1] = [*head, Line("integrity", 0, 0, "flagged", "; ".join(violations + notes)[:1500])]
            return report
        integrity = Line("integrity", 0, 0, "note" if notes else "pass", "; ".join(notes)[:1500] or "nothing detected")
        imp = a.result("import")
        if imp is None or imp.get("error"):
            why = a.failures.get("import") or (imp or {}).get("error", "")
            failed("import timed out" if why.startswith("timed out") else f"import failed: {_tail(str(why))}")
            report[1:1] = [*head, integrity]
            return report

        def a_fail(task: str) -> str:
            return a.failures.get(task) or (a.result(task) or {}).get("error") or "no result"

        for name, task in ((KV, "kv"), (LAUNCHER, "launcher")):
            if name not in todo:
                continue
            r = a.result(task)
            if r is None or r.get("error"):
                lines[name] = Line(name, 0, items[name], "error", a_fail(task))
            elif name == KV:
                lines[name] = share(name, items[name], score_kv(r, groups, ref))
            else:
                lines[name] = share(name, items[name], score_launcher(r))

        # --- what phase B compiles: each distinct recorded function once
        tree_b = work / "b"
        _harness(tree_b, "verify.py")
        shutil.copy2(ROOT / "reference.py", tree_b / "reference.py")
        (tree_b / "records").mkdir()
        keys: dict = {}  # (round, rid) -> phase-B record key, or "rejected: ..."
        records_b: dict = {}
        by_hash: dict = {}
        for (rnd, rid), (options, ir) in a.records.items():
            problem = record_problem(options)
            if problem:
                keys[(rnd, rid)] = f"rejected: {problem}"
                continue
            digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode() + ir).hexdigest()
            if digest not in by_hash:
                key = f"r{len(by_hash)}"
                by_hash[digest] = key
                (tree_b / "records" / f"{key}.json").write_bytes(ir)
                records_b[key] = {
                    "file": f"records/{key}.json",
                    "target": options.get("target"),
                    "pass_configs": options.get("pass_configs"),
                    "arch": record_arch(options),
                }
            keys[(rnd, rid)] = by_hash[digest]
        if a.card:
            (tree_b / "records" / "card.json").write_bytes(a.card)

        def rec_of(task: str, rid) -> str:
            """The phase-B key of a rid that phase A's ``task`` returned ("" or "rejected: ..." if none)."""
            rnd = a.results[task][2]
            return keys.get((rnd, rid), "") if rid is not None else ""

        tasks_b: list[dict] = []
        compile_cases = []  # (tile, arch, key or why not)
        if COMPILES in todo:
            r = a.result("compile")
            for i, key in enumerate(compile_keys):
                c = (r or {}).get("cases", [None] * len(compile_keys))
                c = c[i] if i < len(c) and isinstance(c[i], dict) else None
                tile, arch = key[3], key[5]
                if c is None:
                    compile_cases.append((tile, arch, f"no result: {a_fail('compile')}"))
                elif c.get("error"):
                    compile_cases.append((tile, arch, str(c["error"])))
                elif c.get("rid") is None:
                    why = f"compile_kernel returned a {c.get('type')}, not a kernel compiled by tilelang.compile"
                    compile_cases.append((tile, arch, why))
                elif not c.get("cached"):
                    compile_cases.append((tile, arch, "compile_kernel is not cached: a second call compiled again"))
                else:
                    k = rec_of("compile", c["rid"])
                    if k in records_b and records_b[k]["arch"] != arch:
                        k = f"compiled for {records_b[k]['arch'] or 'an unnamed arch'}, not {arch}"
                    compile_cases.append((tile, arch, k))
            for k in dict.fromkeys(k for _, _, k in compile_cases if k in records_b):
                tasks_b.append({"name": f"compile:{k}", "kind": "compile", "rid": k})
        if SIGNATURE in todo and a.card:
            tasks_b.append({"name": "signature", "kind": "signature"})

        config_key = {}  # launch config -> phase-B key or why not
        if run_gpu:
            r = a.result("launch")
            got = {tuple(c["config"]): c for c in (r or {}).get("configs", []) if isinstance(c, dict) and "config" in c}
            for cfg in map(tuple, launch):
                c = got.get(cfg)
                if c is None:
                    config_key[cfg] = f"no result: {a_fail('launch')}"
                elif c.get("error"):
                    config_key[cfg] = str(c["error"])
                elif c.get("rid") is None:
                    config_key[cfg] = "the launcher ran no kernel compiled by tilelang.compile"
                else:
                    config_key[cfg] = rec_of("launch", c["rid"]) or "unknown record"
            tasks_b += _gpu_tasks(todo, config_key, records_b, seed, bool(a.card))

        b = Phase()
        if tasks_b:
            inputs_b = {
                "site": box.site_dirs,
                "specs": {t["name"]: t for t in tasks_b},
                "records": records_b,
                "card": "records/card.json",
                "card_shape": CARD,
            }
            # One group per kernel (its compile and every run of it), so that on a many-core
            # grader the compiles overlap; the timing runs last, alone on the GPU.
            batches: dict = {}
            for t in tasks_b:
                if t["kind"] != "speedup":
                    batches.setdefault(t.get("rid", t["kind"]), []).append(t["name"])
            timing = [[t["name"]] for t in tasks_b if t["kind"] == "speedup"]
            if (os.cpu_count() or 1) < 8:  # too few cores to overlap: one process, one import of torch
                batches = {"all": [n for g in batches.values() for n in g] + [n for g in timing for n in g]}
                timing = []
            b = run_groups(box, work, "b", tree_b, "verify.py", list(batches.values()), inputs_b, limits)
            if timing:
                t = run_phase(box, work, "speedup", tree_b, "verify.py", timing[0], inputs_b, limits)
                b.results.update(t.results)
                b.failures.update(t.failures)
        rejected = sorted({k.removeprefix("rejected: ") for k in keys.values() if k.startswith("rejected")})
        rejected += sorted(
            {
                str(r.get("error")).removeprefix("rejected: ")
                for r, _, _ in b.results.values()
                if isinstance(r, dict) and r.get("rejected")
            }
        )
        if rejected:
            notes = [*notes, *(f"refused to compile: {w}" for w in rejected)]
            integrity = Line("integrity", 0, 0, "note", "; ".join(notes)[:1500])
            report.meta["detections"] += [f"note: refused to compile: {w}" for w in rejected]
        report.meta["phase_b"] = {"ready": b.ready, "isolation": b.isolation}
        report.meta["seconds"] = {"a": a.seconds, "b": b.seconds}

        def b_out(task: str) -> tuple[dict | None, str]:
            res = b.result(task)
            if res is None:
                return None, b.failures.get(task, "not run")
            if res.get("error"):
                return None, str(res["error"])
            return res, ""

        if COMPILES in todo:
            outcomes = []
            for tile, arch, k in compile_cases:
                label = f"{tile}/{arch}"
                if k not in records_b:
                    outcomes.append((False, f"{label}: {k}"))
                    continue
                res, why = b_out(f"compile:{k}")
                if res is None:
                    outcomes.append((False, f"{label}: {why}"))
                elif not res.get("has_name"):
                    outcomes.append((False, f"{label}: the kernel source does not name sliding_window_attention"))
                else:
                    outcomes.append((True, ""))
            lines[COMPILES] = share(COMPILES, items[COMPILES], outcomes)
        if SIGNATURE in todo:
            lines[SIGNATURE] = _score_signature(a, b, b_out, items[SIGNATURE])
        if run_gpu:
            lines.update(_score_gpu(todo, items, a, b, b_out, config_key, records_b, seed, ref, torch))

    report[:] = [Line("submission", 0, 0, "pass", "parses and imports"), *head, integrity]
    report.extend(lines[n] for n in items)
    return report


def _sandbox_line(iso: dict, fallback: str = "") -> Line:
    if not iso:
        return Line("sandbox", 0, 0, "error", "no report from the sandbox")
    detail = f"namespaces: {iso.get('namespaces')}; runs as {iso.get('user')}; memory limit: {iso.get('memory_limit')}"
    for note in ([fallback] if fallback else []) + list(iso.get("notes") or []):
        detail += "; " + note
    strong = iso.get("namespaces") == "namespaces" and iso.get("user") in ("nobody", "root without capabilities")
    return Line("sandbox", 0, 0, "pass" if strong else "weak", detail)


def _score_signature(a: Phase, b: Phase, b_out, points: float) -> Line:
    if not a.card:
        r = a.result("card")
        return Line(SIGNATURE, 0, points, "fail", (r or {}).get("error") or a.failures.get("card", "no PrimFunc"))
    res, why = b_out("signature")
    if res is None:
        return Line(SIGNATURE, 0, points, "fail" if why.startswith("rejected") else "error", why)
    shape = [CARD["seq_len"], CARD["head_dim"]]
    want = [
        ["Q", shape, CARD["dtype"]],
        ["K", shape, CARD["dtype"]],
        ["V", shape, CARD["dtype"]],
        ["O", shape, "float32"],
    ]
    got = res.get("params")
    if got == want:
        return Line(SIGNATURE, points, points, "pass", "1/1 cases pass.")
    return Line(SIGNATURE, 0, points, "fail", f"0/1 cases pass. assert parameters {got} == {want}"[:300])


def _gpu_tasks(todo: set, config_key: dict, records_b: dict, seed: int, has_card: bool) -> list[dict]:
    tasks = []

    def ok(cfg):
        return config_key.get(cfg) in records_b

    if MATCH in todo:
        for i, (n, w, tile, dtype) in enumerate(cases.gpu_cases(CARD, TILES)):
            if ok((n, w, tile, dtype)):
                k = config_key[(n, w, tile, dtype)]
                spec = {"kind": "match", "rid": k, "seq": n, "window": w, "dtype": dtype, "seed": seed + 100 + i}
                tasks.append({"name": f"match:{i}", **spec})
    if BOUNDS in todo:
        for j, (n, w) in enumerate(cases.BOUNDS):
            if ok((n, w, "assignment", "float16")):
                k = config_key[(n, w, "assignment", "float16")]
                tasks.append(
                    {"name": f"bounds:{j}", "kind": "bounds", "rid": k, "seq": n, "window": w, "seed": seed + n + 1}
                )
    if WINDOW in todo:
        for j, (n, w) in enumerate(cases.WINDOW):
            if ok((n, w, "assignment", "float16")):
                k = config_key[(n, w, "assignment", "float16")]
                tasks.append(
                    {"name": f"window:{j}", "kind": "window", "rid": k, "seq": n, "window": w, "seed": seed + n + w}
                )
    if MEMORY in todo:
        cfgs = [(n, CARD["window"], "assignment", "float16") for n in cases.MEMORY_SEQS]
        if all(ok(c) for c in cfgs):
            rids = {str(c[0]): config_key[c] for c in cfgs}
            tasks.append({"name": "memory", "kind": "memory", "rids": rids, "seed": seed})
    if CARD_RUNS in todo and has_card:
        tasks.append({"name": "card_run", "kind": "card_run", "seed": seed + 7})
    if SPEEDUP in todo:
        swa = (CARD["seq_len"], CARD["window"], "assignment", CARD["dtype"])
        full = (CARD["seq_len"], CARD["seq_len"], "assignment", CARD["dtype"])
        if ok(swa) and ok(full):
            tasks.append(
                {
                    "name": "speedup",
                    "kind": "speedup",
                    "rid": config_key[swa],
                    "full_rid": config_key[full],
                    "seed": seed + 1,
                }
            )
    return tasks


def _score_gpu(todo, items, a, b, b_out, config_key, records_b, seed, ref, torch) -> dict:
    lines = {}
    if b.ready and not b.ready.get("cuda"):
        why = "CUDA is not available inside the sandbox (are the /dev/nvidia* devices open to its user?)"
        return {n: Line(n, 0, items[n], "error", why) for n in GPU_ITEMS & todo}

    def kernel_problem(cfg) -> str:
        k = config_key.get(cfg, "not launched")
        return "" if k in records_b else k

    if MATCH in todo:
        outcomes = []
        for i, (n, w, tile, dtype) in enumerate(cases.gpu_cases(CARD, TILES)):
            label = f"{n}-{w}-{tile}-{dtype}"
            problem = kernel_problem((n, w, tile, dtype))
            res, why = (None, problem) if problem else b_out(f"match:{i}")
            if res is None:
                outcomes.append((False, f"{label}: {why}"))
                continue
            out = load_tensors(b.results[f"match:{i}"][1]).get("out")
            q, k, v = make_qkv(n, getattr(torch, dtype), seed + 100 + i)
            outcomes.append(_check_match(label, out, ref.sliding_window_attention_ref(q, k, v, w), res, dtype, torch))
        lines[MATCH] = share(MATCH, items[MATCH], outcomes)
    if BOUNDS in todo:
        outcomes = []
        for j, (n, w) in enumerate(cases.BOUNDS):
            problem = kernel_problem((n, w, "assignment", "float16"))
            res, why = (None, problem) if problem else b_out(f"bounds:{j}")
            if res is None:
                outcomes.append((False, f"{n}-{w}: {why}"))
                continue
            buf = load_tensors(b.results[f"bounds:{j}"][1]).get("buf")
            pad = cases.BOUNDS_PAD
            if not isinstance(buf, torch.Tensor) or tuple(buf.shape) != (n + 2 * pad, cases.HEAD_DIM):
                outcomes.append((False, f"{n}-{w}: no output buffer"))
            elif not ((buf[:pad] == 12345.0).all() and (buf[pad + n :] == 12345.0).all()):
                outcomes.append((False, f"{n}-{w}: wrote outside the output"))
            elif not torch.isfinite(buf[pad : pad + n]).all():
                outcomes.append((False, f"{n}-{w}: non-finite output"))
            else:
                outcomes.append((True, ""))
        lines[BOUNDS] = share(BOUNDS, items[BOUNDS], outcomes)
    if WINDOW in todo:
        outcomes = []
        for j, (n, w) in enumerate(cases.WINDOW):
            problem = kernel_problem((n, w, "assignment", "float16"))
            res, why = (None, problem) if problem else b_out(f"window:{j}")
            if res is None:
                outcomes.append((False, f"{n}-{w}: {why}"))
                continue
            rows = load_tensors(b.results[f"window:{j}"][1]).get("rows", {})
            outcomes.append(_check_window(n, w, rows, torch))
        lines[WINDOW] = share(WINDOW, items[WINDOW], outcomes)
    if MEMORY in todo:
        cfgs = [(n, CARD["window"], "assignment", "float16") for n in cases.MEMORY_SEQS]
        problem = next((kernel_problem(c) for c in cfgs if kernel_problem(c)), "")
        res, why = (None, problem) if problem else b_out("memory")
        if res is None:
            lines[MEMORY] = Line(MEMORY, 0, items[MEMORY], "fail", why)
        else:
            peaks = {int(s): int(p) for s, p in (res.get("peaks") or {}).items()}
            n0, n2 = cases.MEMORY_SEQS[0], cases.MEMORY_SEQS[-1]
            bad = [s for s in cases.MEMORY_SEQS if peaks.get(s, 1 << 62) > ref.tiled_memory_bytes(s, cases.HEAD_DIM)]
            if bad or not peaks.get(n0) or peaks[n2] / peaks[n0] > (n2 / n0) * 1.05:
                lines[MEMORY] = Line(MEMORY, 0, items[MEMORY], "fail", f"0/1 cases pass. peaks {peaks}")
            else:
                lines[MEMORY] = Line(MEMORY, items[MEMORY], items[MEMORY], "pass", "1/1 cases pass.")
    if CARD_RUNS in todo:
        res, why = b_out("card_run") if a.card else (None, (a.result("card") or {}).get("error") or "no PrimFunc")
        if res is None:
            lines[CARD_RUNS] = Line(CARD_RUNS, 0, items[CARD_RUNS], "fail", why)
        else:
            out = load_tensors(b.results["card_run"][1]).get("out")
            q, k, v = make_qkv(CARD["seq_len"], torch.float16, seed + 7)
            err = rel_err(out, ref.sliding_window_attention_ref(q, k, v, CARD["window"])) if out is not None else 1.0
            ok = out is not None and err < 3e-3
            lines[CARD_RUNS] = Line(
                CARD_RUNS, items[CARD_RUNS] * ok, items[CARD_RUNS], "pass" if ok else "fail", f"rel err {err:.1e}"
            )
    if SPEEDUP in todo:
        lines[SPEEDUP] = _score_speedup(b, b_out, kernel_problem, seed, ref, torch)
    return lines


def _check_match(label, out, expected, res, dtype, torch) -> tuple[bool, str]:
    if not isinstance(out, torch.Tensor) or out.shape != expected.shape:
        return False, f"{label}: no output of the right shape"
    if not torch.isfinite(out).all():
        return False, f"{label}: non-finite output: NaN/inf, or elements left unwritten (poisoned with NaN)"
    err, torch_err = rel_err(out, expected), float(res.get("torch_err", 0.0))
    if err > 2 * torch_err + 1e-4:
        return False, f"{label}: rel err {err:.2e} vs PyTorch's own {torch_err:.2e}"
    if err >= (3e-3 if dtype == "float16" else 1e-2):
        return False, f"{label}: rel err {err:.2e}"
    try:
        torch.testing.assert_close(out, expected.float(), rtol=1e-2, atol=1e-2)
    except AssertionError as e:
        return False, f"{label}: {_tail(str(e))}"
    return True, ""


def _check_window(n, w, rows, torch) -> tuple[bool, str]:
    for i in cases.window_rows(n):
        r = rows.get(i)
        if not isinstance(r, dict):
            return False, f"{n}-{w}: row {i} missing"
        if not torch.equal(r["outside"], r["base"]):
            return False, f"{n}-{w}: row {i} saw a key outside its window"
        if torch.equal(r["value"], r["base"]):
            return False, f"{n}-{w}: row {i} ignored value {r['j']} inside its window"
        if r["j"] != i and torch.equal(r["key"], r["base"]):
            return False, f"{n}-{w}: row {i} ignored key {r['j']} inside its window"
    return True, ""


def _score_speedup(b, b_out, kernel_problem, seed, ref, torch) -> Line:
    spec = GRADING["speedup"]
    for cfg in (
        (CARD["seq_len"], CARD["window"], "assignment", CARD["dtype"]),
        (CARD["seq_len"], CARD["seq_len"], "assignment", CARD["dtype"]),
    ):
        if kernel_problem(cfg):
            return Line(SPEEDUP, 0, spec["points"], "error", kernel_problem(cfg))
    res, why = b_out("speedup")
    if res is None:
        return Line(SPEEDUP, 0, spec["points"], "error", why)
    out = load_tensors(b.results["speedup"][1]).get("out")
    q, k, v = make_qkv(CARD["seq_len"], torch.float16, seed + 1)
    err = rel_err(out, ref.sliding_window_attention_ref(q, k, v, CARD["window"])) if out is not None else float("inf")
    if out is None or not torch.isfinite(out).all() or not err < 3e-3:
        return Line(SPEEDUP, 0, spec["points"], "fail", f"wrong output (rel err {err:.1e})")
    speedup = float(res.get("speedup", 0))
    band = max((pts for least, pts in spec["bands"] if speedup >= least), default=0)
    detail = f"{speedup:.2f}x the fastest full attention ({res.get('env')})"
    return Line(SPEEDUP, band, spec["points"], "pass" if band else "fail", detail)


def markdown(submission: Path, lines: list[Line], meta: dict | None = None) -> str:
    got = sum(ln.points for ln in lines)
    available = sum(ln.max_points for ln in lines if ln.status != "skipped")
    total = sum(ln.max_points for ln in lines)
    rows = [f"# Grade: {submission}", "", "| item | points | max | status | detail |", "|---|---:|---:|---|---|"]
    rows += [f"| {ln.item} | {ln.points:g} | {ln.max_points:g} | {ln.status} | {ln.detail} |" for ln in lines]
    rows += ["", f"**Total: {got:g} / {total:g}** ({available:g} available on this machine; skipped items need a GPU)"]
    if meta and "seed" in meta:
        rows += ["", f"Inputs drawn from seed {meta['seed']} (`--seed {meta['seed']}` reproduces them)."]
    return "\n".join(rows) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("submission", type=Path)
    p.add_argument("--out", type=Path, default=Path("grade-report"))
    p.add_argument("--timeout", type=float, help="seconds per task (default: configs/grading.json)")
    p.add_argument("--only", nargs="+", metavar="ITEM", help=f"grade only these tests (or {SPEEDUP!r})")
    p.add_argument("--seed", type=int, help="seed of the inputs (default: random, named in the report)")
    p.add_argument("--memory-gib", type=float, help="memory limit of a step (default: configs/grading.json)")
    p.add_argument("--isolation", choices=["auto", "basic"], default="auto", help=argparse.SUPPRESS)
    p.add_argument("--hide", type=Path, action="append", default=[], help=argparse.SUPPRESS)  # tests: more folders
    args = p.parse_args()
    out = args.out.resolve()
    lines = grade(
        args.submission,
        args.timeout,
        only=args.only,
        seed=args.seed,
        memory_gib=args.memory_gib,
        hide=(out, *args.hide),
        isolation=args.isolation,
    )
    # Every step has ended and every process of it is gone: only now does the report folder exist.
    report = markdown(args.submission, lines, lines.meta)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(report)
    total = {"points": sum(ln.points for ln in lines), "max_points": sum(ln.max_points for ln in lines)}
    meta = {k: lines.meta.get(k) for k in ("seed", "isolation", "detections")}
    (out / "report.json").write_text(
        json.dumps({"submission": str(args.submission), "lines": [asdict(ln) for ln in lines]} | total | meta, indent=2)
    )
    print(report)


if __name__ == "__main__":
    main()
