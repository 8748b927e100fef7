"""swattn: sliding-window (local) attention in TileLang, proven against PyTorch.

Convention: tensors (batch, seq, heads, head_dim); query i attends key j iff
pos(i) - left <= j <= pos(i) + right with pos(i) = i + seqlen_k - seqlen_q
(bottom-right aligned); ``window_size=(left, right)``, -1 unbounded; causal sets
right = 0; lse in natural log; a row that sees no key gives 0. The repository's
``window=W`` (|i - j| <= W) is ``window_size=(W, W)``; transformers'
``sliding_window=W`` is ``(W - 1, 0)`` with causal.

CUDA runs the TileLang kernels (float16/bfloat16); the CPU an exact eager twin.
"""

from .api import flash_attn_func, flash_attn_varlen_func, sliding_window_attention
from .decode import SlidingWindowKVCache, flash_attn_with_kvcache
from .modules import GroupedQueryAttention, SlidingWindowAttention
from .online import AttnQKVLayout, AttnQKVPackFormat, OfflineSlidingWindowAttn, OnlineSlidingWindowAttn, merge_

__version__ = "0.2.0"

__all__ = [
    "AttnQKVLayout",
    "AttnQKVPackFormat",
    "GroupedQueryAttention",
    "OfflineSlidingWindowAttn",
    "OnlineSlidingWindowAttn",
    "SlidingWindowAttention",
    "SlidingWindowKVCache",
    "__version__",
    "flash_attn_func",
    "flash_attn_with_kvcache",
    "flash_attn_varlen_func",
    "merge_",
    "sliding_window_attention",
]
