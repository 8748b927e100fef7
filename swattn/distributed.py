"""Sequence-parallel sliding-window attention over torch.distributed (NCCL on
GPUs, gloo on CPUs), forward and backward.

The sequence is split into P equal shards, rank r holding positions
[r * n, (r + 1) * n) of q, k, v as (batch, n, heads, head_dim). Window: the
repository's one definition (window.py): query i sees key j iff
-left <= j - i <= right, or either is below ``global_tokens``.

Two schedules, both built on online.py's blocks (``block_attention``,
``block_attention_backward``) and its one merge (``merge_``):

* halo (a pure window): rank r needs only the K/V rows within ``left`` before
  and ``right`` after its shard, from as many neighbours as the window spans
  (``halo_plan``). They travel with one ``batch_isend_irecv`` while the rank
  computes the rows whose windows stay inside its shard; the rows near an edge
  then run over the halo and the local keys together (split by queries, so no
  merge). The halo is kept for the backward, which sends the halo's dK/dV back
  to their owners the same way, reversed.
* ring (full attention, or global tokens, which every query must see): the
  BurstAttention global-attention-optimisation ring. Forward: K/V blocks travel
  around the ring, P - 1 hops, each hop's transfer posted before the current
  block is computed (double buffering). Backward: K/V stay, and each query
  shard's (q, dO, lse, delta) travels, its dQ accumulating on the way and
  arriving home after the last hop. Blocks the window cannot see are skipped
  (not their transfer: the ring must go on).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .eager import work_dtype
from .online import block_attention, block_attention_backward, empty_state, merge_, output_delta, window_bounds
from .window import block_visible


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


def halo_plan(rank: int, world: int, n: int, left: int, right: int):
    """Who sends which K/V rows to whom for a window (left, right) over shards of n.

    Returns (receives, sends): receives lists (source rank, rows) — the last
    ``rows`` rows of a shard before this one, or the first of one after it;
    sends lists (destination rank, rows, "tail" or "head") — which of this
    shard's rows a neighbour needs."""
    receives, sends = [], []
    for reach, direction in ((left, -1), (right, 1)):
        o = 1
        while (o - 1) * n < reach and o < world:
            rows = min(n, reach - (o - 1) * n)
            src, dst = rank + direction * o, rank - direction * o
            if 0 <= src < world:
                receives.append((src, rows))
            if 0 <= dst < world:  # the rank o steps the other way needs my rows
                sends.append((dst, rows, "tail" if direction < 0 else "head"))
            o += 1
    return receives, sends


def _rows(n: int, rows: int, side: str) -> slice:
    """The first (``head``) or last (``tail``) ``rows`` of a shard of n rows."""
    return slice(n - rows, n) if side == "tail" else slice(0, rows)


def _exchange(sends: list, receives: list, group):
    """Post point-to-point transfers: sends [(tensor, peer)], receives [(buffer, peer)]."""
    ops = [dist.P2POp(dist.isend, t.contiguous(), _peer(group, p), group) for t, p in sends]
    ops += [dist.P2POp(dist.irecv, b, _peer(group, p), group) for b, p in receives]
    return dist.batch_isend_irecv(ops) if ops else []


def _gather(pieces, first: int, last: int):
    """K/V rows [first, last) (clipped to what ``pieces`` hold) as one (2, batch,
    rows, heads, dim) tensor, and the position of its first row. ``pieces``:
    (tensor (2, batch, rows, heads, dim), position of its first row), sorted and
    contiguous."""
    first, last = max(first, pieces[0][1]), min(last, pieces[-1][1] + pieces[-1][0].shape[2])
    parts = []
    for t, start in pieces:
        lo, hi = max(first, start), min(last, start + t.shape[2])
        if lo < hi:
            parts.append(t[:, :, lo - start : hi - start])
    return (parts[0].contiguous() if len(parts) == 1 else torch.cat(parts, dim=2)), first


def _write(out, lse, r0: int, block) -> None:
    """Put a block's (out, lse) of rows r0 .. r0 + rows that saw all their keys."""
    o, l = block
    out[:, r0 : r0 + o.shape[1]] = o
    lse[:, :, r0 : r0 + o.shape[1]] = l


def _wait(reqs) -> None:
    for r in reqs:
        r.wait()


class _SequenceParallelAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, left, right, global_tokens, scale, group, ring):
        rank, world, n = dist.get_rank(group), dist.get_world_size(group), q.shape[1]
        kv = torch.stack([k, v])
        halo, sends = [], []
        if not ring:
            # Every row is written once, with all its keys: out in q's dtype, no
            # float32 state to zero, merge or cast back (three passes over a
            # float32 copy of the output: ~7 % of a 4-GPU forward, analysis.md).
            out = torch.empty_like(q)
            lse = torch.empty(q.shape[0], q.shape[2], n, dtype=work_dtype(q), device=q.device)
            receives, sends = halo_plan(rank, world, n, left, right)
            bufs = [(torch.empty_like(kv[:, :, :rows]), src) for src, rows in receives]
            reqs = _exchange([(kv[:, :, _rows(n, rows, side)], dst) for dst, rows, side in sends], bufs, group)
            # Split the queries, not the keys: rows farther than the window from
            # an edge with a neighbour see only local keys and are computed while
            # the halo travels; the edge rows wait for it. Each row is computed
            # once with all its keys, so nothing is merged.
            a = min(left, n) if rank > 0 else 0
            z = max(n - right, 0) if rank < world - 1 else n
            interior = a < z
            if interior:
                block = block_attention(q[:, a:z], k, v, rank * n + a, rank * n, left, right, 0, scale, final=True)
                _write(out, lse, a, block)
            _wait(reqs)
            for buf, src in bufs:
                halo.append((buf, src, src * n + (n - buf.shape[2] if src < rank else 0)))
            pieces = sorted([(kv, rank * n)] + [(buf, k0) for buf, _, k0 in halo], key=lambda p: p[1])
            for r0, r1 in [(0, a), (z, n)] if interior else [(0, n)]:
                if r0 < r1:
                    # the keys rows r0 .. r1 - 1 can see
                    (kr, vr), k0 = _gather(pieces, rank * n + r0 - left, rank * n + r1 + right)
                    block = block_attention(q[:, r0:r1], kr, vr, rank * n + r0, k0, left, right, 0, scale, final=True)
                    _write(out, lse, r0, block)
        else:
            out, lse = empty_state(q)
            current, spare = kv.contiguous(), torch.empty_like(kv)
            for hop in range(world):
                nxt, prv = (rank + 1) % world, (rank - 1) % world
                reqs = _exchange([(current, nxt)], [(spare, prv)], group) if hop < world - 1 else []
                src = (rank - hop) % world
                if block_visible(rank * n, n, src * n, n, left, right, global_tokens):
                    merge_(
                        out, lse, *block_attention(q, *current, rank * n, src * n, left, right, global_tokens, scale)
                    )
                _wait(reqs)
                current, spare = spare, current
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, *(buf for buf, _, _ in halo))
        ctx.halo = [(src, k0) for _, src, k0 in halo]
        ctx.halo_sends = sends  # the backward returns their dK/dV the same way
        ctx.args = left, right, global_tokens, scale, group, ring
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, *halo_bufs = ctx.saved_tensors
        left, right, global_tokens, scale, group, ring = ctx.args
        rank, world, n = dist.get_rank(group), dist.get_world_size(group), q.shape[1]
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        delta = output_delta(dout, out, dlse)

        def zeros():
            return [torch.zeros(x.shape, dtype=lse.dtype, device=q.device) for x in (q, k, v)]

        if not ring:
            # the own block's gradients are fresh float32 tensors: start from them (no zero + add pass)
            own = block_visible(rank * n, n, rank * n, n, left, right, 0)
            dq, dk, dv = (
                block_attention_backward(dout, q, k, v, lse, delta, rank * n, rank * n, left, right, 0, scale)
                if own
                else zeros()
            )
            back = []  # the halo's dK/dV, home to their owners
            for buf, (src, k0) in zip(halo_bufs, ctx.halo, strict=True):
                gq, gk, gv = block_attention_backward(
                    dout, q, buf[0], buf[1], lse, delta, rank * n, k0, left, right, 0, scale
                )
                dq += gq
                back.append((torch.stack([gk, gv]), src))
            incoming = [
                (dk.new_empty(2, k.shape[0], rows, *k.shape[2:]), dst, rows, side) for dst, rows, side in ctx.halo_sends
            ]
            _wait(_exchange(back, [(buf, dst) for buf, dst, _, _ in incoming], group))
            for buf, _, rows, side in incoming:
                dk[:, _rows(n, rows, side)] += buf[0]
                dv[:, _rows(n, rows, side)] += buf[1]
        else:
            dq, dk, dv = zeros()
            # The query side travels: (q, dO, lse, delta) fixed, dQ accumulating.
            travel = [x.clone() for x in (q, dout, lse, delta)]  # receive buffers later: never the saved tensors
            spare = [torch.empty_like(x) for x in travel]
            dq_travel, dq_spare = dq, torch.empty_like(dq)
            for hop in range(world):
                nxt, prv = (rank + 1) % world, (rank - 1) % world
                reqs = (
                    _exchange([(x, nxt) for x in travel], [(x, prv) for x in spare], group) if hop < world - 1 else []
                )
                src = (rank - hop) % world
                if block_visible(src * n, n, rank * n, n, left, right, global_tokens):
                    tq, tdo, tlse, tdelta = travel
                    gq, gk, gv = block_attention_backward(
                        tdo, tq, k, v, tlse, tdelta, src * n, rank * n, left, right, global_tokens, scale
                    )
                    dq_travel += gq
                    dk += gk
                    dv += gv
                if world == 1:  # nothing travels: a rank never sends to itself
                    break
                _wait(reqs + _exchange([(dq_travel, nxt)], [(dq_spare, prv)], group))  # dQ follows its queries
                travel, spare = spare, travel
                dq_travel, dq_spare = dq_spare, dq_travel
            dq = dq_travel  # after the last hop, this rank's own dQ is home
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


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
    attention of this rank's shard; differentiable. Returns out (batch, n,
    q_heads, head_dim) in q's dtype, and lse (batch, q_heads, n) float32/64
    natural log if asked."""
    if not (q.dim() == k.dim() == v.dim() == 4) or k.shape != v.shape or q.shape[:2] != k.shape[:2]:
        raise ValueError(f"q, k, v must be (batch, n, heads, head_dim) shards: {q.shape}, {k.shape}, {v.shape}")
    if q.shape[2] % k.shape[2]:
        raise ValueError("q_heads must be a multiple of kv_heads")
    n = _shard_len(q, group)
    left, right = window_bounds(window, causal, n * dist.get_world_size(group))
    ring = global_tokens > 0 or window is None
    out, lse = _SequenceParallelAttention.apply(q, k, v, left, right, global_tokens, scale, group, ring)
    return (out, lse) if return_lse else out
