"""Sequence-parallel sliding-window attention over torch.distributed (NCCL on
GPUs, gloo on CPUs), forward pass.

The sequence is split into P equal shards, rank r holding positions
[r * n, (r + 1) * n) of q, k, v as (batch, n, heads, head_dim). Window: the
repository's one definition (online.py): query i sees key j iff
-left <= j - i <= right, or either is below ``global_tokens``.

Two schedules, both built on online.py's ``block_attention`` and ``merge_``:

* halo (a pure window): rank r needs only the K/V rows within ``left`` before
  and ``right`` after its shard, from as many neighbours as the window spans.
  They travel with one ``batch_isend_irecv`` while the rank computes its own
  shard's block; the halo blocks are merged in as they are used.
* ring (full attention, or global tokens, which every query must see): the
  BurstAttention global-attention-optimisation ring. K/V blocks travel around
  the ring, P - 1 hops; each hop's send/receive of the next block is posted
  before the current block is computed (double buffering), and blocks the
  window cannot see are skipped (not their transfer: the ring must go on).

The backward pass (dK/dV of the halo returned to their owners; Q/dQ/dO/delta/lse
around the ring) needs the backward kernels of issue 4 and is not built yet.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from online import block_attention, block_visible, empty_state, merge_, window_bounds


def _shard_len(q: torch.Tensor, group) -> int:
    """The common shard length; uneven shards are an error on every rank."""
    n = torch.tensor([q.shape[1]], device=q.device if q.is_cuda else "cpu")
    lens = [torch.zeros_like(n) for _ in range(dist.get_world_size(group))]
    dist.all_gather(lens, n, group=group)
    lens = [int(x) for x in lens]
    if len(set(lens)) != 1:
        raise ValueError(f"sequence shards must have equal lengths, got {lens}")
    return lens[0]


def _peer(group, rank: int) -> int:
    return dist.get_global_rank(group, rank) if group is not None else rank


def halo_exchange(kv: torch.Tensor, left: int, right: int, group=None):
    """Post the transfers of the K/V halo; returns (requests, {source rank: received rows}).

    kv (2, batch, n, kv_heads, head_dim) is this rank's K and V. Rank r receives
    from rank r - o the last min(n, left - (o - 1) n) rows (o = 1, 2, ... while
    rows remain) and from r + o the first min(n, right - (o - 1) n) rows, and
    sends its own rows to the ranks that need them.
    """
    rank, world, n = dist.get_rank(group), dist.get_world_size(group), kv.shape[2]
    ops, recv = [], {}
    for reach, direction in ((left, -1), (right, 1)):
        o = 1
        while (o - 1) * n < reach and o < world:
            rows = min(n, reach - (o - 1) * n)
            src, dst = rank + direction * o, rank - direction * o
            if 0 <= src < world:  # my neighbour o steps away holds keys I need
                buf = torch.empty_like(kv[:, :, :rows])
                recv[src] = buf
                ops.append(dist.P2POp(dist.irecv, buf, _peer(group, src), group))
            if 0 <= dst < world:  # I hold keys that the rank o steps the other way needs
                part = kv[:, :, n - rows :] if direction < 0 else kv[:, :, :rows]
                ops.append(dist.P2POp(dist.isend, part.contiguous(), _peer(group, dst), group))
            o += 1
    return (dist.batch_isend_irecv(ops) if ops else []), recv


def sliding_window_attention_sp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window=128,
    *,
    causal: bool = False,
    global_tokens: int = 0,
    scale: float | None = None,
    return_lse: bool = False,
    group=None,
):
    """Sliding-window (``window`` int or (left, right)) or full (``window=None``)
    attention of this rank's shard. Returns out (batch, n, q_heads, head_dim) in
    q's dtype, and lse (batch, q_heads, n) float32/64 natural log if asked."""
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        raise NotImplementedError("sliding_window_attention_sp is forward-only: its backward (issue 4) is not built")
    if not (q.dim() == k.dim() == v.dim() == 4) or k.shape != v.shape or q.shape[:2] != k.shape[:2]:
        raise ValueError(f"q, k, v must be (batch, n, heads, head_dim) shards: {q.shape}, {k.shape}, {v.shape}")
    if q.shape[2] % k.shape[2]:
        raise ValueError("q_heads must be a multiple of kv_heads")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    n = _shard_len(q, group)
    seq_len = n * world
    left, right = window_bounds(window, causal, seq_len)
    out, lse = empty_state(q)
    my_rows = rank * n
    kv = torch.stack([k, v])
    if global_tokens == 0 and window is not None:
        reqs, recv = halo_exchange(kv, left, right, group)
        if block_visible(my_rows, n, my_rows, n, left, right, 0):  # the interior, while the halo travels
            merge_(out, lse, *block_attention(q, k, v, my_rows, my_rows, left, right, 0, scale))
        for r in reqs:
            r.wait()
        for src, buf in sorted(recv.items()):
            k0 = src * n + (n - buf.shape[2] if src < rank else 0)
            merge_(out, lse, *block_attention(q, buf[0], buf[1], my_rows, k0, left, right, 0, scale))
    else:
        _ring(q, kv, out, lse, left, right, global_tokens, scale, group)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def _ring(q, kv, out, lse, left, right, global_tokens, scale, group):
    """K/V go around the ring; hop t computes the block that started on rank - t."""
    rank, world, n = dist.get_rank(group), dist.get_world_size(group), q.shape[1]
    current, spare = kv.contiguous(), torch.empty_like(kv)
    for hop in range(world):
        reqs = []
        if hop < world - 1:  # post the next hop before computing this one
            ops = [
                dist.P2POp(dist.isend, current, _peer(group, (rank + 1) % world), group),
                dist.P2POp(dist.irecv, spare, _peer(group, (rank - 1) % world), group),
            ]
            reqs = dist.batch_isend_irecv(ops)
        src = (rank - hop) % world
        if block_visible(rank * n, n, src * n, n, left, right, global_tokens):
            merge_(
                out,
                lse,
                *block_attention(q, current[0], current[1], rank * n, src * n, left, right, global_tokens, scale),
            )
        for r in reqs:
            r.wait()
        current, spare = spare, current
