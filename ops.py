"""The op as PyTorch sees it: ``swattn::attention_fwd`` / ``swattn::attention_bwd``
custom ops with autograd, so that training works and ``torch.compile`` treats
the op as opaque (no graph break, no silent fallback).

Both ops work on the kernel's layout: (batch, seq, heads, head_dim) with the
head classes of a dilation already formed (swattn.to_classes, a view the
autograd of PyTorch differentiates). Window: local query i sees key j iff
-left <= j - i <= right (or, with adaptive windows, -win[h, i, 0] <= j - i <=
win[h, i, 1]) or either is below ``n_global``, and both exist in their head
class (``swattn.class_len(true_seq_len, class, dilation)``).

CUDA runs the TileLang kernels (swattn.py forward, backward.py backward). CPU
runs the same algorithm eagerly (P recomputed from the saved log-sum-exp,
delta = rowsum(dO * O)) in float32: it checks the bookkeeping on machines
without a GPU and is no reference (reference.py is).
"""

from __future__ import annotations

import torch

import online  # the eager path (masked_forward / masked_backward), shared with the blocks
import swattn


def _class_masks(s, heads, left, right, win, n_global, true_seq_len, dilation, heads_per_class, device):
    """(heads, s, s) boolean: the window (or a global token) inside each head's class, padding hidden."""
    if win is not None:  # one (left, right) per row: (heads, s, 1) bounds
        left, right = win[..., 0, None], win[..., 1, None]
    local = online.block_mask(0, s, 0, s, left, right, n_global, device=device)
    i = torch.arange(s, device=device)
    valid = torch.tensor(
        [swattn.class_len(true_seq_len, h // heads_per_class, dilation) for h in range(heads)], device=device
    )
    exists = i[None, :] < valid[:, None]  # (heads, s)
    return local & exists[:, :, None] & exists[:, None, :]


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
    b, s, hq, d = q.shape
    if swattn.on_gpu(q):
        out = torch.empty_like(q)
        lse = torch.empty(b, hq, s, device=q.device, dtype=torch.float32)
        if win is not None:
            mode = "adaptive"
        else:
            mode = "general" if dilation > 1 or n_global > 0 else "window"
            win, kt_fwd = swattn._placeholders(q.device)
        kernel = swattn.compiled_forward(d, swattn.DTYPES[q.dtype], swattn.cuda_arch(q.device), None, mode)
        scalars = (left, right, n_global, heads_per_class, kv_heads_per_class, true_seq_len, dilation)
        kernel(q, k, v, out, lse, win, kt_fwd, *scalars)
        return out, lse
    mask = _class_masks(s, hq, left, right, win, n_global, true_seq_len, dilation, heads_per_class, q.device)
    out, lse = online.masked_forward(q, k, v, mask)
    return out.to(q.dtype).contiguous(), lse.float()


attention_fwd = torch.library.custom_op("swattn::attention_fwd", _fwd_impl, mutates_args=())


@attention_fwd.register_fake
def _(q, k, v, win, kt_fwd, kt_bwd, *scalars):
    b, s, hq, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, hq, s), dtype=torch.float32)


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
    if swattn.on_gpu(q):
        import backward  # the backward kernels compile only when a backward runs

        grads = backward.attention_backward(
            dout,
            q,
            k,
            v,
            out,
            lse,
            left,
            right,
            true_seq_len,
            dilation,
            kv_heads_per_class,
            dlse=delta_shift,
            n_global=n_global,
            row_windows=None if win is None else (win, kt_bwd),
            kv_grads_dtype=q.dtype,  # written once each: no float32 copy to cast
        )
        dq, dk, dv = grads
        return dq.to(q.dtype), dk, dv  # dK, dV already in the input dtype (q, k, v share it)
    s = q.shape[1]
    mask = _class_masks(s, q.shape[2], left, right, win, n_global, true_seq_len, dilation, heads_per_class, q.device)
    delta = online.output_delta(dout, out, delta_shift)
    dq, dk, dv = online.masked_backward(dout, q, k, v, lse, delta, mask)
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
    (scripts/probe_bwd_host.py), more than the GPU's work on small shapes. Under
    torch.compile the custom ops stay (``attention`` picks)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _fwd_impl(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, dout, dlse):
        return _backward(ctx, dout, dlse, _bwd_impl)


def adaptive_tables(
    win, dilation: int, q_heads: int, kv_heads: int, seq_len: int, global_tokens: int, head_dim: int, arch: str
):
    """(win, kt_fwd, kt_bwd) for per-row windows ``win`` already in the head-class
    layout (classes, seq / d, 2): the windows, the forward's key tiles per (head,
    query tile) and the backward's query tiles per (kv head, key tile), merged
    over each GQA group (a union of ranges; heads with none skipped)."""
    import backward

    device = win.device
    valid = swattn.class_len(seq_len, torch.arange(dilation * q_heads, device=device) // q_heads, dilation)
    block_m, block_n = swattn.tile_config(head_dim, arch)[:2]
    kt_fwd = swattn.adaptive_schedule(win[..., 0], win[..., 1], valid, global_tokens, block_m, block_n)
    bm, bn = backward.tile_config(head_dim, arch)[:2]
    per_head = swattn.adaptive_key_side_schedule(win[..., 0], win[..., 1], valid, global_tokens, bm, bn).long()
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


def attention(
    q, k, v, left: int, right: int, dilation: int = 1, global_tokens: int = 0, row_windows=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable sliding-window attention for (batch, seq, heads, head_dim)
    tensors (already validated; swattn.sliding_window_attention is the public
    entry): the dilation's head classes around the custom op. ``row_windows``:
    adaptive windows (left, right), each int (q_heads, seq). Returns (out, lse)."""
    s, hq, hk, d = q.shape[1], q.shape[2], k.shape[2], q.shape[3]
    qv, kv, vv = (swattn.to_classes(x, dilation) for x in (q, k, v))
    sd = qv.shape[1]
    tables = (None, None, None)
    if row_windows is not None:
        win = torch.stack([swattn.rows_to_classes(w, dilation) for w in row_windows], -1).contiguous()
        tables = (win, None, None)  # the eager path needs only the windows, no tile schedules
        if swattn.on_gpu(q):
            tables = adaptive_tables(win, dilation, hq, hk, s, global_tokens, d, swattn.cuda_arch(q.device))
    scalars = (min(left, sd - 1), min(right, sd - 1), global_tokens, s, dilation, hq, hk)
    fwd = attention_fwd if torch.compiler.is_compiling() else _EagerAttention.apply
    out, lse = fwd(qv, kv, vv, *tables, *scalars)
    return swattn.from_classes(out, lse, s, dilation)
