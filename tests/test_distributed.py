"""Sequence-parallel attention (distributed.py) on 1, 2, 3 and 4 gloo ranks (CPU)
against the single-process reference, output, lse and gradients; on two GPUs
with NCCL when present.

Window: query i sees key j iff -left <= j - i <= right, or either is below
global_tokens (reference.local_mask). Each spawn runs the whole grid of cases
(spawning costs more than the cases)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent

SHARD = 8
# (window, causal, global_tokens, q_heads, kv_heads): windows below, at and above a shard, full
CASES = [
    (3, False, 0, 4, 2),
    (3, True, 0, 2, 2),
    (SHARD, False, 0, 4, 1),
    (13, False, 0, 4, 4),
    ((13, 2), False, 0, 4, 2),
    (21, True, 0, 4, 2),
    (1000, False, 0, 2, 2),
    (0, False, 0, 2, 1),
    (None, False, 0, 4, 2),
    (None, True, 0, 4, 2),
    (2, False, 3, 4, 2),
    (5, True, 11, 2, 2),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, backend: str):
    sys.path.insert(0, str(ROOT))
    import reference as ref
    from swattn import distributed, testing
    from swattn.online import window_bounds

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NCCL_NVLS_ENABLE="0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        dtype = torch.float16 if backend == "nccl" else torch.float64
        shard = 512 if backend == "nccl" else SHARD
        head_dim = 64 if backend == "nccl" else 8
        seq_len = shard * world
        for n, (window, causal, g, hq, hk) in enumerate(CASES):
            gen = torch.Generator().manual_seed(n)
            q = torch.randn(2, seq_len, hq, head_dim, generator=gen, dtype=torch.float64)
            k, v = (torch.randn(2, seq_len, hk, head_dim, generator=gen, dtype=torch.float64) for _ in range(2))
            g_out, g_lse = (
                torch.randn(q.shape, generator=gen, dtype=torch.float64),
                torch.randn(2, hq, seq_len, generator=gen, dtype=torch.float64),
            )
            mine = slice(rank * shard, (rank + 1) * shard)
            shards = [x[:, mine].to(device, dtype).requires_grad_() for x in (q, k, v)]
            out, lse = distributed.sliding_window_attention_sp(
                *shards, window, causal=causal, global_tokens=g, return_lse=True
            )
            loss = (out.double() * g_out[:, mine].to(device)).sum() + (
                lse.double() * g_lse[:, :, mine].to(device)
            ).sum()
            grads = torch.autograd.grad(loss, shards)

            left, right = window_bounds(window, causal, seq_len)
            full = [x.clone().requires_grad_() for x in (q, k, v)]
            want, want_lse = testing.attention_ref(
                *full, testing.local_mask(seq_len, left, right, global_tokens=g), return_lse=True
            )
            want_grads = torch.autograd.grad((want * g_out).sum() + (want_lse * g_lse).sum(), full)
            bound, lse_bound = (2e-2, 1e-2) if backend == "nccl" else (1e-12, 1e-10)
            where = f"rank {rank}/{world} case {CASES[n]}"
            assert ref.rel_err(out.cpu(), want[:, mine]) < bound, where
            assert (lse.cpu().double() - want_lse[:, :, mine]).abs().max().item() < lse_bound, where
            for name, got, w in zip("qkv", grads, want_grads, strict=True):
                assert ref.rel_err(got.cpu(), w[:, mine]) < bound, (
                    f"{where}: d{name} err {ref.rel_err(got.cpu(), w[:, mine]):.1e}"
                )
        if world == 1:  # one shard cannot be uneven
            return
        # uneven shards are refused on every rank
        x = torch.zeros(1, shard + (rank == 0), 2, head_dim, device=device, dtype=dtype)
        try:
            distributed.sliding_window_attention_sp(x, x, x, 3)
        except ValueError as e:
            assert "equal lengths" in str(e)
        else:
            raise AssertionError("uneven shards were accepted")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [1, 2, 3, 4])  # 1: nothing may travel (a rank never sends to itself)
def test_gloo_ranks_match_single_process_reference(world):
    mp.spawn(worker, args=(world, free_port(), "gloo"), nprocs=world, join=True)


@pytest.mark.gpu
@pytest.mark.parametrize("world", [2, 4])  # 4 ranks passed on four H200s (results/gpu_s5/x4/nccl4.log)
def test_nccl_gpus_match_reference(world):
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} CUDA GPUs")
    mp.spawn(worker, args=(world, free_port(), "nccl"), nprocs=world, join=True)


@pytest.mark.slow
def test_scaling_script_smoke(tmp_path):
    """scripts/scale_sp.py only ever runs in GPU sessions: its orchestration
    (one spawn per rank count, forward and forward + backward, JSON + PNG) runs
    here on gloo ranks with tiny shapes (`--smoke`), so it cannot rot between them."""
    out = tmp_path / "scale.json"
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "scripts/scale_sp.py", "--smoke", "--out", str(out)], cwd=root, check=True)
    rows = json.loads(out.read_text())
    cases = {(r["window"], r["mode"], r["gpus"]) for r in rows}
    assert cases == {(w, m, g) for w in ("48", "full") for m in ("fwd", "fwdbwd") for g in (1, 2)}
    assert all(r["ms"] > 0 and 0 < r["efficiency"] and 0 <= r["exposed_comm"] <= 1 for r in rows)
    assert out.with_suffix(".png").stat().st_size > 0
