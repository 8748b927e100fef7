"""nn.Modules over the op.

``SlidingWindowAttention`` (alias ``GroupedQueryAttention``): a Llama-shaped layer
(q/k/v/o projections, no rotary embedding) whose attention is
``api.sliding_window_attention``: query i attends key j iff
i - left <= j <= i + right (``window=W`` is (W, W); causal sets right = 0).
Input and output (batch, seq, hidden_size).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .api import sliding_window_attention
from .window import check_window, dense_mask, normalize_window


class SlidingWindowAttention(torch.nn.Module):
    """Attention layer in the shape of Llama's (q/k/v/o projections, no rotary
    embedding) over ``sliding_window_attention``.

    Input and output (batch, seq, hidden_size). Window: ``window=W`` is (W, W)
    (|i - j| <= W), a pair is (left, right) with -1 unbounded; ``causal`` sets
    right = 0; dilation and global tokens as in the op. CUDA float16/bfloat16 with
    head_dim 64/128 runs the TileLang kernels, everything else the exact eager
    path; ``impl="sdpa"`` uses PyTorch's SDPA with the same window as a dense
    mask instead (the reference of the training comparison).
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
        if impl not in ("auto", "sdpa"):
            raise ValueError(f"impl must be 'auto' or 'sdpa', got {impl!r}")
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
        if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
            raise ValueError(f"dilation must be an int >= 1, got {dilation!r}")
        if isinstance(global_tokens, bool) or not isinstance(global_tokens, int) or global_tokens < 0:
            raise ValueError(f"global_tokens must be an int >= 0, got {global_tokens!r}")
        if dilation > 1 and global_tokens:
            raise NotImplementedError("dilation together with global tokens is not supported")
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
        if self.impl == "sdpa":
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
