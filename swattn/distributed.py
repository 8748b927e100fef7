"""Sequence-parallel sliding-window attention over torch.distributed (NCCL on
GPUs, gloo on CPUs), forward and backward.

The sequence is split into P equal shards, rank r holding positions
[r * n, (r + 1) * n) of q, k, v as (batch, n, heads, head_dim). Window: the
repository's one definition (window.py): query i sees key j iff
-left <= j - i <= right, or either is below ``global_tokens``.

Before any transfer, every rank checks its own arguments (the single-device
API's errors: ``window.check_window``, ``api.check_scale``, the shapes) and
then all ranks exchange one small fixed-size int64 descriptor of them (one
all-gather): window, causal, global tokens, scale, head counts, head_dim,
dtype, batch, shard length, gradient tracking and whether the local check
failed. A rank whose check failed raises its own error; every other rank
raises a ValueError naming it; ranks that disagree all raise one ValueError
naming what differs and each rank's value. So a mistake on one rank stops
every rank instead of leaving the others waiting in a transfer.

Every wait (the descriptor's all-gather, the halo and ring transfers, forward
and backward) takes ``timeout`` (default: the process group's, set by
``init_process_group(timeout=...)``): a rank that died or never calls leaves
its peers with an error, not a hang. See ``sliding_window_attention_sp`` for
what a timeout leaves behind.

Two schedules, both built on online.py's blocks (``block_attention``,
``block_attention_backward``) and its one merge (``merge_``):

* halo (a pure window, both sides bounded): rank r needs only the K/V rows
  within ``left`` before and ``right`` after its shard, from as many neighbours
  as the window spans (``halo_plan``). They travel with one
  ``batch_isend_irecv`` while the rank computes the rows whose windows stay
  inside its shard; the rows near an edge then run over the halo and the local
  keys together (split by queries, so no merge). The halo is kept for the
  backward, which sends the halo's dK/dV back to their owners the same way,
  reversed.
* ring (full attention, a side unbounded (-1), or global tokens, which every
  query must see): the BurstAttention global-attention-optimisation ring.
  Forward: K/V blocks travel around the ring, P - 1 hops, each hop's transfer
  posted before the current block is computed (double buffering). Backward:
  K/V stay, and each query shard's (q, dO, lse, delta) travels, its dQ
  accumulating on the way and arriving home after the last hop. Blocks the
  window cannot see are skipped (not their transfer: the ring must go on).
"""

from __future__ import annotations

import datetime
import math
import struct
import zlib

import torch
import torch.distributed as dist

from .api import check_qkv, check_scale
from .eager import work_dtype
from .online import block_attention, block_attention_backward, empty_state, merge_, window_bounds
from .ops import output_delta
from .window import UNBOUNDED, block_visible, check_window

_MAGIC = 0x53575350_0001  # "SWSP", descriptor version 1: a peer in another collective shows up as a mismatch
# The descriptor every rank contributes: int64 fields, in this order.
_FIELDS = (
    "magic",
    "failed",
    "left",
    "right",
    "causal",
    "global_tokens",
    "scale_given",
    "scale_bits",
    "q_heads",
    "kv_heads",
    "head_dim",
    "dtype",
    "batch",
    "shard",
    "grad",
)
_DTYPES = {zlib.crc32(str(d).encode()): str(d) for d in vars(torch).values() if isinstance(d, torch.dtype)}


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _bits_float(b: int) -> float:
    return struct.unpack("<d", struct.pack("<q", b))[0]


# What the ranks must agree on: (name in the error, the value shown, from a descriptor dict)
_AGREE = (
    ("window (left, right; -1 unbounded; right 0 if causal)", lambda d: (d["left"], d["right"])),
    ("causal", lambda d: bool(d["causal"])),
    ("global_tokens", lambda d: d["global_tokens"]),
    ("scale", lambda d: _bits_float(d["scale_bits"]) if d["scale_given"] else None),
    ("q_heads", lambda d: d["q_heads"]),
    ("kv_heads", lambda d: d["kv_heads"]),
    ("head_dim", lambda d: d["head_dim"]),
    ("dtype", lambda d: _DTYPES.get(d["dtype"], f"dtype#{d['dtype']}")),
    ("batch", lambda d: d["batch"]),
    ("shard length (sequence shards must have equal lengths)", lambda d: d["shard"]),
    ("gradient tracking (all ranks or none must run the backward)", lambda d: bool(d["grad"])),
)


def uses_ring(pair: tuple[int, int] | None, global_tokens: int) -> bool:
    """Whether a window runs the ring (else the halo): full attention (None), a
    side unbounded (-1, as for full attention: the halo would gather the whole
    sequence on a rank) or global tokens. ``pair``: ``check_window``'s (left,
    right) with causal applied (right = 0)."""
    return global_tokens > 0 or pair is None or UNBOUNDED in pair


def _backend(group) -> str:
    return str(dist.get_backend(group)).lower()


def _group_device(group, q) -> torch.device:
    """Where the descriptor's all-gather runs: the CPU for gloo, else q's device
    (or the current CUDA device for NCCL when q is unusable)."""
    backend = _backend(group)
    if "gloo" in backend:  # gloo (also "cpu:gloo,cuda:nccl"): CPU tensors
        return torch.device("cpu")
    if isinstance(q, torch.Tensor) and q.device.type != "cpu":
        return q.device
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _check_timeout(timeout) -> datetime.timedelta | None:
    """None (the process group's timeout) or a positive timedelta (seconds as a number)."""
    if timeout is None:
        return None
    if isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        if not math.isfinite(timeout):
            raise ValueError(
                f"timeout must be finite seconds or a timedelta (None: the process group's), got {timeout}"
            )
        timeout = datetime.timedelta(seconds=timeout)
    if not isinstance(timeout, datetime.timedelta):
        raise TypeError(f"timeout must be a datetime.timedelta, seconds or None, got {timeout!r}")
    if timeout <= datetime.timedelta(0):
        raise ValueError(f"timeout must be positive, got {timeout}")
    # Work.wait counts milliseconds and takes 0 as "no timeout": never round down to it
    return max(timeout, datetime.timedelta(milliseconds=1))


def _check_args(q, k, v, window, causal, global_tokens, scale, group) -> tuple[int, int] | None:
    """This rank's arguments, with the single-device API's errors (api.py); returns
    the window pair (-1 unbounded) with causal applied, None for full attention."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    pair = check_window(window)
    if isinstance(global_tokens, bool) or not isinstance(global_tokens, int) or global_tokens < 0:
        raise ValueError(f"global_tokens must be an int >= 0, got {global_tokens!r}")
    check_scale(scale)
    check_qkv(q, k, v, kernels_only=False)
    if _backend(group) == "nccl" and not q.is_cuda:
        raise ValueError(f"an NCCL group needs CUDA tensors, got q on {q.device}")
    if pair is not None and causal:
        pair = (pair[0], 0)
    return pair


def _describe(q, k, v, pair, causal, global_tokens, scale) -> list[int]:
    left, right = (UNBOUNDED, UNBOUNDED) if pair is None else pair
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    d = dict(
        magic=_MAGIC,
        failed=0,
        left=left,
        right=right,
        causal=int(causal),
        global_tokens=global_tokens,
        scale_given=int(scale is not None),
        scale_bits=_float_bits(scale) if scale is not None else 0,
        q_heads=q.shape[2],
        kv_heads=k.shape[2],
        head_dim=q.shape[3],
        dtype=zlib.crc32(str(q.dtype).encode()),
        batch=q.shape[0],
        shard=q.shape[1],
        grad=int(grad),
    )
    return [int(d[f]) for f in _FIELDS]


def _ranks(ranks: list[int]) -> str:
    """'rank 2', 'ranks 0, 1', 'ranks 0-63, 65': runs of three or more as ranges."""
    runs: list[list[int]] = []
    for r in ranks:
        if runs and r == runs[-1][-1] + 1:
            runs[-1].append(r)
        else:
            runs.append([r])
    parts = [f"{run[0]}-{run[-1]}" if len(run) > 2 else ", ".join(map(str, run)) for run in runs]
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(parts)


def _comm_error(e: Exception, what: str, timeout, group) -> Exception:
    """A failed or timed-out wait, as an error that says where and what it means."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    limit = f"{timeout.total_seconds():g} s" if timeout is not None else "the process group's timeout"
    msg = (
        f"sliding_window_attention_sp: rank {rank} of {world}: {what} failed (waited at most {limit}): "
        f"{type(e).__name__}: {e}. A rank that died, or never reached this call, leaves its peers here; "
        "this process group should not be used for collectives any more"
    )
    if "timed out" in str(e).lower():
        return TimeoutError(msg)
    try:
        return type(e)(msg)
    except Exception:
        return RuntimeError(msg)


def _agree(desc: list[int], device, group, timeout, local_error: Exception | None) -> None:
    """All-gather the ranks' descriptors; raise on every rank if one failed its
    local check (that rank: its own error) or if they differ."""
    world = dist.get_world_size(group)
    mine = torch.tensor(desc, dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    work = dist.all_gather(everyone, mine, group=group, async_op=True)
    _wait([work], timeout, "checking that all ranks were given the same arguments", group)
    descs = [dict(zip(_FIELDS, row, strict=True)) for row in torch.stack(everyone).tolist()]
    if local_error is not None:
        raise local_error
    strangers = [r for r, d in enumerate(descs) if d["magic"] != _MAGIC]
    if strangers:
        raise ValueError(
            f"sliding_window_attention_sp: {_ranks(strangers)} sent no descriptor of this function "
            "(another collective, or another version of swattn?)"
        )
    failed = [r for r, d in enumerate(descs) if d["failed"]]
    if failed:
        raise ValueError(
            f"sliding_window_attention_sp: {_ranks(failed)} rejected {'its' if len(failed) == 1 else 'their'} "
            "arguments (the error there says why); every rank stops here rather than wait for it"
        )
    diffs = []
    for name, value in _AGREE:
        by_value: dict = {}
        for r, d in enumerate(descs):
            by_value.setdefault(value(d), []).append(r)
        if len(by_value) > 1:
            diffs.append(f"{name}: " + "; ".join(f"{val} on {_ranks(rs)}" for val, rs in by_value.items()))
    if diffs:
        raise ValueError(
            "sliding_window_attention_sp: all ranks must be given the same arguments, but they differ in "
            + " | ".join(diffs)
        )


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


def _wait(reqs, timeout, what: str, group) -> None:
    """Wait for posted transfers, at most ``timeout`` each (None: the process
    group's timeout, which the backend applies)."""
    for r in reqs:
        try:
            r.wait() if timeout is None else r.wait(timeout)
        except Exception as e:
            raise _comm_error(e, what, timeout, group) from e


class _SequenceParallelAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, left, right, global_tokens, scale, group, ring, timeout):
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
            _wait(reqs, timeout, "the halo exchange of K/V", group)
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
                _wait(reqs, timeout, f"ring hop {hop + 1} of K/V", group)
                current, spare = spare, current
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, *(buf for buf, _, _ in halo))
        ctx.halo = [(src, k0) for _, src, k0 in halo]
        ctx.halo_sends = sends  # the backward returns their dK/dV the same way
        ctx.args = left, right, global_tokens, scale, group, ring, timeout
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, *halo_bufs = ctx.saved_tensors
        left, right, global_tokens, scale, group, ring, timeout = ctx.args
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
            reqs = _exchange(back, [(buf, dst) for buf, dst, _, _ in incoming], group)
            _wait(reqs, timeout, "the backward's halo exchange of dK/dV", group)
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
                reqs += _exchange([(dq_travel, nxt)], [(dq_spare, prv)], group)  # dQ follows its queries
                _wait(reqs, timeout, f"backward ring hop {hop + 1}", group)
                travel, spare = spare, travel
                dq_travel, dq_spare = dq_spare, dq_travel
            dq = dq_travel  # after the last hop, this rank's own dQ is home
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None, None


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
    timeout: datetime.timedelta | float | None = None,
):
    """Sliding-window (``window`` int or (left, right), -1 unbounded) or full
    (``window=None``) attention of this rank's shard; differentiable. Returns out
    (batch, n, q_heads, head_dim) in q's dtype, and lse (batch, q_heads, n)
    float32/64 natural log if asked.

    Every rank of ``group`` must call it with the same window, causal,
    global_tokens, scale, head counts, head_dim, dtype, batch and shard length
    (and all or none tracking gradients): that is checked first (one small
    all-gather), and a difference, or a rank whose own arguments are invalid,
    raises on every rank (ValueError; the invalid rank raises its own
    TypeError/ValueError, as the single-device API would).

    ``timeout`` (a timedelta or seconds; None: the process group's, from
    ``init_process_group(timeout=...)``) bounds each wait of this call and of
    its backward: a peer that died or never calls makes this rank raise
    (TimeoutError, or the backend's RuntimeError, e.g. when the peer's
    connection closed) instead of hanging. A timeout cannot cancel what was
    posted, so the group is unusable afterwards. On gloo (torch 2.13) both
    kinds of wait honour it: a timed-out transfer closes the group's
    connections (later calls on it fail at once: "Application timeout caused
    pair closure"); a timed-out all-gather stays pending, and
    ``destroy_process_group`` waits for it until the peer leaves or the group's
    own timeout. On NCCL an explicit timeout makes each wait block the CPU until
    its transfer is done (None keeps the waits asynchronous on the stream).
    The argument check costs one all-gather and one device-to-host copy a call
    (as the shard-length check before it did).
    """
    world = dist.get_world_size(group)
    local_error, wait_timeout, pair = None, None, None
    try:
        wait_timeout = _check_timeout(timeout)
        pair = _check_args(q, k, v, window, causal, global_tokens, scale, group)
        desc = _describe(q, k, v, pair, causal, global_tokens, scale)
    except Exception as e:  # still join the all-gather, so that the other ranks raise too
        local_error = e
        desc = [_MAGIC if f == "magic" else int(f == "failed") for f in _FIELDS]
    _agree(desc, _group_device(group, q), group, wait_timeout, local_error)
    n = q.shape[1]
    left, right = window_bounds(window, causal, n * world)
    ring = uses_ring(pair, global_tokens)
    out, lse = _SequenceParallelAttention.apply(q, k, v, left, right, global_tokens, scale, group, ring, wait_timeout)
    return (out, lse) if return_lse else out
