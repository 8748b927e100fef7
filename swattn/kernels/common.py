"""Device-side pieces shared by the TileLang kernels: the rows' key ranges and
the per-element mask, the online-softmax step, the epilogue, and the register
split of warp-specialised CTAs.

Units: the kernels keep raw scores s = q . k and exponentiate
exp2(s * scale_log2 - m * scale_log2) with scale_log2 = softmax_scale * log2(e)
folded into one multiply-add; lse leaves the kernel in natural-log units.
"""

# No `from __future__ import annotations`: TileLang evaluates the macros' annotations.
import tilelang.language as T
import tvm.tirx as tir  # tvm ships inside tilelang; importable once tilelang is

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


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
def write_rows(O, LSE, acc, l, m_safe, b, row0, qh, seq_len, scale_log2, base=0):
    """The epilogue: rows row0 .. row0 + len(l) - 1 (those below seq_len) of O
    (acc / l; 0 for a row that saw no key) and LSE (natural log; -inf there),
    at O[b, base + row] (``base``: a packed sequence's first row)."""
    rows, dim = acc.shape[0], acc.shape[1]
    for i, j in T.Parallel(rows, dim):
        if row0 + i < seq_len:
            O[b, base + row0 + i, qh, j] = T.if_then_else(l[i] > 0, acc[i, j] / l[i], 0)
    for i in T.Parallel(rows):
        if row0 + i < seq_len:
            # lse in natural-log units: (m * scale_log2 + log2 l) * ln 2.
            LSE[b, qh, base + row0 + i] = T.if_then_else(
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
