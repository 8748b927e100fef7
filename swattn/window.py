"""The one window specification: every path (kernels, eager twin, blocks,
distributed, modules) takes its (left, right) from here.

Convention (FlashAttention's, generalised): query i attends key j iff

    pos(i) - left <= j <= pos(i) + right          (the local window)
    or j < global_tokens or pos(i) < global_tokens (global tokens)

where pos(i) = i + (seqlen_k - seqlen_q): queries are aligned bottom-right
with the keys, so equal lengths give pos(i) = i. ``window_size=(left, right)``
with -1 meaning unbounded; ``causal`` sets right = 0. The repository's own
symmetric window |i - j| <= W is (W, W); transformers' ``sliding_window=W``
is (W - 1, 0) with causal. Dilation d: query i attends keys i + k * d with
-left <= k <= right, i.e. an ordinary window over each residue class mod d
(``to_classes``). An adaptive window gives each (head, query) its own (left,
right) (``adaptive_windows``).

Pure PyTorch and Python: nothing here imports TileLang. The tile schedules are
written over injected ``maximum``/``minimum``/``select`` so that the kernels
evaluate them on TIR expressions and the launchers on tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

UNBOUNDED = -1  # FlashAttention's "no limit on this side"


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_window(window, name: str = "window") -> tuple[int, int] | None:
    """Validate an int W (= (W, W)), a (left, right) pair (-1: unbounded) or None
    (full attention); return the pair as given (None stays None). Floats, bools,
    other negatives and other types raise."""
    if window is None:
        return None
    if _is_int(window):
        if window < 0:
            raise ValueError(f"{name} must be >= 0 (or a (left, right) pair with -1 for unbounded), got {window}")
        return window, window
    if isinstance(window, (tuple, list)) and len(window) == 2 and all(_is_int(x) for x in window):
        if min(window) < UNBOUNDED:
            raise ValueError(f"{name} sizes must be >= 0, or -1 for unbounded; got {tuple(window)}")
        return int(window[0]), int(window[1])
    raise TypeError(f"{name} must be an int, a (left, right) pair of ints (-1: unbounded) or None, got {window!r}")


def normalize_window(window, causal: bool, seqlen_q: int, seqlen_k: int | None = None) -> tuple[int, int]:
    """(left, right) >= 0 for lengths (seqlen_q, seqlen_k) (bottom-right aligned):
    -1 and None become unbounded, causal sets right = 0, and both sides are
    clamped to the span beyond which they change nothing (so the kernels' int32
    sums stay small). ``seqlen_k`` defaults to ``seqlen_q``."""
    pair = check_window(window)
    seqlen_k = seqlen_q if seqlen_k is None else seqlen_k
    # pos(i) - j ranges over [-(sq - 1) + (sk - sq)... ]: the widest reach any pair needs.
    span = max(seqlen_q + seqlen_k, 1)
    left, right = (span, span) if pair is None else (span if x == UNBOUNDED else x for x in pair)
    if causal:
        right = 0
    return min(left, span), min(right, span)


def shift_window(left: int, right: int, offset: int, span: int) -> tuple[int, int]:
    """The window in a block's local coordinates: local query i sees local key j
    iff -left' <= j - i <= right', where ``offset`` = (global position of local
    key 0) - (global position of local query 0) is folded in. May be negative;
    clamped to +-span (= q_len + k_len), beyond which nothing changes."""
    return max(min(left + offset, span), -span), max(min(right - offset, span), -span)


def block_visible(q_offset: int, q_len: int, k_offset: int, k_len: int, left: int, right: int, global_tokens: int = 0):
    """Whether any (query, key) pair of two blocks at global positions is inside the window."""
    if q_len == 0 or k_len == 0:
        return False
    if q_offset < global_tokens or k_offset < global_tokens:
        return True
    lo = k_offset - (q_offset + q_len - 1)  # smallest j - i
    hi = k_offset + k_len - 1 - q_offset  # largest j - i
    return lo <= right and hi >= -left


def block_mask(q_offset, q_len, k_offset, k_len, left, right, global_tokens=0, dilation: int = 1, device=None):
    """Boolean (q_len, k_len): the pairs of two blocks at global positions that the
    window keeps (the one dense mask: eager paths, modules, tests). ``left`` /
    ``right`` may be tensors (..., q_len, 1), one bound per query row; the mask
    is then (..., q_len, k_len). With ``dilation`` d the window counts every
    d-th key: offsets k * d, -left <= k <= right."""
    i = torch.arange(q_offset, q_offset + q_len, device=device)[:, None]
    j = torch.arange(k_offset, k_offset + k_len, device=device)[None, :]
    off = j - i
    local = (off >= -left * dilation) & (off <= right * dilation)
    if dilation > 1:
        local = local & (off % dilation == 0)
    if not global_tokens:  # (a query before the keys, at a negative position, is no global token)
        return local
    return local | (i < global_tokens) | (j < global_tokens)


def dense_mask(seq_len: int, left: int, right: int, dilation: int = 1, global_tokens: int = 0, device=None):
    """The (seq, seq) window of one sequence (``block_mask`` at offset 0)."""
    return block_mask(0, seq_len, 0, seq_len, left, right, global_tokens, dilation, device)


def is_adaptive(window) -> bool:
    """A window given as a tensor (or a pair holding one): a window per (head, query)."""
    parts = window if isinstance(window, (tuple, list)) else (window,)
    return any(isinstance(w, torch.Tensor) for w in parts)


def adaptive_windows(window, causal: bool, q_heads: int, seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(left, right) int32 (q_heads, seq_len) from a window tensor W (symmetric)
    or a pair (left, right) of tensors or ints, each broadcastable to
    (q_heads, seq_len): shape (q_heads, 1) is a window per head, (seq_len,) or
    (1, seq_len) one per query, (q_heads, seq_len) one per both. Causal sets
    right = 0; sizes are clamped to seq_len - 1."""
    left, right = tuple(window) if isinstance(window, (tuple, list)) else (window, window)
    out = []
    for name, w in (("left", left), ("right", right)):
        if isinstance(w, bool) or not (isinstance(w, torch.Tensor) or _is_int(w)):
            raise TypeError(f"an adaptive window's {name} must be an integer tensor or an int, got {w!r}")
        w = torch.as_tensor(w)
        if w.dtype.is_floating_point or w.dtype.is_complex or w.dtype == torch.bool:
            raise TypeError(f"an adaptive window must be an integer tensor, got {name} of dtype {w.dtype}")
        try:
            w = torch.broadcast_to(w, (q_heads, seq_len))
        except RuntimeError:
            raise ValueError(
                f"an adaptive window must broadcast to (q_heads, seq) = {(q_heads, seq_len)}: "
                f"(q_heads, 1) per head, (seq,) per query; got {name} of shape {tuple(w.shape)}"
            ) from None
        if w.numel() and int(w.min()) < 0:
            raise ValueError(f"window sizes must be >= 0, got a negative {name} size")
        out.append(w.to(device=device, dtype=torch.int32).clamp(max=max(seq_len - 1, 0)))
    if causal:
        out[1] = torch.zeros_like(out[1])
    return out[0], out[1]


# ---- head classes of a dilation ------------------------------------------------


def class_len(seq_len, r, dilation):
    """Positions r, r + d, r + 2d, ... below seq_len: how many (the kernels' formula)."""
    return (seq_len - r + dilation - 1) // dilation


def to_classes(x: torch.Tensor, dilation: int) -> torch.Tensor:
    """(B, S, H, D) -> (B, ceil(S / d), d * H, D): head r * H + h holds positions
    r, r + d, ... of head h. A view when d divides S; otherwise S is padded
    (a copy) and the kernels hide the padding via ``class_len``."""
    if dilation == 1:  # no view either: each op is a node the backward walks
        return x
    b, s, h, d = x.shape
    pad = (-s) % dilation
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
    return x.view(b, (s + pad) // dilation, dilation * h, d)


def from_classes(out: torch.Tensor, lse: torch.Tensor, seq_len: int, dilation: int):
    """Inverse of ``to_classes`` for the output (a view) and the lse (B, d * H, S / d) -> (B, H, S)."""
    if dilation == 1:  # nothing to undo, and no view/alias nodes for the backward to walk
        return out, lse
    b, sd, dh, d = out.shape
    h = dh // dilation
    out = out.view(b, sd * dilation, h, d)[:, :seq_len]
    lse = lse.view(b, dilation, h, sd).permute(0, 2, 3, 1).reshape(b, h, sd * dilation)[:, :, :seq_len]
    return out, lse


def rows_to_classes(w: torch.Tensor, dilation: int) -> torch.Tensor:
    """A per-(head, position) table (H, S) in ``to_classes``' layout: (d * H, ceil(S / d))."""
    h, s = w.shape
    pad = (-s) % dilation
    w = F.pad(w, (0, pad))
    return w.view(h, (s + pad) // dilation, dilation).permute(2, 0, 1).reshape(dilation * h, (s + pad) // dilation)


# ---- tile schedules ------------------------------------------------------------


def key_tile_schedule(q_tile, seq_len, left, right, n_global, block_m: int, block_n: int, maximum, minimum, select):
    """The key tiles query tile ``q_tile`` visits, as (n_global_tiles, lo, hi):
    first tiles 0 .. n_global_tiles - 1 (the global keys), then lo .. hi - 1
    (the local window, clipped to the sequence and past the global tiles).

    A tile that holds a global query (row < n_global) sees every key: then
    there are no separate global tiles and [lo, hi) is the whole sequence.
    Evaluated by the kernels on TIR (``T.max``, ``T.min``, ``tir.Select``), by the
    tests on ints (``max``, ``min``) and by the adaptive launcher on tensors.
    """
    r0 = q_tile * block_m
    n_tiles = (seq_len + block_n - 1) // block_n
    has_global_row = r0 < n_global
    g = (n_global + block_n - 1) // block_n
    lo = maximum(r0 - left, 0) // block_n
    hi = (minimum(r0 + block_m + right, seq_len) + block_n - 1) // block_n
    if isinstance(n_global, int) and n_global == 0:  # no global tokens: the window alone
        return 0, lo, maximum(hi, lo)
    if isinstance(has_global_row, bool):
        if has_global_row:
            return 0, 0, n_tiles
        lo = maximum(lo, g)
        return g, lo, maximum(hi, lo)
    lo = maximum(lo, g)
    return (
        select(has_global_row, 0, g),
        select(has_global_row, 0, lo),
        select(has_global_row, n_tiles, maximum(hi, lo)),
    )


def _tmax(a, b):
    a, b = (a, b) if isinstance(a, torch.Tensor) else (b, a)
    return torch.maximum(a, b) if isinstance(b, torch.Tensor) else a.clamp(min=b)


def _tmin(a, b):
    a, b = (a, b) if isinstance(a, torch.Tensor) else (b, a)
    return torch.minimum(a, b) if isinstance(b, torch.Tensor) else a.clamp(max=b)


def _row_spans(left, right, valid, block_m: int):
    """Per (head, query tile of block_m rows): the first and last key its real rows see."""
    heads, seq = left.shape
    n_qt = -(-seq // block_m)
    pad = n_qt * block_m - seq
    i = torch.arange(n_qt * block_m, device=left.device)
    real = i[None, :] < valid[:, None]  # rows past a class's length are padding
    big = 1 << 40
    first = torch.where(real, i - F.pad(left.long(), (0, pad)), big).view(heads, n_qt, block_m).amin(-1)
    last = torch.where(real, i + F.pad(right.long(), (0, pad)), -big).view(heads, n_qt, block_m).amax(-1)
    return first, last


def adaptive_key_side_schedule(left, right, valid, n_global: int, block_m: int, block_n: int) -> torch.Tensor:
    """For the backward of per-row windows: the query tiles (of block_m rows) each
    (head, key tile of block_n keys) must visit, (heads, key_tiles, 3) int32 of
    (n_global_tiles, lo, hi) as in ``key_tile_schedule``: the global query tiles
    first, then [lo, hi). A superset (the kernel masks each pair): [lo, hi) runs
    from the first tile whose rows reach past the key tile's start to the last
    whose rows reach before its end, via running max / min of the tiles' spans."""
    heads, seq = left.shape
    first, last = _row_spans(left, right, valid, block_m)
    reach_right = torch.cummax(last, dim=1).values  # non-decreasing in the tile index
    reach_left = torch.flip(torch.cummin(torch.flip(first, [1]), dim=1).values, [1])  # non-decreasing too
    n_kt = -(-seq // block_n)
    k0 = torch.arange(n_kt, device=left.device) * block_n
    k_last = k0 + block_n - 1
    lo = torch.searchsorted(reach_right.contiguous(), k0.expand(heads, n_kt).contiguous())
    hi = torch.searchsorted(reach_left.contiguous(), k_last.expand(heads, n_kt).contiguous(), right=True)
    n_q_tiles = (valid.long() + block_m - 1) // block_m
    g = -(-n_global // block_m)
    lo, hi = torch.clamp(lo, min=g), torch.minimum(hi, n_q_tiles[:, None])
    hi = torch.maximum(hi, lo)
    global_key = (k0 < n_global).expand(heads, n_kt)
    return torch.stack(
        [
            torch.where(global_key, 0, g),
            torch.where(global_key, 0, lo),
            torch.where(global_key, n_q_tiles[:, None].expand(heads, n_kt), hi),
        ],
        -1,
    ).int()


def adaptive_schedule(left, right, valid, n_global: int, block_m: int, block_n: int) -> torch.Tensor:
    """Key tiles of every (head, query tile) for per-row windows: (heads, q_tiles, 3)
    int32 of ``key_tile_schedule``'s (n_global_tiles, lo, hi).

    left, right (heads, seq) per row; valid (heads,) keys (and queries) that exist
    per head (``class_len``). A tile's window is the union of its rows': first
    key min(i - left_i), last key max(i + right_i), fed to ``key_tile_schedule``
    as the tile-wide (left, right) that reaches them.
    """
    heads, seq = left.shape
    n_qt = -(-seq // block_m)
    first, last = _row_spans(left, right, valid, block_m)
    r0 = torch.arange(n_qt, device=left.device) * block_m
    n_g, lo, hi = key_tile_schedule(
        torch.arange(n_qt, device=left.device),
        valid[:, None].long(),
        r0 - first,
        last - (r0 + block_m - 1),
        n_global,
        block_m,
        block_n,
        _tmax,
        _tmin,
        torch.where,
    )
    return torch.stack([torch.as_tensor(x, device=left.device).expand(heads, n_qt) for x in (n_g, lo, hi)], -1).int()
