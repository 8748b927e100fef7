"""What the tile sweeps (sweep_op.py, sweep_bwd.py) share: the benchmark shapes
and compiling every variant in worker processes first, so that TileLang's disk
cache serves the timing process."""

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
