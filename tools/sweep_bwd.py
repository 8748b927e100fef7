"""Sweep the backward kernel's tiles and CTAs per SM on bench_op shapes; one table.
Feeds swattn/tiles.json.

    python tools/sweep_bwd.py [--shapes 1 3] [--dtype float16]

Compiles every variant in worker processes first (TileLang's disk cache then
serves the timing process), then times the main backward kernel alone (dQ
zeroed inside the timed call, as the launcher does) with triton's do_bench.
"err vs row 1": ||dK - dK of the first variant|| / ||dK of the first||, dQ and dV
likewise (the max of the three); tests/test_autograd.py holds the real checks.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from sweep_common import bench_shapes, check_and_time, compile_all, random_qkv, shape_label  # noqa: E402  (tools/ is on sys.path as the script's folder)

# (block_m, block_n, threads, num_stages, CTAs per SM, dQ by TMA reduce-add, dV/dK
# GEMMs from shared memory), or None = backward's shipped tile (swattn/tiles.json).
# Session 4 (H200) settled the lse/delta staging (now always on) and dQ by TMA
# (D = 64 only); session 10 the shared-memory dV/dK GEMMs at D = 256 (tools/time_d256.py).
VARIANTS = [
    None,
    (64, 64, 128, 2, 2, False, False),
    (64, 64, 128, 2, 2, True, False),
    # Session 5: 128-key tiles over two consumer warpgroups (each owns 64 keys'
    # dK and dV), one CTA per SM, so dQ's TMA tile fits at D = 128 as well.
    (64, 128, 256, 2, 1, True, False),
    (64, 128, 256, 2, 1, False, False),
    (64, 128, 256, 3, 1, True, False),
    (64, 128, 256, 2, 1, True, True),
    # Session 12 (H200): the shared-memory dV/dK GEMMs at D = 64 and 128, one stage, and
    # 128 x 128 over two warpgroups (FlashAttention-3's D = 64 tile).
    (64, 64, 128, 2, 2, True, True),
    (64, 128, 256, 1, 1, True, True),
    (64, 128, 256, 1, 1, True, False),
    (128, 128, 256, 2, 1, True, True),
    (128, 128, 256, 1, 1, True, True),
    # Session 13 (H200): with the GEMMs asynchronous, FlashAttention-3's D = 64 tile in the
    # register form.
    (128, 128, 256, 2, 1, True, False),
]


def _compile(job):
    from swattn import launch

    head_dim, dtype, tile = job
    try:
        launch.compiled_backward(head_dim, dtype, "sm_90a", tile)
    except Exception as e:  # a variant that does not build is reported, not fatal
        return job, repr(e)[:200]
    return job


def _launch(kern, args) -> None:
    args[6].zero_()  # dQ accumulates atomically
    kern(*args)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", type=int, nargs="*", default=[1, 3])
    p.add_argument("--dtype", default="float16")
    p.add_argument("--variants", type=int, nargs="*", help="indices into VARIANTS (default: all; 0: the shipped tile)")
    args = p.parse_args()
    shapes = bench_shapes(args.shapes)
    variants = VARIANTS if args.variants is None else [VARIANTS[i] for i in args.variants]
    compile_all(_compile, list(dict.fromkeys((sh["head_dim"], args.dtype, v) for sh in shapes for v in variants)))

    import torch

    import swattn
    from swattn import launch

    dt = getattr(torch, args.dtype)
    lines = [
        "| shape | window | tile (bm, bn, thr, stages, CTAs/SM, dQ by TMA, dV/dK SS) | us | err vs row 1 |",
        "|---|---|---|---:|---:|",
    ]
    for sh in shapes:
        s, hk, d, left, right = sh["seq"], sh["kv_heads"], sh["head_dim"], sh["left"], sh["right"]
        q, k, v = random_qkv(sh, dt)
        do = torch.randn_like(q)
        out, lse = swattn.sliding_window_attention(q, k, v, (left, right), return_lse=True)
        delta = (do.float() * out.float()).sum(-1).transpose(1, 2).contiguous()
        win, kt, cu, _ = launch.placeholders(q.device)
        grads = [torch.empty(x.shape, device="cuda", dtype=torch.float32) for x in (q, k, v)]
        base = None
        for tile in variants:
            try:
                kern = launch.compiled_backward(d, args.dtype, "sm_90a", tile)
            except Exception as e:
                print(tile, "failed:", repr(e)[:200])
                continue

            kargs = (q, k, v, do, lse, delta, *grads, win, kt, cu, cu, left, right, 0, hk, s, s, 1, 0, d**-0.5, 0.0)
            call = functools.partial(_launch, kern, kargs)

            # dQ is zeroed by the call itself (it accumulates): poison dK and dV
            us, err, base = check_and_time(call, grads[1:], grads, base, warmup=20)
            tile = tile or launch.tile_config(d, "sm_90a", "backward")
            lines.append(f"| {shape_label(sh)} | {tile} | {us:.1f} | {err:.1e} |")
            print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
