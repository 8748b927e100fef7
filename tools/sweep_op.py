"""Sweep the general op's kernel variants (tile shape, CTAs per SM, kernel mode)
on bench_op shapes; prints one table. Feeds swattn/tiles.json.

    python tools/sweep_op.py [--shapes 1 3] [--dtype float16]

Compiles every variant in worker processes first (TileLang's disk cache then
serves the timing process), then times each with triton's do_bench (median).
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from sweep_common import bench_shapes, check_and_time, compile_all, random_qkv, shape_label  # noqa: E402  (tools/ is on sys.path as the script's folder)

# (block_m, block_n, threads, num_stages, CTAs per SM) or None for swattn.TILES;
# kernel mode; loop schedule: "ws" TileLang's warp-specialized TMA pipeline,
# "auto" TileLang's role-based automatic warp specialization; skip = clear S instead of masking full tiles.
VARIANTS = [
    (None, "window", "ws", False),
    (None, "window", "ws", True),
    (None, "window", "auto", False),  # role-based WS declines if/else bodies: no skip
    ((128, 128, 256, 2, 1), "window", "ws", True),
    (None, "general", "ws", True),
    ((128, 64, 256, 3, 2), "window", "ws", True),
    ((128, 64, 256, 4, 2), "window", "ws", True),
    ((64, 128, 128, 2, 2), "window", "ws", True),
    ((64, 64, 128, 2, 3), "window", "ws", True),
    ((64, 64, 128, 3, 3), "window", "ws", True),
    ((128, 64, 128, 2, 2), "window", "ws", True),
    ((64, 64, 128, 2, 4), "window", "ws", True),
    ((64, 64, 128, 3, 4), "window", "ws", True),
    ((64, 128, 128, 2, 3), "window", "ws", True),
    # D = 128 at two CTAs per SM: two independent 64-row CTAs interleave their
    # softmax and tensor-core phases (FA3's ping-pong, left to the scheduler).
    # Shared memory bounds the stages: 64x128 K/V tiles fit two CTAs at one stage.
    ((64, 64, 128, 2, 2), "window", "ws", True),
    ((64, 64, 128, 3, 2), "window", "ws", True),
    ((64, 128, 128, 1, 2), "window", "ws", True),
    # 192-row query tiles over three consumer warpgroups (160 registers each):
    # a third of the K/V re-reads from L2 of 64-row tiles (the D = 64 kernel's
    # L2 runs at 74 % of peak, analysis.md), and 50 % more rows per K/V tile at D = 128.
    ((192, 128, 384, 2, 1), "window", "ws", True),
    ((192, 64, 384, 2, 1), "window", "ws", True),
    ((192, 64, 384, 3, 1), "window", "ws", True),
]


@functools.cache
def build(head_dim, dtype, tile, mode, schedule, skip):
    import tilelang

    from swattn import launch
    from swattn.kernels import forward as fwd_kernels

    if tile is not None and tile[0] == 128 and tile[1] == 64 and head_dim == 128:
        raise ValueError("128x64 tiles at D=128 do not fit")
    configs = {"tl.enable_fast_math": True}
    if schedule == "auto":
        configs["tl.enable_auto_warp_specialization"] = "role_based"
    fn = fwd_kernels.make_forward(head_dim, dtype, "sm_90a", tile or launch.tile_config(head_dim, "sm_90a"), mode, skip)
    return tilelang.compile(fn, target={"kind": "cuda", "arch": "sm_90a"}, pass_configs=configs)


def _compile(job):
    try:
        build(*job)
    except Exception as e:  # a variant that does not build is reported, not fatal
        return job, repr(e)[:200]
    return job


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", type=int, nargs="*", default=[1, 3])
    p.add_argument("--dtype", default="float16")
    p.add_argument("--variants", type=int, nargs="*", help="indices into VARIANTS (default: all)")
    args = p.parse_args()
    variants = [VARIANTS[i] for i in args.variants] if args.variants else VARIANTS
    shapes = bench_shapes(args.shapes)
    compile_all(_compile, list(dict.fromkeys((sh["head_dim"], args.dtype, *v) for sh in shapes for v in variants)))

    import torch

    from swattn import launch

    dt = getattr(torch, args.dtype)
    lines = [
        "| shape | window | tile (bm, bn, thr, stages, CTAs/SM) | mode | schedule | skip | us | err vs row 1 |",
        "|---|---|---|---|---|---|---:|---:|",
    ]
    for sh in shapes:
        b, s, hq, hk, d = sh["batch"], sh["seq"], sh["q_heads"], sh["kv_heads"], sh["head_dim"]
        q, k, v = random_qkv(sh, dt)
        out = torch.empty_like(q)
        lse = torch.empty(b, hq, s, device="cuda")
        base = None
        for tile, mode, schedule, skip in variants:
            try:
                kern = build(d, args.dtype, tile, mode, schedule, skip)
            except Exception as e:
                print(tile, mode, schedule, "failed:", repr(e)[:200])
                continue

            win, kt, cu, sink = launch.placeholders(q.device)
            scalars = (sh["left"], sh["right"], 0, hq, hk, s, 1, 0, launch.LOG2E / d**0.5, 0.0, 0.0)
            call = functools.partial(kern, q, k, v, out, lse, win, kt, cu, cu, sink, *scalars)

            us, err, base = check_and_time(call, [out], [out], base)
            tile = tile or launch.tile_config(d, "sm_90a")
            lines.append(f"| {shape_label(sh)} | {tile} | {mode} | {schedule} | {skip} | {us:.1f} | {err:.1e} |")
            print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
