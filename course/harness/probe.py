"""Phase A of a grading: import the submission, call it, and record what it builds.

Runs in the sandbox, in the same process as the submission, so nothing it
sends is trusted: the grader checks every value itself and never runs what it
receives here. What it sends:

  * answers of the pure-Python parts (``kv_tile_range``, the launcher's input
    checks), which the grader compares with its own brute force;
  * every PrimFunc the submission hands to ``tilelang.compile`` (replaced by a
    recorder before the submission is imported), serialised with
    ``tvm.ir.save_json``, and the card's ``sliding_window_attention``: phase B
    compiles and runs these itself, in a process the submission never enters;
  * what it saw the submission do: an import-time meta-path sentinel, an
    audit hook and a ``sys.modules`` scan catch imports of the grading files
    or the project under any name and through any mechanism; a snapshot of
    torch, TileLang, builtins and this harness catches monkeypatching.
    Detections go out the moment they happen, so a submission cannot take
    them back.

    python -I -S probe.py INPUT_JSON FD
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TREE = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import builtins  # noqa: E402
import importlib  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import operator  # noqa: E402
import re  # noqa: E402
import sysconfig  # noqa: E402
import traceback  # noqa: E402
import types  # noqa: E402

import cases  # noqa: E402
import channel  # noqa: E402

CFG = json.loads(open(sys.argv[1]).read())
CHAN = channel.Writer(int(sys.argv[2]))
sys.path[:0] = [TREE]
sys.path += CFG["site"]

import tilelang  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import tvm  # noqa: E402  (the copy inside tilelang, importable once tilelang is)

FORBIDDEN = set(CFG["forbidden"])
SECRET = [os.path.normpath(p) for p in CFG["secret"]]
RUNTIME = [os.path.realpath(p) for p in CFG["runtime"]]  # the interpreter and libraries: readable wherever they live
SOLUTION_FILE = os.path.join(TREE, "solution.py")
GRADING_FILES = {"reference.py", "test.py", "bench.py", "grade.py", "conftest.py", "handout.py", "solution.py"}
SPAWN_EVENTS = {"subprocess.Popen", "os.system", "os.posix_spawn", "os.spawn", "os.exec", "os.fork", "os.forkpty"}
ARMED = False
SEEN: set = set()


def emit(kind: str, what: str) -> None:
    """One detection, sent now: ``violation`` (scores zero) or ``note`` (reported)."""
    if (kind, what) in SEEN or len(SEEN) > 200:
        return
    SEEN.add((kind, what))
    CHAN.send({"type": "detect", "kind": kind, "what": what})


def forbidden(name: str) -> bool:
    top = name.partition(".")[0]
    return top in FORBIDDEN or top.startswith("__editable__")


class Sentinel:
    """First on sys.meta_path: sees every import that is not cached yet, however it was asked for."""

    def find_spec(self, name, path=None, target=None):
        if ARMED and forbidden(name):
            emit("violation", f"imported {name!r} (a grading or project module)")
        return None


SENTINEL = Sentinel()


def check_path(path, mode="r") -> None:
    if isinstance(path, int):
        return
    p = os.path.normpath(os.path.join(os.getcwd(), os.fsdecode(path)))
    writing = isinstance(mode, str) and any(c in mode for c in "wax+")
    writing = writing or (isinstance(mode, int) and mode & (os.O_WRONLY | os.O_RDWR))
    if not writing and any(p == r or p.startswith(r + "/") for r in RUNTIME):
        return
    for s in SECRET:
        if p == s or p.startswith(s + "/"):
            emit("violation", f"opened {p} (the grader's or the repository's files)")
            return
    m = re.match(r"^/proc/(\d+)(/|$)", p)
    if m and int(m[1]) != os.getpid() and not os.path.exists(f"/proc/self/task/{m[1]}"):
        emit("violation", f"read {p} (another process)")
        return
    base = os.path.basename(p)
    if base in GRADING_FILES and p != SOLUTION_FILE:
        emit("violation", f"opened {p} (a grading file)")
    elif writing:
        emit("note", f"tried to write {p}")


def audit(event: str, args: tuple) -> None:
    if not ARMED:
        return
    try:
        if event == "import" and forbidden(str(args[0])):
            emit("violation", f"imported {args[0]!r} (a grading or project module)")
        elif event == "open":
            check_path(args[0], args[1] if args[1] is not None else (args[2] if len(args) > 2 else "r"))
        elif event in SPAWN_EVENTS:
            emit("note", f"started a process ({event} {str(args[:2])[:120]})")
        elif event == "socket.connect":
            emit("note", f"network connection attempt {str(args[1:])[:80]}")
        elif event in ("os.kill", "os.killpg"):
            emit("note", f"sent a signal ({event} {args})")
    except Exception:  # an audit hook must never break what it audits
        pass


# --- the recorder that stands in for tilelang.compile -------------------------------------------

REAL_COMPILE = tilelang.compile
COMPILE_SIGNATURE = inspect.signature(REAL_COMPILE)
PRIM_FUNC = tvm.tirx.PrimFunc if hasattr(tvm, "tirx") else tvm.tir.PrimFunc
RECORDS: list = []
CALLS: list = []


def jsonable(x):
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return {"unsupported": type(x).__name__, "repr": repr(x)[:200]}


class RecordedKernel:
    """What ``tilelang.compile`` returns during phase A: the grader compiles the recorded function later."""

    def __init__(self, rid: int):
        self.rid = rid

    def __call__(self, *args, **kwargs):
        CALLS.append(self.rid)

    def get_kernel_source(self, *args, **kwargs) -> str:
        return f"// sliding_window_attention: compiled by the grader (record {self.rid})"


def recording_compile(*args, **kwargs):
    bound = COMPILE_SIGNATURE.bind(*args, **kwargs).arguments
    func = bound.get("func")
    if not isinstance(func, PRIM_FUNC):
        raise TypeError(f"tilelang.compile: expected a TileLang PrimFunc, got {type(func).__name__}")
    rid = len(RECORDS)
    options = {k: jsonable(v) for k, v in bound.items() if k != "func"}
    RECORDS.append(options)
    CHAN.send({"type": "record", "rid": rid, "options": options}, tvm.ir.save_json(func).encode())
    return RecordedKernel(rid)


# --- integrity ----------------------------------------------------------------------------------


def watched() -> dict:
    return {
        "torch": torch,
        "torch.Tensor": torch.Tensor,
        "torch.testing": torch.testing,
        "torch.nn.functional": F,
        "tilelang": tilelang,
        "tilelang.jit": sys.modules["tilelang.jit"],
        "builtins": builtins,
        "sys": sys,
        "importlib": importlib,
        "json": json,
        "os": os,
        "harness": sys.modules[__name__],
        "channel": channel,
    }


def snapshot() -> dict:
    snap = {}
    for mod, obj in watched().items():
        for key, value in list(vars(obj).items()):
            if callable(value) and not isinstance(value, types.ModuleType):
                snap[(mod, key)] = value
    return snap


def allowed_roots() -> list[str]:
    roots = {HERE, sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"], *CFG["site"], *RUNTIME}
    return [os.path.realpath(r) for r in roots if r]


def check_integrity(before: dict, solution) -> None:
    for (mod, key), value in before.items():
        if vars(watched()[mod]).get(key) is not value:
            emit("violation", f"replaced {mod}.{key}")
    if not sys.meta_path or sys.meta_path[0] is not SENTINEL:
        emit("violation", "changed the import system (sys.meta_path)")
    roots = allowed_roots()
    for name, mod in list(sys.modules.items()):
        if forbidden(name):
            emit("violation", f"module {name!r} is loaded (a grading or project module)")
        path = getattr(mod, "__file__", None)
        if not isinstance(path, str) or not os.path.isabs(path):
            continue  # built-in, namespace, or torch's placeholder names (torch.ops: "_ops.py")
        real = os.path.realpath(path)
        if real == os.path.realpath(SOLUTION_FILE):
            if name != "solution" or mod is not solution:
                emit("violation", f"loaded the submission a second time as {name!r}")
        elif not any(real == r or real.startswith(r + "/") for r in roots):
            emit("violation", f"loaded module {name!r} from {real} (outside the submission and the libraries)")


# --- the tasks ----------------------------------------------------------------------------------


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:500]


def task_kv(sol) -> dict:
    out = []
    for group in CFG["kv"]:
        values, error = [], ""
        for qt, seq_len, window, bm, bn in group["cases"]:
            try:
                lo, hi = sol.kv_tile_range(qt, seq_len, window, bm, bn)
                values.append([operator.index(lo), operator.index(hi)])  # ints, as range() needs
            except BaseException as e:  # noqa: BLE001  (a student's error, reported as such)
                error = error_text(e)
                break
        out.append({"name": group["name"], "values": values, "error": error})
    return {"groups": out}


def _good(device="cpu"):
    return [torch.randn(128, 64, dtype=torch.float16, device=device) for _ in range(3)]


BAD_INPUT_ARGS = {  # test.py's BAD_INPUTS, argument makers only (expectations: cases.BAD_INPUTS)
    "not a tensor": lambda q, k, v: ([q.tolist(), k, v], {}),
    "3-D": lambda q, k, v: ([q[None], k[None], v[None]], {}),
    "shape mismatch": lambda q, k, v: ([q, k[:64], v], {}),
    "head_dim 48": lambda q, k, v: ([q[:, :48], k[:, :48], v[:, :48]], {}),
    "empty": lambda q, k, v: ([q[:0], k[:0], v[:0]], {}),
    "float32": lambda q, k, v: ([q.float(), k.float(), v.float()], {}),
    "mixed dtypes": lambda q, k, v: ([q, k.bfloat16(), v], {}),
    "non-contiguous": lambda q, k, v: ([q.t().contiguous().t(), k, v], {}),
    "negative window": lambda q, k, v: ([q, k, v], {"window": -1}),
    "float window": lambda q, k, v: ([q, k, v], {"window": 2.5}),
    "bool window": lambda q, k, v: ([q, k, v], {"window": True}),
    "bad out": lambda q, k, v: ([q, k, v], {"out": torch.empty(128, 64)[:, :32]}),
    "cpu tensors": lambda q, k, v: ([q, k, v], {}),
}


def task_launcher(sol) -> dict:
    out = {}
    for name in cases.BAD_INPUTS:
        args, kwargs = BAD_INPUT_ARGS[name](*_good())
        try:
            sol.sliding_window_attention_forward(*args, **kwargs)
            out[name] = {"returned": True}
        except BaseException as e:  # noqa: BLE001
            mro = [f"{c.__module__}.{c.__qualname__}" for c in type(e).__mro__]
            out[name] = {"mro": mro, "message": str(e)[:500]}
    return {"cases": out}


def task_compile(sol) -> dict:
    out = []
    for key in CFG["compile_keys"]:
        try:
            k1 = sol.compile_kernel(*key)
            k2 = sol.compile_kernel(*key)
            rid = k1.rid if type(k1) is RecordedKernel else None
            out.append({"key": key, "rid": rid, "type": type(k1).__name__, "cached": k1 is k2})
        except BaseException as e:  # noqa: BLE001
            out.append({"key": key, "error": error_text(e)})
    return {"cases": out}


def task_card(sol) -> dict:
    try:
        func = sol.sliding_window_attention
    except BaseException as e:  # noqa: BLE001
        return {"error": error_text(e)}
    if not isinstance(func, PRIM_FUNC):
        return {"error": f"sliding_window_attention is not a TileLang PrimFunc: it is a {type(func).__name__}"}
    CHAN.send({"type": "card"}, tvm.ir.save_json(func).encode())
    return {"ok": True}


def task_launch(sol) -> dict:
    out = []
    for seq_len, window, tile, dtype in CFG["launch_configs"]:
        try:
            q, k, v = (
                torch.zeros(seq_len, cases.HEAD_DIM, dtype=getattr(torch, dtype), device="cuda") for _ in range(3)
            )
            o = torch.empty(seq_len, cases.HEAD_DIM, dtype=torch.float32, device="cuda")
            CALLS.clear()
            sol.sliding_window_attention_forward(q, k, v, window, tile=tile, out=o)
            out.append({"config": [seq_len, window, tile, dtype], "rid": CALLS[-1] if CALLS else None})
        except BaseException as e:  # noqa: BLE001
            out.append({"config": [seq_len, window, tile, dtype], "error": error_text(e)})
    return {"configs": out}


TASKS = {"kv": task_kv, "launcher": task_launcher, "compile": task_compile, "card": task_card, "launch": task_launch}


def main() -> None:
    global ARMED
    tilelang.compile = recording_compile
    sys.modules["tilelang.jit"].compile = recording_compile
    sys.meta_path.insert(0, SENTINEL)
    sys.addaudithook(audit)
    before = snapshot()
    ARMED = True
    CHAN.send({"type": "begin", "task": "import"})
    try:
        solution = importlib.import_module("solution")
    except BaseException as e:  # noqa: BLE001
        tb = traceback.format_exception(e)
        CHAN.send(
            {"type": "end", "task": "import", "result": {"error": error_text(e), "traceback": "".join(tb)[-3000:]}}
        )
        check_integrity(before, None)
        return
    check_integrity(before, solution)
    CHAN.send({"type": "end", "task": "import", "result": {"ok": True}})
    for name in CFG["tasks"]:
        if name not in TASKS:
            continue
        CHAN.send({"type": "begin", "task": name})
        try:
            result = TASKS[name](solution)
        except BaseException as e:  # noqa: BLE001
            result = {"error": error_text(e)}
        check_integrity(before, solution)
        CHAN.send({"type": "end", "task": name, "result": result})


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: atexit handlers a submission registered do not run
