"""Sliding-window attention as a model would call it: batched, multi-head, GQA,
any length, every window shape. TileLang forward kernel + launcher.

Window (the repository's one definition, generalised; an adaptive window gives
every (head, query) its own left and right):
    query i attends key j  <=>  i - left <= j <= i + right          (the local window)
                             or  j < global_tokens or i < global_tokens   (global tokens)
with ``window=W`` meaning left = right = W and ``causal=True`` meaning right = 0.
Dilation d: query i attends keys i + k * d with -left <= k <= right. A dilated
window is an ordinary window over each residue class mod d, and with
(batch, seq, heads, dim) storage the classes are a free view: (B, S, H, D) ->
(B, S / d, d * H, D) puts class r in heads r * H .. r * H + H - 1.

Layout: q (batch, seq, q_heads, head_dim), k and v (batch, seq, kv_heads,
head_dim), q_heads % kv_heads == 0 (GQA/MQA; K/V are indexed per group, never
repeated). Output (batch, seq, q_heads, head_dim) in the input dtype; with
``return_lse`` also the log-sum-exp (batch, q_heads, seq) float32 in natural log.

One compiled kernel per (head_dim, dtype, tile configuration, arch): batch,
seq_len, head counts and the window are run-time values, so a whole test grid
shares it.

The online-softmax block repeats solution.py's on purpose: solution.py is the
course's self-contained teaching kernel, whose student handout removes exactly
that block, so it cannot call shared code for it.

Also here: ``SlidingWindowAttention`` / ``GroupedQueryAttention``, a Llama-shaped
nn.Module (q/k/v/o projections) that runs this op on CUDA and SDPA with the same
window as a dense mask elsewhere.

Status (2026-11-26): every GPU test passes on an H100 with the shipped tiles
(configs/op_tiles.json); 1.04-1.38x FlexAttention's forward on the benchmark
shapes, behind FlashAttention-4 at W >= 512 and D = 128; forward + backward
1.05-1.25x FlexAttention, 0.70-0.85x FlashAttention-4 (analysis.md, session 5).
"""

# No `from __future__ import annotations`: TileLang evaluates the prim_func
# annotations, and the dynamic sizes used only there must stay real objects.
import functools
import json
import math
from pathlib import Path

import tilelang
import tilelang.language as T
import torch
import torch.nn.functional as F
import tvm.tirx as tir  # tvm ships inside tilelang; importable once tilelang is

DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}
MODES = ("window", "general", "adaptive")
HEAD_DIMS = (64, 128)
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# Tiles per (arch, head_dim) for the forward and the backward: data, chosen by
# scripts/sweep_op.py and scripts/sweep_bwd.py on the GPU (configs/op_tiles.json
# says what each field means; analysis.md has the measurements behind them).
OP_TILES = json.loads((Path(__file__).resolve().parent / "configs" / "op_tiles.json").read_text())
TILE_FIELDS = ("block_m", "block_n", "threads", "num_stages", "occupancy")


def tile_config(head_dim: int, arch: str, kind: str = "forward", fields: tuple = TILE_FIELDS) -> tuple:
    """The shipped tile of ``kind`` ("forward" or "backward") as a tuple of ``fields``."""
    entry = OP_TILES[kind]["sm_90a" if arch.startswith("sm_9") else "sm_80"][str(head_dim)]
    return tuple(entry[f] for f in fields)


def key_tile_schedule(
    q_tile, seq_len, left, right, n_global, block_m: int, block_n: int, maximum=max, minimum=min, select=tir.Select
):
    """The key tiles query tile ``q_tile`` visits, as (n_global_tiles, lo, hi):
    first tiles 0 .. n_global_tiles - 1 (the global keys), then lo .. hi - 1
    (the local window, clipped to the sequence and past the global tiles).

    A tile that holds a global query (row < n_global) sees every key: then
    there are no separate global tiles and [lo, hi) is the whole sequence.
    Used by the kernel with ``T.max``/``T.min``, by the tests with Python's, and
    by the launcher of adaptive windows on tensors (``select=torch.where``).
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


@functools.cache
def make_forward(
    head_dim: int,
    dtype: str,
    arch: str = "sm_90a",
    tile: tuple | None = None,
    mode: str = "general",
    skip_full_masks: bool = True,
):
    """Kernel factory: forward sliding-window attention, all sizes and windows at run time.

    ``tile`` = (block_m, block_n, threads, num_stages, occupancy), default ``tile_config``.
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
    block_m, block_n, threads, num_stages, occupancy = tile or tile_config(head_dim, arch)
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
                n_g, lo, hi = key_tile_schedule(bx, valid, left, right, n_glob, block_m, block_n, T.max, T.min)
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


@T.macro
def softmax_step(s, p, acc, m, m_prev, m_tile, m_safe, alpha, l, l_tile, scale_log2):
    """The online softmax of one key tile, between S = Q K^T (s: raw scores, -inf
    where masked) and acc += P V: ``softmax_scores``, then P into p (in q's
    dtype) and the accumulator rescaled by alpha. Every forward kernel's loop body."""
    softmax_scores(s, m, m_prev, m_tile, m_safe, alpha, l, l_tile, scale_log2)
    T.copy(s, p)
    for i, j in T.Parallel(acc.shape[0], acc.shape[1]):
        acc[i, j] *= alpha[i]


@T.macro
def softmax_scores(s, m, m_prev, m_tile, m_safe, alpha, l, l_tile, scale_log2):
    """The statistics half of ``softmax_step``: the running row max m (m_prev
    before), m_safe = m except 0 for a row that has seen no key yet (so exp2
    never meets -inf minus -inf), s = exp2((s - m_safe) * scale_log2), alpha =
    exp2((m_prev - m_safe) * scale_log2) and the running sum l rescaled by it.
    The accumulator's rescale is the caller's (an overlapped loop does it only
    once the previous tile's P V has finished)."""
    rows, cols = s.shape[0], s.shape[1]
    neg_inf = -T.infinity("float32")
    T.copy(m, m_prev)
    T.reduce_max(s, m_tile, dim=1, clear=True)
    for i in T.Parallel(rows):
        m[i] = T.max(m_prev[i], m_tile[i])
        # -inf max (no visible key yet): exponentiate against 0, not -inf.
        m_safe[i] = T.if_then_else(m[i] == neg_inf, 0, m[i])
        alpha[i] = T.exp2(m_prev[i] * scale_log2 - m_safe[i] * scale_log2)
    for i, j in T.Parallel(rows, cols):
        s[i, j] = T.exp2(s[i, j] * scale_log2 - m_safe[i] * scale_log2)
    T.reduce_sum(s, l_tile, dim=1)
    for i in T.Parallel(rows):
        l[i] = l[i] * alpha[i] + l_tile[i]


@T.macro
def write_rows(O, LSE, acc, l, m_safe, b, row0, qh, seq_len, scale_log2):
    """The epilogue: rows row0 .. row0 + len(l) - 1 (those below seq_len) of O
    (acc / l; 0 for a row that saw no key) and LSE (natural log; -inf there)."""
    rows, dim = acc.shape[0], acc.shape[1]
    for i, j in T.Parallel(rows, dim):
        if row0 + i < seq_len:
            O[b, row0 + i, qh, j] = T.if_then_else(l[i] > 0, acc[i, j] / l[i], 0)
    for i in T.Parallel(rows):
        if row0 + i < seq_len:
            # lse in natural-log units: (m * scale_log2 + log2 l) * ln 2.
            LSE[b, qh, row0 + i] = T.if_then_else(
                l[i] > 0, (m_safe[i] * scale_log2 + T.log2(l[i])) * LN2, -T.infinity("float32")
            )


def consumer_regs(consumer_threads: int, occupancy: int, producer_threads: int = 128, producer_regs: int = 24) -> int:
    """Registers per consumer thread when ``occupancy`` CTAs share the SM's 64K registers.

    A CTA launches with ``__launch_bounds__(threads, occupancy)`` registers per
    thread (rounded down to 8) and setmaxnreg only moves registers inside that
    pool: asking for more than the producer frees deadlocks the consumers.
    """
    total = consumer_threads + producer_threads
    pool = 65536 // (occupancy * total) // 8 * 8 * total
    return min(240, (pool - producer_threads * producer_regs) // consumer_threads // 8 * 8)


def tile_fully_visible(q0, k0, block_m: int, block_n: int, valid, left, right, n_global, general: bool = True):
    """Every query of tile [q0, q0 + block_m) sees every key of tile [k0, k0 + block_n)
    (the window test of the kernels true throughout: no per-element mask needed).
    ``valid``: keys that exist; ``general`` adds the global tokens' rows and columns."""
    exists = k0 + block_n <= valid
    in_window = tir.all(k0 >= q0 + block_m - 1 - left, k0 + block_n - 1 <= q0 + right)
    if not general:
        return tir.all(exists, in_window)
    return tir.all(exists, tir.any(in_window, k0 + block_n <= n_global, q0 + block_m <= n_global))


def row_keys(qi, valid, left, right, n_global=0, q_valid=None, maximum=max, minimum=min, select=tir.Select):
    """The keys query ``qi`` sees as ranges: (first, count, n_global_keys) means
    keys first .. first + count - 1 and 0 .. n_global_keys - 1 (which may
    overlap). ``valid``: keys that exist; ``q_valid`` (optional): queries that
    exist (a row past it sees nothing). Python ints or TIR expressions."""
    first = qi - left
    count = maximum(minimum(left + right + 1, valid - first), 0)
    n_glob = 0
    if not (isinstance(n_global, int) and n_global == 0):
        # A global row sees every key that exists.
        is_global = qi < n_global
        first, count, n_glob = select(is_global, 0, first), select(is_global, valid, count), minimum(n_global, valid)
    if q_valid is not None:
        count, n_glob = select(qi < q_valid, count, 0), select(qi < q_valid, n_glob, 0)
    return first, count, n_glob


def row_sees(kj, first, count, n_glob=None):
    """Key kj lies in a row's ranges (``row_keys``): the kernels' per-element mask (TIR).

    One unsigned compare, kj - first < count (a key before the range wraps to a
    huge unsigned number), plus one for the global keys, combined bitwise:
    written with ``&&``, nvcc turned the test into a branch per element
    (BSSY/BSYNC), and a masked tile cost about three unmasked ones."""
    local = T.Cast("uint32", kj - first) < T.Cast("uint32", count)
    return local if n_glob is None else (T.Cast("int32", local) | T.Cast("int32", kj < n_glob)) != 0


def tile_of(it, n_global_tiles, lo):
    """Key tile of loop iteration ``it``: the global tiles first, then the window's."""
    if isinstance(n_global_tiles, int) and n_global_tiles == 0:
        return lo + it
    return T.if_then_else(it < n_global_tiles, it, lo + it - n_global_tiles)


def on_gpu(x: torch.Tensor) -> bool:
    """Whether the kernels run for ``x`` (the seam the CPU tests of the launch paths patch)."""
    return x.is_cuda


@functools.cache
def cuda_arch(device) -> str:
    """The kernels' target for a CUDA device ("sm_90a" on Hopper); cached: the
    capability query costs host time on every call otherwise."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}{'a' if major == 9 else ''}"


@functools.cache
def compiled_forward(
    head_dim: int,
    dtype: str,
    arch: str,
    tile: tuple | None = None,
    mode: str = "general",
    skip_full_masks: bool = True,
):
    return tilelang.compile(
        make_forward(head_dim, dtype, arch, tile, mode, skip_full_masks),
        target={"kind": "cuda", "arch": arch},
        pass_configs={"tl.enable_fast_math": True},
    )


def normalize_window(window, causal: bool, seq_len: int) -> tuple[int, int]:
    """(left, right) from an int W or a pair, with causal -> right = 0, clamped to seq_len - 1."""
    if isinstance(window, bool) or not isinstance(window, (int, tuple, list)):
        raise TypeError(f"window must be an int or a (left, right) pair, got {window!r}")
    left, right = (window, window) if isinstance(window, int) else tuple(window)
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (left, right)) or min(left, right) < 0:
        raise ValueError(f"window sizes must be ints >= 0, got {window!r}")
    if causal:
        right = 0
    cap = max(seq_len - 1, 0)
    return min(left, cap), min(right, cap)


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


def rows_to_classes(w: torch.Tensor, dilation: int) -> torch.Tensor:
    """A per-(head, position) table (H, S) in ``to_classes``' layout: (d * H, ceil(S / d))."""
    h, s = w.shape
    pad = (-s) % dilation
    w = torch.nn.functional.pad(w, (0, pad))
    return w.view(h, (s + pad) // dilation, dilation).permute(2, 0, 1).reshape(dilation * h, (s + pad) // dilation)


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


@functools.cache
def _placeholders(device) -> tuple[torch.Tensor, torch.Tensor]:
    """WIN and KT for the kernels that do not read them."""
    return torch.zeros(1, 1, 2, dtype=torch.int32, device=device), torch.zeros(
        1, 1, 3, dtype=torch.int32, device=device
    )


def _check(q, k, v, dilation, global_tokens, scale):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor")
        if x.dim() != 4:
            raise ValueError(f"{name} must be (batch, seq, heads, head_dim), got shape {tuple(x.shape)}")
    if q.dtype not in DTYPES or not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must all be float16 or all bfloat16, got {q.dtype}, {k.dtype}, {v.dtype}")
    (b, s, hq, d), (bk, sk, hk, dk) = q.shape, k.shape
    if k.shape != v.shape or (b, s, d) != (bk, sk, dk):
        raise ValueError(f"shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if d not in HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {HEAD_DIMS}, got {d}")
    if s < 1 or hk < 1 or hq % hk:
        raise ValueError(f"need seq >= 1 and q_heads % kv_heads == 0, got seq {s}, heads {hq} / {hk}")
    if not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"dilation must be an int >= 1, got {dilation!r}")
    if not isinstance(global_tokens, int) or global_tokens < 0:
        raise ValueError(f"global_tokens must be an int >= 0, got {global_tokens!r}")
    if dilation > 1 and global_tokens:
        raise NotImplementedError("dilation together with global tokens is not supported")
    if scale is not None and not (isinstance(scale, float | int) and scale > 0):
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    if not all(on_gpu(x) for x in (q, k, v)) or len({x.device for x in (q, k, v)}) != 1:
        raise ValueError("q, k, v must be on one CUDA device")


def class_len(seq_len: int, r, dilation: int):
    """Positions r, r + d, r + 2d, ... below seq_len: how many (the kernel's formula)."""
    return (seq_len - r + dilation - 1) // dilation


def to_classes(x: torch.Tensor, dilation: int) -> torch.Tensor:
    """(B, S, H, D) -> (B, ceil(S / d), d * H, D): head r * H + h holds positions
    r, r + d, ... of head h. A view when d divides S; otherwise S is padded
    (a copy) and the kernel hides the padding via ``class_len``."""
    if dilation == 1:  # no view either: each op is a node the backward walks
        return x
    b, s, h, d = x.shape
    pad = (-s) % dilation
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad))
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


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | tuple[int, int] | torch.Tensor,
    *,
    causal: bool = False,
    dilation: int = 1,
    global_tokens: int = 0,
    scale: float | None = None,
    return_lse: bool = False,
    layout: str = "bshd",
):
    """Forward sliding-window attention.

    Args:
        q: (batch, seq, q_heads, head_dim); k, v: (batch, seq, kv_heads, head_dim),
            float16 or bfloat16, CUDA. ``layout="bhsd"`` takes (batch, heads, seq,
            head_dim) instead (transposed to bshd; non-contiguous inputs are
            copied to contiguous ones first).
        window: W (|i - j| <= W) or (left, right); >= seq is full attention. An
            int tensor (or a pair of them) is an adaptive window, one per head
            (shape (q_heads, 1)), per query ((seq,)) or both ((q_heads, seq)).
        causal: right = 0. dilation: keys i + k * d, -left <= k <= right.
        global_tokens: the first G positions attend to, and are attended by, all.
        scale: softmax scale, default 1 / sqrt(head_dim).
        return_lse: also return the log-sum-exp (batch, q_heads, seq), float32, natural log.
    Returns:
        out (same layout as q), and lse if ``return_lse``.
    """
    if layout not in ("bshd", "bhsd"):
        raise ValueError(f"layout must be 'bshd' or 'bhsd', got {layout!r}")
    if layout == "bhsd":
        q, k, v = (x.transpose(1, 2) if isinstance(x, torch.Tensor) else x for x in (q, k, v))
    _check(q, k, v, dilation, global_tokens, scale)
    b, s, hq, d = q.shape
    adaptive = is_adaptive(window)
    if adaptive:
        row_windows = adaptive_windows(window, causal, hq, s, q.device)
        left = right = 0  # the kernel reads the rows' windows instead
    else:
        left, right = normalize_window(window, causal, s)
    if scale is not None:  # the kernel applies 1/sqrt(d): fold the ratio into q
        q = q * (scale * math.sqrt(d))
    q, k, v = (x.contiguous() for x in (q, k, v))  # a no-op for contiguous inputs
    import ops  # the differentiable path: custom ops + autograd (ops.py imports this module)

    out, lse = ops.attention(q, k, v, left, right, dilation, global_tokens, row_windows if adaptive else None)
    if layout == "bhsd":
        out = out.transpose(1, 2)
    return (out, lse) if return_lse else out


def attention_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, left: int, right: int):
    """One block of a blocked or distributed computation: query block q (batch, Sq,
    q_heads, D) against key block k, v (batch, Sk, kv_heads, D), where local query i
    sees local key j iff -left <= j - i <= right. The caller folds the blocks'
    global offsets into (left, right), which may then be negative or exceed the
    block. Returns (out in q's dtype, lse (batch, q_heads, Sq) float32, natural
    log); a row that sees no key gets out 0 and lse -inf. CUDA only; the
    default softmax scale (scale q beforehand for another)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not on_gpu(x):
            raise ValueError(f"{name} must be a 4-D CUDA tensor (batch, seq, heads, head_dim)")
    if q.dtype not in DTYPES or not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must all be float16 or all bfloat16, got {q.dtype}, {k.dtype}, {v.dtype}")
    (b, sq, hq, d), (bk, sk, hk, dk) = q.shape, k.shape
    if k.shape != v.shape or b != bk or d != dk or d not in HEAD_DIMS or hq % hk:
        raise ValueError(f"incompatible blocks: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    span = sq + sk  # beyond this a window is all or nothing; keeps the kernel's int32 sums small
    left, right = max(min(left, span), -span), max(min(right, span), -span)
    q, k, v = (x.contiguous() for x in (q, k, v))
    out = torch.empty_like(q)
    lse = torch.empty(b, hq, sq, device=q.device, dtype=torch.float32)
    win, kt = _placeholders(q.device)
    kernel = compiled_forward(d, DTYPES[q.dtype], cuda_arch(q.device), None, "window")
    kernel(q, k, v, out, lse, win, kt, left, right, 0, hq, hk, sk, 1)
    return out, lse


def dense_mask(seq_len: int, left: int, right: int, dilation: int = 1, global_tokens: int = 0, device=None):
    """The window as a (seq, seq) boolean matrix, for the CPU path of the module
    (the tests check it against reference.local_mask)."""
    offset = torch.arange(seq_len, device=device)[None, :] - torch.arange(seq_len, device=device)[:, None]
    local = (offset >= -left * dilation) & (offset <= right * dilation) & (offset % dilation == 0)
    idx = torch.arange(seq_len, device=device)
    return local | (idx[:, None] < global_tokens) | (idx[None, :] < global_tokens)


class SlidingWindowAttention(torch.nn.Module):
    """Attention layer in the shape of Llama's (q/k/v/o projections, no rotary
    embedding), with the sliding window of ``sliding_window_attention``.

    Input and output (batch, seq, hidden_size). On CUDA with float16/bfloat16 and
    a supported head_dim it runs the TileLang kernel (differentiable); otherwise
    PyTorch's SDPA with the same window as a dense mask (K/V heads repeated
    there: it is the slow path). ``impl`` forces one ("kernel" or "sdpa", the
    reference of the training comparison). ``num_kv_heads < num_heads`` is
    grouped-query attention.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        window: int | tuple[int, int] = 128,
        causal: bool = True,
        dilation: int = 1,
        global_tokens: int = 0,
        bias: bool = False,
        impl: str = "auto",
    ):
        super().__init__()
        if impl not in ("auto", "kernel", "sdpa"):
            raise ValueError(f"impl must be 'auto', 'kernel' or 'sdpa', got {impl!r}")
        self.impl = impl
        num_kv_heads = num_kv_heads or num_heads
        if hidden_size % num_heads or num_heads % num_kv_heads:
            raise ValueError("need hidden_size % num_heads == 0 and num_heads % num_kv_heads == 0")
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
        opts = dict(causal=self.causal, dilation=self.dilation, global_tokens=self.global_tokens)
        use_kernel = x.is_cuda and q.dtype in DTYPES and self.head_dim in HEAD_DIMS
        if self.impl == "kernel" and not use_kernel:
            raise ValueError("impl='kernel' needs CUDA float16/bfloat16 activations and head_dim 64 or 128")
        if use_kernel and self.impl != "sdpa":
            o = sliding_window_attention(q, k, v, self.window, **opts)
        else:
            left, right = normalize_window(self.window, self.causal, s)
            mask = dense_mask(s, left, right, self.dilation, self.global_tokens, device=x.device)
            group = self.num_heads // self.num_kv_heads
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
            kt, vt = kt.repeat_interleave(group, dim=1), vt.repeat_interleave(group, dim=1)
            o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask).transpose(1, 2)
        return self.o_proj(o.reshape(b, s, self.num_heads * self.head_dim))


GroupedQueryAttention = SlidingWindowAttention  # the same layer; GQA when num_kv_heads < num_heads
