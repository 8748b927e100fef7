"""The public functions: validate once, build the window, call the ops.

Convention of every function here (window.py has the one definition):
tensors (batch, seq, heads, head_dim); query i attends key j iff
pos(i) - left <= j <= pos(i) + right, pos(i) = i + seqlen_k - seqlen_q
(bottom-right aligned); ``window_size=(left, right)`` with -1 unbounded; causal
sets right = 0; lse in natural log; a row that sees no key gives out 0 and
lse -inf. The repository's symmetric window |i - j| <= W is ``window=W`` =
``window_size=(W, W)``; transformers' ``sliding_window=W`` is (W - 1, 0) with
causal.

CUDA tensors run the TileLang kernels (float16/bfloat16); CPU tensors the exact
eager twin (float32/float64/float16/bfloat16). Anything a path cannot honour
raises a clear error before any work.
"""

from __future__ import annotations

import math

import torch

from . import launch, ops
from .window import adaptive_windows, check_window, is_adaptive, normalize_window

CPU_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_qkv(q, k, v, same_length: bool = True) -> None:
    """Types, ranks, dtypes, devices, shapes and head counts of (batch, seq, heads,
    head_dim) q, k, v; raises TypeError / ValueError naming what is wrong."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be (batch, seq, heads, head_dim), got shape {tuple(x.shape)}")
    if len({q.device, k.device, v.device}) != 1:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.is_cuda and q.dtype not in launch.DTYPES:
        raise TypeError(f"on CUDA the kernels take float16 or bfloat16, got {q.dtype}")
    if not q.is_cuda and q.dtype not in CPU_DTYPES:
        raise TypeError(f"on the CPU q, k, v must be float32, float64, float16 or bfloat16, got {q.dtype}")
    (b, s, hq, d), (bk, sk, hk, dk) = q.shape, k.shape
    if k.shape != v.shape or b != bk or d != dk or (same_length and s != sk):
        raise ValueError(f"shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if min(b, s, sk) < 1 and same_length:
        raise ValueError(f"need batch >= 1 and seq >= 1, got q {tuple(q.shape)}")
    if hq < 1 or hk < 1 or hq % hk:
        raise ValueError(f"q_heads must be a positive multiple of kv_heads, got {hq} / {hk}")
    if q.is_cuda and d not in launch.HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {launch.HEAD_DIMS} on CUDA, got {d}")
    if d < 1:
        raise ValueError(f"head_dim must be >= 1, got {d}")


def check_scale(scale) -> None:
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, (float, int)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"the softmax scale must be a positive finite number, got {scale!r}")


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | tuple[int, int] | torch.Tensor | None,
    *,
    causal: bool = False,
    dilation: int = 1,
    global_tokens: int = 0,
    scale: float | None = None,
    return_lse: bool = False,
    layout: str = "bshd",
):
    """Sliding-window attention, differentiable (q, k, v).

    Window: query i attends key j iff i - left <= j <= i + right, or either is
    below ``global_tokens``; ``window=W`` is (W, W) (the repository's |i - j| <= W),
    a pair is (left, right) with -1 unbounded, None is full attention; causal sets
    right = 0.

    Args:
        q: (batch, seq, q_heads, head_dim); k, v: (batch, seq, kv_heads, head_dim),
            q_heads a multiple of kv_heads (GQA/MQA). CUDA: float16/bfloat16,
            head_dim 64 or 128; CPU: float32/float64/float16/bfloat16, any
            head_dim. ``layout="bhsd"`` takes (batch, heads, seq, head_dim).
        window: W, (left, right), None, or an int tensor (or a pair of them): an
            adaptive window per head ((q_heads, 1)), per query ((seq,)) or both
            ((q_heads, seq)).
        causal: right = 0. dilation: keys i + k * d, -left <= k <= right.
        global_tokens: the first G positions attend to, and are attended by, all.
        scale: softmax scale, default 1 / sqrt(head_dim).
        return_lse: also return the log-sum-exp (batch, q_heads, seq), natural log
            (float32; float64 for float64 inputs).
    Returns:
        out (same layout and dtype as q), and lse if ``return_lse``.
    """
    if layout not in ("bshd", "bhsd"):
        raise ValueError(f"layout must be 'bshd' or 'bhsd', got {layout!r}")
    if layout == "bhsd":
        q, k, v = (x.transpose(1, 2) if isinstance(x, torch.Tensor) else x for x in (q, k, v))
    adaptive = is_adaptive(window)
    if not adaptive:
        check_window(window)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"dilation must be an int >= 1, got {dilation!r}")
    if isinstance(global_tokens, bool) or not isinstance(global_tokens, int) or global_tokens < 0:
        raise ValueError(f"global_tokens must be an int >= 0, got {global_tokens!r}")
    if dilation > 1 and global_tokens:
        raise NotImplementedError("dilation together with global tokens is not supported")
    check_scale(scale)
    check_qkv(q, k, v)
    b, s, hq, d = q.shape
    if adaptive:
        row_windows = adaptive_windows(window, causal, hq, s, q.device)
        left = right = 0  # the kernel reads the rows' windows instead
    else:
        row_windows = None
        left, right = normalize_window(window, causal, s)
    if scale is not None:  # the op applies 1/sqrt(d): fold the ratio into q
        q = q * (scale * math.sqrt(d))
    q, k, v = (x.contiguous() for x in (q, k, v))  # a no-op for contiguous inputs
    out, lse = ops.attention(q, k, v, left, right, dilation, global_tokens, row_windows)
    if layout == "bhsd":
        out = out.transpose(1, 2)
    return (out, lse) if return_lse else out
