"""One forward (and, with --backward, one backward) call of bench_op shapes,
bracketed by cudaProfilerStart/Stop for Nsight Compute: where the kernel's time
goes, counted by the hardware (analysis.md, "Where the forward loses").

    ncu --clock-control none --profile-from-start off --section SpeedOfLight \\
        --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \\
        --section WarpStateStats python tools/profile_op.py --shapes 1 2 3

Compiles and runs every call once before the profiled range.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sweep_common import bench_shapes, random_qkv  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", type=int, nargs="*", default=[1, 2, 3])
    p.add_argument("--dtype", default="float16")
    p.add_argument("--backward", action="store_true")
    args = p.parse_args()

    import torch

    import swattn

    calls = []
    for sh in bench_shapes(args.shapes):
        q, k, v = random_qkv(sh, getattr(torch, args.dtype))
        window = (sh["left"], sh["right"])
        if args.backward:
            q, k, v = (x.requires_grad_() for x in (q, k, v))
            do = torch.randn_like(q)

            def call(q=q, k=k, v=v, window=window, do=do):
                swattn.sliding_window_attention(q, k, v, window).backward(do)
        else:

            def call(q=q, k=k, v=v, window=window):
                swattn.sliding_window_attention(q, k, v, window)

        call()  # compile, first launch
        calls.append(call)
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for call in calls:
        call()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
