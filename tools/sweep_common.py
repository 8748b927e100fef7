"""What the scripts share: the benchmark shapes, compiling every variant in worker
processes first (so that TileLang's disk cache serves the timing process), the
sweeps' check-and-time step, and the host-time probes' timer and profiler."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


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
