"""Online block aggregation of sliding-window attention.

Attention over a set of keys can be computed a block of keys at a time: each
block gives a partial output o_b (normalised over its own keys) and its
log-sum-exp lse_b, and two partials over disjoint key sets merge exactly:

    lse = log(exp(lse_1) + exp(lse_2))
    o   = exp(lse_1 - lse) * o_1 + exp(lse_2 - lse) * o_2

``merge_`` is that step, in place; the distributed code (distributed.py) uses
the same function. A row that has seen no key yet has lse = -inf and o = 0,
and merging a block it cannot see (lse_b = -inf) leaves it unchanged, NaN-free.

Window (the repository's one definition): query i sees key j iff
-left <= j - i <= right, or i < global_tokens or j < global_tokens, with
``window=W`` meaning left = right = W and ``causal`` meaning right = 0;
positions are global, so a block at offset (q_offset, k_offset) is masked
where it lies in the whole sequence.

Layout (batch, seq, heads, head_dim), separate Q, K, V, GQA (q_heads a
multiple of kv_heads). On CUDA (float16/bfloat16, head_dim 64/128, no global
token in the block) a block runs the TileLang kernel (``launch.forward`` with
the offsets folded into the window); otherwise the eager twin (float32, or
float64 for float64 inputs).
"""

from __future__ import annotations

import math

import torch

from . import eager, launch
from .window import block_mask, block_visible, normalize_window, shift_window


def merge_(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor):
    """Merge a partial attention (block_out, block_lse) over new keys into (out, lse), in place.

    out, block_out (batch, seq, heads, head_dim); lse, block_lse (batch, heads, seq),
    natural log, -inf where a row has no key. Returns (out, lse).
    """
    new_lse = torch.logaddexp(lse, block_lse)
    ref = torch.where(torch.isinf(new_lse), torch.zeros_like(new_lse), new_lse)  # -inf rows: exp(-inf - 0) = 0
    w_old = torch.exp(lse - ref).transpose(1, 2).unsqueeze(-1)
    w_new = torch.exp(block_lse - ref).transpose(1, 2).unsqueeze(-1)
    out.mul_(w_old.to(out.dtype)).add_(block_out.to(out.dtype) * w_new.to(out.dtype))
    lse.copy_(new_lse)
    return out, lse


def window_bounds(window, causal: bool, seq_len: int) -> tuple[int, int]:
    """(left, right) of an int W, a pair (-1: unbounded), or None (full attention), with causal -> right = 0."""
    return normalize_window(window, causal, max(seq_len, 1))


def _kernel_block(q, k, global_tokens: int, q_offset: int, k_offset: int) -> bool:
    """Whether a block runs the kernels: CUDA, their dtypes and head dims, no global token."""
    touches_global = q_offset < global_tokens or k_offset < global_tokens
    return launch.on_gpu(q) and q.dtype in launch.DTYPES and q.shape[3] in launch.HEAD_DIMS and not touches_global


def block_attention(
    q,
    k,
    v,
    q_offset: int,
    k_offset: int,
    left: int,
    right: int,
    global_tokens: int = 0,
    scale: float | None = None,
    final: bool = False,
):
    """Partial attention of a query block to a key block at their global offsets.

    Returns (out, lse): out (batch, q_len, q_heads, head_dim) float32 (float64 for
    float64 inputs), lse (batch, q_heads, q_len) float32/64, natural log; rows
    that see no key of the block get 0 and -inf. ``final``: the block holds
    every key its rows see (nothing will be merged into it), so out may stay in
    the kernel's dtype (q's) instead of a float32 copy.
    """
    sq, d, sk = q.shape[1], q.shape[3], k.shape[1]
    if _kernel_block(q, k, global_tokens, q_offset, k_offset):
        if scale is not None:
            q = q * (scale * math.sqrt(d))
        lo, hi = shift_window(left, right, k_offset - q_offset, sq + sk)
        q, k, v = (x.contiguous() for x in (q, k, v))
        out, lse = launch.forward(q, k, v, lo, hi)
        return (out if final else out.float()), lse
    mask = block_mask(q_offset, sq, k_offset, sk, left, right, global_tokens, device=q.device)
    return eager.masked_forward(q, k, v, mask, scale)


def block_attention_backward(
    dout, q, k, v, lse, delta, q_offset: int, k_offset: int, left: int, right: int, global_tokens: int = 0, scale=None
):
    """Gradients of one block of the blocked attention: (dq, dk, dv), float32
    (float64 for float64 inputs). ``lse`` (batch, q_heads, q_len) is the merged
    log-sum-exp of the queries ``q`` over all key blocks, ``delta`` =
    rowsum(dout * out) - dlse with their merged output; k, v the key block at
    ``k_offset``. Summing over the key blocks gives the gradient of the whole
    attention (the FlashAttention-2 backward, blocked); dk, dv are summed over
    each GQA group."""
    sq, sk = q.shape[1], k.shape[1]
    if _kernel_block(q, k, global_tokens, q_offset, k_offset) and scale is None:
        lo, hi = shift_window(left, right, k_offset - q_offset, sq + sk)
        q, k, v = (x.contiguous() for x in (q, k, v))
        return launch.backward(dout, q, k, v, lse, delta, lo, hi, sk, true_q_len=sq)
    mask = block_mask(q_offset, sq, k_offset, sk, left, right, global_tokens, device=q.device)
    return eager.masked_backward(dout, q, k, v, lse, delta, mask, scale)


def output_delta(dout: torch.Tensor, out: torch.Tensor, dlse: torch.Tensor | None = None) -> torch.Tensor:
    """delta = rowsum(dout * out) - dlse, (batch, heads, seq), the term every key
    block's backward shares (dS = P * (dP - delta)); out, dout (batch, seq, heads,
    dim). Float32 (float64 for float64 out). On the GPU, for the kernels' dtypes and
    head dims, one pass of the backward's preprocess kernel reads out and dout in
    their own dtype (an eager float32 product and sum would write and read them
    again in float32: ~3.5 GB at 131072 tokens, 32 heads of 128)."""
    if launch.on_gpu(out) and out.dtype in launch.DTYPES and out.shape[3] in launch.HEAD_DIMS:
        delta = launch.preprocess(out, dout)
        return (delta if dlse is None else delta - dlse.float()).contiguous()
    return eager.output_delta(dout, out, dlse)


def empty_state(q: torch.Tensor):
    """(out, lse) before any key block, for q (batch, seq, heads, dim): zeros and -inf,
    float32 (float64 for float64 q)."""
    work = eager.work_dtype(q)
    out = torch.zeros(q.shape, dtype=work, device=q.device)
    lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=work, device=q.device)
    return out, lse


class OfflineSlidingWindowAttn(torch.nn.Module):
    """The whole sequence at once: (q, k, v) -> (out, lse). The oracle of the online module."""

    def __init__(self, window=128, causal: bool = False, global_tokens: int = 0, scale: float | None = None):
        super().__init__()
        self.window, self.causal, self.global_tokens, self.scale = window, causal, global_tokens, scale

    def forward(self, q, k, v):
        left, right = window_bounds(self.window, self.causal, q.shape[1])
        return block_attention(q, k, v, 0, 0, left, right, self.global_tokens, self.scale)


class OnlineSlidingWindowAttn(torch.nn.Module):
    """One (query block, key block) at a time, merged into a global output in place.

    ``forward(q_block, k_block, v_block, block_idx_q, block_idx_kv, global_out,
    global_lse)``: the query block holds rows block_idx_q * block_size_q ... of the
    sequence, the key block rows block_idx_kv * block_size_kv ...; the block's
    partial attention is merged into global_out[:, rows] and global_lse[:, :, rows].
    Start from ``empty_state`` (out 0, lse -inf); any order and any set of
    disjoint key blocks covering the sequence gives the offline result.
    """

    def __init__(
        self,
        seq_len: int,
        block_size_q: int,
        block_size_kv: int,
        window=128,
        causal: bool = False,
        global_tokens: int = 0,
        scale: float | None = None,
    ):
        super().__init__()
        if min(seq_len, block_size_q, block_size_kv) < 1:
            raise ValueError("seq_len and block sizes must be >= 1")
        self.seq_len, self.block_size_q, self.block_size_kv = seq_len, block_size_q, block_size_kv
        self.left, self.right = window_bounds(window, causal, seq_len)
        self.global_tokens, self.scale = global_tokens, scale

    empty_state = staticmethod(empty_state)

    def forward(self, q, k, v, block_idx_q: int, block_idx_kv: int, global_out, global_lse):
        q0, k0 = block_idx_q * self.block_size_q, block_idx_kv * self.block_size_kv
        if not (0 <= q0 < self.seq_len and 0 <= k0 < self.seq_len):
            raise ValueError(f"block ({block_idx_q}, {block_idx_kv}) lies outside the sequence of {self.seq_len}")
        if q.shape[1] != min(self.block_size_q, self.seq_len - q0) or k.shape[1] != min(
            self.block_size_kv, self.seq_len - k0
        ):
            raise ValueError(f"block shapes {tuple(q.shape)}, {tuple(k.shape)} do not match the block sizes")
        rows = slice(q0, q0 + q.shape[1])
        if not block_visible(q0, q.shape[1], k0, k.shape[1], self.left, self.right, self.global_tokens):
            return global_out, global_lse  # nothing of this key block is visible: the state is unchanged
        out, lse = block_attention(q, k, v, q0, k0, self.left, self.right, self.global_tokens, self.scale)
        merge_(global_out[:, rows], global_lse[:, :, rows], out, lse)
        return global_out, global_lse
