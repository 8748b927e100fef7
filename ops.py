"""The op as PyTorch sees it: ``swattn::attention_fwd`` / ``swattn::attention_bwd``
custom ops with autograd, so that training works and ``torch.compile`` treats
the op as opaque (no graph break, no silent fallback).

Both ops work on the kernel's layout: (batch, seq, heads, head_dim) with the
head classes of a dilation already formed (swattn.to_classes, a view the
autograd of PyTorch differentiates). Window: local query i sees key j iff
-left <= j - i <= right or either is below ``n_global``, and both exist in
their head class (``swattn.class_len(true_seq_len, class, dilation)``).

CUDA runs the TileLang kernels (swattn.py forward, backward.py backward). CPU
runs the same algorithm eagerly (P recomputed from the saved log-sum-exp,
delta = rowsum(dO * O)) in float32: it checks the bookkeeping on machines
without a GPU and is no reference (reference.py is).
"""

from __future__ import annotations

import math

import torch

import swattn


def _class_masks(
    s: int,
    heads: int,
    left: int,
    right: int,
    n_global: int,
    true_seq_len: int,
    dilation: int,
    heads_per_class: int,
    device,
):
    """(heads, s, s) boolean: the window (or a global token) inside each head's class, padding hidden."""
    i = torch.arange(s, device=device)
    offset = i[None, :] - i[:, None]
    local = ((offset >= -left) & (offset <= right)) | (i[:, None] < n_global) | (i[None, :] < n_global)
    valid = torch.tensor(
        [swattn.class_len(true_seq_len, h // heads_per_class, dilation) for h in range(heads)], device=device
    )
    exists = i[None, :] < valid[:, None]  # (heads, s)
    return local[None] & exists[:, :, None] & exists[:, None, :]


def _eager_scores(q, k, left, right, n_global, true_seq_len, dilation, heads_per_class):
    """Masked, scaled scores (batch, q_heads, s, s) in float32 and K/V's head group size."""
    b, s, hq, d = q.shape
    group = hq // k.shape[2]
    qt = q.float().transpose(1, 2)
    kt = k.float().transpose(1, 2).repeat_interleave(group, dim=1)
    scores = (qt @ kt.transpose(-1, -2)) / math.sqrt(d)
    mask = _class_masks(s, hq, left, right, n_global, true_seq_len, dilation, heads_per_class, q.device)
    return scores.masked_fill(~mask, float("-inf")), group


@torch.library.custom_op("swattn::attention_fwd", mutates_args=())
def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    left: int,
    right: int,
    n_global: int,
    true_seq_len: int,
    dilation: int,
    heads_per_class: int,
    kv_heads_per_class: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out in q's dtype, lse (batch, q_heads, seq) float32, natural log)."""
    b, s, hq, d = q.shape
    if q.is_cuda:
        out = torch.empty_like(q)
        lse = torch.empty(b, hq, s, device=q.device, dtype=torch.float32)
        mode = "general" if dilation > 1 or n_global > 0 else "window"
        win, kt = swattn._placeholders(q.device)
        kernel = swattn.compiled_forward(d, swattn.DTYPES[q.dtype], swattn.cuda_arch(q.device), None, mode)
        args = (left, right, n_global, heads_per_class, kv_heads_per_class, true_seq_len, dilation)
        kernel(q, k, v, out, lse, win, kt, *args)
        return out, lse
    scores, group = _eager_scores(q, k, left, right, n_global, true_seq_len, dilation, heads_per_class)
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - torch.where(torch.isinf(lse), 0, lse)[..., None])
    out = (p @ v.float().transpose(1, 2).repeat_interleave(group, dim=1)).transpose(1, 2)
    return out.to(q.dtype).contiguous(), lse


@attention_fwd.register_fake
def _(q, k, v, left, right, n_global, true_seq_len, dilation, heads_per_class, kv_heads_per_class):
    b, s, hq, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, hq, s), dtype=torch.float32)


@torch.library.custom_op("swattn::attention_bwd", mutates_args=())
def attention_bwd(
    dout: torch.Tensor,
    delta_shift: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    left: int,
    right: int,
    n_global: int,
    true_seq_len: int,
    dilation: int,
    heads_per_class: int,
    kv_heads_per_class: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in the input dtype. ``delta_shift`` (batch, q_heads, seq) is the
    gradient of the lse output (zeros if unused): it enters as delta - dlse."""
    if q.is_cuda:
        return _cuda_backward(
            dout, delta_shift, q, k, v, out, lse, left, right, true_seq_len, dilation, kv_heads_per_class
        )
    scores, group = _eager_scores(q, k, left, right, n_global, true_seq_len, dilation, heads_per_class)
    p = torch.exp(scores - torch.where(torch.isinf(lse), 0, lse)[..., None])  # (b, hq, s, s)
    do = dout.float().transpose(1, 2)
    vt = v.float().transpose(1, 2).repeat_interleave(group, dim=1)
    kt = k.float().transpose(1, 2).repeat_interleave(group, dim=1)
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2) - delta_shift
    ds = p * (do @ vt.transpose(-1, -2) - delta[..., None]) / math.sqrt(q.shape[-1])
    dq = (ds @ kt).transpose(1, 2)
    b, s, hk, d = k.shape
    dk = (ds.transpose(-1, -2) @ q.float().transpose(1, 2)).view(b, hk, group, s, d).sum(2).transpose(1, 2)
    dv = (p.transpose(-1, -2) @ do).view(b, hk, group, s, d).sum(2).transpose(1, 2)
    return dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous()


def _cuda_backward(
    dout, delta_shift, q, k, v, out, lse, left, right, n_global, true_seq_len, dilation, kv_heads_per_class
):
    import backward  # the backward kernels compile only when a backward runs

    grads = backward.attention_backward(
        dout, q, k, v, out, lse, left, right, true_seq_len, dilation, kv_heads_per_class, delta_shift, n_global=n_global
    )
    return tuple(g.to(x.dtype) for g, x in zip(grads, (q, k, v), strict=True))


@attention_bwd.register_fake
def _(
    dout,
    delta_shift,
    q,
    k,
    v,
    out,
    lse,
    left,
    right,
    n_global,
    true_seq_len,
    dilation,
    heads_per_class,
    kv_heads_per_class,
):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_INTS = ("left", "right", "n_global", "true_seq_len", "dilation", "heads_per_class", "kv_heads_per_class")


def _setup_context(ctx, inputs, output):
    q, k, v, *ints = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)  # exactly what the backward needs
    ctx.ints = ints


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dout = torch.zeros_like(out) if dout is None else dout.contiguous()  # any strides in
    shift = torch.zeros_like(lse) if dlse is None else dlse.float()
    dq, dk, dv = attention_bwd(dout, shift, q, k, v, out, lse, *ctx.ints)
    return (dq, dk, dv) + (None,) * len(_INTS)


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def attention(
    q, k, v, left: int, right: int, dilation: int = 1, global_tokens: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable sliding-window attention for (batch, seq, heads, head_dim)
    tensors (already validated; swattn.sliding_window_attention is the public
    entry): the dilation's head classes around the custom op. Returns (out, lse)."""
    s, hq, hk = q.shape[1], q.shape[2], k.shape[2]
    qv, kv, vv = (swattn.to_classes(x, dilation) for x in (q, k, v))
    sd = qv.shape[1]
    out, lse = attention_fwd(qv, kv, vv, min(left, sd - 1), min(right, sd - 1), global_tokens, s, dilation, hq, hk)
    return swattn.from_classes(out, lse, s, dilation)
