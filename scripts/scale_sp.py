"""Scaling of sequence-parallel attention (distributed.py) over the GPUs of one host.

    python scripts/scale_sp.py [--seqs 65536 131072 262144] [--windows 4096 full] [--gpus 1 2]

For each (seq, window) and GPU count P: forward time of one call (median of
several, every rank synchronised, the slowest rank counts), scaling efficiency
T(1) / (P * T(P)), and the exposed communication: 1 - T(compute only) / T(P),
where compute only runs the same blocks on local tensors without any transfer.
D = 128, GQA 32 query / 8 kv heads, bf16, batch 1. NCCL with
NCCL_NVLS_ENABLE=0 and TORCH_SYMM_MEM_DISABLE_MULTICAST=1. Prints one table.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HEADS, KV_HEADS, DIM = 32, 8, 128


def timed(fn, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        if dist.is_initialized():
            dist.barrier()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        if dist.is_initialized():
            dist.barrier()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def worker(rank, world, port, seq, window, results):
    import distributed
    from online import block_attention, block_visible, window_bounds

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NCCL_NVLS_ENABLE="0")
    os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    n = seq // world
    g = torch.Generator(device="cuda").manual_seed(rank)
    q = torch.randn(1, n, HEADS, DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(1, n, KV_HEADS, DIM, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    w = None if window == "full" else int(window)
    total = timed(lambda: distributed.sliding_window_attention_sp(q, k, v, w))
    left, right = window_bounds(w, False, seq)
    if w is None:  # the ring: every visible block, from local tensors
        blocks = [src for src in range(world) if block_visible(rank * n, n, src * n, n, left, right, 0)]
        compute = timed(lambda: [block_attention(q, k, v, rank * n, src * n, left, right) for src in blocks])
    else:  # the halo: one block over the keys the window reaches
        lo, hi = max(0, rank * n - left), min(seq, (rank + 1) * n + right)
        kk, vv = (torch.randn(1, hi - lo, KV_HEADS, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        compute = timed(lambda: block_attention(q, kk, vv, rank * n, lo, left, right))
    times = torch.tensor([total, compute], device="cuda")
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    if rank == 0:
        results.put(tuple(times.tolist()))
    dist.destroy_process_group()


def single_gpu(seq: int, window) -> float:
    import swattn

    q = torch.randn(1, seq, HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, seq, KV_HEADS, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    w = seq if window == "full" else int(window)
    return timed(lambda: swattn.sliding_window_attention(q, k, v, w))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seqs", type=int, nargs="*", default=[65536, 131072, 262144])
    p.add_argument("--windows", nargs="*", default=["4096", "full"])
    p.add_argument("--gpus", type=int, nargs="*", default=[1, torch.cuda.device_count()])
    args = p.parse_args()
    ctx = mp.get_context("spawn")
    lines = [
        "| seq | window | GPUs | ms | efficiency | exposed comm |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for seq in args.seqs:
        for window in args.windows:
            base = single_gpu(seq, window)
            lines.append(f"| {seq} | {window} | 1 | {base:.1f} | 1.00 | - |")
            print(lines[-1], flush=True)
            for world in sorted(set(args.gpus) - {1}):
                results = ctx.Queue()
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    port = s.getsockname()[1]
                mp.spawn(worker, args=(world, port, seq, window, results), nprocs=world, join=True)
                total, compute = results.get()
                eff, comm = base / (world * total), max(0.0, 1 - compute / total)
                lines.append(f"| {seq} | {window} | {world} | {total:.1f} | {eff:.2f} | {100 * comm:.0f} % |")
                print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
