"""Compile caches, tile selection and one launcher per kernel.

Everything that touches a compiled TileLang kernel goes through here: the
tiles shipped in ``tiles.json`` (package data, chosen by tools/sweep_op.py and
tools/sweep_bwd.py on the GPU), one ``functools.cache`` per kernel keyed by
every compile-time choice, and a launcher per kernel that allocates the
outputs and passes exactly the arguments its prim_func declares
(tests/test_launchers.py checks that on the CPU with stand-ins).

Launchers take tensors already validated (api.py) and in the kernels' layout
(head classes of a dilation formed: window.to_classes). Window arguments are in
the kernels' local coordinates: local query i sees local key j iff
-left <= j - i <= right (``window.shift_window`` folds block offsets in).
"""

from __future__ import annotations

import functools
import json
import math
from importlib import resources

import tilelang
import torch

from . import window
from .kernels import backward as bwd_kernels
from .kernels import forward as fwd_kernels
from .kernels.common import LOG2E

DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}
HEAD_DIMS = (64, 128)  # every kernel; the FlashAttention-style ones also 256 (PADDED_HEAD_DIMS)
PADDED_HEAD_DIMS = (64, 128, 256)  # other multiples of 8 are zero-padded up to the next
TILES = json.loads(resources.files(__package__).joinpath("tiles.json").read_text())
FWD_FIELDS = ("block_m", "block_n", "threads", "num_stages", "occupancy")
BWD_FIELDS = FWD_FIELDS + ("dq_tma", "kv_ss")
PASS_CONFIGS = {"tl.enable_fast_math": True}


def tile_config(head_dim: int, arch: str, kind: str = "forward") -> tuple:
    """The shipped tile of ``kind`` ("forward" or "backward") for (head_dim, arch) as a tuple."""
    fields = FWD_FIELDS if kind == "forward" else BWD_FIELDS
    entry = TILES[kind]["sm_90a" if arch.startswith("sm_9") else "sm_80"][str(head_dim)]
    return tuple(entry[f] for f in fields)


def on_gpu(x: torch.Tensor) -> bool:
    """Whether the kernels run for ``x`` (the seam the CPU tests of the launch paths patch)."""
    return x.is_cuda


@functools.cache
def cuda_arch(device) -> str:
    """The kernels' target for a CUDA device ("sm_90a" on Hopper); cached: the
    capability query costs host time on every call otherwise."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}{'a' if major == 9 else ''}"


def _compile(prim_func, arch: str, fast_math: bool = True):
    return tilelang.compile(
        prim_func, target={"kind": "cuda", "arch": arch}, pass_configs=PASS_CONFIGS if fast_math else {}
    )


@functools.cache
def compiled_forward(
    head_dim: int,
    dtype: str,
    arch: str,
    tile: tuple | None = None,
    mode: str = "general",
    skip_full_masks: bool = True,
    varlen: bool = False,
    softcap: bool = False,
    sinks: bool = False,
):
    tile = tile or tile_config(head_dim, arch)
    fn = fwd_kernels.make_forward(head_dim, dtype, arch, tile, mode, skip_full_masks, varlen, softcap, sinks)
    return _compile(fn, arch)


@functools.cache
def compiled_backward(
    head_dim: int,
    dtype: str,
    arch: str,
    tile: tuple | None = None,
    adaptive: bool = False,
    kv_grads: str = "float32",
    varlen: bool = False,
    softcap: bool = False,
):
    tile = tile or tile_config(head_dim, arch, "backward")
    return _compile(bwd_kernels.make_backward(head_dim, dtype, arch, tile, adaptive, kv_grads, varlen, softcap), arch)


@functools.cache
def compiled_preprocess(head_dim: int, dtype: str, arch: str):
    return _compile(bwd_kernels.make_preprocess(head_dim, dtype), arch, fast_math=False)


@functools.cache
def placeholders(device) -> tuple[torch.Tensor, ...]:
    """WIN, KT, CU (cu_seqlens) and SINK for the kernels that do not read them."""
    return (
        torch.zeros(1, 1, 2, dtype=torch.int32, device=device),
        torch.zeros(1, 1, 3, dtype=torch.int32, device=device),
        torch.zeros(2, dtype=torch.int32, device=device),
        torch.zeros(1, dtype=torch.float32, device=device),
    )


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    left: int,
    right: int,
    n_global: int = 0,
    true_seq_len: int | None = None,
    dilation: int = 1,
    heads_per_class: int | None = None,
    kv_heads_per_class: int | None = None,
    tables: tuple | None = None,
    tile: tuple | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward kernel: (out in q's dtype, lse (batch, q_heads, seq_q) float32, natural log).

    q (batch, seq_q, q_heads, D), k, v (batch, seq_k, kv_heads, D), contiguous.
    ``true_seq_len``: keys that exist (default seq_k). Dilation's head classes:
    ``heads_per_class`` / ``kv_heads_per_class`` (default: one class). ``tables``:
    (WIN, KT) of adaptive windows (``adaptive_tables``). The cheapest compiled
    mode that serves the call runs: "window" unless dilation, global tokens or
    adaptive windows need more. ``tile`` overrides the shipped tile (sweeps).
    ``scale``: the softmax scale, default 1 / sqrt(D)."""
    b, s, hq, d = q.shape
    hk = k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty(b, hq, s, device=q.device, dtype=torch.float32)
    win, kt, cu, sink = placeholders(q.device)
    if tables is not None:
        mode, (win, kt) = "adaptive", tables
    else:
        mode = "general" if dilation > 1 or n_global > 0 else "window"
    kernel = compiled_forward(d, DTYPES[q.dtype], cuda_arch(q.device), tile, mode)
    scalars = (
        left,
        right,
        n_global,
        hq if heads_per_class is None else heads_per_class,
        hk if kv_heads_per_class is None else kv_heads_per_class,
        k.shape[1] if true_seq_len is None else true_seq_len,
        dilation,
        0,
        (1.0 / math.sqrt(d) if scale is None else scale) * LOG2E,
        0.0,
        0.0,
    )
    kernel(q, k, v, out, lse, win, kt, cu, cu, sink, *scalars)
    return out, lse


def preprocess(out: torch.Tensor, dout: torch.Tensor, dlse: torch.Tensor | None = None) -> torch.Tensor:
    """delta = rowsum(dout * out) - dlse, (batch, heads, seq) float32 contiguous, by one
    pass of the preprocess kernel over out and dout in their own dtype (``dlse``, the
    gradient reaching lse, subtracted after it)."""
    b, s, h, d = out.shape
    delta = torch.empty(b, h, s, device=out.device, dtype=torch.float32)
    kernel = compiled_preprocess(d, DTYPES[out.dtype], cuda_arch(out.device))
    kernel(out.contiguous(), dout.to(out.dtype).contiguous(), delta)
    return delta if dlse is None else (delta - dlse.float()).contiguous()


def backward(
    do,
    q,
    k,
    v,
    lse,
    delta,
    left: int,
    right: int,
    true_seq_len: int,
    dilation: int = 1,
    kv_heads_per_class: int | None = None,
    true_q_len: int | None = None,
    n_global: int = 0,
    tables=None,
    kv_grads_dtype: torch.dtype = torch.float32,
    tile: tuple | None = None,
    scale: float | None = None,
):
    """The backward kernel: (dq float32, dk, dv in ``kv_grads_dtype``: float32 or
    q's dtype) for tensors in the kernels' layout; lse (natural log) and delta =
    rowsum(dO * O) - dlse (float32, batch, q_heads, seq_q) of these queries, which
    for a block are slices of the merged state. ``true_q_len``: queries that exist
    (default seq_q). ``tables``: (WIN, KT) of adaptive windows (``adaptive_tables``)."""
    d = q.shape[3]
    device = q.device  # each .device builds a new object: host time on small shapes
    if kv_grads_dtype not in (torch.float32, q.dtype):
        raise ValueError(f"kv_grads_dtype must be float32 or {q.dtype}, got {kv_grads_dtype}")
    do = do.to(q.dtype).contiguous()
    # The kernel's ABI wants lse/delta packed; a block's are slices of the merged state.
    lse, delta = lse.float().contiguous(), delta.float().contiguous()
    dq = torch.zeros(q.shape, device=device, dtype=torch.float32)
    dk = torch.empty(k.shape, device=device, dtype=kv_grads_dtype)
    dv = torch.empty(v.shape, device=device, dtype=kv_grads_dtype)
    kv_grads = "float32" if kv_grads_dtype == torch.float32 else DTYPES[q.dtype]
    kernel = compiled_backward(d, DTYPES[q.dtype], cuda_arch(device), tile, tables is not None, kv_grads)
    win, kt, cu, _ = placeholders(device)
    if tables is not None:
        win, kt = tables
    q_len = q.shape[1] if true_q_len is None else true_q_len
    kvpc = k.shape[2] if kv_heads_per_class is None else kv_heads_per_class
    sm_scale = 1.0 / math.sqrt(d) if scale is None else scale
    scalars = (left, right, n_global, kvpc, q_len, true_seq_len, dilation, 0, sm_scale, 0.0)
    kernel(q, k, v, do, lse, delta, dq, dk, dv, win, kt, cu, cu, *scalars)
    return dq, dk, dv


def adaptive_tables(
    win, dilation: int, q_heads: int, kv_heads: int, seq_len: int, global_tokens: int, head_dim: int, arch: str
):
    """(win, kt_fwd, kt_bwd) for per-row windows ``win`` already in the head-class
    layout (classes, seq / d, 2): the windows, the forward's key tiles per (head,
    query tile) and the backward's query tiles per (kv head, key tile), merged
    over each GQA group (a union of ranges; heads with none skipped)."""
    device = win.device
    valid = window.class_len(seq_len, torch.arange(dilation * q_heads, device=device) // q_heads, dilation)
    block_m, block_n = tile_config(head_dim, arch)[:2]
    kt_fwd = window.adaptive_schedule(win[..., 0], win[..., 1], valid, global_tokens, block_m, block_n)
    bm, bn = tile_config(head_dim, arch, "backward")[:2]
    per_head = window.adaptive_key_side_schedule(win[..., 0], win[..., 1], valid, global_tokens, bm, bn).long()
    group = q_heads // kv_heads
    per_head = per_head.view(dilation * kv_heads, group, per_head.shape[1], 3)
    n_g, lo, hi = per_head.unbind(-1)
    some = hi > lo
    big = 1 << 40
    lo_u = torch.where(some, lo, big).amin(1)
    hi_u = torch.where(some, hi, -big).amax(1)
    empty = hi_u < lo_u
    lo_u, hi_u = torch.where(empty, n_g[:, 0], lo_u), torch.where(empty, n_g[:, 0], hi_u)
    kt_bwd = torch.stack([n_g[:, 0], lo_u, hi_u], -1).int().contiguous()
    return win, kt_fwd.contiguous(), kt_bwd


def _padded(x: torch.Tensor, d: int) -> torch.Tensor:
    """x with its last dim zero-padded to d (scores and outputs of the real dims unchanged)."""
    return x if x.shape[-1] == d else torch.nn.functional.pad(x, (0, d - x.shape[-1]))


def padded_head_dim(d: int) -> int:
    """The kernel head_dim that serves head_dim d (a multiple of 8 up to 256)."""
    return next(p for p in PADDED_HEAD_DIMS if d <= p)


def _flash_views(q, k, v, cu_seqlens_q, left: int, right: int):
    """(q, k, v as (batch, seq, heads, D), kernel-local (left, right)): packed tensors
    as one batch of their totals; unpacked ones with seq_q != seq_k shifted
    bottom-right on the host (varlen kernels shift per sequence themselves)."""
    if cu_seqlens_q is not None:
        return q[None], k[None], v[None], left, right
    sq, sk = q.shape[1], k.shape[1]
    lo, hi = window.shift_window(left, right, sq - sk, sq + sk)
    return q, k, v, lo, hi


def flash_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, sinks, left, right, softcap, scale, max_seqlen_q, max_seqlen_k):
    """The forward kernel in its FlashAttention-style variants (``ops.flash_fwd``'s
    arguments): (out like q, lse (batch, q_heads, seq_q) or (q_heads, total_q))."""
    d = q.shape[-1]
    dp = padded_head_dim(d)
    varlen = cu_seqlens_q is not None
    qv, kv, vv, lo, hi = _flash_views(*(_padded(x, dp) for x in (q, k, v)), cu_seqlens_q, left, right)
    b, s, hq, _ = qv.shape
    out = torch.empty_like(qv)
    lse = torch.empty(b, hq, s, device=q.device, dtype=torch.float32)
    win, kt, cu, sink = placeholders(q.device)
    kernel = compiled_forward(
        dp, DTYPES[q.dtype], cuda_arch(q.device), None, "window", True, varlen, softcap > 0, sinks is not None
    )
    scale_log2, cap_pre = (LOG2E, scale / softcap) if softcap > 0 else (scale * LOG2E, 0.0)
    kernel(
        qv, kv, vv, out, lse, win, kt,
        cu_seqlens_q if varlen else cu,
        cu_seqlens_k if varlen else cu,
        sink if sinks is None else sinks.float().contiguous(),
        lo, hi, 0, hq, kv.shape[2], kv.shape[1], 1, max_seqlen_q if varlen else 0, scale_log2, float(softcap), cap_pre,
    )  # fmt: skip
    out = out[..., :d]
    return (out[0], lse[0]) if varlen else (out, lse)


def flash_backward(
    dout,
    dlse,
    q,
    k,
    v,
    out,
    lse,
    cu_seqlens_q,
    cu_seqlens_k,
    sinks,
    left,
    right,
    softcap,
    scale,
    max_seqlen_q,
    max_seqlen_k,
):
    """The backward kernel in its FlashAttention-style variants: (dq, dk, dv in the
    inputs' dtype, dsinks float32 or None); lse as ``flash_forward`` returned it.
    dsink_h = -sum over rows of exp(sink_h - lse) * delta, delta = rowsum(dO * O) - dlse."""
    d = q.shape[-1]
    dp = padded_head_dim(d)
    varlen = cu_seqlens_q is not None
    if not varlen and softcap > 0 and dp == 256:
        # TileLang 0.1.15 cannot build this tile's softcap kernel without varlen (its
        # ThreadSync pass: "a shared-memory sync inside a divergent region with 219
        # threads"); the varlen one builds: run the batch as packed equal-length sequences.
        b, sq, sk = q.shape[0], q.shape[1], k.shape[1]
        cu_q = torch.arange(b + 1, device=q.device, dtype=torch.int32) * sq
        cu_k = torch.arange(b + 1, device=q.device, dtype=torch.int32) * sk
        flat = [x.reshape(-1, *x.shape[2:]) for x in (dout, q, k, v, out)]
        lse_p, dlse_p = (None if x is None else x.transpose(0, 1).reshape(x.shape[1], -1) for x in (lse, dlse))
        dq, dk, dv, dsinks = flash_backward(
            flat[0], dlse_p, *flat[1:], lse_p, cu_q, cu_k, sinks, left, right, softcap, scale, sq, sk
        )
        return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape), dsinks
    device = q.device
    qv, kv, vv, lo, hi = _flash_views(*(_padded(x, dp) for x in (q, k, v)), cu_seqlens_q, left, right)
    dov, outv = (_padded(x, dp)[None] if varlen else _padded(x, dp) for x in (dout, out))
    lsev = lse[None] if varlen else lse
    delta = preprocess(outv, dov, dlse[None] if varlen and dlse is not None else dlse)
    dq = torch.zeros(qv.shape, device=device, dtype=torch.float32)
    dk, dv = torch.empty_like(kv), torch.empty_like(vv)
    win, kt, cu, _ = placeholders(device)
    kernel = compiled_backward(
        dp, DTYPES[q.dtype], cuda_arch(device), None, False, DTYPES[q.dtype], varlen, softcap > 0
    )
    sk = kv.shape[1]
    kernel(
        qv, kv, vv, dov.contiguous(), lsev.float().contiguous(), delta, dq, dk, dv, win, kt,
        cu_seqlens_q if varlen else cu,
        cu_seqlens_k if varlen else cu,
        lo, hi, 0, kv.shape[2], qv.shape[1], sk, 1, max_seqlen_k if varlen else 0, scale, float(softcap),
    )  # fmt: skip
    dsinks = None
    if sinks is not None:
        p_sink = torch.exp(sinks.float()[None, :, None] - lsev.float())
        dsinks = -(p_sink * delta).sum((0, 2))
    grads = (dq[..., :d], dk[..., :d], dv[..., :d])
    if varlen:
        grads = tuple(g[0] for g in grads)
    return (*grads, dsinks)
