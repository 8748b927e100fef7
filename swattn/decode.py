"""Inference attention over a KV cache: FlashAttention's ``flash_attn_with_kvcache``
with sliding windows, and a ring-buffer cache for windowed layers.

Convention (window.py has the one definition; FlashAttention's): tensors
(batch, seq, heads, head_dim); ``window_size=(left, right)``, -1 unbounded;
causal sets right = 0. Sequence b holds L = cache_seqlens[b] + new keys (those
of this call, appended first) and its q_len queries are aligned bottom-right to
them: query i sits at position L - q_len + i and sees the keys pos - left ..
pos + right that exist (< L). lse in natural log; a row that sees no key gives
out 0 (lse -inf, or its sink). Softcap c > 0: s <- c * tanh(s * scale / c)
before the mask. Sinks (q_heads,) float32: one extra logit per head in each
row's denominator (lse includes it). Decode (q_len 1), speculative tokens and
chunked prefill (q_len up to thousands) are one call.

Three caches:
  contiguous  k_cache, v_cache (batch, cache_len, kv_heads, D);
  paged       (num_pages, page_size, kv_heads, D) with block_table (batch,
              pages_per_seq) int32: position p of sequence b is row p % page_size
              of page block_table[b, p // page_size]. The kernel reads only the
              pages some query's window intersects (from the window's left edge on);
  ring        ``SlidingWindowKVCache``: (batch, slots, kv_heads, D) with slots >=
              window + new_tokens_max, position p in slot p % slots, per-sequence
              position counters on the device: O(window) memory per sequence,
              independent of the history.

CUDA (float16/bfloat16, head_dim 64/128/256) runs the TileLang kernels
(kernels/decode.py), split-KV when batch x kv_heads cannot fill the SMs, with
a combine kernel for the partials; on sm_90+ the append, split and combine
kernels chain by programmatic dependent launch. Nothing in a call reads a device
value on the host (cache_seqlens stays on the device, the split count comes from
shapes), so a call captures into a CUDA graph and replays with new lengths. The CPU runs the
exact eager twin (``eager.masked_forward`` per sequence) in float32/float64, for
float32/float64/float16/bfloat16 inputs. Inference only: nothing here records
an autograd graph (the calls run under ``torch.no_grad``).
"""

from __future__ import annotations

import functools
import math

import torch

from . import eager, launch, window
from .api import check_scale, check_sinks, check_softcap
from .kernels import decode as kernels
from .kernels.common import LOG2E

# ---- tiles ---------------------------------------------------------------------
# (block_m, block_n, consumer threads, num_stages, occupancy) per head_dim on sm_90a.
# block_m = 64: one warpgroup's wgmma holds a group's heads x the queries (a decode
# step with group 4 fills 4 of its rows: decode is bound by the K/V reads, not the
# MMA). block_n and the stages give each SM 64-128 KiB of K/V loads in flight (two
# CTAs per SM x 2 stages x a (K + V) tile of 32 KiB at D = 64 and 128); D = 256 holds
# a 64 x 256 float32 accumulator (202 registers, no spill) at one CTA per SM. All
# compile without spills for sm_90a (ptxas -v); at D = 64 and 128 no other tile of
# tools/sweep_decode.py beats them on an H200 (analysis.md).
TILES = {64: (64, 128, 128, 2, 2), 128: (64, 64, 128, 2, 2), 256: (64, 32, 128, 2, 1)}
HEAD_DIMS = tuple(TILES)
CPU_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
RING_ALIGN = 128  # ring slots are a multiple of every block_n: a key tile is one run of slots
MAX_SPLITS = 64
MIN_TILES_PER_SPLIT = 2  # fewer key tiles per split cost more in partials than they save


def tile_for(head_dim: int) -> tuple:
    if head_dim not in TILES:
        raise ValueError(f"the decode kernels take head_dim {HEAD_DIMS}, got {head_dim}")
    return TILES[head_dim]


# ---- compile caches ------------------------------------------------------------


def _pdl(arch: str) -> bool:
    """Programmatic dependent launch (kernels/decode.py, pdl_prologue): sm_90 and newer."""
    return int("".join(c for c in arch[3:] if c.isdigit())) >= 90  # "sm_90a" -> 90


@functools.cache
def compiled_decode(
    head_dim: int, dtype: str, arch: str, tile: tuple, layout: str, split: bool, softcap: bool, sinks: bool
):
    fn = kernels.make_decode(head_dim, dtype, tile, layout, split, softcap, sinks, _pdl(arch))
    return launch._compile(fn, arch)


@functools.cache
def compiled_combine(head_dim: int, dtype: str, arch: str, sinks: bool):
    return launch._compile(kernels.make_combine(head_dim, dtype, sinks, MAX_SPLITS, _pdl(arch)), arch)


@functools.cache
def compiled_append(head_dim: int, dtype: str, arch: str, layout: str):
    return launch._compile(kernels.make_append(head_dim, dtype, layout, _pdl(arch)), arch)


def _compile_variant(key: tuple) -> tuple:
    """One ``precompile`` job (a module-level function: spawned processes import it)."""
    if key[0] == "combine":
        compiled_combine(*key[1:])
    elif key[0] == "append":
        compiled_append(*key[1:])
    else:
        compiled_decode(*key)
    return key


def precompile(variants, arch: str = "sm_90a", jobs: int | None = None) -> None:
    """Compile decode variants in ``jobs`` processes (default: one per CPU) into
    TileLang's disk cache, from which this and later processes load each in about a
    second (a compile takes 30-120 s and uses one core). ``variants``: tuples
    (head_dim, dtype name, layout, split, softcap, sinks) for ``make_decode``,
    ("combine", head_dim, dtype name, sinks) for ``make_combine`` and ("append",
    head_dim, dtype name, layout) for ``make_append``."""
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    keys = [
        (v[0], v[1], v[2], arch, v[3]) if v[0] in ("combine", "append") else (v[0], v[1], arch, tile_for(v[0]), *v[2:])
        for v in dict.fromkeys(variants)
    ]
    jobs = min(jobs or os.cpu_count() or 1, len(keys))
    if jobs <= 1:
        for key in keys:
            _compile_variant(key)
        return
    # spawn: the caller may have initialised CUDA, which a forked child must not inherit.
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_compile_variant, keys))


@functools.cache
def sm_count(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def placeholders(device) -> tuple[torch.Tensor, torch.Tensor]:
    """BT and SINK for the kernels that do not read them."""
    return torch.zeros(1, 1, dtype=torch.int32, device=device), torch.zeros(1, dtype=torch.float32, device=device)


# ---- split-KV --------------------------------------------------------------------


def choose_splits(ctas: int, key_tiles: int, sms: int, occupancy: int) -> int:
    """Splits of each CTA's key range (flash-decoding) from host-known shapes only.

    ``ctas`` = batch x kv_heads x row tiles, ``key_tiles`` the most key tiles one
    row tile can visit. A grid that already fills most of the resident slots
    (sms x occupancy) runs unsplit; otherwise each CTA's range is split so the
    grid fills one wave (floor: a second, nearly empty wave costs a whole
    CTA's time), keeping at least MIN_TILES_PER_SPLIT tiles per split."""
    slots = sms * occupancy
    if ctas >= 0.8 * slots:
        return 1
    splits = min(slots // max(ctas, 1), key_tiles // MIN_TILES_PER_SPLIT, MAX_SPLITS)
    return max(splits, 1)


# ---- the launcher ----------------------------------------------------------------


def decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_table: torch.Tensor | None,
    n_new: int,
    left: int,
    right: int,
    scale: float,
    softcap: float,
    sinks: torch.Tensor | None,
    layout: str,
    key_span: int,
    num_splits: int = 0,
    tile: tuple | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The decode kernel (and the combine kernel when split): (out in q's dtype,
    lse (batch, q_heads, q_len) float32, natural log).

    Inputs validated (``flash_attn_with_kvcache``), the new keys already in the
    cache; ``cache_seqlens`` (batch,) int32 on q's device counts the keys before
    them, ``n_new`` the new ones; ``left``, ``right`` >= 0. ``key_span``: the most
    keys a query tile's windows can reach (host-known: from the window and the
    cache's capacity), for the split heuristic. ``num_splits`` 0: the heuristic."""
    b, sq, hq, d = q.shape
    hk = k_cache.shape[2]
    device = q.device
    tile = tile or tile_for(d)
    block_m, block_n, occupancy = tile[0], tile[1], tile[4]
    group = hq // hk
    m_tiles = -(-sq * group // block_m)
    if num_splits <= 0:
        num_splits = choose_splits(b * hk * m_tiles, -(-key_span // block_n) + 1, sm_count(device), occupancy)
    split = num_splits > 1
    bt_none, sink_none = placeholders(device)
    bt = block_table if layout == "paged" else bt_none
    sink = sink_none if sinks is None else sinks
    dtype, arch = launch.DTYPES[q.dtype], launch.cuda_arch(device)
    if softcap:  # the capped score is already scaled: the softmax only converts to log2
        scalars = (group, n_new, left, right, LOG2E, float(softcap), scale / softcap)
    else:
        scalars = (group, n_new, left, right, scale * LOG2E, 0.0, 0.0)
    out = torch.empty_like(q)
    lse = torch.empty(b, hq, sq, device=device, dtype=torch.float32)
    if not split:
        kernel = compiled_decode(d, dtype, arch, tile, layout, False, bool(softcap), sinks is not None)
        kernel(q, k_cache, v_cache, cache_seqlens, bt, sink, out, lse, *scalars)
        return out, lse
    part_out = torch.empty(num_splits, b, sq, hq, d, device=device, dtype=torch.float32)
    part_lse = torch.empty(num_splits, b, hq, sq, device=device, dtype=torch.float32)
    kernel = compiled_decode(d, dtype, arch, tile, layout, True, bool(softcap), False)  # the sink is the combine's
    kernel(q, k_cache, v_cache, cache_seqlens, bt, sink, part_out, part_lse, *scalars)
    compiled_combine(d, dtype, arch, sinks is not None)(part_out, part_lse, sink, out, lse)
    return out, lse


# ---- the in-place append -----------------------------------------------------------


def cache_rows(cache_seqlens: torch.Tensor, n: int, layout: str, slots: int, block_table=None) -> torch.Tensor:
    """Flat row (of the cache viewed as (rows, kv_heads, D)) of positions cache_seqlens[b] + i,
    i < n, as (batch * n,) int64, on the device (no host sync)."""
    batch = cache_seqlens.shape[0]
    pos = cache_seqlens.long()[:, None] + torch.arange(n, device=cache_seqlens.device)
    if layout == "paged":
        page = torch.gather(block_table.long(), 1, torch.div(pos, slots, rounding_mode="floor"))
        return (page * slots + pos % slots).flatten()
    if layout == "ring":
        pos = pos % slots
    return (torch.arange(batch, device=pos.device)[:, None] * slots + pos).flatten()


def append_(k_cache, v_cache, k, v, cache_seqlens, layout: str, block_table=None) -> None:
    """Write k, v (batch, n, kv_heads, D) into the caches at positions
    cache_seqlens[b] .. cache_seqlens[b] + n - 1, in place: on CUDA the append kernel
    (one launch), elsewhere one index_copy_ each."""
    if launch.on_gpu(k_cache):
        bt = block_table if layout == "paged" else placeholders(k.device)[0]
        kernel = compiled_append(k.shape[3], launch.DTYPES[k.dtype], launch.cuda_arch(k.device), layout)
        kernel(k.contiguous(), v.contiguous(), cache_seqlens, bt, k_cache, v_cache)
        return
    b, n, hk, d = k.shape
    rows = cache_rows(cache_seqlens, n, layout, k_cache.shape[1], block_table)
    k_cache.view(-1, hk, d).index_copy_(0, rows, k.reshape(b * n, hk, d))
    v_cache.view(-1, hk, d).index_copy_(0, rows, v.reshape(b * n, hk, d))


# ---- the eager twin ------------------------------------------------------------------


def eager_decode(q, k_cache, v_cache, cache_seqlens, block_table, n_new, left, right, scale, softcap, sinks, layout):
    """``decode`` in PyTorch, per sequence through ``eager.masked_forward``: (out, lse)
    in the work dtype (float32; float64 for float64 inputs). Reads the lengths on
    the host."""
    b, sq, hq, d = q.shape
    work = eager.work_dtype(q)
    out = q.new_zeros(q.shape, dtype=work)
    lse = q.new_full((b, hq, sq), float("-inf"), dtype=work)
    lengths = [int(x) + n_new for x in cache_seqlens.tolist()]
    slots = k_cache.shape[1]
    for s, n_keys in enumerate(lengths):
        first = max(n_keys - slots, 0) if layout == "ring" else 0  # the ring holds the last `slots` positions
        pos = torch.arange(first, n_keys, device=q.device)
        if layout == "paged":
            rows = block_table[s].long()[pos // slots] * slots + pos % slots
        else:
            rows = s * slots + (pos % slots if layout == "ring" else pos)
        kb = k_cache.reshape(-1, *k_cache.shape[2:])[rows][None]
        vb = v_cache.reshape(-1, *v_cache.shape[2:])[rows][None]
        mask = window.block_mask(n_keys - sq, sq, first, n_keys - first, left, right, device=q.device)
        o, l_ = eager.masked_forward(q[s : s + 1], kb, vb, mask, scale, softcap, sinks)
        out[s], lse[s] = o[0], l_[0]
    return out, lse


# ---- the public function ----------------------------------------------------------------


def _check_tensor(name, x, dims: int):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(x.shape)}")


def _check_common(q, k_cache, v_cache, softmax_scale, softcap, sinks, num_splits):
    """q and the caches: ranks, dtypes, devices, heads; the scalars. Returns the scale."""
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or not 0 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be an int in 0 .. {MAX_SPLITS} (0: choose), got {num_splits!r}")
    _check_tensor("q", q, 4)
    _check_tensor("k_cache", k_cache, 4)
    _check_tensor("v_cache", v_cache, 4)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise TypeError(f"q, k_cache, v_cache must share one dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if len({q.device, k_cache.device, v_cache.device}) != 1:
        raise ValueError(f"q and the caches must be on one device, got {q.device}, {k_cache.device}, {v_cache.device}")
    b, sq, hq, d = q.shape
    hk = k_cache.shape[2]
    if min(b, sq) < 1:
        raise ValueError(f"need batch >= 1 and q_len >= 1, got q {tuple(q.shape)}")
    if k_cache.shape[3] != d:
        raise ValueError(f"head_dim differs: q {d}, k_cache {k_cache.shape[3]}")
    if hk < 1 or hq % hk:
        raise ValueError(f"q_heads must be a positive multiple of kv_heads, got {hq} / {hk}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous (they are read by TMA and written in place)")
    if launch.on_gpu(q):
        if q.dtype not in launch.DTYPES:
            raise TypeError(f"on CUDA the decode kernels take float16 or bfloat16, got {q.dtype}")
        tile_for(d)
    elif q.dtype not in CPU_DTYPES:
        raise TypeError(f"on the CPU q and the caches must be float32, float64, float16 or bfloat16, got {q.dtype}")
    check_scale(softmax_scale)
    check_softcap(softcap)
    check_sinks(sinks, q)
    return 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)


def _check_new(k, v, batch: int, kv_heads: int, head_dim: int, dtype, device) -> int:
    """The new keys and values (both or neither); returns how many (0 for none)."""
    if (k is None) != (v is None):
        raise ValueError("give both k and v (the new keys and values) or neither")
    if k is None:
        return 0
    _check_tensor("k", k, 4)
    _check_tensor("v", v, 4)
    if k.shape != v.shape or k.shape[0] != batch or k.shape[2] != kv_heads or k.shape[3] != head_dim:
        raise ValueError(
            f"k, v must be (batch, new, kv_heads, head_dim) = ({batch}, new, {kv_heads}, {head_dim}); "
            f"got {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.dtype != dtype or v.dtype != dtype or k.device != device or v.device != device:
        raise TypeError(f"k, v must match the cache's dtype {dtype} and device {device}, got {k.dtype} on {k.device}")
    if k.shape[1] < 1:
        raise ValueError(f"k, v hold no token: {tuple(k.shape)} (pass None instead)")
    return k.shape[1]


def _seqlens(cache_seqlens, batch: int, default: int, device) -> torch.Tensor:
    """cache_seqlens as (batch,) int32 on the device: an int is broadcast (a fill
    kernel, no host sync), None is ``default``; a tensor is checked by shape, dtype
    and device (its values only on the CPU: the GPU would have to sync)."""
    if cache_seqlens is None or (isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool)):
        value = default if cache_seqlens is None else cache_seqlens
        if value < 0:
            raise ValueError(f"cache_seqlens must be >= 0, got {value}")
        return torch.full((batch,), value, dtype=torch.int32, device=device)
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.shape != (batch,):
        raise ValueError(
            f"cache_seqlens must be an int or a (batch,) = ({batch},) int32 tensor, got "
            f"{getattr(cache_seqlens, 'shape', cache_seqlens)!r}"
        )
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(f"cache_seqlens must be int32, got {cache_seqlens.dtype}")
    if cache_seqlens.device != device:
        raise ValueError(f"cache_seqlens must be on q's device {device}, got {cache_seqlens.device}")
    return cache_seqlens


def _run(
    q,
    k_cache,
    v_cache,
    k,
    v,
    seqlens,
    block_table,
    layout,
    scale,
    causal,
    window_size,
    softcap,
    sinks,
    capacity: int,
    num_splits: int,
    return_lse: bool,
    ring_slots: int | None = None,
):
    """Append, then attend (kernels on CUDA, the eager twin elsewhere): the shared tail
    of ``flash_attn_with_kvcache`` and ``SlidingWindowKVCache``."""
    n_new = 0 if k is None else k.shape[1]
    sq = q.shape[1]
    left, right = window.normalize_window(window_size, causal, sq, capacity + n_new)
    if ring_slots is not None and left + sq > ring_slots:
        raise ValueError(
            f"the ring holds {ring_slots} positions: a window of left {left} over {sq} queries needs {left + sq}"
        )
    with torch.no_grad():
        if not launch.on_gpu(q):
            lengths = seqlens.tolist()
            if min(lengths) < 0 or (ring_slots is None and max(lengths) + n_new > capacity):
                raise ValueError(f"cache_seqlens + new tokens must lie in 0 .. {capacity}, got {lengths} + {n_new}")
            if layout == "paged" and bool(((block_table < 0) | (block_table >= k_cache.shape[0])).any()):
                raise ValueError(f"block_table holds a page outside 0 .. {k_cache.shape[0] - 1}")
        if n_new:
            append_(k_cache, v_cache, k, v, seqlens, layout, block_table)
        if launch.on_gpu(q):
            sink = None if sinks is None else sinks.float().contiguous()
            span = min(left + sq + right, capacity) if ring_slots is None else left + sq
            out, lse = decode(
                q.contiguous(),
                k_cache,
                v_cache,
                seqlens,
                block_table,
                n_new,
                left,
                right,
                scale,
                softcap,
                sink,
                layout,
                span,
                num_splits,
            )
        else:
            out, lse = eager_decode(
                q, k_cache, v_cache, seqlens, block_table, n_new, left, right, scale, softcap, sinks, layout
            )
            out = out.to(q.dtype)  # lse stays in the work dtype: float32 (float64 for float64 inputs)
    return (out, lse) if return_lse else out


def flash_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    cache_seqlens: torch.Tensor | int | None = None,
    block_table: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    return_lse: bool = False,
    num_splits: int = 0,
):
    """FlashAttention's ``flash_attn_with_kvcache`` with sliding windows: append new
    keys to a cache in place, then attend to it. Inference only (no autograd).

    Window: sequence b has L = cache_seqlens[b] + new keys; query i of q_len sits at
    position L - q_len + i (bottom-right aligned) and attends keys pos - left ..
    pos + right of ``window_size=(left, right)`` that exist (< L), -1 unbounded;
    ``causal`` sets right = 0. transformers' ``sliding_window=W`` is (W - 1, 0)
    with causal.

    Args:
        q: (batch, q_len, q_heads, head_dim): 1 token (decode), a few (speculative
            decoding) or a chunk (chunked prefill).
        k_cache, v_cache: (batch, cache_len, kv_heads, head_dim), or with
            ``block_table`` paged: (num_pages, page_size, kv_heads, head_dim);
            contiguous, q's dtype; q_heads a multiple of kv_heads (GQA/MQA). Slots
            past a sequence's keys may hold anything finite. CUDA: float16/bfloat16,
            head_dim 64, 128 or 256, page_size a multiple of the kernel's key tile
            (128 at head_dim 64, 64 at 128, 32 at 256).
        k, v: (batch, new, kv_heads, head_dim) or None: written into the caches at
            positions cache_seqlens[b] .. + new - 1 before attending (in place).
        cache_seqlens: (batch,) int32 on q's device, or an int: keys already cached
            per sequence; None: every slot (cache_len, or pages_per_seq x page_size).
            On CUDA its values stay on the device (no sync): keeping
            cache_seqlens + new within the cache is the caller's part.
        block_table: (batch, pages_per_seq) int32 on q's device: sequence b's pages.
        softmax_scale: default 1 / sqrt(head_dim).
        softcap: c > 0 replaces each scaled score s by c * tanh(s / c), before the mask.
        sinks: (q_heads,) sink logits: each adds exp(sink) to its head's denominators.
        return_lse: also return lse (batch, q_heads, q_len), float32, natural log.
        num_splits: split-KV pieces per query tile (at most MAX_SPLITS, 64); 0 picks
            from the shapes.
    Returns:
        out (batch, q_len, q_heads, head_dim) in q's dtype, and lse if ``return_lse``.
    """
    scale = _check_common(q, k_cache, v_cache, softmax_scale, softcap, sinks, num_splits)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    pair = window.check_window(window_size, "window_size")
    if pair is None or isinstance(window_size, int):
        raise TypeError(f"window_size must be a (left, right) pair (-1: unbounded), got {window_size!r}")
    b = q.shape[0]
    n_new = _check_new(k, v, b, k_cache.shape[2], q.shape[3], q.dtype, q.device)
    if block_table is None:
        layout = "contiguous"
        if k_cache.shape[0] != b:
            raise ValueError(
                f"a contiguous k_cache must be (batch, cache_len, kv_heads, head_dim) with batch {b}, "
                f"got {tuple(k_cache.shape)}"
            )
        capacity = k_cache.shape[1]
    else:
        layout = "paged"
        _check_tensor("block_table", block_table, 2)
        if block_table.dtype != torch.int32 or block_table.shape[0] != b or block_table.device != q.device:
            raise ValueError(
                f"block_table must be (batch, pages_per_seq) int32 on q's device with batch {b}, got "
                f"{tuple(block_table.shape)} {block_table.dtype} on {block_table.device}"
            )
        page = k_cache.shape[1]
        if launch.on_gpu(q) and page % tile_for(q.shape[3])[1]:
            raise ValueError(
                f"page_size must be a multiple of {tile_for(q.shape[3])[1]} at head_dim {q.shape[3]} "
                f"(a key tile never straddles two pages), got {page}"
            )
        capacity = block_table.shape[1] * page
        block_table = block_table.contiguous()
    if cache_seqlens is None and n_new:
        raise ValueError("appending k, v needs cache_seqlens (where the new keys go)")
    seqlens = _seqlens(cache_seqlens, b, capacity, q.device)
    return _run(
        q,
        k_cache,
        v_cache,
        k,
        v,
        seqlens,
        block_table,
        layout,
        scale,
        causal,
        window_size,
        softcap,
        sinks,
        capacity,
        num_splits,
        return_lse,
    )


# ---- the ring-buffer cache of a windowed layer ----------------------------------------------


class SlidingWindowKVCache:
    """A KV cache that keeps only what a sliding window can see: per sequence,
    ``slots`` >= window + new_tokens_max positions (rounded up to RING_ALIGN), position
    p in slot p % slots; memory O(window) per sequence, independent of the history.

    Conventions as ``flash_attn_with_kvcache``: tensors (batch, seq, heads,
    head_dim); ``window`` is the window's left size (a query at position p sees
    keys p - window .. p: transformers' ``sliding_window=W`` is window = W - 1);
    lse natural log; queries aligned bottom-right to the keys appended so far.
    ``seqlens`` (batch,) int32 on the device counts each sequence's positions;
    ``append`` and ``attend`` never read it on the host (CUDA-graph safe).

    Args:
        batch, kv_heads, head_dim: the cache's shape.
        window: the left window (>= 0) of the layer.
        new_tokens_max: the most tokens one ``append`` adds and one ``attend``
            queries (1 for plain decoding; the chunk size for chunked prefill).
        dtype, device: of the cache (zero-initialised).
    """

    def __init__(
        self,
        batch: int,
        window: int,
        new_tokens_max: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.bfloat16,
        device=None,
    ):
        for name, x, low in (
            ("batch", batch, 1),
            ("window", window, 0),
            ("new_tokens_max", new_tokens_max, 1),
            ("kv_heads", kv_heads, 1),
            ("head_dim", head_dim, 1),
        ):
            if isinstance(x, bool) or not isinstance(x, int) or x < low:
                raise ValueError(f"{name} must be an int >= {low}, got {x!r}")
        self.window, self.new_tokens_max = window, new_tokens_max
        self.slots = -(-(window + new_tokens_max) // RING_ALIGN) * RING_ALIGN
        shape = (batch, self.slots, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=self.k.device)

    @property
    def nbytes(self) -> int:
        """Bytes of K and V (the counters aside)."""
        return 2 * self.k.numel() * self.k.element_size()

    def reset(self, seqlens: torch.Tensor | int = 0) -> None:
        """Start over (every sequence at ``seqlens`` positions; the slots keep their values)."""
        self.seqlens.copy_(torch.as_tensor(seqlens, dtype=torch.int32).expand_as(self.seqlens))

    def _check_new(self, k, v):
        batch, _, kv_heads, head_dim = self.k.shape
        n = _check_new(k, v, batch, kv_heads, head_dim, self.k.dtype, self.k.device)
        if not 1 <= n <= self.new_tokens_max:
            raise ValueError(f"append takes 1 .. new_tokens_max = {self.new_tokens_max} tokens, got {n}")
        return n

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v (batch, n, kv_heads, head_dim), n <= new_tokens_max, at each
        sequence's next positions, and advance its counter (all on the device)."""
        n = self._check_new(k, v)
        with torch.no_grad():
            append_(self.k, self.v, k, v, self.seqlens, "ring")
            self.seqlens.add_(n)

    def attend(
        self,
        q: torch.Tensor,
        softmax_scale: float | None = None,
        window_size: tuple[int, int] | None = None,
        softcap: float = 0.0,
        sinks: torch.Tensor | None = None,
        return_lse: bool = False,
        num_splits: int = 0,
    ):
        """Attention of q (batch, q_len, q_heads, head_dim), q_len <= new_tokens_max,
        aligned bottom-right to the keys appended so far. ``window_size`` (left,
        right) defaults to (window, 0) (causal); left must be <= window. Other
        arguments as ``flash_attn_with_kvcache``. Returns out (and lse)."""
        scale = _check_common(q, self.k, self.v, softmax_scale, softcap, sinks, num_splits)
        if q.shape[0] != self.k.shape[0]:
            raise ValueError(f"q's batch {q.shape[0]} is not the cache's {self.k.shape[0]}")
        if q.shape[1] > self.new_tokens_max:
            raise ValueError(f"attend takes q_len <= new_tokens_max = {self.new_tokens_max}, got {q.shape[1]}")
        window_size = (self.window, 0) if window_size is None else window_size
        pair = window.check_window(window_size, "window_size")
        if pair is None or isinstance(window_size, int) or not 0 <= pair[0] <= self.window:
            raise ValueError(
                f"window_size must be a (left, right) pair with 0 <= left <= window = {self.window}, "
                f"got {window_size!r}"
            )
        return _run(
            q,
            self.k,
            self.v,
            None,
            None,
            self.seqlens,
            None,
            "ring",
            scale,
            False,
            pair,
            softcap,
            sinks,
            self.slots,
            num_splits,
            return_lse,
            ring_slots=self.slots,
        )

    def update_and_attend(self, q, k, v, **kwargs):
        """``append(k, v)`` then ``attend(q, **kwargs)``."""
        self.append(k, v)
        return self.attend(q, **kwargs)
