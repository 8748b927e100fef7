"""Sweep tile configurations and lowerings of the kernel on one GPU; prints one table.

    python tools/sweep_tiles.py [--seq 512 1024 2048] [--window 128] [--lowerings]

``--lowerings`` sweeps how TileLang lowers the card's 64 x 64 tile instead of
its shape: Hopper's default (a producer warpgroup issuing TMA loads, wgmma in
the consumer: 256 threads), the same with mma.sync instead of wgmma, and
without warp specialisation (128 threads, cp.async loads) with either MMA.
At these sizes the time is one CTA's latency chain, and mma.sync on a 64 x 64
tile has a shorter issue-to-result latency than wgmma.

Compiles every variant in parallel worker processes first (TileLang's disk
cache then serves the timing process), then times each by CUDA-graph replay
(bench.kernel_us) next to the full-attention baselines. Feeds configs/tiles.json.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VARIANTS = [
    dict(block_m=bm, block_n=bn, threads=th, num_stages=st)
    for bm, bn, th, st in [
        (64, 64, 128, 2),
        (64, 64, 128, 1),
        (64, 64, 128, 3),
        (64, 32, 128, 2),
        (64, 128, 128, 2),
        (128, 64, 256, 2),
        (128, 128, 256, 2),
    ]
]


FAST = {"tl.enable_fast_math": True}
# name -> (make_kernel's loop form, extra pass configs). Without warp
# specialisation TileLang 0.1.15 needs the loop form it uses for sm_80
# (solution.make_kernel explains the two forms).
NO_WS = {"tl.disable_warp_specialized": True, "tl.disable_tma_lower": True}
LOWERINGS = {
    "tma+ws+wgmma": ("sm_90a", {}),
    "tma+ws+mma": ("sm_90a", {"tl.disable_wgmma": True}),
    "cp.async+wgmma": ("sm_80", NO_WS),
    "cp.async+mma": ("sm_80", NO_WS | {"tl.disable_wgmma": True}),
}


def lowering_variants() -> list[dict]:
    """The card's tile (configs/tiles.json "assignment") under each lowering; the
    cp.async ones also at one stage (no producer warpgroup to run ahead)."""
    import solution

    card, _ = solution.tile_options("assignment")
    variants = []
    for name, (_, configs) in LOWERINGS.items():
        for stages in (1, 2) if configs.get("tl.disable_warp_specialized") else (card["num_stages"],):
            variants.append(card | dict(num_stages=stages, lowering=name))
    return variants


def build(seq: int, window: int, variant: dict):
    """Compile one variant for sm_90a (the lowering's loop form and pass configs)."""
    import tilelang

    import solution

    variant = dict(variant)
    loop_form, configs = LOWERINGS[variant.pop("lowering", "tma+ws+wgmma")]
    func = solution.make_kernel(seq, 64, window, arch=loop_form, **variant)
    return tilelang.compile(func, target={"kind": "cuda", "arch": "sm_90a"}, pass_configs=FAST | configs)


def _compile(job):
    try:
        build(*job)
        return job, None
    except Exception as e:  # report, keep sweeping
        return job, str(e).splitlines()[-1][:100]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, nargs="*", default=[512, 1024, 2048])
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--lowerings", action="store_true", help="sweep the card tile's lowerings, not tile shapes")
    args = p.parse_args()
    variants = lowering_variants() if args.lowerings else VARIANTS
    jobs = [(s, w, v) for s in args.seq for w in (args.window, s) for v in variants]  # window, then full
    with mp.get_context("spawn").Pool(12) as pool:
        failed = {repr(j): e for j, e in pool.map(_compile, jobs) if e}

    import torch

    import bench
    import reference as ref

    rows = []
    for job in jobs:
        seq, window, variant = job
        if repr(job) in failed:
            rows.append((seq, window, variant, None, failed[repr(job)]))
            continue
        kernel = build(seq, window, variant)
        sets = bench.input_sets(seq, 64, torch.float16)
        outs = [torch.empty(seq, 64, device="cuda") for _ in sets]
        outs[0].fill_(float("nan"))  # poisoned: an unwritten element fails the check
        kernel(*sets[0], outs[0])
        err = ref.rel_err(outs[0], ref.sliding_window_attention_ref(*sets[0], window))
        us = bench.kernel_us([lambda s=s, o=o, k=kernel: k(*s, o) for s, o in zip(sets, outs, strict=True)])
        rows.append((seq, window, variant, us, f"{err:.1e}"))
        print(rows[-1], flush=True)
    tiny = torch.zeros(1, device="cuda")
    print(f"empty-ish launch (tiny add_): {bench.kernel_us([lambda: tiny.add_(1)]):.2f} us")
    for seq in args.seq:
        sets = bench.input_sets(seq, 64, torch.float16)
        print(f"seq {seq}: SDPA flash full {bench.kernel_us([lambda s=s: bench.sdpa_flash(*s) for s in sets]):.1f} us")
    print("| seq | window | bm | bn | threads | stages | lowering | kernel us | rel err / error |")
    print("|---:|---:|---:|---:|---:|---:|---|---:|---|")
    for seq, window, v, us, note in rows:
        t = "-" if us is None else f"{us:.2f}"
        print(
            f"| {seq} | {window} | {v['block_m']} | {v['block_n']} | {v['threads']} | {v['num_stages']} "
            f"| {v.get('lowering', 'tma+ws+wgmma')} | {t} | {note} |"
        )


if __name__ == "__main__":
    main()
