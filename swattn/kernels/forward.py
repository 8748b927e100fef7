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
    varlen: bool = False,
    softcap: bool = False,
    sinks: bool = False,
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

    The FlashAttention-style features ("window" mode only):
      ``varlen``   Q, K, V, O hold packed sequences as (1, total, heads, D) and LSE
                   (1, heads, total_q); sequence b is rows CU_Q[b] .. CU_Q[b + 1] - 1
                   (CU_K for the keys); the grid walks ceil(max_seqlen_q / block_m)
                   query tiles per sequence and each sequence's queries sit
                   bottom-right against its keys: the window (left, right) shifts by
                   seq_k - seq_q per sequence, here, not in the launcher. Tiles past a
                   sequence's end do nothing.
      ``softcap``  S <- softcap * tanh(S * cap_pre) after the GEMM (cap_pre = scale /
                   softcap), masked after the tanh (a -inf mask before it would
                   become -softcap); the softmax then runs on scaled scores
                   (the launcher passes scale_log2 = log2(e)).
      ``sinks``    one logit per q head (SINK, float32) joins each row's denominator
                   in the epilogue (no value): the row max and sum absorb it, so lse
                   includes it and a row that sees no key gets lse = sink, out 0.
    Without them CU_Q, CU_K and SINK are tiny placeholders. The softmax scale is a
    run-time value (scale_log2 = scale * log2(e)).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode != "window" and (varlen or softcap or sinks):
        raise ValueError("varlen, softcap and sinks are built on the 'window' mode only")
    general, adaptive = mode != "window", mode == "adaptive"
    block_m, block_n, threads, num_stages, occupancy = tile
    accum = "float32"
    batch, seq_len = T.dynamic("batch"), T.dynamic("seq_len")
    q_heads, kv_heads, kv_len = T.dynamic("q_heads"), T.dynamic("kv_heads"), T.dynamic("kv_len")
    win_heads, win_len = T.dynamic("win_heads"), T.dynamic("win_len")
    kt_heads, kt_tiles = T.dynamic("kt_heads"), T.dynamic("kt_tiles")
    cu_len, n_sink = T.dynamic("cu_len"), T.dynamic("n_sink")
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
        CU_Q: T.Tensor((cu_len,), "int32"),
        CU_K: T.Tensor((cu_len,), "int32"),
        SINK: T.Tensor((n_sink,), accum),
        left: T.int32,
        right: T.int32,
        n_global: T.int32,
        heads_per_class: T.int32,
        kv_heads_per_class: T.int32,
        true_seq_len: T.int32,  # keys that exist (K's length before any class padding)
        dilation: T.int32,
        max_seqlen_q: T.int32,  # varlen: the grid's query tiles per sequence
        scale_log2: T.float32,  # softmax scale * log2(e): exp(x * scale) = exp2(x * scale_log2)
        cap: T.float32,  # softcap (softcap only)
        cap_pre: T.float32,  # softmax scale / softcap (softcap only)
    ):
        grid_m = T.ceildiv(max_seqlen_q, block_m) if varlen else T.ceildiv(seq_len, block_m)
        n_seq = cu_len - 1 if varlen else batch
        with T.Kernel(grid_m, q_heads, n_seq, threads=threads) as (bx, qh, b):
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
            n_glob = n_global if general else 0
            if varlen:
                # This sequence's rows, and its window shifted bottom-right: query i sits at
                # key position i + seq_k - seq_q. Held in registers, read once.
                q_base = T.alloc_var("int32", init=CU_Q[b])
                k_base = T.alloc_var("int32", init=CU_K[b])
                n_q = T.alloc_var("int32", init=CU_Q[b + 1] - CU_Q[b])
                valid = T.alloc_var("int32", init=CU_K[b + 1] - CU_K[b])
                w_left = T.alloc_var("int32", init=left - (valid - n_q))
                w_right = T.alloc_var("int32", init=right + (valid - n_q))
                bi = 0
            else:
                q_base, k_base, n_q, bi = 0, 0, seq_len, b
                valid = keys_in_class(qh, heads_per_class, true_seq_len, dilation)
                w_left, w_right = left, right

            T.copy(Q[bi, q_base + bx * block_m : q_base + (bx + 1) * block_m, qh, :], q_s)
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
                    row_left, row_right = w_left, w_right
                first, count, glob = row_keys(qi, valid, row_left, row_right, n_glob, None, T.max, T.min)
                row_first[i] = first
                row_count[i] = count
                if general:
                    row_glob[i] = glob
            if adaptive:
                n_g, lo, hi = KT[qh, bx, 0], KT[qh, bx, 1], KT[qh, bx, 2]
            else:
                n_g, lo, hi = key_tile_schedule(
                    bx, valid, w_left, w_right, n_glob, block_m, block_n, T.max, T.min, tir.Select
                )
                if varlen:  # a query tile past its sequence's end does nothing
                    hi = T.if_then_else(bx * block_m < n_q, hi, lo)
            for it in T.Pipelined(n_g + hi - lo, num_stages=num_stages):
                kt0 = k_base + tile_of(it, n_g, lo) * block_n
                T.copy(K[bi, kt0 : kt0 + block_n, kvh, :], k_s)
                k0 = tile_of(it, n_g, lo) * block_n
                # A key tile that every row sees whole (the window's interior) clears S
                # instead; adaptive rows always take the mask.
                full = False
                if skip_full_masks and not adaptive:
                    full = tile_fully_visible(
                        bx * block_m, k0, block_m, block_n, valid, w_left, w_right, n_glob, general
                    )
                if softcap:
                    # The cap bends scores before the mask, so S starts at 0 and the mask
                    # selects after the tanh.
                    T.clear(s)
                    T.gemm(q_s, k_s, s, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                    if full:
                        for i, j in T.Parallel(block_m, block_n):
                            s[i, j] = cap * T.tanh(s[i, j] * cap_pre)
                    else:
                        for i, j in T.Parallel(block_m, block_n):
                            seen = row_sees(k0 + j, row_first[i], row_count[i], None)
                            s[i, j] = T.Select(seen, cap * T.tanh(s[i, j] * cap_pre), neg_inf)
                else:
                    if full:
                        T.clear(s)
                    else:
                        for i, j in T.Parallel(block_m, block_n):
                            seen = row_sees(k0 + j, row_first[i], row_count[i], row_glob[i] if general else None)
                            s[i, j] = T.Select(seen, T.float32(0), neg_inf)
                    T.gemm(q_s, k_s, s, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)

                softmax_step(s, p, acc, m, m_prev, m_tile, m_safe, alpha, l, l_tile, scale_log2)
                T.copy(V[bi, kt0 : kt0 + block_n, kvh, :], v_s)
                T.gemm(p, v_s, acc, policy=T.GemmWarpPolicy.FullRow)

            if sinks:
                # The sink joins the row's max and sum (in log2 units): M = max(m, sink),
                # l <- l * 2^(m - M) + 2^(sink - M), acc rescaled alike. A row that saw no
                # key (m = -inf, l = 0) ends with l = 1 at M = sink: out 0, lse = sink.
                for i in T.Parallel(block_m):
                    sink_log2 = SINK[qh] * LOG2E
                    m_tile[i] = T.max(m[i] * scale_log2, sink_log2)  # M, log2 units
                    alpha[i] = T.exp2(m_safe[i] * scale_log2 - m_tile[i])
                    l[i] = l[i] * alpha[i] + T.exp2(sink_log2 - m_tile[i])
                    m_safe[i] = m_tile[i] / scale_log2
                for i, j in T.Parallel(block_m, head_dim):
                    acc[i, j] *= alpha[i]
            write_rows(O, LSE, acc, l, m_safe, bi, bx * block_m, qh, n_q, scale_log2, q_base)

    return forward
