"""What the hand-written-pipeline experiments (probe_resident_kv.py,
probe_overlap_d128.py, probe_assignment_split.py) share: their compile, a
consumer warpgroup's state, the start of a query tile and the masked score
tile. TileLang pieces, called inside their kernels."""

import tilelang
import tilelang.language as T

import swattn


def compile_kernel(fn, arch: str = "sm_90a"):
    """An experiment's prim_func compiled as the op's kernels are (fast math)."""
    return tilelang.compile(fn, target={"kind": "cuda", "arch": arch}, pass_configs={"tl.enable_fast_math": True})


def consumer_state(rows: int, cols: int, head_dim: int, dtype: str) -> tuple:
    """One consumer warpgroup's buffers, in the order the experiments' consumer
    macros take them: q_s (its Q rows, shared), s (scores), p (probabilities in
    q's dtype), acc, the seven per-row float32 vectors of ``swattn.softmax_step``
    (m, m_prev, m_tile, m_safe, alpha, l, l_tile) and the row ranges (first, count)."""
    return (
        T.alloc_shared((rows, head_dim), dtype),
        T.alloc_fragment((rows, cols), "float32"),
        T.alloc_fragment((rows, cols), dtype),
        T.alloc_fragment((rows, head_dim), "float32"),
        *(T.alloc_fragment((rows,), "float32") for _ in range(7)),
        T.alloc_fragment((rows,), "int32"),
        T.alloc_fragment((rows,), "int32"),
    )


@T.macro
def start_query_tile(Q, q_s, acc, l, m, row_first, row_count, b, q0, qh, seq_len, left, right):
    """Load the warpgroup's Q rows q0 .. q0 + rows - 1, clear the online-softmax
    state and compute each row's key range (``swattn.row_keys``: the mask is
    then one unsigned compare per element, ``swattn.row_sees``)."""
    rows = q_s.shape[0]
    T.copy(Q[b, q0 : q0 + rows, qh, :], q_s)
    T.fill(acc, 0)
    T.fill(l, 0)
    T.fill(m, -T.infinity("float32"))
    for i in T.Parallel(rows):
        first, count, _ = swattn.row_keys(q0 + i, seq_len, left, right, 0, None, T.max, T.min)
        row_first[i] = first
        row_count[i] = count


@T.macro
def scores_init(s, q0, k0, row_first, row_count, seq_len, left, right):
    """S before Q K^T accumulates into it, for query rows q0.. against key tile k0..:
    cleared when the tile lies inside every row's window (no per-element mask),
    else 0 where the key is seen and -inf where masked."""
    rows, cols = s.shape[0], s.shape[1]
    if swattn.tile_fully_visible(q0, k0, rows, cols, seq_len, left, right, 0, False):
        T.clear(s)
    else:
        for i, j in T.Parallel(rows, cols):
            seen = swattn.row_sees(k0 + j, row_first[i], row_count[i])
            s[i, j] = T.Select(seen, T.float32(0), -T.infinity("float32"))
