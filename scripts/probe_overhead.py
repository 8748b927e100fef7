"""Where does a small sliding-window call spend its time? (GPU)

Times, by CUDA-graph replay (bench.kernel_us), at seq 2048 / head_dim 64 with
the assignment tiles: an almost empty launch; a TileLang kernel that only
loads Q and stores O (the fixed cost of one CTA's I/O); the attention kernel
with windows that make each CTA walk 1, 3, 5, 9, 17 key tiles (the slope is the
cost of one tile, the intercept the fixed cost), with and without fast math;
and the same kernel with L2-hot inputs.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tilelang  # noqa: E402
import tilelang.language as T  # noqa: E402
import torch  # noqa: E402

import bench  # noqa: E402
import solution  # noqa: E402

SEQ, DIM = 2048, 64
FAST = {"tl.enable_fast_math": True}


def copy_kernel(block_m=64, threads=128):
    @T.prim_func
    def copy(Q: T.Tensor((SEQ, DIM), "float16"), O: T.Tensor((SEQ, DIM), "float32")):
        with T.Kernel(T.ceildiv(SEQ, block_m), threads=threads) as bx:
            q_s = T.alloc_shared((block_m, DIM), "float16")
            acc = T.alloc_fragment((block_m, DIM), "float32")
            T.copy(Q[bx * block_m, 0], q_s)
            T.copy(q_s, acc)
            T.copy(acc, O[bx * block_m, 0])

    return copy


def main():
    target = solution.cuda_target()
    sets = bench.input_sets(SEQ, DIM, torch.float16)
    outs = [torch.empty(SEQ, DIM, device="cuda") for _ in sets]
    rows = []
    tiny = torch.zeros(1, device="cuda")
    rows.append(("tiny torch add_ (launch floor)", bench.kernel_us([lambda: tiny.add_(1)])))
    k = tilelang.compile(copy_kernel(), target=target, pass_configs=FAST)
    rows.append(
        (
            "TileLang copy Q -> O (fp32), 64-row CTAs",
            bench.kernel_us([lambda s=s, o=o: k(s[0], o) for s, o in zip(sets, outs, strict=True)]),
        )
    )
    variants = [("", {}), ("fast math ", FAST)]
    for label, cfg in variants:
        for window in (0, 64, 128, 256, 512):
            f = solution.make_kernel(SEQ, DIM, window, arch=target["arch"])
            kern = tilelang.compile(f, target=target, pass_configs=cfg)
            tiles = solution.kv_tile_range(SEQ // 128, SEQ, window, 64, 64)
            us = bench.kernel_us([lambda s=s, o=o, kk=kern: kk(*s, o) for s, o in zip(sets, outs, strict=True)])
            rows.append((f"SWA {label}W={window} ({tiles[1] - tiles[0]} tiles/CTA)", us))
    f = solution.make_kernel(SEQ, DIM, 128, arch=target["arch"])
    kern = tilelang.compile(f, target=target, pass_configs=FAST)
    rows.append(("SWA fast math W=128, one input set (L2-hot)", bench.kernel_us([lambda: kern(*sets[0], outs[0])])))
    for name, us in rows:
        print(f"| {name} | {us:.2f} |")


if __name__ == "__main__":
    main()
