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


def check_qkv(q, k, v, same_length: bool = True, any_head_dim: bool = False, kernels_only: bool = True) -> None:
    """Types, ranks, dtypes, devices, shapes and head counts of (batch, seq, heads,
    head_dim) q, k, v; raises TypeError / ValueError naming what is wrong.
    ``kernels_only``: CUDA tensors must suit the kernels (dtype, head_dim); a caller
    with an eager fallback on CUDA (the distributed blocks) passes False."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be (batch, seq, heads, head_dim), got shape {tuple(x.shape)}")
    if len({q.device, k.device, v.device}) != 1:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if kernels_only and q.is_cuda and q.dtype not in launch.DTYPES:
        raise TypeError(f"on CUDA the kernels take float16 or bfloat16, got {q.dtype}")
    if (not q.is_cuda or not kernels_only) and q.dtype not in CPU_DTYPES:
        raise TypeError(f"on the CPU q, k, v must be float32, float64, float16 or bfloat16, got {q.dtype}")
    (b, s, hq, d), (bk, sk, hk, dk) = q.shape, k.shape
    if k.shape != v.shape or b != bk or d != dk or (same_length and s != sk):
        raise ValueError(f"shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if same_length and min(b, s) < 1:
        raise ValueError(f"need batch >= 1 and seq >= 1, got q {tuple(q.shape)}")
    if hq < 1 or hk < 1 or hq % hk:
        raise ValueError(f"q_heads must be a positive multiple of kv_heads, got {hq} / {hk}")
    if kernels_only and q.is_cuda and not any_head_dim and d not in launch.HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {launch.HEAD_DIMS} on CUDA, got {d}")
    if d < 1:
        raise ValueError(f"head_dim must be >= 1, got {d}")


def check_scale(scale) -> None:
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, (float, int)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"the softmax scale must be a positive finite number, got {scale!r}")


def check_dilation(dilation, global_tokens) -> None:
    """dilation an int >= 1, global_tokens an int >= 0, not both in use."""
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"dilation must be an int >= 1, got {dilation!r}")
    if isinstance(global_tokens, bool) or not isinstance(global_tokens, int) or global_tokens < 0:
        raise ValueError(f"global_tokens must be an int >= 0, got {global_tokens!r}")
    if dilation > 1 and global_tokens:
        raise NotImplementedError("dilation together with global tokens is not supported")


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
    check_dilation(dilation, global_tokens)
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


MAX_HEAD_DIM = 256


def check_softcap(softcap) -> None:
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap must be a finite number >= 0 (0: off), got {softcap!r}")


def check_sinks(sinks, q: torch.Tensor) -> None:
    """sinks: None or (q_heads,) float32 / float64 / q's dtype on q's device ((..., q_heads, head_dim) q)."""
    if sinks is None:
        return
    hq = q.shape[-2]
    if not isinstance(sinks, torch.Tensor) or sinks.shape != (hq,):
        raise ValueError(f"sinks must be a tensor of shape (q_heads,) = ({hq},), got {getattr(sinks, 'shape', sinks)}")
    if sinks.device != q.device:
        raise ValueError(f"sinks must be on q's device {q.device}, got {sinks.device}")
    if sinks.dtype not in (torch.float32, q.dtype, torch.float64):
        raise TypeError(f"sinks must be float32 or q's dtype, got {sinks.dtype}")


def _check_flash_args(q, softmax_scale, causal, window_size, softcap, sinks):
    """The scalars of the FlashAttention-style functions; returns the scale."""
    check_window(window_size, "window_size")
    if window_size is None or isinstance(window_size, int):
        raise TypeError(f"window_size must be a (left, right) pair (-1: unbounded), got {window_size!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    check_scale(softmax_scale)
    check_softcap(softcap)
    d = q.shape[-1]
    if q.is_cuda and (d % 8 or d > MAX_HEAD_DIM):
        raise ValueError(f"head_dim must be a multiple of 8 up to {MAX_HEAD_DIM} on CUDA, got {d}")
    check_sinks(sinks, q)
    return 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    return_lse: bool = False,
):
    """FlashAttention's ``flash_attn_func`` with its conventions, differentiable in q, k, v and sinks.

    Window: query i of seqlen_q sits at key position pos = i + seqlen_k - seqlen_q
    (bottom-right aligned) and attends keys pos - left .. pos + right of
    ``window_size=(left, right)``, -1 unbounded; ``causal`` sets right = 0. The
    repository's |i - j| <= W is (W, W); transformers' ``sliding_window=W`` is
    (W - 1, 0) with causal.

    Args:
        q: (batch, seqlen_q, q_heads, head_dim); k, v: (batch, seqlen_k, kv_heads,
            head_dim), q_heads a multiple of kv_heads. CUDA: float16/bfloat16, head_dim
            a multiple of 8 up to 256; CPU: float32/float64/float16/bfloat16.
        softmax_scale: default 1 / sqrt(head_dim).
        softcap: c > 0 replaces each scaled score s by c * tanh(s / c), before the mask.
        sinks: (q_heads,) learned sink logits (float32 or q's dtype): each adds
            exp(sink) to its head's softmax denominators, with no value.
        return_lse: also return lse (batch, q_heads, seqlen_q), float32, natural log
            (the sink included; -inf for a row that sees nothing and no sink).
    Returns:
        out (batch, seqlen_q, q_heads, head_dim) in q's dtype (0 for a row that sees
        no key), and lse if ``return_lse``.
    """
    check_qkv(q, k, v, same_length=False, any_head_dim=True)
    scale = _check_flash_args(q, softmax_scale, causal, window_size, softcap, sinks)
    sq, sk = q.shape[1], k.shape[1]
    left, right = normalize_window(window_size, causal, sq, sk)
    q, k, v = (x.contiguous() for x in (q, k, v))
    out, lse = ops.flash_attention(q, k, v, None, None, sinks, left, right, softcap, scale, sq, sk)
    return (out, lse) if return_lse else out


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int | None,
    max_seqlen_k: int | None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    return_lse: bool = False,
):
    """FlashAttention's ``flash_attn_varlen_func``: packed sequences, one launch.

    q (total_q, q_heads, head_dim), k, v (total_k, kv_heads, head_dim); sequence b
    holds rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1 of q and likewise of k, v
    (int32, batch + 1, on q's device, non-decreasing from 0); max_seqlen_q/k bound
    the lengths (None: read from the offsets, one device-to-host sync, so not
    CUDA-graph capturable). Each sequence gets its own bottom-right window (see
    ``flash_attn_func``, whose other arguments these are). Returns out (total_q,
    q_heads, head_dim), and lse (q_heads, total_q) if ``return_lse``.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise ValueError(f"{name} must be a (total, heads, head_dim) tensor, got {getattr(x, 'shape', x)}")
    check_qkv(q[None], k[None], v[None], same_length=False, any_head_dim=True)
    scale = _check_flash_args(q, softmax_scale, causal, window_size, softcap, sinks)
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
            raise ValueError(f"{name} must be a 1-D int32 tensor of batch + 1 offsets, got {getattr(cu, 'dtype', cu)}")
        if cu.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {cu.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k disagree on the batch: {cu_seqlens_q.numel()} vs "
            f"{cu_seqlens_k.numel()} offsets"
        )
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    if max_seqlen_k is None:
        max_seqlen_k = int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max())
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ValueError(f"{name} must be an int >= 0, got {m!r}")
    if not q.is_cuda and not torch.compiler.is_compiling():  # host offsets: check them all (no sync needed)
        for name, cu, total, m in (
            ("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q),
            ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k),
        ):
            lens = cu[1:] - cu[:-1]
            if int(cu[0]) != 0 or bool((lens < 0).any()) or int(cu[-1]) > total:
                raise ValueError(f"{name} must start at 0, not decrease and end at most at {total}: {cu.tolist()}")
            if int(lens.max()) > m:
                raise ValueError(f"{name} holds a sequence of {int(lens.max())} tokens, over max {m}")
    left, right = normalize_window(window_size, causal, max(max_seqlen_q, 1), max(max_seqlen_k, 1))
    q, k, v = (x.contiguous() for x in (q, k, v))
    out, lse = ops.flash_attention(
        q, k, v, cu_seqlens_q, cu_seqlens_k, sinks, left, right, softcap, scale, max_seqlen_q, max_seqlen_k
    )
    return (out, lse) if return_lse else out
