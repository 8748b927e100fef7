"""The PyTorch oracle for sliding-window attention. Plain, eager, CPU-friendly.

Window definition (the one every file in this repository uses):
    query i attends key j  <=>  |i - j| <= window
so an interior query sees 2 * window + 1 keys, and the sequence ends clip the
window. ``window >= seq_len - 1`` is full attention, ``window = 0`` attends to
itself only. This is FlashAttention's ``window_size=(window, window)``.

Shapes: q, k, v are (..., seq_len, head_dim); any leading dims broadcast, so
the assignment's (seq, dim) and a batched (batch, heads, seq, dim) both work.

Nothing here imports TileLang: the kernels are checked against this file, and
this file never against the kernels.
"""

from __future__ import annotations

import math

import torch


def window_mask(seq_len: int, window: int | None, device=None) -> torch.Tensor:
    """Boolean (seq_len, seq_len) matrix, True where query i may attend key j.

    ``window=None`` means full attention.
    """
    idx = torch.arange(seq_len, device=device)
    if window is None:
        return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device)
    return (idx[:, None] - idx[None, :]).abs() <= window


def visible_keys(seq_len: int, window: int | None) -> torch.Tensor:
    """Number of keys each query sees, (seq_len,) int64, in closed form.

    Query i sees keys max(0, i - W) .. min(seq_len - 1, i + W).
    """
    i = torch.arange(seq_len)
    if window is None:
        return torch.full((seq_len,), seq_len, dtype=torch.int64)
    return torch.clamp(i + window, max=seq_len - 1) - torch.clamp(i - window, min=0) + 1


def attention_flops(seq_len: int, head_dim: int, window: int | None, heads: int = 1) -> int:
    """Useful forward FLOPs: 2 matmuls x 2 FLOPs per multiply-add x visible pairs x head_dim.

    Counts only the (query, key) pairs inside the window, clipped at the ends,
    so TFLOP/s compares sliding-window and full attention on equal terms.
    """
    return 4 * heads * int(visible_keys(seq_len, window).sum()) * head_dim


def rel_err(out: torch.Tensor, expected: torch.Tensor) -> float:
    """||out - expected|| / ||expected|| in float64: the one error metric of the repo."""
    out, expected = out.double(), expected.double()
    return ((out - expected).norm() / expected.norm()).item()


def _scale(head_dim: int, scale: float | None) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else scale


def attention_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    window: int | None,
    scale: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The softmax matrix P, (..., seq, seq), zero outside the window.

    Computed in ``dtype`` (float64 by default: the oracle's precision).
    """
    seq_len, head_dim = q.shape[-2], q.shape[-1]
    scores = (q.to(dtype) @ k.to(dtype).transpose(-1, -2)) * _scale(head_dim, scale)
    mask = window_mask(seq_len, window, device=q.device)
    # -inf, not a large negative number: exp(-inf) is exactly 0.
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1)


def sliding_window_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | None,
    scale: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Masked attention softmax(q k^T * scale + mask) v, materialising (seq, seq).

    ``dtype=torch.float64`` is the oracle; ``dtype=q.dtype`` gives the same math
    in the input precision, whose error against the oracle measures how much
    rounding PyTorch itself makes (tests bound the kernel by a multiple of it).
    Returns (..., seq, head_dim) in ``dtype``.
    """
    return attention_weights(q, k, window, scale, dtype) @ v.to(dtype)


def full_attention_ref(q, k, v, scale: float | None = None, dtype: torch.dtype = torch.float64):
    """Full (unmasked) attention: the baseline sliding windows are compared with."""
    return sliding_window_attention_ref(q, k, v, None, scale, dtype)


def sliding_window_attention_banded(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    block: int = 64,
    scale: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The same function in O(seq * head_dim) memory: a second, independent oracle.

    Walks query blocks and, for each, only the keys its window can reach: rows
    [r0, r1) need keys [r0 - W, r1 - 1 + W], clipped to the sequence. Never
    forms the (seq, seq) matrix, so it also runs at lengths the naive one cannot.
    """
    seq_len, head_dim = q.shape[-2], q.shape[-1]
    s = _scale(head_dim, scale)
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=dtype, device=q.device)
    for r0 in range(0, seq_len, block):
        r1 = min(r0 + block, seq_len)
        c0, c1 = max(0, r0 - window), min(seq_len, r1 + window)
        qi = torch.arange(r0, r1, device=q.device)[:, None]
        kj = torch.arange(c0, c1, device=q.device)[None, :]
        scores = (q[..., r0:r1, :].to(dtype) @ k[..., c0:c1, :].to(dtype).transpose(-1, -2)) * s
        scores = scores.masked_fill((qi - kj).abs() > window, float("-inf"))
        out[..., r0:r1, :] = torch.softmax(scores, dim=-1) @ v[..., c0:c1, :].to(dtype)
    return out


# --- memory model --------------------------------------------------------------


def naive_memory_bytes(seq_len: int, head_dim: int, in_bytes: int = 2, out_bytes: int = 4) -> int:
    """Device memory the naive version needs: inputs, output and two (seq, seq)
    float32 matrices (the scores, then the softmax), i.e. O(N^2)."""
    return 3 * seq_len * head_dim * in_bytes + seq_len * head_dim * out_bytes + 2 * seq_len * seq_len * 4


def tiled_memory_bytes(seq_len: int, head_dim: int, in_bytes: int = 2, out_bytes: int = 4) -> int:
    """Device memory the tiled kernel needs: inputs and output only, O(N * d).

    The scores live in registers and shared memory, a tile at a time (see
    ``tile_working_set_bytes``), never in device memory.
    """
    return 3 * seq_len * head_dim * in_bytes + seq_len * head_dim * out_bytes


def tile_working_set_bytes(block_m: int, block_n: int, head_dim: int, num_stages: int, in_bytes: int = 2) -> int:
    """On-chip bytes one CTA holds: the Q tile, ``num_stages`` K and V tiles in
    shared memory, and the float32 score tile and output accumulator in registers.
    Independent of seq_len; the window only sets how many K/V tiles stream past."""
    shared = block_m * head_dim * in_bytes + 2 * max(num_stages, 1) * block_n * head_dim * in_bytes
    registers = block_m * block_n * 4 + block_m * head_dim * 4
    return shared + registers
