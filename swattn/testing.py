"""The general oracle: plain float64 PyTorch attention under an explicit mask,
written apart from the code it checks (it shares no helper with window.py,
eager.py or the kernels). Tests and benchmarks import it; the library never does.

Convention (the one of api.py): tensors (batch, seq, heads, head_dim); query i
of seqlen_q sits at key position pos(i) = i + seqlen_k - seqlen_q (bottom-right
aligned) and attends key j iff pos(i) - left <= j <= pos(i) + right (each side
-1 = unbounded; causal sets right = 0); lse in natural log; a row that sees no
key gives out 0 and lse -inf (or its sink logit when sinks are given).
"""

from __future__ import annotations

import math

import torch


def local_mask(seq_len: int, left, right, dilation: int = 1, global_tokens: int = 0, device=None) -> torch.Tensor:
    """Boolean (seq, seq) mask of the general window, True where query i sees key j:

        j = i + k * dilation with -left <= k <= right,   or   i < G   or   j < G.

    ``left = right = W, dilation = 1, G = 0`` is the card's |i - j| <= W; causal is
    right = 0. Adaptive windows: ``left``/``right`` may be int tensors (..., seq),
    one size per query (and per head in the leading dims); the mask is then
    (..., seq, seq).
    """
    i = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    offset = j - i
    left, right = (torch.as_tensor(w, device=device) for w in (left, right))
    left, right = (w[..., :, None] if w.dim() else w for w in (left, right))
    local = (offset >= -left * dilation) & (offset <= right * dilation) & (offset % dilation == 0)
    return local | (i < global_tokens) | (j < global_tokens)


def window_mask(seqlen_q: int, seqlen_k: int, window_size=(-1, -1), causal: bool = False, device=None) -> torch.Tensor:
    """Boolean (seqlen_q, seqlen_k), FlashAttention's window: bottom-right aligned,
    (left, right) with -1 unbounded, causal -> right = 0."""
    left, right = window_size
    if causal:
        right = 0
    pos = torch.arange(seqlen_q, device=device)[:, None] + (seqlen_k - seqlen_q)
    j = torch.arange(seqlen_k, device=device)[None, :]
    seen = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if left >= 0:
        seen &= j >= pos - left
    if right >= 0:
        seen &= j <= pos + right
    return seen


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    dtype: torch.dtype = torch.float64,
    return_lse: bool = False,
    *,
    window_size=(-1, -1),
    causal: bool = False,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
):
    """Masked attention for q (batch, seq_q, q_heads, d), k/v (batch, seq_k, kv_heads, d).

    ``mask`` (broadcasting to (batch, q_heads, seq_q, seq_k)), or else the window
    (``window_size``, ``causal``; ``window_mask``). Scores = q k^T * scale (default
    1/sqrt(d)); ``softcap`` c > 0: c * tanh(scores / c), before the mask; ``sinks``
    (q_heads,): an extra logit per head in each row's denominator. GQA by
    repeating each K/V head over its group (the oracle may copy; the kernels may
    not). Returns out (batch, seq_q, q_heads, d) in ``dtype`` and, with
    ``return_lse``, lse (batch, q_heads, seq_q) in natural log.
    """
    group = q.shape[2] // k.shape[2]
    qt = q.to(dtype).transpose(1, 2)
    kt = k.to(dtype).transpose(1, 2).repeat_interleave(group, dim=1)
    vt = v.to(dtype).transpose(1, 2).repeat_interleave(group, dim=1)
    if mask is None:
        mask = window_mask(q.shape[1], k.shape[1], window_size, causal, device=q.device)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (qt @ kt.transpose(-1, -2)) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        sink = sinks.to(dtype)[None, :, None, None].expand(*scores.shape[:-1], 1)
        scores = torch.cat([scores, sink], -1)
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - torch.where(torch.isinf(lse), 0, lse)[..., None])  # an empty row: all 0
    if sinks is not None:
        p = p[..., :-1]
    if bool(torch.isfinite(vt).all()):
        out = p @ vt
    else:  # a masked pair contributes nothing, even where V holds NaN or inf: pair by pair
        seen = mask.expand(p.shape)
        out = torch.cat(
            [
                torch.where(seen[..., r : r + 16, :, None], p[..., r : r + 16, :, None] * vt[..., None, :, :], 0).sum(
                    -2
                )
                for r in range(0, p.shape[-2], 16)
            ],
            -2,
        )
    out = out.transpose(1, 2)
    return (out, lse) if return_lse else out


def varlen_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, dtype=torch.float64, return_lse=False, **kw):
    """``attention_ref`` per sequence of packed q (total_q, q_heads, d), k/v
    (total_k, kv_heads, d) with int32 cu_seqlens (batch + 1): out (total_q,
    q_heads, d), lse (q_heads, total_q)."""
    outs, lses = [], []
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        qb, kb, vb = q[cq[b] : cq[b + 1]][None], k[ck[b] : ck[b + 1]][None], v[ck[b] : ck[b + 1]][None]
        o, lse = attention_ref(qb, kb, vb, dtype=dtype, return_lse=True, **kw)
        outs.append(o[0])
        lses.append(lse[0])
    out, lse = torch.cat(outs), torch.cat(lses, -1)
    return (out, lse) if return_lse else out
