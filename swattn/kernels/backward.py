"""Backward pass of sliding-window attention in TileLang (FlashAttention-2 structure).

Window: the repository's one definition (window.py): local query i sees key j
iff -left <= j - i <= right or either is below ``n_global`` (and both exist),
over the head classes of a dilation (window.to_classes), with GQA. Adaptive
windows: each row's (left, right) from WIN, each key tile's query tiles from KT
(``adaptive=True``).

Three steps, no O(N^2) buffer anywhere:
  1. ``make_preprocess``: delta_i = rowsum(dO_i * O_i), float32 (batch, heads, seq).
  2. ``make_backward``: one CTA per (key tile, kv head, batch) walks, from the key
     side, the query tiles whose window reaches its keys (``key_tile_schedule``
     with left and right swapped), for every query head of its GQA group. It
     recomputes P = exp(S - lse) from the forward's log-sum-exp, accumulates dK
     and dV in registers (summed over the group: K/V are never repeated), and
     adds each tile's dQ into a float32 buffer (atomics, or one TMA reduce-add per
     tile). lse and delta are staged per query tile by the threads, not by TMA:
     a (batch, heads, seq) float32 row stride is a multiple of 16 bytes only when
     seq is a multiple of 4, and TMA needs that.
  3. dQ is cast to the input dtype (the launcher's ``.to``).
"""

# No `from __future__ import annotations`: TileLang evaluates the prim_func annotations.
import functools

import tilelang.language as T
import tvm.tirx as tir  # tvm ships inside tilelang; importable once tilelang is

from ..window import class_len, key_tile_schedule
from .common import LOG2E, consumer_regs, row_keys, row_sees, tile_fully_visible, tile_of


@functools.cache
def make_preprocess(head_dim: int, dtype: str):
    """delta = rowsum(dO * O) in float32, the term dS = P * (dP - delta) needs."""
    accum, rows = "float32", 64
    batch, seq_len, heads = T.dynamic("batch"), T.dynamic("seq_len"), T.dynamic("heads")

    @T.prim_func
    def preprocess(
        O: T.Tensor((batch, seq_len, heads, head_dim), dtype),
        dO: T.Tensor((batch, seq_len, heads, head_dim), dtype),
        Delta: T.Tensor((batch, heads, seq_len), accum),
    ):
        with T.Kernel(T.ceildiv(seq_len, rows), heads, batch, threads=128) as (bx, h, b):
            o = T.alloc_fragment((rows, head_dim), accum)
            do = T.alloc_fragment((rows, head_dim), accum)
            delta = T.alloc_fragment((rows,), accum)
            T.copy(O[b, bx * rows : (bx + 1) * rows, h, :], o)
            T.copy(dO[b, bx * rows : (bx + 1) * rows, h, :], do)
            for i, j in T.Parallel(rows, head_dim):
                o[i, j] *= do[i, j]
            T.reduce_sum(o, delta, dim=1)
            for i in T.Parallel(rows):
                if bx * rows + i < seq_len:
                    Delta[b, h, bx * rows + i] = delta[i]

    return preprocess


@T.macro
def cast_gemm(src, a, b_s, acc):
    """acc += src . b_s with the float32 fragment ``src`` cast to the input dtype into
    ``a``: a shared buffer (the GEMM reads both operands from shared memory, wgmma SS)
    or a register fragment (RS)."""
    T.copy(src, a)
    T.gemm(a, b_s, acc, policy=T.GemmWarpPolicy.FullRow)


@functools.cache
def make_backward(
    head_dim: int,
    dtype: str,
    arch: str,
    tile: tuple,
    adaptive: bool = False,
    kv_grads: str = "float32",
    varlen: bool = False,
    softcap: bool = False,
):
    """dQ (float32, accumulated across CTAs) and dK, dV (``kv_grads``: each is
    written once, by the CTA of its key tile, so the input dtype saves a float32
    buffer and a cast per tensor where no one sums them further; the blocked
    paths sum them over key blocks, in float32) for the window (left, right).

    Q and K/V may differ in length (a block of a blocked or distributed
    computation, offsets folded into left and right, which may then be negative);
    ``true_q_len`` and ``true_seq_len`` count the queries and keys that exist
    before any class padding. ``adaptive``: every row reads its (left, right)
    from WIN (heads, seq, 2) and each (kv head, key tile) its query tiles from
    KT (``window.adaptive_key_side_schedule``, merged over the GQA group); the
    scalars left, right are then unused, as WIN and KT are otherwise.
    ``tile`` = (block_m, block_n, threads, num_stages, occupancy, dq_tma, kv_ss),
    from ``launch.tile_config`` (tiles.json, chosen by tools/sweep_bwd.py).
    D = 64: 64x64 tiles, two CTAs per SM (the forward's register split), 1.4-1.6x
    faster than one. D = 128: 64 queries x 128 keys over two consumer warpgroups,
    each owning 64 keys' dK and dV (64 registers each) at one CTA per SM: 1.35-1.39x
    faster than 64x64 at two (analysis.md, history).
    Each query tile's lse and delta are staged once in shared memory (TileLang
    issues them as cp.async from the producer warps: TMA cannot take them, see
    the module docstring), not read once per score element: 8-18 % faster
    (analysis.md). ``dq_tma`` (Hopper): add each dQ
    tile through shared memory with one TMA reduce-add (cp.reduce.async.bulk,
    clipped at the sequence end by the hardware) instead of one float32 atomic
    per element: 1.1x at D = 64 and with the 128-key tile at D = 128 (where the
    64x64 tile's second CTA per SM had no room for its 32 KB). ``kv_ss``: P^T and
    dS^T go through shared memory and the dV / dK GEMMs read both operands from
    there (wgmma SS) instead of P^T, dS^T from registers (RS). With RS every
    consumer warpgroup holds the whole A operand (block_n rows), so at D = 256 the
    only tiles that build put 2 x 64 x 256 float32 dK/dV accumulators on one
    warpgroup (256 registers a thread: spills); with SS two warpgroups split dK/dV
    by columns (64 x 128 each) without a spill: 2.3x faster at D = 256 (analysis.md).
    On Hopper in the register form (``overlap``) the GEMMs are asynchronous: S^T with
    dP^T, dV with the dS arithmetic, dK with the dS^T store and the barrier before dQ's
    GEMM (analysis.md 4.11; each ``T.gemm`` otherwise waits for itself at once).

    ``varlen``: packed sequences as in ``forward.make_forward`` (tensors (1, total,
    heads, D), LSE/Delta (1, heads, total_q), CU_Q/CU_K offsets; each sequence's
    window shifted bottom-right here; the grid walks ceil(max_seqlen_k / block_n)
    key tiles per sequence). ``softcap``: P from the capped scores and dS carries
    the cap's derivative, scale * (1 - tanh^2). The softmax scale is a run-time
    value (``sm_scale``)."""
    if adaptive and (varlen or softcap):
        raise ValueError("varlen and softcap are not built on adaptive windows")
    block_m, block_n, threads, num_stages, occupancy, dq_tma, kv_ss = tile
    # Hopper, register form: the GEMMs are issued asynchronously (see the loop).
    overlap = arch == "sm_90a" and not kv_ss
    accum = "float32"
    batch, seq_len, kv_len = T.dynamic("batch"), T.dynamic("seq_len"), T.dynamic("kv_len")
    q_heads, kv_heads = T.dynamic("q_heads"), T.dynamic("kv_heads")
    win_heads, win_len = T.dynamic("win_heads"), T.dynamic("win_len")
    kt_heads, kt_tiles = T.dynamic("kt_heads"), T.dynamic("kt_tiles")
    cu_len = T.dynamic("cu_len")

    @T.prim_func
    def backward(
        Q: T.Tensor((batch, seq_len, q_heads, head_dim), dtype),
        K: T.Tensor((batch, kv_len, kv_heads, head_dim), dtype),
        V: T.Tensor((batch, kv_len, kv_heads, head_dim), dtype),
        dO: T.Tensor((batch, seq_len, q_heads, head_dim), dtype),
        LSE: T.Tensor((batch, q_heads, seq_len), accum),
        Delta: T.Tensor((batch, q_heads, seq_len), accum),
        dQ: T.Tensor((batch, seq_len, q_heads, head_dim), accum),
        dK: T.Tensor((batch, kv_len, kv_heads, head_dim), kv_grads),
        dV: T.Tensor((batch, kv_len, kv_heads, head_dim), kv_grads),
        WIN: T.Tensor((win_heads, win_len, 2), "int32"),
        KT: T.Tensor((kt_heads, kt_tiles, 3), "int32"),
        CU_Q: T.Tensor((cu_len,), "int32"),
        CU_K: T.Tensor((cu_len,), "int32"),
        left: T.int32,
        right: T.int32,
        n_global: T.int32,
        kv_heads_per_class: T.int32,
        true_q_len: T.int32,
        true_seq_len: T.int32,
        dilation: T.int32,
        max_seqlen_k: T.int32,  # varlen: the grid's key tiles per sequence
        sm_scale: T.float32,
        cap: T.float32,  # softcap (softcap only)
    ):
        grid_n = T.ceildiv(max_seqlen_k, block_n) if varlen else T.ceildiv(kv_len, block_n)
        n_seq = cu_len - 1 if varlen else batch
        with T.Kernel(grid_n, kv_heads, n_seq, threads=threads) as (bx, kvh, b):
            # As in forward.make_forward, but TileLang gives this loop's producer as many
            # threads as the consumers (it stages lse/delta with cp.async as well as
            # loading by TMA), so the split is computed for that.
            regs = consumer_regs(threads, occupancy, producer_threads=threads)
            if regs < 240:
                T.annotate_min_blocks_per_sm(occupancy)
                T.annotate_producer_reg_dealloc(24)
                T.annotate_consumer_reg_alloc(regs)
            k_s = T.alloc_shared((block_n, head_dim), dtype)
            v_s = T.alloc_shared((block_n, head_dim), dtype)
            q_s = T.alloc_shared((block_m, head_dim), dtype)
            do_s = T.alloc_shared((block_m, head_dim), dtype)
            ds_s = T.alloc_shared((block_n, block_m), dtype)
            pt_s = T.alloc_shared((block_n, block_m), dtype) if kv_ss else None
            st = T.alloc_fragment((block_n, block_m), accum)  # S^T, then P^T
            dpt = T.alloc_fragment((block_n, block_m), accum)  # dP^T, then dS^T
            dcap = T.alloc_fragment((block_n, block_m), accum) if softcap else None  # 1 - tanh^2
            pt_cast = T.alloc_fragment((block_n, block_m), dtype)
            # overlap: dS^T's own registers, since the running dV GEMM still reads P^T's
            ds_cast = T.alloc_fragment((block_n, block_m), dtype) if overlap else None
            touch = T.alloc_local((1,), dtype) if overlap else None
            dk = T.alloc_fragment((block_n, head_dim), accum)
            dv = T.alloc_fragment((block_n, head_dim), accum)
            dq = T.alloc_fragment((block_m, head_dim), accum)
            dq_s = T.alloc_shared((block_m, head_dim), accum)  # used with dq_tma only
            lse_s = T.alloc_shared((block_m,), accum)
            delta_s = T.alloc_shared((block_m,), accum)
            # The keys each query row of the tile sees, as ranges (row_keys).
            first_s = T.alloc_shared((block_m,), "int32")
            count_s = T.alloc_shared((block_m,), "int32")
            glob_s = T.alloc_shared((block_m,), "int32")

            group = q_heads // kv_heads
            scale_log2 = sm_scale * LOG2E
            cap_pre = sm_scale / cap if softcap else None
            if varlen:
                # This sequence's rows, and its window shifted bottom-right (query i sits
                # at key position i + seq_k - seq_q), in registers.
                q_base = T.alloc_var("int32", init=CU_Q[b])
                k_base = T.alloc_var("int32", init=CU_K[b])
                q_valid = T.alloc_var("int32", init=CU_Q[b + 1] - CU_Q[b])
                k_valid = T.alloc_var("int32", init=CU_K[b + 1] - CU_K[b])
                left = left - (k_valid - q_valid)
                right = right + (k_valid - q_valid)
                bi, q_rows, k_rows = 0, q_valid, k_valid
            else:
                # Keys and queries that exist in this head class (dilation pads classes).
                q_base, k_base, bi, q_rows, k_rows = 0, 0, b, seq_len, kv_len
                k_valid = class_len(true_seq_len, kvh // kv_heads_per_class, dilation)
                q_valid = class_len(true_q_len, kvh // kv_heads_per_class, dilation)
            # The query tiles whose rows see a key of this tile: the forward's
            # schedule seen from the key side (left and right swap, so do the
            # tiles): a tile holding a global key is seen by every query; the
            # global queries (which see every key) come first, then the window's.
            if adaptive:
                sched = KT[kvh, bx, 0], KT[kvh, bx, 1], KT[kvh, bx, 2]
            else:
                sched = key_tile_schedule(
                    bx, q_valid, right, left, n_global, block_n, block_m, T.max, T.min, tir.Select
                )
            # Held in registers: inlined, these selects would grow every index below.
            n_g = T.alloc_var("int32", init=sched[0])
            lo = T.alloc_var("int32", init=sched[1])
            n_tiles = sched[0] + sched[2] - sched[1]
            if varlen:  # a key tile past its sequence's end has no query to visit
                n_tiles = T.if_then_else(bx * block_n < k_valid, n_tiles, 0)
            n_q = T.alloc_var("int32", init=n_tiles)

            T.copy(K[bi, k_base + bx * block_n : k_base + (bx + 1) * block_n, kvh, :], k_s)
            T.copy(V[bi, k_base + bx * block_n : k_base + (bx + 1) * block_n, kvh, :], v_s)
            T.fill(dk, 0)
            T.fill(dv, 0)
            for it in T.Pipelined(group * n_q, num_stages=num_stages):
                qh = kvh * group + it // n_q
                qt = tile_of(it % n_q, n_g, lo)
                T.copy(Q[bi, q_base + qt * block_m : q_base + (qt + 1) * block_m, qh, :], q_s)
                T.copy(dO[bi, q_base + qt * block_m : q_base + (qt + 1) * block_m, qh, :], do_s)
                # Per query row, once per tile: lse, delta (0 past the end, where the
                # mask hides the row) and the keys the row sees.
                for i in T.Parallel(block_m):
                    qi = qt * block_m + i
                    row = q_base + T.min(qi, q_rows - 1)
                    lse_s[i] = T.if_then_else(qi < q_rows, LSE[bi, qh, row], 0)
                    delta_s[i] = T.if_then_else(qi < q_rows, Delta[bi, qh, row], 0)
                    if adaptive:
                        row_left, row_right = WIN[qh, row, 0], WIN[qh, row, 1]
                    else:
                        row_left, row_right = left, right
                    first, count, glob = row_keys(qi, k_valid, row_left, row_right, n_global, q_valid, T.max, T.min)
                    first_s[i] = first
                    count_s[i] = count
                    glob_s[i] = glob
                T.fill(st, 0)
                if overlap:
                    # S^T and dP^T in flight together (both read shared memory only); P is
                    # computed as soon as S^T alone is done.
                    T.fill(dpt, 0)
                    T.wgmma_gemm(k_s, q_s, st, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                    T.wgmma_gemm(v_s, do_s, dpt, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                    T.wait_wgmma(1)
                else:
                    T.gemm(k_s, q_s, st, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                # A tile inside the window (and inside both sequences): P without the
                # mask, whose compares and selects cost as much as the exponentials.
                full = not adaptive and tir.all(
                    qt * block_m + block_m <= q_valid,
                    tile_fully_visible(qt * block_m, bx * block_n, block_m, block_n, k_valid, left, right, n_global),
                )
                if softcap:
                    # P from the capped score cap * tanh(s * scale / cap); keep the cap's
                    # derivative 1 - tanh^2 for dS (the scale joins it below).
                    for j, i in T.Parallel(block_n, block_m):
                        th = T.tanh(st[j, i] * cap_pre)
                        dcap[j, i] = 1 - th * th
                        seen = row_sees(bx * block_n + j, first_s[i], count_s[i], glob_s[i])
                        st[j, i] = T.Select(seen, T.exp2((cap * th - lse_s[i]) * LOG2E), T.float32(0))
                elif full:
                    for j, i in T.Parallel(block_n, block_m):
                        st[j, i] = T.exp2(st[j, i] * scale_log2 - lse_s[i] * LOG2E)
                else:
                    for j, i in T.Parallel(block_n, block_m):
                        seen = row_sees(bx * block_n + j, first_s[i], count_s[i], glob_s[i])
                        # Masked and out-of-range pairs are 0 by selection, never by
                        # multiplying: rows past the end may hold anything.
                        p = T.exp2(st[j, i] * scale_log2 - lse_s[i] * LOG2E)
                        st[j, i] = T.Select(seen, p, T.float32(0))
                if overlap:
                    # dV += P^T dO runs while dS is computed.
                    T.copy(st, pt_cast)
                    T.wgmma_gemm(pt_cast, do_s, dv, policy=T.GemmWarpPolicy.FullRow)
                    T.wait_wgmma(1)  # dP^T
                else:
                    T.fill(dpt, 0)
                    T.gemm(v_s, do_s, dpt, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                    cast_gemm(st, pt_s if kv_ss else pt_cast, do_s, dv)  # dV += P^T dO
                for j, i in T.Parallel(block_n, block_m):
                    ds = st[j, i] * (dpt[j, i] - delta_s[i]) * sm_scale
                    if softcap:
                        ds = ds * dcap[j, i]
                    dpt[j, i] = T.if_then_else(st[j, i] > 0, ds, 0)
                if overlap:
                    # dK += dS^T Q runs across the barrier around the shared dS^T tile, where
                    # the two warpgroups of a 128-key tile wait for each other; one wait
                    # ends the tile. TileLang releases a pipeline stage after its buffer's
                    # last reader in program order: the dV and dK GEMMs were dO's and Q's,
                    # so both are read once more after the wait (behind a branch on the
                    # scale's sign: kept, and it only fills a register), which puts the
                    # release after the GEMMs complete.
                    T.copy(dpt, ds_cast)
                    T.wgmma_gemm(ds_cast, q_s, dk, policy=T.GemmWarpPolicy.FullRow)
                    T.copy(ds_cast, ds_s)
                    T.fill(dq, 0)
                    T.wgmma_gemm(ds_s, k_s, dq, transpose_A=True, policy=T.GemmWarpPolicy.FullRow)
                    T.wait_wgmma(0)
                    if sm_scale < 0:
                        touch[0] = do_s[0, 0] + q_s[0, 0]
                else:
                    cast_gemm(dpt, ds_s if kv_ss else pt_cast, q_s, dk)  # dK += dS^T Q
                    if not kv_ss:
                        T.copy(pt_cast, ds_s)  # dQ's GEMM reads dS^T from shared memory
                    T.fill(dq, 0)
                    T.gemm(ds_s, k_s, dq, transpose_A=True, policy=T.GemmWarpPolicy.FullRow)
                if dq_tma:
                    T.copy(dq, dq_s)
                    rq = q_base + qt * block_m
                    T.atomic_add(dQ[bi, rq : rq + block_m, qh, :], dq_s, annotations={"use_tma": 1})
                else:
                    for i, d in T.Parallel(block_m, head_dim):
                        if qt * block_m + i < q_rows:
                            T.atomic_add(dQ[bi, q_base + qt * block_m + i, qh, d], dq[i, d])
            for j, d in T.Parallel(block_n, head_dim):
                if bx * block_n + j < k_rows:
                    dK[bi, k_base + bx * block_n + j, kvh, d] = T.Cast(kv_grads, dk[j, d])
                    dV[bi, k_base + bx * block_n + j, kvh, d] = T.Cast(kv_grads, dv[j, d])

    return backward
