"""Phase B of a grading: compile and run what the submission built, without the submission.

No code of the submission runs in this process. It loads the TIR that phase A
recorded (``tvm.ir.load_json``), refuses anything that is not a TileLang
PrimFunc or that reaches outside the kernel (calls to external or packed
functions, imported source, host or target attributes), compiles it with
TileLang itself, and runs it on inputs drawn from the grading's seed. It sends
raw outputs; the grader recomputes the reference and scores them in its own
process. A task that fails on the GPU ends the process (a CUDA error poisons
the context), and the grader restarts it for the remaining tasks.

    python -I -S verify.py INPUT_JSON FD
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TREE = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import cases  # noqa: E402
import channel  # noqa: E402

CFG = json.loads(open(sys.argv[1]).read())
CHAN = channel.Writer(int(sys.argv[2]))
sys.path[:0] = [TREE]
sys.path += CFG["site"]

import tilelang  # noqa: E402
import torch  # noqa: E402
import tvm  # noqa: E402

import reference as ref  # noqa: E402  (the grader's copy of the oracle, beside this file)

tir = tvm.tirx if hasattr(tvm, "tirx") else tvm.tir
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# Names that reach outside a kernel: external C symbols, packed functions, inline source.
DENY_OPS = re.compile(r"extern|packed|llvm|asm|import|dlopen|system", re.I)
DENY_KEYS = re.compile(r"import|source|extern|link|packed|llvm|host|target|compile", re.I)


class Rejected(Exception):
    pass


def lint(func) -> list[str]:
    problems = []
    for key in dict(func.attrs or {}):
        if key != "global_symbol" and DENY_KEYS.search(str(key)):
            problems.append(f"function attribute {key!r}")

    def visit(node):
        if isinstance(node, tir.Call):
            op = node.op
            if not isinstance(op, tvm.ir.Op):
                problems.append(f"calls {op}")
            elif DENY_OPS.search(op.name):
                arg = node.args[0] if len(node.args) else None
                problems.append(f"calls {op.name}" + (f" {arg.value!r}" if isinstance(arg, tir.StringImm) else ""))
        if isinstance(node, tir.AttrStmt) and DENY_KEYS.search(str(node.attr_key)):
            problems.append(f"attribute {node.attr_key!r}")
        for key in dict(getattr(node, "annotations", None) or {}):
            if DENY_KEYS.search(str(key)):
                problems.append(f"annotation {key!r}")

    tir.stmt_functor.post_order_visit(func.body, visit)
    return sorted(set(problems))


def load_func(path: str):
    try:
        func = tvm.ir.load_json(open(os.path.join(TREE, path)).read())
    except Exception as e:
        raise Rejected(f"not loadable TIR: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(func, tir.PrimFunc):
        raise Rejected(f"not a TileLang PrimFunc: {type(func).__name__}")
    problems = lint(func)
    if problems:
        raise Rejected("reaches outside the kernel: " + "; ".join(problems[:5]))
    return func


KERNELS: dict = {}


def kernel(rid):
    """The recorded function ``rid``, compiled here by TileLang with the recorded target and pass configs."""
    rid = str(rid)
    if rid not in KERNELS:
        rec = CFG["records"][rid]
        func = load_func(rec["file"])
        KERNELS[rid] = tilelang.compile(func, target=rec["target"], pass_configs=rec["pass_configs"] or None)
    return KERNELS[rid]


def make_qkv(seq_len: int, dtype, seed: int, device="cuda"):
    """test.py's make_qkv: the grader draws the same inputs on its CPU from the same seed."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(seq_len, cases.HEAD_DIM, generator=g).to(dtype=dtype, device=device) for _ in range(3)]


def tensors(**kw) -> bytes:
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}, buf)
    return buf.getvalue()


# --- tasks: each returns (result, payload bytes) -----------------------------------------------


def t_compile(t):
    t0 = time.perf_counter()
    k = kernel(t["rid"])
    return {
        "ok": True,
        "has_name": "sliding_window_attention" in k.get_kernel_source(),
        "seconds": time.perf_counter() - t0,
    }, b""


def t_signature(t):
    func = load_func(CFG["card"])
    params = []
    for p in func.params:
        b = func.buffer_map.get(p)
        params.append(None if b is None else [b.name, [int(x) for x in b.shape], str(b.dtype)])
    return {"params": params}, b""


def t_match(t):
    q, k, v = make_qkv(t["seq"], DTYPES[t["dtype"]], t["seed"])
    out = torch.full((t["seq"], cases.HEAD_DIM), float("nan"), device="cuda")  # poison: unwritten -> NaN
    kernel(t["rid"])(q, k, v, out)
    torch.cuda.synchronize()
    expected = ref.sliding_window_attention_ref(q, k, v, t["window"])
    torch_err = ref.rel_err(ref.sliding_window_attention_ref(q, k, v, t["window"], dtype=q.dtype), expected)
    return {"torch_err": torch_err}, tensors(out=out)


def t_bounds(t):
    seq, pad = t["seq"], cases.BOUNDS_PAD
    q, k, v = make_qkv(seq, torch.float16, t["seed"])
    buf = torch.full((seq + 2 * pad, cases.HEAD_DIM), 12345.0, device="cuda")
    kernel(t["rid"])(q, k, v, buf[pad : pad + seq])
    torch.cuda.synchronize()
    return {}, tensors(buf=buf)


def t_window(t):
    seq, window = t["seq"], t["window"]
    q, k, v = make_qkv(seq, torch.float16, t["seed"])
    run_kernel = kernel(t["rid"])

    def run(k, v):
        out = torch.empty(seq, cases.HEAD_DIM, device="cuda")
        run_kernel(q, k, v, out)
        return out

    base = run(k, v)
    g = torch.Generator(device="cpu").manual_seed(0)
    rows = {}
    for i in cases.window_rows(seq):
        outside = (torch.arange(seq, device="cuda") - i).abs() > window
        k2, v2 = k.clone(), v.clone()
        k2[outside] = torch.randn(int(outside.sum()), k.shape[1], generator=g).to(k2)
        v2[outside] = torch.randn(int(outside.sum()), v.shape[1], generator=g).to(v2)
        j = min(i + window, seq - 1)
        v3 = v.clone()
        v3[j] = -v3[j] * 3
        k3 = k.clone()
        k3[j] = -k3[j] * 3
        rows[i] = {"base": base[i], "outside": run(k2, v2)[i], "value": run(k, v3)[i], "key": run(k3, v)[i], "j": j}
    torch.cuda.synchronize()
    return {}, tensors(rows=rows)


def t_memory(t):
    peaks = {}
    for seq, rid in t["rids"].items():
        seq = int(seq)
        q, k, v = make_qkv(seq, torch.float16, t["seed"])
        run_kernel = kernel(rid)
        run_kernel(q, k, v, torch.empty(seq, cases.HEAD_DIM, device="cuda"))  # compile and load outside the measurement
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run_kernel(q, k, v, torch.empty(seq, cases.HEAD_DIM, device="cuda"))  # the output is part of the call
        torch.cuda.synchronize()
        peaks[seq] = torch.cuda.max_memory_allocated() - before
    return {"peaks": peaks}, b""


def cuda_arch() -> str:
    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}{'a' if major == 9 else ''}"


def t_card_run(t):
    """test_card_prim_func_runs: the card's PrimFunc, compiled as the test does (no pass configs)."""
    func = load_func(CFG["card"])
    k = tilelang.compile(func, target={"kind": "cuda", "arch": cuda_arch()})
    q, k_, v = make_qkv(CFG["card_shape"]["seq_len"], torch.float16, t["seed"])
    out = torch.full_like(q, float("nan"), dtype=torch.float32)
    k(q, k_, v, out)
    torch.cuda.synchronize()
    return {}, tensors(out=out)


def kernel_us(calls: list, reps: int = 200) -> float:
    """bench.py's kernel_us: median GPU time of one call, from a CUDA graph of ``reps`` calls."""
    from triton.testing import do_bench

    for c in calls:
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for r in range(reps):
            calls[r % len(calls)]()
    return do_bench(graph.replay, warmup=50, rep=300, return_mode="median") * 1e3 / reps


def t_speedup(t):
    """bench.py --assignment: the card kernel, checked on fresh inputs, then timed against full attention."""
    import torch.nn.functional as F

    seq = CFG["card_shape"]["seq_len"]
    swa, full = kernel(t["rid"]), kernel(t["full_rid"])
    q, k, v = make_qkv(seq, torch.float16, t["seed"])
    out = torch.full((seq, cases.HEAD_DIM), float("nan"), device="cuda")
    swa(q, k, v, out)
    torch.cuda.synchronize()
    per_set = 3 * seq * cases.HEAD_DIM * 2
    n = max(2, min(64, (256 << 20) // per_set))  # bench.py: rotate inputs over more than the L2
    sets = [[torch.randn(seq, cases.HEAD_DIM, device="cuda", dtype=torch.float16) for _ in range(3)] for _ in range(n)]
    outs = [torch.empty(seq, cases.HEAD_DIM, device="cuda") for _ in range(n)]

    def sdpa(q, k, v, o):
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q[None, None], k[None, None], v[None, None])[0, 0]

    times = {
        name: kernel_us([lambda s=s, o=o, fn=fn: fn(*s, o) for s, o in zip(sets, outs, strict=True)])
        for name, fn in (("tilelang SWA (assignment)", swa), ("tilelang full (W>=S)", full), ("SDPA flash full", sdpa))
    }
    speedup = min(times["tilelang full (W>=S)"], times["SDPA flash full"]) / times["tilelang SWA (assignment)"]
    env = f"{torch.cuda.get_device_name()} | torch {torch.__version__} | tilelang {tilelang.__version__}"
    return {"kernel_us": times, "speedup": speedup, "env": env}, tensors(out=out)


TASKS = {
    "compile": t_compile,
    "signature": t_signature,
    "match": t_match,
    "bounds": t_bounds,
    "window": t_window,
    "memory": t_memory,
    "card_run": t_card_run,
    "speedup": t_speedup,
}


def main() -> None:
    CHAN.send({"type": "ready", "cuda": torch.cuda.is_available()})
    for name in CFG["tasks"]:
        t = CFG["specs"][name]
        CHAN.send({"type": "begin", "task": t["name"]})
        try:
            result, payload = TASKS[t["kind"]](t)
        except Rejected as e:
            result, payload = {"error": f"rejected: {e}", "rejected": True}, b""
        except Exception as e:
            CHAN.send({"type": "end", "task": t["name"], "result": {"error": f"{type(e).__name__}: {str(e)[:400]}"}})
            if torch.cuda.is_initialized():
                os._exit(3)  # a CUDA error may poison the context: the grader restarts for the rest
            continue
        CHAN.send({"type": "end", "task": t["name"], "result": result}, payload)


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)
