"""The cluster-split assignment kernel (split.py) against solution.py and the
full-attention baselines, one head (GPU): correctness on the edge cases, then
CUDA-graph kernel time at seq 512 / 1024 / 2048, W = 128.

    python scripts/probe_split.py [--splits 2 3 5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--splits", type=int, nargs="*", default=[2, 3, 5])
    args = p.parse_args()
    import torch

    import bench
    import reference as ref
    import solution
    import split

    torch.manual_seed(0)
    print("| check | seq | window | split | rel err |\n|---|---:|---:|---:|---:|")
    for seq, window in [(2048, 128), (1000, 128), (512, 0), (300, 1000), (2048, 64), (4096, 512)]:
        q, k, v = (torch.randn(seq, 64, device="cuda", dtype=torch.float16) for _ in range(3))
        want = ref.sliding_window_attention_ref(q, k, v, window)
        for sp in args.splits:
            out = torch.full((seq, 64), float("nan"), device="cuda")
            split.split_attention(q, k, v, window, sp, out)
            print(f"| correctness | {seq} | {window} | {sp} | {ref.rel_err(out, want):.1e} |", flush=True)

    print("\n| seq | impl | kernel us | x vs fastest full |\n|---:|---|---:|---:|")
    for seq in (512, 1024, 2048):
        sets = bench.input_sets(seq, 64, torch.float16)
        impls = {
            "solution (64x64)": lambda q, k, v: solution.sliding_window_attention_forward(q, k, v, 128),
            "tilelang full": lambda q, k, v, seq=seq: solution.sliding_window_attention_forward(q, k, v, seq),
            "SDPA flash full": bench.sdpa_flash,
        }
        for sp in args.splits:
            impls[f"split {sp}"] = lambda q, k, v, sp=sp: split.split_attention(q, k, v, 128, sp)
        times = {n: bench.kernel_us([lambda s=s, f=f: f(*s) for s in sets]) for n, f in impls.items()}
        full = min(times["tilelang full"], times["SDPA flash full"])
        for n, us in times.items():
            print(f"| {seq} | {n} | {us:.2f} | {full / us:.2f} |", flush=True)


if __name__ == "__main__":
    main()
