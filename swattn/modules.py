"""nn.Modules over the op.

``SlidingWindowAttention``: a Llama-shaped layer (q/k/v/o projections, no rotary
embedding) whose attention is ``api.sliding_window_attention``: query i attends
key j iff i - left <= j <= i + right (``window=W`` is (W, W); causal sets
right = 0). Input and output (batch, seq, hidden_size).

``GroupedQueryAttention`` (lesson 15): Llama's attention layer from a config
(rotary embeddings, grouped K/V heads, a (k, v) cache), causal, with an optional
sliding window in transformers' convention: ``sliding_window=W`` lets the query at
position p see keys p - W + 1 .. p (FlashAttention's window (W - 1, 0) with causal,
bottom-right aligned, so a cached decode step of one query sees the last W keys).
Input and output (batch, seq, hidden_size); ``repeat_kv`` spreads its K/V heads.

The course's sliding-window modules (``OfflineSlidingWindowAttn``,
``OnlineSlidingWindowAttn``) live in online.py with the block merge they share.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from . import launch
from .api import MAX_HEAD_DIM, check_dilation, flash_attn_func, sliding_window_attention
from .window import check_window, dense_mask, normalize_window


class SlidingWindowAttention(torch.nn.Module):
    """Attention layer in the shape of Llama's (q/k/v/o projections, no rotary
    embedding) over ``sliding_window_attention``.

    Input and output (batch, seq, hidden_size). Window: ``window=W`` is (W, W)
    (|i - j| <= W), a pair is (left, right) with -1 unbounded; ``causal`` sets
    right = 0; dilation and global tokens as in the op. CUDA float16/bfloat16 with
    head_dim 64/128 runs the TileLang kernels, the CPU the exact eager path, and
    other CUDA inputs PyTorch's SDPA under the same window as a dense mask.
    ``impl="sdpa"`` always takes SDPA (the reference of the training comparison);
    ``impl="kernel"`` insists on the kernels and raises where they cannot run.
    ``num_kv_heads < num_heads`` is grouped-query attention. Arguments the op
    cannot honour raise here, at construction.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        window: int | tuple[int, int] | None = 128,
        causal: bool = True,
        dilation: int = 1,
        global_tokens: int = 0,
        bias: bool = False,
        impl: str = "auto",
    ):
        super().__init__()
        if impl not in ("auto", "kernel", "sdpa"):
            raise ValueError(f"impl must be 'auto', 'kernel' or 'sdpa', got {impl!r}")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for name, x in (("hidden_size", hidden_size), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
            if isinstance(x, bool) or not isinstance(x, int) or x < 1:
                raise ValueError(f"{name} must be a positive int, got {x!r}")
        if hidden_size % num_heads or num_heads % num_kv_heads:
            raise ValueError(
                f"need hidden_size % num_heads == 0 and num_heads % num_kv_heads == 0, got "
                f"{hidden_size}, {num_heads}, {num_kv_heads}"
            )
        check_window(window)
        check_dilation(dilation, global_tokens)
        self.impl = impl
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = hidden_size // num_heads
        self.window, self.causal, self.dilation, self.global_tokens = window, causal, dilation, global_tokens
        self.q_proj = torch.nn.Linear(hidden_size, num_heads * self.head_dim, bias=bias)
        self.k_proj = torch.nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = torch.nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = torch.nn.Linear(num_heads * self.head_dim, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
        kernel_ok = x.is_cuda and q.dtype in launch.DTYPES and self.head_dim in launch.HEAD_DIMS
        if self.impl == "kernel" and not kernel_ok:
            raise ValueError("impl='kernel' needs CUDA float16/bfloat16 activations and head_dim 64 or 128")
        # The op runs the kernels on CUDA and its exact eager twin on the CPU; CUDA inputs the kernels
        # do not take (float32, other head dims) go to SDPA instead of an error.
        if self.impl == "sdpa" or (x.is_cuda and not kernel_ok):
            left, right = normalize_window(self.window, self.causal, s)
            mask = dense_mask(s, left, right, self.dilation, self.global_tokens, device=x.device)
            group = self.num_heads // self.num_kv_heads
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
            kt, vt = kt.repeat_interleave(group, dim=1), vt.repeat_interleave(group, dim=1)
            o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask).transpose(1, 2)
        else:
            opts = dict(causal=self.causal, dilation=self.dilation, global_tokens=self.global_tokens)
            o = sliding_window_attention(q, k, v, self.window, **opts)
        return self.o_proj(o.reshape(b, s, self.num_heads * self.head_dim))


# ---- lesson 15: grouped-query attention ----------------------------------------------


def repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    """(batch, kv_heads, seq, head_dim) -> (batch, kv_heads * n, seq, head_dim): head
    h * n + r is K/V head h, so each group of n query heads shares one K/V head."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, kv_heads, seq, head_dim), got shape {tuple(x.shape)}")
    if n == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n, s, d).reshape(b, h * n, s, d)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the halves of the last axis (Llama's RoPE pairs i with i + d / 2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin (batch, seq, head_dim) of Llama's rotary embedding at ``position_ids``
    (batch, seq): angle p * theta^(-2i / head_dim) for the pair (i, i + head_dim / 2).
    The angles are formed in float64 (float32 would lose the low bits of p * freq at
    long positions) and cast to ``dtype``."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=position_ids.device) / head_dim)
    angles = position_ids.to(torch.float64)[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (batch, heads, seq, head_dim) rotated by cos, sin (batch, seq, head_dim)."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def _field(config, name: str, default):
    value = config.get(name, default) if isinstance(config, dict) else getattr(config, name, default)
    return default if value is None else value


class GroupedQueryAttention(torch.nn.Module):
    """Lesson 15's grouped-query attention: Llama's attention layer from a config.

    Config fields (an object or a dict): ``hidden_size``, ``num_attention_heads``,
    ``num_key_value_heads`` (default: num_attention_heads), ``attention_dropout``
    (default 0); optional ``sliding_window`` (None), ``max_position_embeddings``
    (2048), ``rope_theta`` (10000), ``head_dim`` (hidden_size / heads),
    ``attention_bias`` (False).

    ``forward(hidden_states, position_ids=None, past_key_value=None,
    attention_mask=None, use_cache=False)`` -> (output (batch, seq, hidden_size),
    present): q, k, v projections, rotary embeddings at ``position_ids`` (batch, seq)
    (default: the positions after the cache), the cache ``past_key_value`` = (k, v),
    each (batch, kv_heads, past_len, head_dim), prepended to the new keys; present
    is the extended (k, v) with ``use_cache`` and None otherwise.

    Window: causal, bottom-right aligned (query i of seq sits at key position
    past_len + i) and, with ``sliding_window=W``, limited to the W keys ending at the
    query's own (FlashAttention's (W - 1, 0)). ``forward_with_sliding_window`` is the
    same with ``window_size`` for W. ``attention_mask`` (boolean, True = attend, or
    additive float), broadcasting to (batch, heads, seq, past_len + seq), is combined
    with the causal and window masks, never ignored.

    CUDA float16/bfloat16 (head_dim a multiple of 8 up to 256) with no mask that
    matters and no active dropout runs ``swattn.flash_attn_func`` (the TileLang
    kernels); everything else an exact eager path (float32, float64 for float64),
    a row that sees no key giving 0.
    """

    def __init__(self, config, layer_idx: int | None = None):
        super().__init__()
        hidden = _field(config, "hidden_size", None)
        heads = _field(config, "num_attention_heads", None)
        kv_heads = _field(config, "num_key_value_heads", heads)
        for name, x in (("hidden_size", hidden), ("num_attention_heads", heads), ("num_key_value_heads", kv_heads)):
            if isinstance(x, bool) or not isinstance(x, int) or x < 1:
                raise ValueError(f"config.{name} must be a positive int, got {x!r}")
        if heads % kv_heads:
            raise ValueError(f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})")
        head_dim = _field(config, "head_dim", hidden // heads)
        if head_dim * heads != hidden and _field(config, "head_dim", None) is None:
            raise ValueError(f"hidden_size ({hidden}) must be a multiple of num_attention_heads ({heads})")
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
            raise ValueError(f"head_dim must be an even int >= 2 (rotary pairs), got {head_dim!r}")
        dropout = float(_field(config, "attention_dropout", 0.0))
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"attention_dropout must be in [0, 1], got {dropout}")
        window = _field(config, "sliding_window", None)
        self._check_window(window, "config.sliding_window", allow_none=True)
        theta = float(_field(config, "rope_theta", 10000.0))
        if not (math.isfinite(theta) and theta > 0):
            raise ValueError(f"rope_theta must be a positive finite number, got {theta}")
        bias = bool(_field(config, "attention_bias", False))

        self.config = SimpleNamespace(**config) if isinstance(config, dict) else config
        self.layer_idx = layer_idx
        self.hidden_size, self.num_heads, self.num_key_value_heads, self.head_dim = hidden, heads, kv_heads, head_dim
        self.num_key_value_groups = heads // kv_heads
        self.attention_dropout, self.sliding_window, self.rope_theta = dropout, window, theta
        self.max_position_embeddings = int(_field(config, "max_position_embeddings", 2048))
        self.scaling = head_dim**-0.5
        self.q_proj = torch.nn.Linear(hidden, heads * head_dim, bias=bias)
        self.k_proj = torch.nn.Linear(hidden, kv_heads * head_dim, bias=bias)
        self.v_proj = torch.nn.Linear(hidden, kv_heads * head_dim, bias=bias)
        self.o_proj = torch.nn.Linear(heads * head_dim, hidden, bias=bias)

    @staticmethod
    def _check_window(window, name: str, allow_none: bool = False) -> None:
        if window is None and allow_none:
            return
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"{name} must be an int >= 1 (the keys a query sees, its own included), got {window!r}")

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        past_key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool = False,
    ):
        """(output (batch, seq, hidden_size), present (k, v) or None); causal, with
        ``config.sliding_window`` if set. See the class docstring."""
        return self._forward(
            hidden_states, position_ids, past_key_value, attention_mask, use_cache, self.sliding_window
        )

    def forward_with_sliding_window(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        window_size: int = 512,
        position_ids: torch.Tensor | None = None,
        past_key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
        use_cache: bool = False,
    ):
        """``forward`` with the causal and window masks combined: the query at position p
        sees keys p - window_size + 1 .. p (and what ``attention_mask`` allows)."""
        self._check_window(window_size, "window_size")
        return self._forward(hidden_states, position_ids, past_key_value, attention_mask, use_cache, window_size)

    def _forward(self, x, position_ids, past_key_value, attention_mask, use_cache: bool, window: int | None):
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden_states must be (batch, seq, {self.hidden_size}), got {getattr(x, 'shape', x)}")
        b, s, _ = x.shape
        hq, hk, d = self.num_heads, self.num_key_value_heads, self.head_dim
        past_len = 0
        if past_key_value is not None:
            past_len = self._check_cache(past_key_value, x)
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + s, device=x.device)[None].expand(b, s)
        else:
            if not isinstance(position_ids, torch.Tensor) or position_ids.shape[-1] != s or position_ids.dim() > 2:
                raise ValueError(
                    f"position_ids must be (batch, {s}) or ({s},), got {getattr(position_ids, 'shape', None)}"
                )
            position_ids = position_ids.to(x.device).reshape(-1, s).expand(b, s)
        q = self.q_proj(x).view(b, s, hq, d).transpose(1, 2)
        k = self.k_proj(x).view(b, s, hk, d).transpose(1, 2)
        v = self.v_proj(x).view(b, s, hk, d).transpose(1, 2)
        cos, sin = rotary_cos_sin(position_ids, d, self.rope_theta, q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if past_key_value is not None:
            k = torch.cat((past_key_value[0], k), dim=2)
            v = torch.cat((past_key_value[1], v), dim=2)
        o = self._attention(q, k, v, attention_mask, window)
        out = self.o_proj(o.reshape(b, s, hq * d))
        return out, ((k, v) if use_cache else None)

    def _check_cache(self, past_key_value, x) -> int:
        ok = isinstance(past_key_value, (tuple, list)) and len(past_key_value) == 2
        ok = ok and all(isinstance(t, torch.Tensor) for t in past_key_value)
        want = (x.shape[0], self.num_key_value_heads, None, self.head_dim)
        if not ok or past_key_value[0].shape != past_key_value[1].shape or past_key_value[0].dim() != 4:
            raise ValueError(f"past_key_value must be a (k, v) pair of (batch, kv_heads, past_len, head_dim) = {want}")
        pk = past_key_value[0]
        if (pk.shape[0], pk.shape[1], pk.shape[3]) != (want[0], want[1], want[3]):
            raise ValueError(
                f"past_key_value must be (batch, kv_heads, past_len, head_dim) = {want}, got {tuple(pk.shape)}"
            )
        if pk.dtype != x.dtype or pk.device != x.device:
            raise ValueError(f"past_key_value must be {x.dtype} on {x.device}, got {pk.dtype} on {pk.device}")
        return pk.shape[2]

    def _mask_or_none(self, mask, shape, device):
        """The mask, checked; None if it allows everything (so the kernels may run)."""
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor) or not (mask.dtype == torch.bool or mask.dtype.is_floating_point):
            raise TypeError(f"attention_mask must be a boolean or floating tensor, got {getattr(mask, 'dtype', mask)}")
        try:
            fits = torch.broadcast_shapes(mask.shape, shape) == shape
        except RuntimeError:
            fits = False
        if mask.dim() != 4 or not fits:
            raise ValueError(
                f"attention_mask must broadcast to (batch, heads, q_len, k_len) = {tuple(shape)}, "
                f"got {tuple(mask.shape)}"
            )
        if mask.device != device:
            raise ValueError(f"attention_mask must be on {device}, got {mask.device}")
        allows_all = bool(mask.all()) if mask.dtype == torch.bool else bool((mask == 0).all())
        return None if allows_all else mask

    def _attention(self, q, k, v, mask, window: int | None) -> torch.Tensor:
        """o (batch, q_len, heads, head_dim): q (batch, heads, q_len, d), k, v (batch,
        kv_heads, k_len, d), causal bottom-right, the last ``window`` keys if set."""
        b, hq, sq, d = q.shape
        sk = k.shape[2]
        mask = self._mask_or_none(mask, torch.Size((b, hq, sq, sk)), q.device)
        dropout = self.training and self.attention_dropout > 0
        kernels = q.is_cuda and q.dtype in launch.DTYPES and d % 8 == 0 and d <= MAX_HEAD_DIM
        if kernels and mask is None and not dropout:
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
            left = -1 if window is None else window - 1
            return flash_attn_func(qt, kt, vt, softmax_scale=self.scaling, causal=True, window_size=(left, 0))
        work = torch.float64 if q.dtype == torch.float64 else torch.float32
        kr, vr = (repeat_kv(t, self.num_key_value_groups).to(work) for t in (k, v))
        scores = (q.to(work) @ kr.transpose(-1, -2)) * self.scaling
        pos = torch.arange(sq, device=q.device)[:, None] + (sk - sq)  # bottom-right: the cache sits before
        j = torch.arange(sk, device=q.device)[None, :]
        seen = j <= pos
        if window is not None:
            seen = seen & (j > pos - window)
        if mask is not None and mask.dtype == torch.bool:
            seen = seen & mask
        elif mask is not None:
            scores = scores + mask.to(work)
        scores = scores.masked_fill(~seen, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        # A row that sees nothing has lse -inf: subtract 0 so that its weights are exp(-inf) = 0, not NaN.
        p = torch.exp(scores - torch.where(torch.isinf(lse), 0, lse))
        if dropout:
            p = F.dropout(p, self.attention_dropout, training=True)
        return (p @ vr).transpose(1, 2).to(q.dtype)
