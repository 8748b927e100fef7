"""Online block aggregation of sliding-window attention, and the course's
offline / online sliding-window attention modules.

Attention over a set of keys can be computed a block of keys at a time: each
block gives a partial output o_b (normalised over its own keys) and its
log-sum-exp lse_b, and two partials over disjoint key sets merge exactly:

    lse = log(exp(lse_1) + exp(lse_2))
    o   = exp(lse_1 - lse) * o_1 + exp(lse_2 - lse) * o_2

``merge_`` is that step, in place; the distributed code (distributed.py) and
``OnlineSlidingWindowAttn`` use the same function. A row that has seen no key
yet has lse = -inf, and merging a block it cannot see (lse_b = -inf) leaves it
unchanged, NaN-free.

Two window conventions live here, each stated where it is used:

* the functions (``block_attention`` and its backward, used by distributed.py):
  the repository's one definition, query i sees key j iff -left <= j - i <= right,
  or i < global_tokens or j < global_tokens, with ``window=W`` meaning
  left = right = W and ``causal`` meaning right = 0; positions are global, so a
  block at offset (q_offset, k_offset) is masked where it lies in the whole
  sequence.
* the course's modules (``OfflineSlidingWindowAttn``, ``OnlineSlidingWindowAttn``):
  one int ``window_size`` w (None: unbounded), positions aligned bottom-right:
  with s = max(seqlen_q, seqlen_kv), query i sits at s - seqlen_q + i and key j
  at s - seqlen_kv + j; a key is visible iff its position is >= the query's - w
  and <= the query's (causal) or <= the query's + w (not causal). That is
  FlashAttention's ``window_size=(w, w)`` (``(w, 0)`` with causal).

Layout of the functions: (batch, seq, heads, head_dim), separate Q, K, V, GQA
(q_heads a multiple of kv_heads). On CUDA (float16/bfloat16, head_dim 64/128,
no global token in the block) a block runs the TileLang kernel
(``launch.forward`` with the offsets folded into the window); otherwise the
eager twin (float32, or float64 for float64 inputs).
"""

from __future__ import annotations

import math
from enum import Enum

import torch
import torch.nn.functional as F

from . import eager, launch
from .api import MAX_HEAD_DIM, flash_attn_func, flash_attn_varlen_func
from .window import block_mask, normalize_window, shift_window

LOW_PRECISION = (torch.float16, torch.bfloat16)


def merge_(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor):
    """Merge a partial attention (block_out, block_lse) over new keys into (out, lse), in place.

    out, block_out (batch, seq, heads, head_dim); lse, block_lse (batch, heads, seq),
    natural log, -inf where a row has no key. Any finite lse merges exactly
    (lse' = log(exp(lse) + exp(lse_b)), out' = exp(lse - lse') out + exp(lse_b - lse') out_b);
    a row where both are -inf keeps its out and lse. A float16/bfloat16 ``out`` is
    merged in float32 and rounded once. Returns (out, lse).
    """
    new_lse = torch.logaddexp(lse, block_lse)
    # Both -inf: exp(-inf - (-inf)) is NaN. Such a row has seen nothing, before or now: keep it as it is.
    empty = torch.isneginf(new_lse)
    ref = torch.where(empty, torch.zeros_like(new_lse), new_lse)
    w_old = torch.where(empty, torch.ones_like(new_lse), torch.exp(lse - ref)).transpose(1, 2).unsqueeze(-1)
    w_new = torch.exp(block_lse - ref).transpose(1, 2).unsqueeze(-1)  # 0 where the block saw nothing
    if out.dtype in LOW_PRECISION:  # two roundings in 8 (or 11) bits would lose a block's worth of accuracy
        out.copy_(out.float() * w_old.float() + block_out.float() * w_new.float())
    else:
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

    Window: global query i sees global key j iff -left <= j - i <= right, or either
    is below ``global_tokens``. Returns (out, lse): out (batch, q_len, q_heads,
    head_dim) float32 (float64 for float64 inputs), lse (batch, q_heads, q_len)
    float32/64, natural log; rows that see no key of the block get 0 and -inf.
    ``final``: the block holds every key its rows see (nothing will be merged into
    it), so out may stay in the kernel's dtype (q's) instead of a float32 copy.
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


def empty_state(q: torch.Tensor):
    """(out, lse) before any key block, for q (batch, seq, heads, dim): zeros and -inf,
    float32 (float64 for float64 q)."""
    work = eager.work_dtype(q)
    out = torch.zeros(q.shape, dtype=work, device=q.device)
    lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=work, device=q.device)
    return out, lse


# ---- the course's modules ------------------------------------------------------------


class AttnQKVPackFormat(Enum):
    """How q, k, v arrive. QKV: one tensor whose heads axis holds the q heads, then
    the k heads, then the v heads; Q_KV: q, and one tensor with the k heads then the
    v heads; Q_K_V: three tensors."""

    QKV = "qkv_packed"
    Q_KV = "q_kv_packed"
    Q_K_V = "q_k_v_packed"


class AttnQKVLayout(Enum):
    """The axes of q, k, v and o. BSHD: (batch, seq, heads, head_dim); SBHD: (seq,
    batch, heads, head_dim); THD: packed sequences (total, heads, head_dim) whose
    lengths cu_seqlens_q / cu_seqlens_k (batch + 1 offsets) give."""

    BSHD = "bshd"
    SBHD = "sbhd"
    THD = "thd"


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _positive_int(name: str, x) -> int:
    if not _is_int(x) or x < 1:
        raise ValueError(f"{name} must be a positive int, got {x!r}")
    return x


def _real_pair(name: str, x) -> tuple[float, float]:
    if not isinstance(x, (tuple, list)) or len(x) != 2 or not all(_is_real(t) for t in x):
        raise ValueError(f"{name} must be a pair of finite numbers, got {x!r}")
    return float(x[0]), float(x[1])


def _enum(cls, value, name: str):
    try:
        return cls(value)
    except (ValueError, TypeError):
        choices = ", ".join(f"{m.name} ({m.value!r})" for m in cls)
        raise ValueError(f"{name} must be one of {choices}, got {value!r}") from None


class GroupRMSNorm(torch.nn.Module):
    """RMS norm over groups of a token's features: x (..., hidden) is split into
    hidden / group_size groups, and each becomes x * rsqrt(mean(x^2 over the group)
    + eps) * gamma. Computed in float32 (float64 for float64 x) and cast back to
    x's dtype. gamma (hidden,) in ``dtype`` on ``device``, initialised
    uniform(init_range) right after ``torch.manual_seed(init_seed)``."""

    def __init__(
        self,
        hidden_size: int,
        group_size: int,
        eps: float = 1e-5,
        init_range=(-1.0, 1.0),
        init_seed: int = 42,
        dtype: torch.dtype = torch.float32,
        device="cpu",
    ):
        super().__init__()
        _positive_int("hidden_size", hidden_size)
        _positive_int("group_size", group_size)
        if hidden_size % group_size:
            raise ValueError(f"group_size {group_size} must divide hidden_size {hidden_size}")
        self.hidden_size, self.group_size, self.eps = hidden_size, group_size, eps
        self.init_range, self.init_seed = init_range, init_seed
        self.weight = torch.nn.Parameter(torch.empty(hidden_size, dtype=dtype, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        torch.manual_seed(self.init_seed)
        torch.nn.init.uniform_(self.weight, *self.init_range)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"GroupRMSNorm expects (..., {self.hidden_size}), got {tuple(x.shape)}")
        work = eager.work_dtype(x)
        g = x.to(work).unflatten(-1, (self.hidden_size // self.group_size, self.group_size))
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return (g.flatten(-2) * self.weight.to(work)).to(x.dtype)


class OfflineSlidingWindowAttn(torch.nn.Module):
    """Sliding-window attention over whole sequences, with the course's options.

    Window: one int ``window_size`` w (None: unbounded), positions aligned
    bottom-right: with s = max(seqlen_q, seqlen_kv), query i sits at s - seqlen_q + i
    and key j at s - seqlen_kv + j; a key is visible iff its position is >= the
    query's - w and <= the query's (``causal``) or <= the query's + w. Equal
    lengths give |i - j| <= w (causal: 0 <= i - j <= w). THD attends each sequence
    on its own, bottom-right aligned within it.

    ``forward(q, k=None, v=None, cu_seqlens_q=None, cu_seqlens_k=None)`` returns o
    in q's layout and dtype, (..., num_q_head, head_dim). The steps, in order:
    split the packed input and bring q, k, v to (batch, seq, heads, head_dim); QK
    norm (``apply_qk_norm``: a ``GroupRMSNorm`` over each token's heads * head_dim
    values, q and k each their own, both seeded with ``init_seed``); logits =
    q k^T * scale (default 1 / sqrt(head_dim)), then cap * tanh(logits / cap) if
    ``softmax_cap`` else logits / ``softmax_temp``; the mask; lse of the masked
    logits; softmax in float32 (a row that sees no key gives zeros) cast to q's
    dtype; clip: clamp((r - l) p + l, 0, 1) for ``softmax_clip_range`` (l, r),
    applied to every entry, masked ones included (l > 0 gives them weight l, as
    the formula says); dropout (training mode only) right after
    ``torch.manual_seed(softmax_dropout_seed)``, THD reseeding per sequence; o = p v,
    the k/v heads shared by groups of num_q_head / num_kv_head q heads.

    CUDA float16/bfloat16 inputs with head_dim a multiple of 8 up to 256, no active
    dropout and clip (0, 1) run the TileLang kernels through ``flash_attn_func`` /
    ``flash_attn_varlen_func``; everything else an exact eager path (float32, float64
    for float64 inputs). Invalid arguments raise at construction.
    """

    def __init__(
        self,
        head_dim: int,
        num_q_head: int,
        num_kv_head: int,
        qkv_pack_format: AttnQKVPackFormat = AttnQKVPackFormat.Q_K_V,
        qkv_layout: AttnQKVLayout = AttnQKVLayout.BSHD,
        window_size: int | None = None,
        causal: bool = False,
        softmax_dropout_rate: float = 0.0,
        softmax_dropout_seed: int = 42,
        softmax_scale: float | None = None,
        softmax_cap: float | None = None,
        softmax_temp: float = 1.0,
        softmax_clip_range: tuple[float, float] = (0.0, 1.0),
        apply_qk_norm: bool = False,
        group_size: int | None = None,
        eps: float = 1e-5,
        init_range: tuple[float, float] = (-1.0, 1.0),
        init_seed: int = 42,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ):
        super().__init__()
        self.head_dim = _positive_int("head_dim", head_dim)
        self.num_q_head = _positive_int("num_q_head", num_q_head)
        self.num_kv_head = _positive_int("num_kv_head", num_kv_head)
        if num_q_head % num_kv_head:
            raise ValueError(f"num_q_head ({num_q_head}) must be a multiple of num_kv_head ({num_kv_head})")
        self.qkv_pack_format = _enum(AttnQKVPackFormat, qkv_pack_format, "qkv_pack_format")
        self.qkv_layout = _enum(AttnQKVLayout, qkv_layout, "qkv_layout")
        if window_size is not None and (not _is_int(window_size) or window_size < 0):
            raise ValueError(f"window_size must be an int >= 0 or None (unbounded), got {window_size!r}")
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {causal!r}")
        if not _is_real(softmax_dropout_rate) or not 0.0 <= softmax_dropout_rate <= 1.0:
            raise ValueError(f"softmax_dropout_rate must be in [0, 1], got {softmax_dropout_rate!r}")
        if not _is_int(softmax_dropout_seed):
            raise TypeError(f"softmax_dropout_seed must be an int, got {softmax_dropout_seed!r}")
        if softmax_scale is not None and (not _is_real(softmax_scale) or softmax_scale <= 0):
            raise ValueError(f"softmax_scale must be a positive finite number or None, got {softmax_scale!r}")
        if softmax_cap is not None and (not _is_real(softmax_cap) or softmax_cap <= 0):
            raise ValueError(f"softmax_cap must be a positive finite number or None, got {softmax_cap!r}")
        if not _is_real(softmax_temp) or softmax_temp <= 0:
            raise ValueError(f"softmax_temp must be a positive finite number, got {softmax_temp!r}")
        clip_lo, clip_hi = _real_pair("softmax_clip_range", softmax_clip_range)
        if clip_lo >= clip_hi:
            raise ValueError(f"softmax_clip_range (l, r) needs l < r, got {softmax_clip_range!r}")
        if not isinstance(apply_qk_norm, bool):
            raise TypeError(f"apply_qk_norm must be a bool, got {apply_qk_norm!r}")
        group_size = head_dim if group_size is None else group_size
        if not _is_int(group_size) or group_size < 1 or head_dim % group_size:
            raise ValueError(f"group_size must be a positive int dividing head_dim {head_dim}, got {group_size!r}")
        if not _is_real(eps) or eps < 0:
            raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
        init_lo, init_hi = _real_pair("init_range", init_range)
        if init_lo > init_hi:
            raise ValueError(f"init_range (a, b) needs a <= b, got {init_range!r}")
        if not _is_int(init_seed):
            raise TypeError(f"init_seed must be an int, got {init_seed!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")

        self.window_size, self.causal = window_size, causal
        self.softmax_dropout_rate, self.softmax_dropout_seed = float(softmax_dropout_rate), softmax_dropout_seed
        self.softmax_scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
        self.softmax_cap = None if softmax_cap is None else float(softmax_cap)
        self.softmax_temp = float(softmax_temp)
        self.softmax_clip_range = (clip_lo, clip_hi)
        self.apply_qk_norm, self.group_size, self.eps = apply_qk_norm, group_size, float(eps)
        self.init_range, self.init_seed = (init_lo, init_hi), init_seed
        if apply_qk_norm:
            opts = dict(eps=self.eps, init_range=self.init_range, init_seed=init_seed, dtype=dtype, device=device)
            self.q_norm = GroupRMSNorm(num_q_head * head_dim, group_size, **opts)
            self.k_norm = GroupRMSNorm(num_kv_head * head_dim, group_size, **opts)
        else:
            self.q_norm = self.k_norm = None

    def reset_parameters(self) -> None:
        """Re-initialise the QK norms' gamma (each right after ``torch.manual_seed(init_seed)``)."""
        if self.apply_qk_norm:
            self.q_norm.reset_parameters()
            self.k_norm.reset_parameters()

    # -- inputs --------------------------------------------------------------------------

    def _split(self, q, k, v):
        """The three tensors of the pack format, in the module's layout."""
        fmt, hq, hk = self.qkv_pack_format, self.num_q_head, self.num_kv_head
        given = {"q": q, "k": k, "v": v}
        need = {
            AttnQKVPackFormat.QKV: ("q",),
            AttnQKVPackFormat.Q_KV: ("q", "k"),
            AttnQKVPackFormat.Q_K_V: ("q", "k", "v"),
        }[fmt]
        for name, x in given.items():
            if name in need and not isinstance(x, torch.Tensor):
                raise TypeError(f"{fmt.name} needs {name} as a torch.Tensor, got {type(x).__name__}")
            if name not in need and x is not None:
                raise ValueError(f"{fmt.name} takes its heads from {', '.join(need)}: {name} must be None")
        rank = 3 if self.qkv_layout == AttnQKVLayout.THD else 4
        for name in need:
            if given[name].dim() != rank:
                raise ValueError(
                    f"{name} must have {rank} dims in layout {self.qkv_layout.name}, "
                    f"got shape {tuple(given[name].shape)}"
                )
        if fmt == AttnQKVPackFormat.QKV:
            if q.shape[-2] != hq + 2 * hk:
                raise ValueError(f"the packed qkv must hold {hq} + 2 * {hk} heads, got {q.shape[-2]}")
            return q.split([hq, hk, hk], dim=-2)
        if fmt == AttnQKVPackFormat.Q_KV:
            if k.shape[-2] != 2 * hk:
                raise ValueError(f"the packed kv must hold 2 * {hk} heads, got {k.shape[-2]}")
            k, v = k.split([hk, hk], dim=-2)
        return q, k, v

    def _check(self, q, k, v):
        """Dtypes, devices, heads, head_dim and the batch / sequence axes of q, k, v (module layout)."""
        if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
            raise TypeError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
        if len({q.device, k.device, v.device}) != 1:
            raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
        for name, x, heads in (("q", q, self.num_q_head), ("k", k, self.num_kv_head), ("v", v, self.num_kv_head)):
            if x.shape[-2:] != (heads, self.head_dim):
                raise ValueError(
                    f"{name} must end in (heads, head_dim) = ({heads}, {self.head_dim}), got shape {tuple(x.shape)}"
                )
        if k.shape != v.shape:
            raise ValueError(f"k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
        batch_axis = {AttnQKVLayout.BSHD: 0, AttnQKVLayout.SBHD: 1, AttnQKVLayout.THD: None}[self.qkv_layout]
        if batch_axis is not None and q.shape[batch_axis] != k.shape[batch_axis]:
            raise ValueError(f"q and k disagree on the batch: {tuple(q.shape)} vs {tuple(k.shape)}")

    @staticmethod
    def _offsets(cu, total: int, name: str) -> list[int]:
        """The offsets of ``cu`` as ints, checked: 1-D integer, from 0, non-decreasing, ending at ``total``."""
        ok = isinstance(cu, torch.Tensor) and cu.dim() == 1 and cu.numel() >= 2
        if not ok or cu.dtype not in (torch.int32, torch.int64):
            got = f"{tuple(cu.shape)} {cu.dtype}" if isinstance(cu, torch.Tensor) else repr(cu)
            raise ValueError(f"THD needs {name}, a 1-D int32 tensor of batch + 1 offsets; got {got}")
        offsets = cu.tolist()
        decreasing = any(b < a for a, b in zip(offsets[:-1], offsets[1:], strict=True))
        if offsets[0] != 0 or decreasing or offsets[-1] != total:
            raise ValueError(f"{name} must start at 0, not decrease and end at the total {total}: {offsets}")
        return offsets

    # -- the attention -------------------------------------------------------------------

    def _mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Boolean (len(q_pos), len(k_pos)): which keys each query sees, at these aligned positions."""
        qp, kp = q_pos[:, None], k_pos[None, :]
        seen = torch.ones(len(q_pos), len(k_pos), dtype=torch.bool, device=q_pos.device)
        if self.window_size is not None:  # None: w = s, beyond every distance: no bound
            seen = (kp >= qp - self.window_size) & (kp <= qp + self.window_size)
        return seen & (kp <= qp) if self.causal else seen

    def _dropout_active(self) -> bool:
        return self.training and self.softmax_dropout_rate > 0

    def _use_kernels(self, q: torch.Tensor) -> bool:
        """Whether ``flash_attn_func`` (the TileLang kernels) can run this forward: CUDA, float16 /
        bfloat16, head_dim a multiple of 8 up to 256, and no step it has not got (dropout, clip)."""
        d = self.head_dim
        plain = not self._dropout_active() and self.softmax_clip_range == (0.0, 1.0)
        return q.is_cuda and q.dtype in LOW_PRECISION and d % 8 == 0 and d <= MAX_HEAD_DIM and plain

    def _flash_args(self) -> dict:
        """The kernels' scale and softcap. With a cap the logits are cap * tanh(scale q k / cap) and the
        temperature is not applied: FlashAttention's softcap (s <- c * tanh(s / c) after the scale)."""
        if self.softmax_cap is not None:
            return dict(softmax_scale=self.softmax_scale, softcap=self.softmax_cap)
        return dict(softmax_scale=self.softmax_scale / self.softmax_temp, softcap=0.0)

    def _flash_window(self) -> tuple[int, int]:
        w = -1 if self.window_size is None else self.window_size
        return (w, 0) if self.causal else (w, w)

    def _eager(self, q, k, v, mask):
        """(o, lse) of the steps 3-9 under a boolean mask (sq, sk): q (b, sq, hq, d), k, v
        (b, sk, hk, d). o (b, sq, hq, d) and lse (b, hq, sq) in float32 (float64 for
        float64 q); p is rounded to q's dtype before the clip, as the course's steps say."""
        work = eager.work_dtype(q)
        group = self.num_q_head // self.num_kv_head
        qt = q.to(work).transpose(1, 2)
        kt, vt = (x.to(work).transpose(1, 2).repeat_interleave(group, dim=1) for x in (k, v))
        logits = (qt @ kt.transpose(-1, -2)) * self.softmax_scale
        if self.softmax_cap is not None:
            logits = self.softmax_cap * torch.tanh(logits / self.softmax_cap)
        else:
            logits = logits / self.softmax_temp
        logits = logits.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(logits, dim=-1)
        # A row that sees nothing has lse -inf: subtract 0 instead so that exp(-inf) gives 0, not NaN.
        p = torch.exp(logits - torch.where(torch.isinf(lse), 0, lse)[..., None]).to(q.dtype)
        lo, hi = self.softmax_clip_range
        if (lo, hi) != (0.0, 1.0):
            p = torch.clamp((hi - lo) * p + lo, 0.0, 1.0)
        if self._dropout_active():
            torch.manual_seed(self.softmax_dropout_seed)
            p = F.dropout(p, self.softmax_dropout_rate, training=True)
        return (p.to(work) @ vt).transpose(1, 2), lse

    def _attend(self, q, k, v):
        """o (b, sq, hq, d) in q's dtype for one batch of equal-length sequences."""
        sq, sk = q.shape[1], k.shape[1]
        if sq == 0 or sk == 0:  # nothing to see (or no one to see it): a row that sees no key gives 0
            return q.new_zeros(q.shape)
        if self._use_kernels(q):
            return flash_attn_func(q, k, v, causal=self.causal, window_size=self._flash_window(), **self._flash_args())
        s = max(sq, sk)
        mask = self._mask(torch.arange(s - sq, s, device=q.device), torch.arange(s - sk, s, device=q.device))
        return self._eager(q, k, v, mask)[0].to(q.dtype)

    def _attend_varlen(self, q, k, v, cq: list[int], ck: list[int]):
        """o (total_q, hq, d) of packed sequences, each attended on its own."""
        if self._use_kernels(q):
            max_q = max(b - a for a, b in zip(cq[:-1], cq[1:], strict=True))
            max_k = max(b - a for a, b in zip(ck[:-1], ck[1:], strict=True))
            cu_q, cu_k = (torch.tensor(c, dtype=torch.int32, device=q.device) for c in (cq, ck))
            return flash_attn_varlen_func(
                q,
                k,
                v,
                cu_q,
                cu_k,
                max_q,
                max_k,
                causal=self.causal,
                window_size=self._flash_window(),
                **self._flash_args(),
            )
        out = q.new_zeros(q.shape)
        for b in range(len(cq) - 1):
            rows = slice(cq[b], cq[b + 1])
            out[rows] = self._attend(q[None, rows], k[None, ck[b] : ck[b + 1]], v[None, ck[b] : ck[b + 1]])[0]
        return out

    def _norm_qk(self, q, k):
        """QK norm over each token's heads * head_dim values; q, k (..., heads, head_dim)."""
        if not self.apply_qk_norm:
            return q, k
        return self.q_norm(q.flatten(-2)).view(q.shape), self.k_norm(k.flatten(-2)).view(k.shape)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor | None = None,
        v: torch.Tensor | None = None,
        cu_seqlens_q: torch.Tensor | None = None,
        cu_seqlens_k: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """o in q's layout and dtype, heads num_q_head.

        Args:
            q: q in the module's layout (BSHD (batch, seq, heads, head_dim), SBHD (seq,
                batch, heads, head_dim), THD (total, heads, head_dim)), or the packed qkv
                (heads num_q_head + 2 * num_kv_head) for QKV.
            k: k, or the packed kv (heads 2 * num_kv_head) for Q_KV; None for QKV.
            v: v for Q_K_V, else None.
            cu_seqlens_q, cu_seqlens_k: THD only: int32 (batch + 1) offsets of the
                sequences in q and in k, v (from 0, non-decreasing, ending at the totals).
        """
        q, k, v = self._split(q, k, v)
        self._check(q, k, v)
        layout = self.qkv_layout
        if layout == AttnQKVLayout.THD:
            cq = self._offsets(cu_seqlens_q, q.shape[0], "cu_seqlens_q")
            ck = self._offsets(cu_seqlens_k, k.shape[0], "cu_seqlens_k")
            if len(cq) != len(ck):
                raise ValueError(f"cu_seqlens_q and cu_seqlens_k disagree on the batch: {cq} vs {ck}")
            q, k = self._norm_qk(q, k)
            return self._attend_varlen(q, k, v, cq, ck)
        if cu_seqlens_q is not None or cu_seqlens_k is not None:
            raise ValueError(f"cu_seqlens are for the THD layout, not {layout.name}")
        if layout == AttnQKVLayout.SBHD:
            q, k, v = (x.transpose(0, 1) for x in (q, k, v))
        q, k = self._norm_qk(q, k)
        o = self._attend(q, k, v)
        return o.transpose(0, 1) if layout == AttnQKVLayout.SBHD else o


class OnlineSlidingWindowAttn(OfflineSlidingWindowAttn):
    """One (query block, key-value block) of the offline module at a time, merged into
    a global output in place (BSHD, Q_K_V, no dropout, no clip).

    Window: that of ``OfflineSlidingWindowAttn`` over the whole sequences (s =
    max(seqlen_q, seqlen_kv); query i at s - seqlen_q + i, key j at s - seqlen_kv + j;
    visible iff >= the query's - w and <= the query's (causal) or + w).

    ``forward(q, k, v, global_o, global_lse, block_idx_q, block_idx_kv)`` returns
    None. q (batch, block_size_q, num_q_head, head_dim) is the block_idx_q-th block of
    queries, k, v (batch, block_size_kv, num_kv_head, head_dim) the block_idx_kv-th
    block of keys; the last blocks are zero-padded past seqlen_q / seqlen_kv (their
    exact valid lengths are accepted too) and the padding is never seen. The block's
    (o, lse) under the whole sequences' mask is merged (``merge_``) into
    global_o[:, rows] (batch, seqlen_q, num_q_head, head_dim) and global_lse[:, :,
    rows] (batch, num_q_head, seqlen_q), float32, for the block's valid rows only:
    lse' = log(exp(lse_g) + exp(lse_b)), o' = exp(lse_g - lse') o_g + exp(lse_b - lse')
    o_b, for whatever global_lse holds; a block no row of which sees a key leaves both
    unchanged. Starting from o = 0, lse = -inf (``empty_state``), all blocks in any
    order give the offline result and its lse. QK norm applies to each block's q, k.

    CUDA float16/bfloat16 blocks run ``flash_attn_func``, the block's window shifted
    into its bottom-right coordinates; everything else the exact eager path.
    """

    def __init__(
        self,
        seqlen_q: int,
        seqlen_kv: int,
        block_size_q: int,
        block_size_kv: int,
        head_dim: int,
        num_q_head: int,
        num_kv_head: int,
        window_size: int | None = None,
        causal: bool = False,
        softmax_scale: float | None = None,
        softmax_cap: float | None = None,
        softmax_temp: float = 1.0,
        apply_qk_norm: bool = False,
        group_size: int | None = None,
        eps: float = 1e-5,
        init_range: tuple[float, float] = (-1.0, 1.0),
        init_seed: int = 42,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ):
        super().__init__(
            head_dim=head_dim,
            num_q_head=num_q_head,
            num_kv_head=num_kv_head,
            window_size=window_size,
            causal=causal,
            softmax_scale=softmax_scale,
            softmax_cap=softmax_cap,
            softmax_temp=softmax_temp,
            apply_qk_norm=apply_qk_norm,
            group_size=group_size,
            eps=eps,
            init_range=init_range,
            init_seed=init_seed,
            dtype=dtype,
            device=device,
        )
        self.seqlen_q = _positive_int("seqlen_q", seqlen_q)
        self.seqlen_kv = _positive_int("seqlen_kv", seqlen_kv)
        self.block_size_q = _positive_int("block_size_q", block_size_q)
        self.block_size_kv = _positive_int("block_size_kv", block_size_kv)
        self.num_blocks_q = -(-seqlen_q // block_size_q)
        self.num_blocks_kv = -(-seqlen_kv // block_size_kv)

    empty_state = staticmethod(empty_state)

    def _block(self, idx, n_blocks: int, size: int, seqlen: int, name: str) -> tuple[int, int]:
        """(start, valid length) of block ``idx``."""
        if not _is_int(idx) or not 0 <= idx < n_blocks:
            raise ValueError(f"{name} must be an int in [0, {n_blocks}), got {idx!r}")
        return idx * size, min(size, seqlen - idx * size)

    def _check_block(self, q, k, v, global_o, global_lse, nq: int, nk: int):
        for name, x in (("q", q), ("k", k), ("v", v), ("global_o", global_o), ("global_lse", global_lse)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        for name, x, size, valid in (
            ("q", q, self.block_size_q, nq),
            ("k", k, self.block_size_kv, nk),
            ("v", v, self.block_size_kv, nk),
        ):
            if x.dim() != 4 or x.shape[1] not in (size, valid):
                raise ValueError(
                    f"{name} must be (batch, {size} (or the valid {valid}), heads, head_dim), "
                    f"got shape {tuple(x.shape)}"
                )
        self._check(q, k, v)
        b = q.shape[0]
        want_o, want_lse = (b, self.seqlen_q, self.num_q_head, self.head_dim), (b, self.num_q_head, self.seqlen_q)
        if tuple(global_o.shape) != want_o or tuple(global_lse.shape) != want_lse:
            raise ValueError(
                f"global_o must be {want_o} and global_lse {want_lse}, got "
                f"{tuple(global_o.shape)} and {tuple(global_lse.shape)}"
            )
        if not global_o.dtype.is_floating_point or global_lse.dtype not in (torch.float32, torch.float64):
            raise TypeError(
                f"global_o must be floating and global_lse float32 (or float64), got "
                f"{global_o.dtype} and {global_lse.dtype}"
            )
        if global_o.device != q.device or global_lse.device != q.device:
            raise ValueError(f"global_o and global_lse must be on q's device {q.device}")

    def _block_kernel(self, q, k, v, lo: int, hi: int):
        """(o, lse) of a block whose local query i sees local key j iff lo <= j - i <= hi (lo <= hi),
        by ``flash_attn_func``, whose window is (left, right) >= 0 around i + sk - sq.

        left = (sk - sq) - lo and right = hi - (sk - sq) may be negative. right < 0: the
        last -right keys are past every query's window; dropping them lowers sk by -right,
        which gives right 0 and left hi - lo >= 0. left < 0: the last -left queries see no key;
        dropping them (their o 0, lse -inf) gives left 0 and right hi - lo. Both cannot be
        negative, as left + right = hi - lo."""
        nq, nk = q.shape[1], k.shape[1]
        left, right = (nk - nq) - lo, hi - (nk - nq)
        if right < 0:
            nk += right
        elif left < 0:
            nq += left
        left, right = (nk - nq) - lo, hi - (nk - nq)
        o, lse = flash_attn_func(
            q[:, :nq], k[:, :nk], v[:, :nk], window_size=(left, right), return_lse=True, **self._flash_args()
        )
        if nq < q.shape[1]:
            b, _, h, d = q.shape
            o = torch.cat([o, o.new_zeros(b, q.shape[1] - nq, h, d)], 1)
            lse = torch.cat([lse, lse.new_full((b, h, q.shape[1] - nq), float("-inf"))], 2)
        return o, lse

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        global_o: torch.Tensor,
        global_lse: torch.Tensor,
        block_idx_q: int,
        block_idx_kv: int,
    ) -> None:
        """Merge block (block_idx_q, block_idx_kv) into global_o, global_lse in place; returns None.

        Args:
            q: (batch, block_size_q, num_q_head, head_dim), zero-padded past seqlen_q.
            k, v: (batch, block_size_kv, num_kv_head, head_dim), zero-padded past seqlen_kv.
            global_o: (batch, seqlen_q, num_q_head, head_dim), updated in place.
            global_lse: (batch, num_q_head, seqlen_q) float32, natural log, updated in place.
            block_idx_q, block_idx_kv: the blocks' indices.
        """
        q0, nq = self._block(block_idx_q, self.num_blocks_q, self.block_size_q, self.seqlen_q, "block_idx_q")
        k0, nk = self._block(block_idx_kv, self.num_blocks_kv, self.block_size_kv, self.seqlen_kv, "block_idx_kv")
        self._check_block(q, k, v, global_o, global_lse, nq, nk)
        q, k, v = q[:, :nq], k[:, :nk], v[:, :nk]  # padding is never seen: it is not even read
        s = max(self.seqlen_q, self.seqlen_kv)
        # Local query i and key j sit at global positions qs + i and ks + j; j - i + (ks - qs) is their distance.
        qs, ks = s - self.seqlen_q + q0, s - self.seqlen_kv + k0
        w = s if self.window_size is None else self.window_size
        lo, hi = -w - (ks - qs), (0 if self.causal else w) - (ks - qs)
        if lo > nk - 1 or hi < -(nq - 1):  # no (i, j) with lo <= j - i <= hi: nothing to merge
            return None
        q, k = self._norm_qk(q, k)
        if self._use_kernels(q):
            o, lse = self._block_kernel(q, k, v, lo, hi)
        else:
            dev = q.device
            o, lse = self._eager(
                q, k, v, self._mask(torch.arange(qs, qs + nq, device=dev), torch.arange(ks, ks + nk, device=dev))
            )
        rows = slice(q0, q0 + nq)
        merge_(global_o[:, rows], global_lse[:, :, rows], o, lse)
        return None
