"""Backward pass of sliding-window attention in TileLang (FlashAttention-2 structure).

Window: the repository's one definition (swattn.py): local query i sees key j
iff -left <= j - i <= right or either is below ``n_global`` (and both exist),
over the head classes of a dilation (swattn.to_classes), with GQA. Adaptive
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
import math

import tilelang
import tilelang.language as T
import torch
import tvm.tirx as tir  # tvm ships inside tilelang; importable once tilelang is

import online
import swattn

# (block_m, block_n, threads, num_stages, CTAs per SM, dQ by TMA): configs/op_tiles.json.
TILE_FIELDS = swattn.TILE_FIELDS + ("dq_tma",)


def tile_config(head_dim: int, arch: str) -> tuple:
    return swattn.tile_config(head_dim, arch, "backward", TILE_FIELDS)


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


@functools.cache
def make_backward(
    head_dim: int,
    dtype: str,
    arch: str = "sm_90a",
    tile: tuple | None = None,
    adaptive: bool = False,
    kv_grads: str = "float32",
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
    KT (``swattn.adaptive_key_side_schedule``, merged over the GQA group); the
    scalars left, right are then unused, as WIN and KT are otherwise.
    ``tile`` = (block_m, block_n, threads, num_stages, occupancy, dq_tma),
    default ``tile_config`` (configs/op_tiles.json, from scripts/sweep_bwd.py).
    D = 64: 64x64 tiles, two CTAs per SM (the forward's register split), 1.4-1.6x
    faster than one. D = 128: 64 queries x 128 keys over two consumer warpgroups,
    each owning 64 keys' dK and dV (64 registers each) at one CTA per SM: 1.35-1.39x
    faster than 64x64 at two (results/gpu_s5/sweep_bwd.log).
    Each query tile's lse and delta are staged once in shared memory (TileLang
    issues them as cp.async from the producer warps: TMA cannot take them, see
    the module docstring), not read once per score element: 8-18 % faster
    (analysis.md). ``dq_tma`` (Hopper): add each dQ
    tile through shared memory with one TMA reduce-add (cp.reduce.async.bulk,
    clipped at the sequence end by the hardware) instead of one float32 atomic
    per element: 1.1x at D = 64 and with the 128-key tile at D = 128 (where the
    64x64 tile's second CTA per SM had no room for its 32 KB)."""
    block_m, block_n, threads, num_stages, occupancy, dq_tma = tile or tile_config(head_dim, arch)
    accum = "float32"
    batch, seq_len, kv_len = T.dynamic("batch"), T.dynamic("seq_len"), T.dynamic("kv_len")
    q_heads, kv_heads = T.dynamic("q_heads"), T.dynamic("kv_heads")
    win_heads, win_len = T.dynamic("win_heads"), T.dynamic("win_len")
    kt_heads, kt_tiles = T.dynamic("kt_heads"), T.dynamic("kt_tiles")
    sm_scale = 1.0 / math.sqrt(head_dim)
    scale_log2 = swattn.LOG2E * sm_scale

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
        left: T.int32,
        right: T.int32,
        n_global: T.int32,
        kv_heads_per_class: T.int32,
        true_q_len: T.int32,
        true_seq_len: T.int32,
        dilation: T.int32,
    ):
        with T.Kernel(T.ceildiv(kv_len, block_n), kv_heads, batch, threads=threads) as (bx, kvh, b):
            # As in swattn.make_forward, but TileLang gives this loop's producer as many
            # threads as the consumers (it stages lse/delta with cp.async as well as
            # loading by TMA), so the split is computed for that.
            regs = swattn.consumer_regs(threads, occupancy, producer_threads=threads)
            if regs < 240:
                T.annotate_min_blocks_per_sm(occupancy)
                T.annotate_producer_reg_dealloc(24)
                T.annotate_consumer_reg_alloc(regs)
            k_s = T.alloc_shared((block_n, head_dim), dtype)
            v_s = T.alloc_shared((block_n, head_dim), dtype)
            q_s = T.alloc_shared((block_m, head_dim), dtype)
            do_s = T.alloc_shared((block_m, head_dim), dtype)
            ds_s = T.alloc_shared((block_n, block_m), dtype)
            st = T.alloc_fragment((block_n, block_m), accum)  # S^T, then P^T
            dpt = T.alloc_fragment((block_n, block_m), accum)  # dP^T, then dS^T
            pt_cast = T.alloc_fragment((block_n, block_m), dtype)
            dk = T.alloc_fragment((block_n, head_dim), accum)
            dv = T.alloc_fragment((block_n, head_dim), accum)
            dq = T.alloc_fragment((block_m, head_dim), accum)
            dq_s = T.alloc_shared((block_m, head_dim), accum)  # used with dq_tma only
            lse_s = T.alloc_shared((block_m,), accum)
            delta_s = T.alloc_shared((block_m,), accum)
            # The keys each query row of the tile sees, as ranges (swattn.row_keys).
            first_s = T.alloc_shared((block_m,), "int32")
            count_s = T.alloc_shared((block_m,), "int32")
            glob_s = T.alloc_shared((block_m,), "int32")

            group = q_heads // kv_heads
            # Keys and queries that exist in this head class (dilation pads classes).
            k_valid = swattn.class_len(true_seq_len, kvh // kv_heads_per_class, dilation)
            q_valid = swattn.class_len(true_q_len, kvh // kv_heads_per_class, dilation)
            # The query tiles whose rows see a key of this tile: the forward's
            # schedule seen from the key side (left and right swap, so do the
            # tiles): a tile holding a global key is seen by every query; the
            # global queries (which see every key) come first, then the window's.
            if adaptive:
                sched = KT[kvh, bx, 0], KT[kvh, bx, 1], KT[kvh, bx, 2]
            else:
                sched = swattn.key_tile_schedule(bx, q_valid, right, left, n_global, block_n, block_m, T.max, T.min)
            # Held in registers: inlined, these selects would grow every index below.
            n_g = T.alloc_var("int32", init=sched[0])
            lo = T.alloc_var("int32", init=sched[1])
            n_q = T.alloc_var("int32", init=sched[0] + sched[2] - sched[1])

            T.copy(K[b, bx * block_n : (bx + 1) * block_n, kvh, :], k_s)
            T.copy(V[b, bx * block_n : (bx + 1) * block_n, kvh, :], v_s)
            T.fill(dk, 0)
            T.fill(dv, 0)
            for it in T.Pipelined(group * n_q, num_stages=num_stages):
                qh = kvh * group + it // n_q
                qt = swattn.tile_of(it % n_q, n_g, lo)
                T.copy(Q[b, qt * block_m : (qt + 1) * block_m, qh, :], q_s)
                T.copy(dO[b, qt * block_m : (qt + 1) * block_m, qh, :], do_s)
                # Per query row, once per tile: lse, delta (0 past the end, where the
                # mask hides the row) and the keys the row sees.
                for i in T.Parallel(block_m):
                    qi = qt * block_m + i
                    row = T.min(qi, seq_len - 1)
                    lse_s[i] = T.if_then_else(qi < seq_len, LSE[b, qh, row], 0)
                    delta_s[i] = T.if_then_else(qi < seq_len, Delta[b, qh, row], 0)
                    if adaptive:
                        row_left, row_right = WIN[qh, row, 0], WIN[qh, row, 1]
                    else:
                        row_left, row_right = left, right
                    first, count, glob = swattn.row_keys(
                        qi, k_valid, row_left, row_right, n_global, q_valid, T.max, T.min
                    )
                    first_s[i] = first
                    count_s[i] = count
                    glob_s[i] = glob
                T.fill(st, 0)
                T.gemm(k_s, q_s, st, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                # A tile inside the window (and inside both sequences): P without the
                # mask, whose compares and selects cost as much as the exponentials.
                full = not adaptive and tir.all(
                    qt * block_m + block_m <= q_valid,
                    swattn.tile_fully_visible(
                        qt * block_m, bx * block_n, block_m, block_n, k_valid, left, right, n_global
                    ),
                )
                if full:
                    for j, i in T.Parallel(block_n, block_m):
                        st[j, i] = T.exp2(st[j, i] * scale_log2 - lse_s[i] * swattn.LOG2E)
                else:
                    for j, i in T.Parallel(block_n, block_m):
                        seen = swattn.row_sees(bx * block_n + j, first_s[i], count_s[i], glob_s[i])
                        # Masked and out-of-range pairs are 0 by selection, never by
                        # multiplying: rows past the end may hold anything.
                        p = T.exp2(st[j, i] * scale_log2 - lse_s[i] * swattn.LOG2E)
                        st[j, i] = T.Select(seen, p, T.float32(0))
                T.fill(dpt, 0)
                T.gemm(v_s, do_s, dpt, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                T.copy(st, pt_cast)
                T.gemm(pt_cast, do_s, dv, policy=T.GemmWarpPolicy.FullRow)
                for j, i in T.Parallel(block_n, block_m):
                    dpt[j, i] = T.if_then_else(st[j, i] > 0, st[j, i] * (dpt[j, i] - delta_s[i]) * sm_scale, 0)
                T.copy(dpt, pt_cast)
                T.gemm(pt_cast, q_s, dk, policy=T.GemmWarpPolicy.FullRow)
                T.copy(pt_cast, ds_s)
                T.fill(dq, 0)
                T.gemm(ds_s, k_s, dq, transpose_A=True, policy=T.GemmWarpPolicy.FullRow)
                if dq_tma:
                    T.copy(dq, dq_s)
                    T.atomic_add(dQ[b, qt * block_m : (qt + 1) * block_m, qh, :], dq_s, annotations={"use_tma": 1})
                else:
                    for i, d in T.Parallel(block_m, head_dim):
                        if qt * block_m + i < seq_len:
                            T.atomic_add(dQ[b, qt * block_m + i, qh, d], dq[i, d])
            for j, d in T.Parallel(block_n, head_dim):
                if bx * block_n + j < kv_len:
                    dK[b, bx * block_n + j, kvh, d] = T.Cast(kv_grads, dk[j, d])
                    dV[b, bx * block_n + j, kvh, d] = T.Cast(kv_grads, dv[j, d])

    return backward


@functools.cache
def compiled_preprocess(head_dim: int, dtype: str, arch: str):
    return tilelang.compile(make_preprocess(head_dim, dtype), target={"kind": "cuda", "arch": arch})


@functools.cache
def compiled_backward(
    head_dim: int,
    dtype: str,
    arch: str,
    tile: tuple | None = None,
    adaptive: bool = False,
    kv_grads: str = "float32",
):
    return tilelang.compile(
        make_backward(head_dim, dtype, arch, tile, adaptive, kv_grads),
        target={"kind": "cuda", "arch": arch},
        pass_configs={"tl.enable_fast_math": True},
    )


def attention_backward(
    do,
    q,
    k,
    v,
    out,
    lse,
    left: int,
    right: int,
    true_seq_len: int,
    dilation: int,
    kv_heads_per_class: int,
    dlse=None,
    true_q_len: int | None = None,
    delta=None,
    n_global: int = 0,
    row_windows=None,
    kv_grads_dtype: torch.dtype = torch.float32,
):
    """(dq, dk, dv): dq float32, dk and dv ``kv_grads_dtype`` (float32 or q's
    dtype), for tensors in the kernel's layout (head classes already formed:
    swattn.to_classes); lse natural log from the forward. ``dlse``,
    the gradient of the lse output if it was used, enters as delta - dlse. For a
    block (K/V of another length), ``true_q_len`` is Q's length and out/lse/do
    are the merged (global) ones of these queries; ``delta`` (float32, batch,
    heads, q_len), if given, replaces rowsum(dO * O) - dlse (then ``out`` is unused).
    ``row_windows``: (WIN, KT) of adaptive windows (``ops.adaptive_tables``)."""
    b, s, hq, d = q.shape
    device = q.device  # each .device builds a new object: host time on small shapes
    dtype, arch = swattn.DTYPES[q.dtype], swattn.cuda_arch(device)
    do = do.to(q.dtype).contiguous()
    if delta is None:
        delta = online.output_delta(do, out.to(q.dtype), dlse)
    # A block's lse/delta are slices of the merged (batch, heads, seq) state: the
    # kernel's ABI wants them packed.
    lse, delta = lse.float().contiguous(), delta.float().contiguous()
    dq = torch.zeros(q.shape, device=device, dtype=torch.float32)
    if kv_grads_dtype not in (torch.float32, q.dtype):
        raise ValueError(f"kv_grads_dtype must be float32 or {q.dtype}, got {kv_grads_dtype}")
    dk = torch.empty(k.shape, device=device, dtype=kv_grads_dtype)
    dv = torch.empty(v.shape, device=device, dtype=kv_grads_dtype)
    kv_grads = "float32" if kv_grads_dtype == torch.float32 else dtype
    kernel = compiled_backward(d, dtype, arch, None, row_windows is not None, kv_grads)
    win, kt = row_windows if row_windows is not None else swattn._placeholders(device)
    q_len = true_seq_len if true_q_len is None else true_q_len
    scalars = (left, right, n_global, kv_heads_per_class, q_len, true_seq_len, dilation)
    kernel(q, k, v, do, lse, delta, dq, dk, dv, win, kt, *scalars)
    return dq, dk, dv
