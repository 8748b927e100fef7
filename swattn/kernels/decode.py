"""Decode attention over a KV cache in TileLang (flash-decoding on Hopper's TMA pipeline).

Convention (FlashAttention's ``flash_attn_with_kvcache``; window.py is the one
definition): tensors (batch, seq, heads, head_dim); sequence b holds
L = cache_seqlens[b] + n_new keys (the new ones already appended by the
launcher) and its q_len queries are aligned bottom-right to them: query i sits
at position pos = L - q_len + i and sees the keys pos - left .. pos + right that
exist (0 <= key < L). ``window_size=(left, right)`` with -1 unbounded reaches
the kernel as non-negative ints (unbounded = a span beyond every key); causal is
right = 0. lse leaves in natural log; a row that sees no key gives out 0 and lse
-inf (or its sink). Softcap c > 0: s <- c * tanh(s * scale / c) before the mask.
Sinks (q_heads,) float32: one extra logit per head in each row's denominator.

Where a key lives (compile-time ``layout``):
  "contiguous"  K (batch, cache_len, kv_heads, D): position p at K[b, p];
  "paged"       K (num_pages, page_size, kv_heads, D) and a block table BT
                (batch, pages_per_seq) int32: position p at
                K[BT[b, p // page_size], p % page_size] (page_size a multiple
                of block_n: a key tile never straddles two pages);
  "ring"        K (batch, slots, kv_heads, D), slots a multiple of block_n:
                position p at K[b, p % slots]. A sliding-window layer keeps only
                the last ``slots`` positions, and every key a window reaches is
                among them (the launcher checks left + q_len <= slots), so a
                tile of positions is one contiguous run of slots, and a slot
                the tile reads for an older or newer position is outside every
                row's window (masked).

GQA: one CTA serves the whole group of q heads of a kv head (x the q_len
queries): its rows are (query i, head h of the group), query-major, packed into
tiles of block_m rows (64: one warpgroup's wgmma; rows past group * q_len are
padding that reads q = 0 and is never written), so the group shares every K/V
tile it reads from memory. The rows' key tiles run from the first row's
window's left edge (pos - left, so only the pages the windows intersect are
read) to the last row's right edge (clipped at L).

Split-KV (flash-decoding): when batch x kv_heads x row tiles cannot fill the
SMs, grid x holds ``num_splits`` CTAs per row tile, each walking an equal share
of the tile range (computed in the kernel from cache_seqlens: no host sync);
each writes a partial (out normalised over its keys, float32, and its lse) and
``make_combine`` merges the partials by log-sum-exp (and adds the sink).

Every length, window, scale and cap is a run-time scalar (cache_seqlens is read
on the device, so a CUDA graph replays with new lengths); only dtype, head_dim,
the tile and the feature flags are compiled in.
"""

# No `from __future__ import annotations`: TileLang evaluates the prim_func annotations.
import functools

import tilelang.language as T
import tvm.tirx as tir  # tvm ships inside tilelang; importable once tilelang is

from .common import LN2, LOG2E, consumer_regs, row_keys, row_sees, softmax_step

LAYOUTS = ("contiguous", "paged", "ring")


@T.macro
def pdl_prologue():
    """Programmatic dependent launch (sm_90+). A decode step is three short kernels in
    a row (append, split, combine), and without PDL each one's launch and CTA
    placement wait for the previous kernel's last CTA to finish. Trigger at once:
    the next kernel's CTAs are placed as soon as every CTA of this grid has started
    (so they never take a slot this grid still needs); then wait for the previous
    kernel's completion and memory before reading anything, since any input (q, the
    lengths, the cache) may be what it wrote. TileLang launches a kernel holding the
    wait with the PDL attribute."""
    T.pdl_trigger()
    T.pdl_sync()


# The producer warpgroup computes each tile's address (the paged one from the block
# table, in 64-bit): at 24 registers (the forward's) ptxas spilled 4-40 bytes there.
PRODUCER_REGS = 40


@functools.cache
def make_decode(
    head_dim: int,
    dtype: str,
    tile: tuple,
    layout: str = "contiguous",
    split: bool = False,
    softcap: bool = False,
    sinks: bool = False,
    pdl: bool = False,
):
    """Kernel factory: windowed attention of q_len queries per sequence to a KV cache.

    ``tile`` = (block_m, block_n, threads, num_stages, occupancy): block_m rows of
    (query, group head) per CTA, block_n keys per step, ``threads`` consumer
    threads (TileLang adds a producer warpgroup that issues the TMA loads), and
    ``occupancy`` CTAs per SM to cap the registers for (decode is bound by
    memory: more resident CTAs keep more loads in flight). ``layout``: "contiguous",
    "paged" or "ring" (module docstring). ``split``: write partials OP
    (num_splits, batch, q_len, q_heads, D) float32 and LP (num_splits, batch,
    q_heads, q_len) for ``make_combine`` instead of O and LSE (then the sink is
    the combine's). ``softcap`` / ``sinks``: compile the cap and the sink in.
    ``pdl`` (sm_90+): programmatic dependent launch (``pdl_prologue``).

    Run-time scalars: ``group`` (q_heads / kv_heads), ``n_new`` (keys appended by
    this call: L = CL[b] + n_new), ``left``, ``right`` (>= 0), ``scale_log2``
    (scale * log2 e; log2 e under a softcap, whose scores are already scaled),
    ``cap`` (c) and ``cap_pre`` (scale / c). Conventions: the module docstring
    (bottom-right queries, (left, right) windows, natural-log lse, 0 for a row
    that sees no key).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    block_m, block_n, threads, num_stages, occupancy = tile
    accum = "float32"
    neg_inf = -T.infinity(accum)
    batch, q_len, q_heads = T.dynamic("batch"), T.dynamic("q_len"), T.dynamic("q_heads")
    kv_rows, kv_slots, kv_heads = T.dynamic("kv_rows"), T.dynamic("kv_slots"), T.dynamic("kv_heads")
    bt_rows, bt_cols, n_sink = T.dynamic("bt_rows"), T.dynamic("bt_cols"), T.dynamic("n_sink")
    num_splits = T.dynamic("num_splits") if split else 1
    out_shape = (num_splits, batch, q_len, q_heads, head_dim) if split else (batch, q_len, q_heads, head_dim)
    lse_shape = (num_splits, batch, q_heads, q_len) if split else (batch, q_heads, q_len)
    out_dtype = accum if split else dtype

    @T.prim_func
    def decode(
        Q: T.Tensor((batch, q_len, q_heads, head_dim), dtype),
        K: T.Tensor((kv_rows, kv_slots, kv_heads, head_dim), dtype),
        V: T.Tensor((kv_rows, kv_slots, kv_heads, head_dim), dtype),
        CL: T.Tensor((batch,), "int32"),  # cache_seqlens: keys cached before this call's n_new
        BT: T.Tensor((bt_rows, bt_cols), "int32"),  # the block table (paged only)
        SINK: T.Tensor((n_sink,), accum),  # sink logits per q head (sinks and not split only)
        O: T.Tensor(out_shape, out_dtype),
        LSE: T.Tensor(lse_shape, accum),
        group: T.int32,
        n_new: T.int32,
        left: T.int32,
        right: T.int32,
        scale_log2: T.float32,
        cap: T.float32,
        cap_pre: T.float32,
    ):
        rows = q_len * group  # (query, group head) rows of one kv head
        m_tiles = T.ceildiv(rows, block_m)
        # Row r of the tile is (query (row0 + r) / group, head (row0 + r) % group): every
        # operand is >= 0, so truncating division (C's / and %) is exact and cheaper
        # than the floor division '//' lowers to for a run-time divisor.
        div, mod = tir.truncdiv, tir.truncmod
        with T.Kernel(m_tiles * num_splits, kv_heads, batch, threads=threads) as (bx, kvh, b):
            if pdl:
                pdl_prologue()
            if consumer_regs(threads, occupancy, 128, PRODUCER_REGS) < 240:  # TileLang's default does not fit
                T.annotate_min_blocks_per_sm(occupancy)
                T.annotate_producer_reg_dealloc(PRODUCER_REGS)
                T.annotate_consumer_reg_alloc(consumer_regs(threads, occupancy, 128, PRODUCER_REGS))
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
            row_first = T.alloc_fragment((block_m,), "int32")
            row_count = T.alloc_fragment((block_m,), "int32")

            mt, sp = bx, 0
            if split:
                mt, sp = div(bx, num_splits), mod(bx, num_splits)
            row0 = mt * block_m
            n_keys = T.alloc_var("int32", init=CL[b] + n_new)  # L: the keys of this sequence
            q_pos0 = n_keys - q_len  # position of query 0 (bottom-right alignment)

            # Q rows (query i, head h) = Q[b, i, kvh * group + h]: a gather (the rows of a
            # group are strided by q_heads * D between queries), once per CTA.
            for r, d in T.Parallel(block_m, head_dim):
                qr = T.min(row0 + r, rows - 1)
                q_s[r, d] = T.if_then_else(row0 + r < rows, Q[b, div(qr, group), kvh * group + mod(qr, group), d], 0)
            T.fill(acc, 0)
            T.fill(l, 0)
            T.fill(m, neg_inf)

            # The keys each row sees, as ranges (``row_keys``): the mask below is one
            # unsigned compare per element. Padding rows see nothing.
            for r in T.Parallel(block_m):
                first, count, _ = row_keys(q_pos0 + div(row0 + r, group), n_keys, left, right, 0, None, T.max, T.min)
                row_first[r] = first
                row_count[r] = T.if_then_else(row0 + r < rows, count, 0)

            # The tile's key tiles: from the first query's left edge to the last one's
            # right edge (clipped to the keys that exist), then this split's share.
            last_row = T.min(row0 + block_m, rows) - 1
            pos_lo = q_pos0 + div(row0, group)
            pos_hi = q_pos0 + div(last_row, group)
            lo = T.max(pos_lo - left, 0) // block_n
            hi = T.max(T.ceildiv(T.max(T.min(pos_hi + right + 1, n_keys), 0), block_n), lo)
            if split:
                share = T.ceildiv(hi - lo, num_splits)
                lo, hi = T.min(lo + sp * share, hi), T.min(lo + (sp + 1) * share, hi)

            for it in T.Pipelined(hi - lo, num_stages=num_stages):
                k0 = (lo + it) * block_n  # the tile's first key position
                if layout == "paged":
                    page, slot = BT[b, div(k0, kv_slots)], mod(k0, kv_slots)
                elif layout == "ring":
                    page, slot = b, mod(k0, kv_slots)
                else:
                    page, slot = b, k0
                T.copy(K[page, slot : slot + block_n, kvh, :], k_s)
                T.clear(s)
                T.gemm(q_s, k_s, s, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                if softcap:
                    for i, j in T.Parallel(block_m, block_n):
                        s[i, j] = cap * T.tanh(s[i, j] * cap_pre)
                # Mask by selection after the product: slots outside a row's window may
                # hold anything finite (older ring positions, a cache's unused tail), and a
                # -inf initial value would not survive a NaN there. A tile every real row
                # sees whole (the window's interior) skips the per-element mask.
                partial = tir.any(k0 < pos_hi - left, k0 + block_n - 1 > pos_lo + right, k0 + block_n > n_keys)
                if partial:
                    for i, j in T.Parallel(block_m, block_n):
                        s[i, j] = T.Select(row_sees(k0 + j, row_first[i], row_count[i]), s[i, j], neg_inf)

                softmax_step(s, p, acc, m, m_prev, m_tile, m_safe, alpha, l, l_tile, scale_log2)
                T.copy(V[page, slot : slot + block_n, kvh, :], v_s)
                T.gemm(p, v_s, acc, policy=T.GemmWarpPolicy.FullRow)

            # Epilogue. m_tile becomes the row's lse in log2 units (-inf: no key), and
            # alpha the factor from acc to out: 1 / l, or with a sink 2^(m - lse) with the
            # sink in the sum (a row that saw no key: acc = 0, so out 0, lse = sink).
            for r in T.Parallel(block_m):
                m_tile[r] = T.if_then_else(l[r] > 0, m_safe[r] * scale_log2 + T.log2(l[r]), neg_inf)
                alpha[r] = T.if_then_else(l[r] > 0, 1 / l[r], 0)
                if sinks and not split:
                    qr = T.min(row0 + r, rows - 1)
                    sink_log2 = SINK[kvh * group + mod(qr, group)] * LOG2E
                    top = T.max(m_tile[r], sink_log2)
                    m_tile[r] = top + T.log2(T.exp2(m_tile[r] - top) + T.exp2(sink_log2 - top))
                    alpha[r] = T.if_then_else(l[r] > 0, T.exp2(m_safe[r] * scale_log2 - m_tile[r]), 0)
            for r, d in T.Parallel(block_m, head_dim):
                if row0 + r < rows:
                    i, qh = div(row0 + r, group), kvh * group + mod(row0 + r, group)
                    if split:
                        O[sp, b, i, qh, d] = acc[r, d] * alpha[r]
                    else:
                        O[b, i, qh, d] = acc[r, d] * alpha[r]
            for r in T.Parallel(block_m):
                if row0 + r < rows:
                    i, qh = div(row0 + r, group), kvh * group + mod(row0 + r, group)
                    if split:
                        LSE[sp, b, qh, i] = m_tile[r] * LN2
                    else:
                        LSE[b, qh, i] = m_tile[r] * LN2

    return decode


@functools.cache
def make_append(head_dim: int, dtype: str, layout: str = "contiguous", pdl: bool = False):
    """Kernel factory: write this call's new keys and values KN, VN (batch, n_new,
    kv_heads, head_dim) into the caches K, V at positions CL[b] .. CL[b] + n_new - 1
    of each sequence, where ``make_decode``'s ``layout`` reads them; in place. One
    launch for both tensors, a CTA per (new token, kv head, batch): a decode step at
    batch 1 is launch-bound, and the eager twin (``decode.append_``) spends about ten
    launches on the index arithmetic and the two copies. A position outside the cache
    (a contiguous cache's capacity, a page past the block table or outside the pool)
    stops the kernel with a trap: an error at the next synchronisation, as an
    out-of-range ``index_copy_`` gives, never a write elsewhere. ``pdl``: as in
    ``make_decode``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    batch, n_new, kv_heads = T.dynamic("batch"), T.dynamic("n_new"), T.dynamic("kv_heads")
    kv_rows, kv_slots = T.dynamic("kv_rows"), T.dynamic("kv_slots")
    bt_rows, bt_cols = T.dynamic("bt_rows"), T.dynamic("bt_cols")
    div, mod = tir.truncdiv, tir.truncmod

    @T.prim_func
    def append(
        KN: T.Tensor((batch, n_new, kv_heads, head_dim), dtype),
        VN: T.Tensor((batch, n_new, kv_heads, head_dim), dtype),
        CL: T.Tensor((batch,), "int32"),
        BT: T.Tensor((bt_rows, bt_cols), "int32"),
        K: T.Tensor((kv_rows, kv_slots, kv_heads, head_dim), dtype),
        V: T.Tensor((kv_rows, kv_slots, kv_heads, head_dim), dtype),
    ):
        with T.Kernel(n_new, kv_heads, batch, threads=min(head_dim, 128)) as (i, h, b):
            if pdl:
                pdl_prologue()
            pos = CL[b] + i
            page = T.alloc_var("int32", init=b)
            slot = T.alloc_var("int32", init=pos)
            inside = T.alloc_var("bool", init=pos >= 0)
            if layout == "paged":
                inside = inside and div(pos, kv_slots) < bt_cols
                page = BT[b, T.min(div(T.max(pos, 0), kv_slots), bt_cols - 1)]
                slot = mod(pos, kv_slots)
                inside = inside and page >= 0 and page < kv_rows
            elif layout == "ring":
                slot = mod(pos, kv_slots)
            else:
                inside = inside and pos < kv_slots
            if not inside:
                T.call_extern("void", "__trap")
            for d in T.Parallel(head_dim):
                K[page, slot, h, d] = KN[b, i, h, d]
                V[page, slot, h, d] = VN[b, i, h, d]

    return append


@functools.cache
def make_combine(head_dim: int, dtype: str, sinks: bool, max_splits: int, pdl: bool = False):
    """Merge split-KV partials by log-sum-exp: out = sum_s 2^(lse_s - lse) out_s with
    lse = log sum_s e^lse_s (+ e^sink), natural-log units in and out. One CTA per
    (query, q head, batch), a thread per output element (up to 128); a row whose
    partials are all empty (and no sink) gets out 0 and lse -inf. ``max_splits``:
    the most partials a launch may pass (compiled in: the weights live in shared
    memory). ``pdl``: as in ``make_decode``."""
    threads = min(head_dim, 128)
    accum = "float32"
    neg_inf = -T.infinity(accum)
    batch, q_len, q_heads = T.dynamic("batch"), T.dynamic("q_len"), T.dynamic("q_heads")
    num_splits, n_sink = T.dynamic("num_splits"), T.dynamic("n_sink")

    @T.prim_func
    def combine(
        OP: T.Tensor((num_splits, batch, q_len, q_heads, head_dim), accum),
        LP: T.Tensor((num_splits, batch, q_heads, q_len), accum),
        SINK: T.Tensor((n_sink,), accum),
        O: T.Tensor((batch, q_len, q_heads, head_dim), dtype),
        LSE: T.Tensor((batch, q_heads, q_len), accum),
    ):
        with T.Kernel(q_len, q_heads, batch, threads=threads) as (i, h, b):
            if pdl:
                pdl_prologue()
            lse_s = T.alloc_shared((max_splits,), accum)
            w_s = T.alloc_shared((max_splits,), accum)
            acc = T.alloc_fragment((head_dim,), accum)
            top = T.alloc_var(accum, init=neg_inf)
            total = T.alloc_var(accum, init=0)
            lse2 = T.alloc_var(accum)
            # The partials' lse in one parallel load (a thread each) into shared memory:
            # the serial loops below then wait on shared memory, not on one global
            # round trip per split (this kernel is latency-bound: a few KiB per CTA).
            for sp in T.Parallel(max_splits):
                lse_s[sp] = T.if_then_else(sp < num_splits, LP[sp, b, h, i] * LOG2E, neg_inf)
            for sp in T.serial(num_splits):
                top = T.max(top, lse_s[sp])
            if sinks:
                top = T.max(top, SINK[h] * LOG2E)
            # -inf max (every partial empty): exponentiate against 0, not -inf.
            top = T.if_then_else(top == neg_inf, 0, top)
            for sp in T.serial(num_splits):
                total += T.exp2(lse_s[sp] - top)
            if sinks:
                total += T.exp2(SINK[h] * LOG2E - top)
            lse2 = T.if_then_else(total > 0, top + T.log2(total), neg_inf)
            # An empty partial (lse -inf) has weight 0 (and out 0).
            for sp in T.Parallel(max_splits):
                w_s[sp] = T.if_then_else(total > 0, T.exp2(lse_s[sp] - lse2), 0)
            T.fill(acc, 0)
            for sp in T.serial(num_splits):
                for d in T.Parallel(head_dim):
                    acc[d] += w_s[sp] * OP[sp, b, i, h, d]
            for d in T.Parallel(head_dim):
                O[b, i, h, d] = acc[d]
            LSE[b, h, i] = lse2 * LN2

    return combine
