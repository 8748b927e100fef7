"""What the scripts share: the benchmark shapes, compiling every variant in worker
processes first (so that TileLang's disk cache serves the timing process), the
sweeps' check-and-time step, the host-time probes' timer and profiler, and the
decode tools' rotating-window calls and per-kernel profile."""

from __future__ import annotations

import functools
import json
import multiprocessing as mp
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# The decode tools' shapes, one query a sequence: (batch, q_heads, kv_heads, D, W, cache).
DECODE_SHAPES = [
    (1, 32, 8, 128, 4096, 131072),
    (1, 32, 8, 128, 128, 131072),
    (8, 32, 8, 128, 4096, 32768),
    (64, 32, 8, 128, 4096, 16384),
    (64, 32, 8, 128, 128, 16384),
    (1, 32, 8, 64, 4096, 131072),
    (64, 32, 8, 64, 4096, 16384),
]


def bench_shapes(indices: list[int]) -> list[dict]:
    """Shapes of configs/bench_op.json by index."""
    shapes = json.loads((ROOT / "configs/bench_op.json").read_text())["shapes"]
    return [shapes[i] for i in indices]


def compile_all(compile_one, jobs: list) -> None:
    """Run ``compile_one(job)`` for every job in spawned workers (it returns the
    job, or (job, error) for a variant that does not build), printing each."""
    with mp.get_context("spawn").Pool(min(len(jobs), 14)) as pool:
        for done in pool.imap_unordered(compile_one, jobs):
            print("compiled", done, flush=True)


def random_qkv(sh: dict, dtype):
    """Fresh q (batch, seq, q_heads, dim) and k, v (batch, seq, kv_heads, dim) on CUDA."""
    import torch

    b, s, d = sh["batch"], sh["seq"], sh["head_dim"]
    q = torch.randn(b, s, sh["q_heads"], d, device="cuda", dtype=dtype)
    k, v = (torch.randn(b, s, sh["kv_heads"], d, device="cuda", dtype=dtype) for _ in range(2))
    return q, k, v


def shape_label(sh: dict) -> str:
    """The table's first two columns for a bench shape."""
    return f"{sh['batch']},{sh['q_heads']},{sh['kv_heads']},{sh['seq']},{sh['head_dim']} | ({sh['left']},{sh['right']})"


def time_us(call, warmup: int = 50) -> float:
    """Median of triton's do_bench, in microseconds."""
    from triton.testing import do_bench

    return do_bench(call, warmup=warmup, rep=200, return_mode="median") * 1e3


def check_and_time(call, poisoned: list, outputs: list, base: list | None, warmup: int = 50):
    """One variant of a sweep: fill ``poisoned`` with NaN (unwritten elements then
    fail the comparison), run ``call``, compare ``outputs`` with ``base`` (the first
    variant's copies; None makes these the base) and time ``call``.
    Returns (us, max relative error over the outputs, base)."""
    import reference as ref

    for t in poisoned:
        t.fill_(float("nan"))
    call()
    got = [t.clone() for t in outputs]
    base = got if base is None else base
    err = max(ref.rel_err(x, y) for x, y in zip(got, base, strict=True))
    return time_us(call, warmup), err, base


def decode_calls(b, hq, hk, d, w, cache, **kw):
    """(attention calls, append + attention calls) of one decode step (one query, bf16,
    window_size (w - 1, 0), causal), one per rotating window: disjoint windows of the
    cache whose K/V together exceed L2. ``kw`` goes to flash_attn_with_kvcache."""
    import torch

    from swattn.decode import flash_attn_with_kvcache

    g = torch.Generator(device="cuda").manual_seed(0)
    kc = torch.randn(b, cache, hk, d, device="cuda", dtype=torch.bfloat16, generator=g)
    vc = torch.randn(kc.shape, device="cuda", dtype=torch.bfloat16, generator=g)
    q = torch.randn(b, 1, hq, d, device="cuda", dtype=torch.bfloat16, generator=g)
    kn, vn = (torch.randn(b, 1, hk, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    lens = [torch.full((b,), cache - r * w, dtype=torch.int32, device="cuda") for r in range(min(32, cache // w))]
    kw = dict(window_size=(w - 1, 0), causal=True, **kw)
    attend = [functools.partial(flash_attn_with_kvcache, q, kc, vc, cache_seqlens=s, **kw) for s in lens]
    step = [functools.partial(flash_attn_with_kvcache, q, kc, vc, kn, vn, s - 1, **kw) for s in lens]
    return attend, step


def kernel_profile(fn, label: str) -> None:
    """Each kernel of one call: its name and mean GPU time over 50 calls (torch.profiler)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / e.count) for e in prof.key_averages() if e.device_time_total > 0]
    print(f"  {label}: " + "; ".join(f"{name[:40]} {t:.1f} us" for name, t in rows), flush=True)


DECODE_TIMES = ("us (graph of R)", "replay us", "+append us", "+append replay")


def decode_table(cols: list[str], aligns: str) -> list[str]:
    """A decode table's two header lines: shape columns, then ``cols`` (aligned by ``aligns``,
    one of '<' or '>' each), then ``decode_times``' four."""
    head = ["B", "Hq/Hkv", "D", "W", "cache", *cols, *DECODE_TIMES]
    rule = ["---:", "---", "---:", "---:", "---:", *("---" if a == "<" else "---:" for a in aligns), *["---:"] * 4]
    return ["| " + " | ".join(head) + " |", "|" + "|".join(rule) + "|"]


def decode_row(shape: tuple, cells: list[str], times: list[float]) -> str:
    """One row of ``decode_table``: shape (batch, q_heads, kv_heads, D, W, cache), cells, times."""
    b, hq, hk, d, w, cache = shape
    return (
        "| "
        + " | ".join([str(b), f"{hq}/{hk}", str(d), str(w), str(cache), *cells] + [f"{x:.1f}" for x in times])
        + " |"
    )


def decode_times(attend, step) -> list[float]:
    """us of ``decode_calls``' pair: a CUDA graph of R rotating calls (bench.kernel_us), the replay
    of a graph holding one call (bench_decode.replay_us), and the same two with the append."""
    from bench_decode import replay_us

    from bench import kernel_us

    return [kernel_us(attend, reps=64), replay_us(attend[0]), kernel_us(step, reps=64), replay_us(step[0])]
