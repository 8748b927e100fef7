"""Forward sliding-window attention in TileLang (FlashAttention-2 structure on
Hopper's warp-specialised TMA pipeline).

One CTA per (query tile of block_m rows, q head, batch) walks only the key tiles
its window reaches (``window.key_tile_schedule``): a query tile's range is one
contiguous run of tiles (plus the global tokens' tiles first), so the work is
O(seq * window) and nothing of size seq^2 exists. Per key tile: S = Q K^T with
the mask folded into S's initial value (-inf where a key is not seen; tiles the
whole query tile sees skip the mask), the online softmax (``common``), and
acc += P V. The epilogue writes O = acc / l and lse.

Layout: Q (batch, seq, q_heads, D), K and V (batch, kv_len, kv_heads, D) with
q_heads % kv_heads == 0 (GQA/MQA: K/V are indexed per group, never repeated);
O like Q; LSE (batch, q_heads, seq) float32, natural log. Batch, lengths, head
counts and windows are run-time values: one compiled kernel per (head_dim,
dtype, tile, mode).
"""

# No `from __future__ import annotations`: TileLang evaluates the prim_func
# annotations, and the dynamic sizes used only there must stay real objects.
import functools
import math

import tilelang.language as T
import tvm.tirx as tir  # tvm ships inside tilelang; importable once tilelang is

from ..window import class_len, key_tile_schedule
from .common import (
    LOG2E,
    consumer_regs,
    row_keys,
    row_sees,
    softmax_step,
    tile_fully_visible,
    tile_of,
    write_rows,
)

MODES = ("window", "general", "adaptive")


@functools.cache
def make_forward(
    head_dim: int,
    dtype: str,
    arch: str,
    tile: tuple,
    mode: str = "general",
    skip_full_masks: bool = True,
):
    """Kernel factory: forward sliding-window attention, all sizes and windows at run time.

    ``tile`` = (block_m, block_n, threads, num_stages, occupancy) (``launch.tile_config``).
    ``mode`` (compile time; the launcher picks the cheapest that serves the call):
      "window"    the (left, right) window with GQA only: the common case pays for
                  no head-class arithmetic and a shorter mask;
      "general"   plus dilation (head classes) and global tokens;
      "adaptive"  plus a window per (head, query): rows read their (left, right)
                  from WIN, the query tile its key tiles from KT (the launcher's
                  ``adaptive_schedule``), instead of the scalars ``left, right``.
    WIN and KT are tiny placeholders in the other modes.
    ``occupancy``: CTAs per SM to ask for. On Hopper TileLang warp-specializes
    the loop (one producer warpgroup feeding ``threads`` consumers) and by
    default gives the consumers 240 registers, one CTA per SM; small tiles then
    leave the SM idle while one CTA waits on memory. Asking for more CTAs caps
    the consumers' registers so that they fit.
    ``skip_full_masks``: a key tile that every row of the query tile sees whole
    (the window's interior) clears S instead of evaluating the mask per element;
    the mask's compares and selects cost as much as the softmax (analysis.md:
    1974 -> 1250 us at D=128, W=1024). False only for the sweep's comparison.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    general, adaptive = mode != "window", mode == "adaptive"
    block_m, block_n, threads, num_stages, occupancy = tile
    accum = "float32"
    batch, seq_len = T.dynamic("batch"), T.dynamic("seq_len")
    q_heads, kv_heads, kv_len = T.dynamic("q_heads"), T.dynamic("kv_heads"), T.dynamic("kv_len")
    win_heads, win_len = T.dynamic("win_heads"), T.dynamic("win_len")
    kt_heads, kt_tiles = T.dynamic("kt_heads"), T.dynamic("kt_tiles")
    scale_log2 = LOG2E / math.sqrt(head_dim)  # default softmax scale; the launcher rescales Q for others
    neg_inf = -T.infinity(accum)

    def kv_head_of(qh, heads_per_class, kv_heads_per_class):
        """GQA and dilation classes: q head qh = r * heads_per_class + h reads
        kv head r * kv_heads_per_class + h // group."""
        group = heads_per_class // kv_heads_per_class
        if not general:
            return qh // group
        return (qh // heads_per_class) * kv_heads_per_class + (qh % heads_per_class) // group

    def keys_in_class(qh, heads_per_class, true_seq_len, dilation):
        """Class r holds positions r, r + d, ...: (true_seq_len - r) / d of them,
        rounded up. Keys past that are the launcher's padding: never visible."""
        return class_len(true_seq_len, qh // heads_per_class, dilation) if general else true_seq_len

    @T.prim_func
    def forward(
        Q: T.Tensor((batch, seq_len, q_heads, head_dim), dtype),
        K: T.Tensor((batch, kv_len, kv_heads, head_dim), dtype),
        V: T.Tensor((batch, kv_len, kv_heads, head_dim), dtype),
        O: T.Tensor((batch, seq_len, q_heads, head_dim), dtype),
        LSE: T.Tensor((batch, q_heads, seq_len), accum),
        WIN: T.Tensor((win_heads, win_len, 2), "int32"),
        KT: T.Tensor((kt_heads, kt_tiles, 3), "int32"),
        left: T.int32,
        right: T.int32,
        n_global: T.int32,
        heads_per_class: T.int32,
        kv_heads_per_class: T.int32,
        true_seq_len: T.int32,  # keys that exist (K's length before any class padding)
        dilation: T.int32,
    ):
        with T.Kernel(T.ceildiv(seq_len, block_m), q_heads, batch, threads=threads) as (bx, qh, b):
            if consumer_regs(threads, occupancy) < 240:  # TileLang's default does not fit
                T.annotate_min_blocks_per_sm(occupancy)
                T.annotate_producer_reg_dealloc(24)
                T.annotate_consumer_reg_alloc(consumer_regs(threads, occupancy))
            q_s = T.alloc_shared((block_m, head_dim), dtype)
            k_s = T.alloc_shared((block_n, head_dim), dtype)
            v_s = T.alloc_shared((block_n, head_dim), dtype)
            s = T.alloc_fragment((block_m, block_n), accum)
            p = T.alloc_fragment((block_m, block_n), dtype)
            acc = T.alloc_fragment((block_m, head_dim), accum)
            m = T.alloc_fragment((block_m,), accum)
            m_prev = T.alloc_fragment((block_m,), accum)
            m_tile = T.alloc_fragment((block_m,), accum)
            m_safe = T.alloc_fragment((block_m,), accum)
            alpha = T.alloc_fragment((block_m,), accum)
            l = T.alloc_fragment((block_m,), accum)
            l_tile = T.alloc_fragment((block_m,), accum)

            kvh = kv_head_of(qh, heads_per_class, kv_heads_per_class)
            valid = keys_in_class(qh, heads_per_class, true_seq_len, dilation)
            n_glob = n_global if general else 0

            T.copy(Q[b, bx * block_m : (bx + 1) * block_m, qh, :], q_s)
            T.fill(acc, 0)
            T.fill(l, 0)
            T.fill(m, neg_inf)

            # The keys each row sees, as ranges (``row_keys``), once per CTA: the
            # per-element mask below is then one unsigned compare (and one more for
            # global keys). Adaptive windows: each row's own (left, right), and the
            # tile's key range precomputed by the launcher.
            row_first = T.alloc_fragment((block_m,), "int32")
            row_count = T.alloc_fragment((block_m,), "int32")
            row_glob = T.alloc_fragment((block_m,), "int32") if general else None
            for i in T.Parallel(block_m):
                qi = bx * block_m + i
                if adaptive:
                    row = T.min(qi, seq_len - 1)
                    row_left, row_right = WIN[qh, row, 0], WIN[qh, row, 1]
                else:
                    row_left, row_right = left, right
                first, count, glob = row_keys(qi, valid, row_left, row_right, n_glob, None, T.max, T.min)
                row_first[i] = first
                row_count[i] = count
                if general:
                    row_glob[i] = glob
            if adaptive:
                n_g, lo, hi = KT[qh, bx, 0], KT[qh, bx, 1], KT[qh, bx, 2]
            else:
                n_g, lo, hi = key_tile_schedule(bx, valid, left, right, n_glob, block_m, block_n, T.max, T.min, tir.Select)
            for it in T.Pipelined(n_g + hi - lo, num_stages=num_stages):
                T.copy(K[b, tile_of(it, n_g, lo) * block_n : (tile_of(it, n_g, lo) + 1) * block_n, kvh, :], k_s)
                k0 = tile_of(it, n_g, lo) * block_n
                # A key tile that every row sees whole (the window's interior) clears S
                # instead; adaptive rows always take the mask.
                full = False
                if skip_full_masks and not adaptive:
                    full = tile_fully_visible(bx * block_m, k0, block_m, block_n, valid, left, right, n_glob, general)
                if full:
                    T.clear(s)
                else:
                    for i, j in T.Parallel(block_m, block_n):
                        seen = row_sees(k0 + j, row_first[i], row_count[i], row_glob[i] if general else None)
                        s[i, j] = T.Select(seen, T.float32(0), neg_inf)
                T.gemm(q_s, k_s, s, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)

                softmax_step(s, p, acc, m, m_prev, m_tile, m_safe, alpha, l, l_tile, scale_log2)
                T.copy(V[b, tile_of(it, n_g, lo) * block_n : (tile_of(it, n_g, lo) + 1) * block_n, kvh, :], v_s)
                T.gemm(p, v_s, acc, policy=T.GemmWarpPolicy.FullRow)

            write_rows(O, LSE, acc, l, m_safe, b, bx * block_m, qh, seq_len, scale_log2)

    return forward

