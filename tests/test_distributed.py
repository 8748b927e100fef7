"""Sequence-parallel attention (distributed.py) on 1, 2, 3 and 4 gloo ranks (CPU)
against the single-process reference, output, lse and gradients; on two GPUs
with NCCL when present. Then its argument checks (every rank raises when one
rank's arguments differ or are invalid) and its timeouts (a rank that died or
never calls leaves the others with an error, not a hang).

Window: query i sees key j iff -left <= j - i <= right, or either is below
global_tokens (reference.local_mask). Each launch runs a whole grid of cases
(launching costs more than the cases). The gloo ranks fork from one
forkserver that imported torch and swattn once: a spawn per rank re-imports
them (~7 s a process, most of this file's time on two cores)."""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
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
    ((-1, -1), False, 0, 4, 2),  # unbounded sides: the ring, as None
    ((-1, 2), False, 0, 2, 1),
    ((5, -1), True, 0, 2, 2),  # causal bounds the right side: the halo
    (2, False, 3, 4, 2),
    (5, True, 11, 2, 2),
]
PRELOAD = ["torch", "torch.distributed", "reference", "swattn.distributed", "swattn.testing", __name__]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(fn, world: int, *args) -> None:
    """fn(rank, world, port, *args) on ``world`` gloo processes, forked from the
    forkserver (started once per session, with PRELOAD imported)."""
    multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD)
    mp.start_processes(fn, args=(world, free_port(), *args), nprocs=world, join=True, start_method="forkserver")


def init_gloo(rank: int, world: int, port: int, timeout_s: float) -> None:
    """A gloo group whose own timeout bounds any wait the test did not bound itself."""
    sys.path.insert(0, str(ROOT))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # several ranks share two cores
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))


def worker(rank: int, world: int, port: int, backend: str):
    sys.path.insert(0, str(ROOT))
    import reference as ref
    from swattn import distributed, testing
    from swattn.online import window_bounds

    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NCCL_NVLS_ENABLE="0")
        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
        torch.cuda.set_device(device)
        dist.init_process_group(backend, rank=rank, world_size=world)
    else:
        init_gloo(rank, world, port, 60)
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
    launch(worker, world, "gloo")


@pytest.mark.gpu
@pytest.mark.parametrize("world", [2, 4])  # 4 ranks passed on four H200s (analysis.md)
def test_nccl_gpus_match_reference(world):
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} CUDA GPUs")
    mp.spawn(worker, args=(world, free_port(), "nccl"), nprocs=world, join=True)


@pytest.mark.slow
def test_scaling_script_smoke(tmp_path):
    """tools/scale_sp.py only ever runs in GPU sessions: its orchestration
    (one spawn per rank count, forward and forward + backward, JSON + PNG) runs
    here on gloo ranks with tiny shapes (`--smoke`), so it cannot rot between them."""
    out = tmp_path / "scale.json"
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "tools/scale_sp.py", "--smoke", "--out", str(out)], cwd=root, check=True)
    rows = json.loads(out.read_text())
    cases = {(r["window"], r["mode"], r["gpus"]) for r in rows}
    assert cases == {(w, m, g) for w in ("48", "full") for m in ("fwd", "fwdbwd") for g in (1, 2)}
    assert all(r["ms"] > 0 and 0 < r["efficiency"] and 0 <= r["exposed_comm"] <= 1 for r in rows)
    assert out.with_suffix(".png").stat().st_size > 0


# ---- the ranks must agree: argument checks on every rank ------------------------


def test_unbounded_sides_take_the_ring():
    from swattn.distributed import uses_ring

    assert uses_ring(None, 0) and uses_ring((-1, -1), 0) and uses_ring((-1, 3), 0) and uses_ring((4, -1), 0)
    assert uses_ring((3, 3), 2)  # global tokens: every query sees them
    assert not uses_ring((3, 3), 0) and not uses_ring((1000, 0), 0) and not uses_ring((0, 0), 0)


def shards(n=SHARD, hq=2, hk=2, d=8, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, n, hq, d, generator=gen, dtype=torch.float64).to(dtype)
    return q, *(torch.randn(1, n, hk, d, generator=gen, dtype=torch.float64).to(dtype) for _ in range(2))


# What one rank (the last) gets differently, and the words every rank's ValueError must hold.
MISMATCHES = [
    (dict(window=5), {}, ["window", "(3, 3) on ranks 0, 1", "(5, 5) on rank 2"]),
    (dict(window=(3, 4)), {}, ["window", "(3, 4) on rank 2"]),
    (dict(window=(2, 3), causal=True), {}, ["window", "causal", "True on rank 2"]),
    (dict(global_tokens=2), {}, ["global_tokens", "2 on rank 2"]),
    (dict(scale=0.5), {}, ["scale", "None on ranks 0, 1", "0.5 on rank 2"]),
    ({}, dict(n=SHARD + 1), ["shard length", "equal lengths", f"{SHARD + 1} on rank 2"]),
    ({}, dict(d=16), ["head_dim", "16 on rank 2"]),
    ({}, dict(hq=4), ["q_heads", "4 on rank 2"]),
    ({}, dict(hq=4, hk=4), ["q_heads", "kv_heads"]),
    ({}, dict(dtype=torch.float32), ["dtype", "torch.float64 on ranks 0, 1", "torch.float32 on rank 2"]),
]
# One rank's (the second's) own arguments are invalid: it raises the single-device API's error.
INVALID = [
    dict(window="3"),
    dict(window=-2),
    dict(window=(3, -2)),
    dict(window=2.5),
    dict(causal=1),
    dict(global_tokens=-1),
    dict(scale=-1.0),
    dict(hq=3),
    dict(n=SHARD + 1, only="k"),  # q and k/v of different lengths
    dict(d=4, only="v"),
    dict(dims=3),
]


def agreement_worker(rank: int, world: int, port: int):
    init_gloo(rank, world, port, 20)
    import swattn
    from swattn import distributed

    sp = distributed.sliding_window_attention_sp
    base = dict(window=3, causal=False, global_tokens=0, scale=None)
    try:
        for kwargs, shape, words in MISMATCHES:
            mine = (kwargs, shape) if rank == world - 1 else ({}, {})
            try:
                sp(*shards(**mine[1]), **{**base, **mine[0]}, timeout=5)
            except ValueError as e:
                assert all(w in str(e) for w in words), f"rank {rank}: {words} not all in: {e}"
            else:
                raise AssertionError(f"rank {rank}: {kwargs} {shape} on rank {world - 1} was accepted")

        for bad in INVALID:
            bad = dict(bad)
            shape = {x: bad.pop(x) for x in ("n", "hq", "d") if x in bad}
            only, dims = bad.pop("only", None), bad.pop("dims", 4)
            qkv = list(shards())
            if rank == 1:
                if only:  # one tensor of the other shape
                    qkv["qkv".index(only)] = shards(**shape)["qkv".index(only)]
                else:
                    qkv = list(shards(**shape))
                qkv = [x[0] if dims == 3 else x for x in qkv]
            args = {**base, **(bad if rank == 1 else {})}
            try:
                sp(*qkv, **args, timeout=5)
            except (TypeError, ValueError) as e:
                if rank == 1:  # exactly the single-device API's error
                    with pytest.raises(type(e)) as single:
                        swattn.sliding_window_attention(*qkv, **args)
                    assert str(single.value) == str(e), f"{bad}: {e!r} vs the single-device {single.value!r}"
                else:
                    assert isinstance(e, ValueError) and "rank 1 rejected its arguments" in str(e), f"rank {rank}: {e}"
            else:
                raise AssertionError(f"rank {rank}: invalid {bad} {shape} on rank 1 was accepted")

        for bad, error in ((-1, ValueError), ("5 s", TypeError)):  # a bad timeout is one rank's error too
            try:
                sp(*shards(), 3, timeout=bad if rank == 1 else 5)
            except (TypeError, ValueError) as e:
                if rank == 1:
                    assert type(e) is error and "timeout" in str(e), e
                else:
                    assert isinstance(e, ValueError) and "rank 1 rejected its arguments" in str(e), f"rank {rank}: {e}"
            else:
                raise AssertionError(f"rank {rank}: timeout={bad!r} on rank 1 was accepted")

        # The group is still in step after all that; (-1, -1) and (4, -1) take the ring, not the halo.
        halo_plan = distributed.halo_plan

        def no_halo(*a):
            raise AssertionError("the halo was used")

        distributed.halo_plan = no_halo
        try:
            q, k, v = shards()
            for window in ((-1, -1), (4, -1), None):
                sp(q, k, v, window, timeout=5)
            with pytest.raises(AssertionError, match="halo"):  # the probe sees a bounded window
                sp(q, k, v, (4, 4), timeout=5)
        finally:
            distributed.halo_plan = halo_plan
        out = sp(q, k, v, 3, timeout=5)
        assert out.shape == q.shape and torch.isfinite(out).all()
    finally:
        dist.destroy_process_group()


def test_ranks_must_agree_and_every_rank_raises():
    launch(agreement_worker, 3)


# ---- a rank that died or never calls: an error, not a hang ----------------------

TIMEOUT = 1.5  # the call's; the group's own is 20 s
SLACK = 3.0  # a loaded two-core machine


def silent_worker(rank: int, world: int, port: int, done):
    """Rank 1 runs the forward but not the backward, then stays alive and silent
    until rank 0 is done: rank 0's backward times out in its transfers, its
    next call (on a second group: a gloo transfer that timed out closed the
    first group's connections) in the all-gather of the arguments."""
    init_gloo(rank, world, port, 20)
    from swattn import distributed

    groups = [dist.new_group([0, 1]) for _ in range(2)]
    try:
        q, k, v = (x.requires_grad_() for x in shards(seed=rank))
        out = distributed.sliding_window_attention_sp(q, k, v, 3, group=groups[0], timeout=TIMEOUT)
        if rank == 1:
            assert done.wait(30), "rank 0 never finished"
            return
        try:
            for step in ("backward", "call"):
                start = time.monotonic()
                try:
                    if step == "backward":
                        out.sum().backward()
                    else:
                        wait = datetime.timedelta(seconds=TIMEOUT)
                        distributed.sliding_window_attention_sp(q, k, v, 3, group=groups[1], timeout=wait)
                except TimeoutError as e:
                    took = time.monotonic() - start
                    assert TIMEOUT - 0.1 < took < TIMEOUT + SLACK, f"{step}: raised after {took:.1f} s: {e}"
                    assert "rank 0 of 2" in str(e), e
                else:
                    raise AssertionError(f"the {step} returned although rank 1 never took part")
        finally:
            done.set()
    finally:
        dist.destroy_process_group()  # gloo: returns once rank 1 has left


def dead_worker(rank: int, world: int, port: int):
    """Rank 1 leaves without calling; rank 0 calls."""
    init_gloo(rank, world, port, 20)
    from swattn import distributed

    try:
        if rank == 1:
            return
        start = time.monotonic()
        try:
            distributed.sliding_window_attention_sp(*shards(), 3, timeout=5)
        except (RuntimeError, TimeoutError) as e:
            assert time.monotonic() - start < 5 + SLACK, e
            assert "rank 0 of 2" in str(e), e
        else:
            raise AssertionError("the call returned although rank 1 had left")
    finally:
        dist.destroy_process_group()


def test_silent_rank_times_out():
    start = time.monotonic()
    launch(silent_worker, 2, multiprocessing.get_context("forkserver").Event())
    assert time.monotonic() - start < 30


def test_dead_rank_raises_not_hangs():
    start = time.monotonic()
    launch(dead_worker, 2)
    assert time.monotonic() - start < 30
