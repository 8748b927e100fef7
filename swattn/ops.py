"""The op as PyTorch sees it: ``swattn::attention_fwd`` / ``swattn::attention_bwd``
custom ops with autograd, so that training works and ``torch.compile`` treats
the op as opaque (no graph break, no silent fallback).

Both ops work on the kernel's layout: (batch, seq, heads, head_dim) with the
head classes of a dilation already formed (window.to_classes, a view the
autograd of PyTorch differentiates). Inputs arrive validated (api.py). Window: local query i sees key j iff
-left <= j - i <= right (or, with adaptive windows, -win[h, i, 0] <= j - i <=
win[h, i, 1]) or either is below ``n_global``, and both exist in their head
class (``window.class_len(true_seq_len, class, dilation)``).

CUDA runs the TileLang kernels (launch.py); CPU the exact eager twin (eager.py).
"""

from __future__ import annotations

import torch

from . import eager, launch, window


def output_delta(dout: torch.Tensor, out: torch.Tensor, dlse: torch.Tensor | None = None) -> torch.Tensor:
    """delta = rowsum(dout * out) - dlse, (batch, heads, seq), the term every key
    block's backward shares (dS = P * (dP - delta)); out, dout (batch, seq, heads,
    dim). Float32 (float64 for float64 out). On the GPU, for the kernels' dtypes and
    head dims, one pass of the backward's preprocess kernel reads out and dout in
    their own dtype (an eager float32 product and sum would write and read them
    again in float32: ~3.5 GB at 131072 tokens, 32 heads of 128); the eager twin elsewhere."""
    if launch.on_gpu(out) and out.dtype in launch.DTYPES and out.shape[3] in launch.HEAD_DIMS:
        return launch.preprocess(out, dout, dlse)
    return eager.output_delta(dout, out, dlse)


def _fwd_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    win: torch.Tensor | None,
    kt_fwd: torch.Tensor | None,
    kt_bwd: torch.Tensor | None,
    left: int,
    right: int,
    n_global: int,
    true_seq_len: int,
    dilation: int,
    heads_per_class: int,
    kv_heads_per_class: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out in q's dtype, lse (batch, q_heads, seq) float32, natural log).

    win, kt_fwd, kt_bwd: adaptive windows (``adaptive_tables``) or None."""
    s, hq = q.shape[1], q.shape[2]
    if launch.on_gpu(q):
        tables = None if win is None else (win, kt_fwd)
        return launch.forward(
            q, k, v, left, right, n_global, true_seq_len, dilation, heads_per_class, kv_heads_per_class, tables
        )
    mask = eager.class_masks(s, hq, left, right, win, n_global, true_seq_len, dilation, heads_per_class, q.device)
    out, lse = eager.masked_forward(q, k, v, mask)
    return out.to(q.dtype).contiguous(), lse.to(eager.work_dtype(q))


attention_fwd = torch.library.custom_op("swattn::attention_fwd", _fwd_impl, mutates_args=())


@attention_fwd.register_fake
def _(q, k, v, win, kt_fwd, kt_bwd, *scalars):
    b, s, hq, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, hq, s), dtype=eager.work_dtype(q))


def _bwd_impl(
    dout: torch.Tensor,
    delta_shift: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    win: torch.Tensor | None,
    kt_fwd: torch.Tensor | None,
    kt_bwd: torch.Tensor | None,
    left: int,
    right: int,
    n_global: int,
    true_seq_len: int,
    dilation: int,
    heads_per_class: int,
    kv_heads_per_class: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in the input dtype. ``delta_shift`` (batch, q_heads, seq) is the
    gradient of the lse output (None if unused): it enters as delta - dlse."""
    delta = output_delta(dout, out, delta_shift)
    if launch.on_gpu(q):
        dq, dk, dv = launch.backward(
            dout,
            q,
            k,
            v,
            lse,
            delta,
            left,
            right,
            true_seq_len,
            dilation,
            kv_heads_per_class,
            true_q_len=true_seq_len,  # queries that exist (a dilation pads each class)
            n_global=n_global,
            tables=None if win is None else (win, kt_bwd),
            kv_grads_dtype=q.dtype,  # written once each: no float32 copy to cast
        )
        return dq.to(q.dtype), dk, dv
    s = q.shape[1]
    mask = eager.class_masks(
        s, q.shape[2], left, right, win, n_global, true_seq_len, dilation, heads_per_class, q.device
    )
    dq, dk, dv = eager.masked_backward(dout, q, k, v, lse, delta, mask)
    return dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous()


attention_bwd = torch.library.custom_op("swattn::attention_bwd", _bwd_impl, mutates_args=())


@attention_bwd.register_fake
def _(dout, delta_shift, q, k, v, out, lse, win, kt_fwd, kt_bwd, *scalars):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


N_FWD_INPUTS = 13  # q, k, v, win, kt_fwd, kt_bwd and seven ints


def _setup_context(ctx, inputs, output):
    q, k, v, win, kt_fwd, kt_bwd, *ints = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)  # exactly what the backward needs, plus the window tables
    ctx.tables = win, kt_fwd, kt_bwd
    ctx.ints = ints


def _backward(ctx, dout, dlse, bwd=attention_bwd):
    q, k, v, out, lse = ctx.saved_tensors
    dout = torch.zeros_like(out) if dout is None else dout.contiguous()  # any strides in
    shift = None if dlse is None else dlse.float()
    dq, dk, dv = bwd(dout, shift, q, k, v, out, lse, *ctx.tables, *ctx.ints)
    return (dq, dk, dv) + (None,) * (N_FWD_INPUTS - 3)


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The same forward and backward without the dispatcher, for eager calls.

    torch.library's custom-op path (schema checks, redispatch, its autograd
    wrapper) cost ~0.6 ms of host time per forward + backward on the H100's host
    (measured by a host-time probe, analysis.md), more than the GPU's work on small shapes. Under
    torch.compile the custom ops stay (``attention`` picks)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _fwd_impl(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, dout, dlse):
        return _backward(ctx, dout, dlse, _bwd_impl)


def attention(
    q, k, v, left: int, right: int, dilation: int = 1, global_tokens: int = 0, row_windows=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable sliding-window attention for (batch, seq, heads, head_dim)
    tensors (already validated; api.sliding_window_attention is the public
    entry): the dilation's head classes around the custom op. ``row_windows``:
    adaptive windows (left, right), each int (q_heads, seq). Returns (out, lse)."""
    s, hq, hk, d = q.shape[1], q.shape[2], k.shape[2], q.shape[3]
    qv, kv, vv = (window.to_classes(x, dilation) for x in (q, k, v))
    sd = qv.shape[1]
    tables = (None, None, None)
    if row_windows is not None:
        win = torch.stack([window.rows_to_classes(w, dilation) for w in row_windows], -1).contiguous()
        tables = (win, None, None)  # the eager path needs only the windows, no tile schedules
        if launch.on_gpu(q):
            tables = launch.adaptive_tables(win, dilation, hq, hk, s, global_tokens, d, launch.cuda_arch(q.device))
    scalars = (min(left, sd - 1), min(right, sd - 1), global_tokens, s, dilation, hq, hk)
    fwd = attention_fwd if torch.compiler.is_compiling() else _EagerAttention.apply
    out, lse = fwd(qv, kv, vv, *tables, *scalars)
    return window.from_classes(out, lse, s, dilation)


# ---- the FlashAttention-style op: bottom-right windows, varlen, softcap, sinks ----------
#
# q (batch, seq_q, q_heads, D) with k, v (batch, seq_k, kv_heads, D), or packed
# q (total_q, q_heads, D), k, v (total_k, kv_heads, D) with int32 cu_seqlens_q/k
# (batch + 1). Query i of a sequence sits at key position i + seq_k - seq_q and
# sees keys pos - left .. pos + right (window.py). lse (batch, q_heads, seq_q), or
# (q_heads, total_q) packed; natural log, sinks included.


def _flash_fwd_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    sinks: torch.Tensor | None,
    left: int,
    right: int,
    softcap: float,
    scale: float,
    max_seqlen_q: int,
    max_seqlen_k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    if launch.on_gpu(q):
        return launch.flash_forward(
            q, k, v, cu_seqlens_q, cu_seqlens_k, sinks, left, right, softcap, scale, max_seqlen_q, max_seqlen_k
        )
    out, lse = eager.flash_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, sinks, left, right, softcap, scale)
    return out.to(q.dtype), lse


flash_fwd = torch.library.custom_op("swattn::flash_fwd", _flash_fwd_impl, mutates_args=())


@flash_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, sinks, *scalars):
    lse_shape = (q.shape[1], q.shape[0]) if cu_seqlens_q is not None else (q.shape[0], q.shape[2], q.shape[1])
    return torch.empty_like(q), q.new_empty(lse_shape, dtype=eager.work_dtype(q))


def _flash_bwd_impl(
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    sinks: torch.Tensor | None,
    left: int,
    right: int,
    softcap: float,
    scale: float,
    max_seqlen_q: int,
    max_seqlen_k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dsinks): the input dtypes, dsinks float32 (zeros (0,) without sinks)."""
    args = (dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, sinks, left, right, softcap, scale)
    if launch.on_gpu(q):
        dq, dk, dv, dsinks = launch.flash_backward(*args, max_seqlen_q, max_seqlen_k)
    else:
        dq, dk, dv, dsinks = eager.flash_backward(*args)
    dsinks = q.new_zeros((0,), dtype=torch.float32) if dsinks is None else dsinks.to(sinks.dtype)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dsinks


flash_bwd = torch.library.custom_op("swattn::flash_bwd", _flash_bwd_impl, mutates_args=())


@flash_bwd.register_fake
def _(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, sinks, *scalars):
    dsinks = q.new_empty((0,), dtype=torch.float32) if sinks is None else torch.empty_like(sinks)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dsinks


N_FLASH_INPUTS = 12  # q, k, v, cu_seqlens_q, cu_seqlens_k, sinks and six scalars


def _flash_setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, sinks, *scalars = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, sinks)
    ctx.scalars = scalars


def _flash_backward(ctx, dout, dlse, bwd=flash_bwd):
    q, k, v, out, lse, cu_q, cu_k, sinks = ctx.saved_tensors
    dout = torch.zeros_like(out) if dout is None else dout.contiguous()
    dq, dk, dv, dsinks = bwd(dout, dlse, q, k, v, out, lse, cu_q, cu_k, sinks, *ctx.scalars)
    return (dq, dk, dv, None, None, dsinks if sinks is not None else None) + (None,) * (N_FLASH_INPUTS - 6)


flash_fwd.register_autograd(_flash_backward, setup_context=_flash_setup_context)


class _EagerFlash(torch.autograd.Function):
    """``flash_fwd`` without the dispatcher's host cost, for eager calls (as ``_EagerAttention``)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _flash_fwd_impl(*inputs)
        _flash_setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, dout, dlse):
        return _flash_backward(ctx, dout, dlse, _flash_bwd_impl)


def flash_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, sinks, left, right, softcap, scale, max_q, max_k):
    """Differentiable (q, k, v, sinks) bottom-right windowed attention (inputs validated by api.py)."""
    fwd = flash_fwd if torch.compiler.is_compiling() else _EagerFlash.apply
    return fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, sinks, left, right, float(softcap), float(scale), max_q, max_k)
