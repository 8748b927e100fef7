"""The exact CPU twin of the launchers: the same algorithm in PyTorch under a
boolean mask, in float32 (float64 for float64 inputs).

It runs wherever the kernels do not (CPU tensors, float32/float64): the
forward gives (out, lse) with lse in natural log, 0 and -inf for a row that sees
no key; the backward recomputes P from the saved lse and uses delta =
rowsum(dO * O) - dlse, as the kernels do. It is no oracle (swattn.testing and
reference.py are): it checks the bookkeeping the kernels share.

Masking is by selection, never by multiplying with 0: a NaN or inf in a key or
value row reaches only the rows whose window holds it.
"""

from __future__ import annotations

import math

import torch

from . import window


def work_dtype(q: torch.Tensor) -> torch.dtype:
    """The dtype of the softmax state (lse, merged out) and the gradients: float64
    for float64 inputs, else float32."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _operands(q, k, v, mask, scale, softcap: float = 0.0):
    """Working dtype, scale, transposed q, group-repeated k, v, and the masked
    scores (softcap applied before the mask), plus the capped tanh for the backward."""
    work = work_dtype(q)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    group = q.shape[2] // k.shape[2]
    qt = q.to(work).transpose(1, 2)
    kt, vt = (x.to(work).transpose(1, 2).repeat_interleave(group, dim=1) for x in (k, v))
    scores = (qt @ kt.transpose(-1, -2)) * scale
    tanh = None
    if softcap:
        tanh = torch.tanh(scores / softcap)
        scores = softcap * tanh
    scores = scores.masked_fill(~mask, float("-inf"))
    return work, scale, qt, kt, vt, scores, tanh


def _pv(p: torch.Tensor, vt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """P @ V where a masked (query, key) pair contributes nothing even if V's row
    is NaN or inf (a matmul would give 0 * NaN = NaN). Finite V: one matmul."""
    if bool(torch.isfinite(vt).all()):
        return p @ vt
    clean = torch.where(torch.isfinite(vt), vt, 0)
    out = p @ clean
    # Only the non-finite entries need the pair-wise product, chunked by rows.
    bad = ~torch.isfinite(vt)  # (..., k, d)
    mask = mask.expand(p.shape)
    for r0 in range(0, p.shape[-2], 64):
        rows = slice(r0, r0 + 64)
        pair = torch.where(
            mask[..., rows, :, None] & bad[..., None, :, :], p[..., rows, :, None] * vt[..., None, :, :], 0
        )
        out[..., rows, :] += pair.sum(-2)
    return out


def _sink_logits(sinks, work, device):
    return None if sinks is None else sinks.to(device=device, dtype=work)[None, :, None]


def masked_forward(q, k, v, mask, scale=None, softcap: float = 0.0, sinks=None):
    """(out, lse) of attention under a boolean mask broadcasting to (batch, q_heads,
    q_len, k_len), float32 (float64 for float64 inputs); q (batch, q_len, q_heads,
    D), k, v (batch, k_len, kv_heads, D). ``softcap`` c > 0: scores become
    c * tanh(s / c) after the scale, before the mask. ``sinks`` (q_heads,): one extra
    logit per head in every row's denominator (no value); lse includes it. A row
    that sees no key gets out 0 and lse -inf (or the sink)."""
    work, _, _, _, vt, scores, _ = _operands(q, k, v, mask, scale, softcap)
    lse = torch.logsumexp(scores, dim=-1)
    sink = _sink_logits(sinks, work, q.device)
    if sink is not None:
        lse = torch.logaddexp(lse, sink.expand_as(lse))
    p = torch.exp(scores - torch.where(torch.isinf(lse), 0, lse)[..., None])
    return _pv(p, vt, mask).transpose(1, 2), lse


def masked_backward(dout, q, k, v, lse, delta, mask, scale=None, softcap: float = 0.0, sinks=None):
    """(dq, dk, dv[, dsinks]) of ``masked_forward`` given the (merged) lse and delta =
    rowsum(dout * out) - dlse: P recomputed from lse, dS = P (dP - delta) scale
    (times 1 - tanh^2 under a softcap); dk, dv summed over each GQA group.
    With ``sinks``: dsink_h = -sum over batch and rows of exp(sink_h - lse) delta."""
    work, scale, qt, kt, vt, scores, tanh = _operands(q, k, v, mask, scale, softcap)
    b, sk, hk, d = k.shape
    lse = lse.to(work)
    delta = delta.to(work)
    p = torch.exp(scores - torch.where(torch.isinf(lse), 0, lse)[..., None])
    dot = dout.to(work).transpose(1, 2)
    ds = torch.where(mask, p * (dot @ vt.transpose(-1, -2) - delta[..., None]), 0)
    if tanh is not None:
        ds = ds * (1 - tanh * tanh)
    ds = ds * scale
    group = q.shape[2] // hk
    mask_t = mask.transpose(-1, -2)
    dq = _pv(ds, kt, mask).transpose(1, 2)
    dk = _pv(ds.transpose(-1, -2), qt, mask_t).view(b, hk, group, sk, d).sum(2).transpose(1, 2)
    dv = _pv(p.transpose(-1, -2), dot, mask_t).view(b, hk, group, sk, d).sum(2).transpose(1, 2)
    if sinks is None:
        return dq, dk, dv
    p_sink = torch.exp(_sink_logits(sinks, work, q.device) - lse)
    return dq, dk, dv, -(p_sink * delta).sum((0, 2))


def output_delta(dout: torch.Tensor, out: torch.Tensor, dlse: torch.Tensor | None = None) -> torch.Tensor:
    """delta = rowsum(dout * out) - dlse, (batch, heads, seq), in the work dtype."""
    work = work_dtype(out)
    delta = (dout.to(work) * out.to(work)).sum(-1).transpose(1, 2)
    if dlse is not None:
        delta = delta - dlse.to(delta.dtype)
    return delta.contiguous()


def class_masks(s, heads, left, right, win, n_global, true_seq_len, dilation, heads_per_class, device):
    """(heads, s, s) boolean: the window (or a global token) inside each head's class, padding hidden.
    ``win`` (heads, s, 2): one (left, right) per row instead of the scalars."""
    if win is not None:  # one (left, right) per row: (heads, s, 1) bounds
        left, right = win[..., 0, None], win[..., 1, None]
    local = window.block_mask(0, s, 0, s, left, right, n_global, device=device)
    i = torch.arange(s, device=device)
    valid = torch.tensor(
        [window.class_len(true_seq_len, h // heads_per_class, dilation) for h in range(heads)], device=device
    )
    exists = i[None, :] < valid[:, None]  # (heads, s)
    return local & exists[:, :, None] & exists[:, None, :]


def _sequences(q, cu_seqlens_q, cu_seqlens_k):
    """(q rows, k rows, sq, sk) per sequence: the whole batch's row ranges for
    (batch, seq, heads, dim) tensors, cu_seqlens' for packed (total, heads, dim) ones."""
    if cu_seqlens_q is None:
        return None
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return [(slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])) for b in range(len(cq) - 1)]


def flash_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, sinks, left: int, right: int, softcap: float, scale: float):
    """``masked_forward`` under the bottom-right window (left, right), per sequence:
    (batch, seq, heads, dim) tensors as one batch, or packed (total, heads, dim)
    with cu_seqlens. Returns out in the work dtype (q's layout) and lse ((batch,
    heads, seq_q) or (heads, total_q))."""
    seqs = _sequences(q, cu_seqlens_q, cu_seqlens_k)
    if seqs is None:
        sq, sk = q.shape[1], k.shape[1]
        mask = window.block_mask(sk - sq, sq, 0, sk, left, right, device=q.device)
        return masked_forward(q, k, v, mask, scale, softcap, sinks)
    work = work_dtype(q)
    out = q.new_zeros(q.shape, dtype=work)
    lse = q.new_full((q.shape[1], q.shape[0]), float("-inf"), dtype=work)
    for rq, rk in seqs:
        sq, sk = rq.stop - rq.start, rk.stop - rk.start
        if sq == 0:
            continue
        mask = window.block_mask(sk - sq, sq, 0, sk, left, right, device=q.device)
        o, l_ = masked_forward(q[None, rq], k[None, rk], v[None, rk], mask, scale, softcap, sinks)
        out[rq], lse[:, rq] = o[0], l_[0]
    return out, lse


def flash_backward(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, sinks, left, right, softcap, scale):
    """(dq, dk, dv, dsinks or None) of ``flash_forward``, in the work dtype; arguments as
    ``launch.flash_backward``'s but the max_seqlen pair."""
    seqs = _sequences(q, cu_seqlens_q, cu_seqlens_k)
    if seqs is None:
        sq, sk = q.shape[1], k.shape[1]
        mask = window.block_mask(sk - sq, sq, 0, sk, left, right, device=q.device)
        delta = output_delta(dout, out, dlse)
        grads = masked_backward(dout, q, k, v, lse, delta, mask, scale, softcap, sinks)
        return grads if sinks is not None else (*grads, None)
    work = work_dtype(q)
    dq, dk, dv = (x.new_zeros(x.shape, dtype=work) for x in (q, k, v))
    dsinks = None if sinks is None else torch.zeros(sinks.shape, dtype=work, device=q.device)
    for rq, rk in seqs:
        sq, sk = rq.stop - rq.start, rk.stop - rk.start
        if sq == 0 or sk == 0:
            continue
        mask = window.block_mask(sk - sq, sq, 0, sk, left, right, device=q.device)
        dl = None if dlse is None else dlse[None, :, rq]
        delta = output_delta(dout[None, rq], out[None, rq], dl)
        g = masked_backward(
            dout[None, rq], q[None, rq], k[None, rk], v[None, rk], lse[None, :, rq], delta, mask, scale, softcap, sinks
        )
        dq[rq], dk[rk], dv[rk] = g[0][0], g[1][0], g[2][0]
        if sinks is not None:
            dsinks += g[3]
    return dq, dk, dv, dsinks
