"""Experiment (issue 8): the D = 128 forward with FA3's intra-warpgroup overlap,
on a hand-written TMA/mbarrier pipeline.

    python scripts/probe_overlap_d128.py            # on a GPU: check against swattn, then time both
    python scripts/probe_overlap_d128.py --compile  # anywhere: build for sm_90a only

Why: at D = 128 the forward is compute-bound and FlashAttention-4 leads
(943 vs 1124 us at (4,16,16,8192,128, W 1024)) by overlapping each key
tile's softmax with the tensor cores. Session 5 tried that inside
T.Pipelined (commit 1416b64): correct but slower, because TileLang releases a
K/V stage as soon as the asynchronous GEMM that reads it is issued, and the
workaround (a copy of the V tile per step) cost more than the overlap won.
Here the pipeline is written by hand (as in scripts/probe_resident_kv.py), so
a stage is released only once the P V GEMM reading it has finished:

    warpgroup 0   producer: K and V tiles of the query tile's window into a
                  two-stage ring (TMA, full/empty mbarriers)
    warpgroups    consumers, 64 query rows each of a 128-row tile, both on
    1, 2          the same key tiles. Per key tile j >= 1:
                    issue S_j = Q K_j^T            (async wgmma)
                    issue O += P_{j-1} V_{j-1}     (async wgmma)
                    wait for S_j; softmax statistics of S_j (overlaps P V)
                    wait for P V; release stage j-1; O *= alpha_j; P_j = exp(S_j)
                  then the last P V, and the epilogue.

Window: query i sees key j iff -left <= j - i <= right (the repository's one
definition); no dilation or global tokens. GQA by q_heads // kv_heads. Not
wired into the op until it is correct and faster on the GPU.
"""

import argparse
import functools
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tilelang.language as T  # noqa: E402
import ws_common  # noqa: E402
from sweep_common import bench_shapes, compare_experiment  # noqa: E402

import swattn  # noqa: E402

ROWS, BLOCK_N, STAGES = 64, 128, 2  # rows per consumer warpgroup, keys per tile, ring depth


@functools.cache
def make_overlap_forward(head_dim: int = 128, dtype: str = "float16", overlap: bool = True):
    """``overlap=False``: the same pipeline with each step's GEMMs waited for
    before the softmax (it separates the cost of the hand-written pipeline from
    that of the overlap itself)."""
    accum = "float32"
    block_m = 2 * ROWS  # the CTA's query tile: two consumer warpgroups
    regs = swattn.consumer_regs(256, 1)  # 240: one CTA per SM
    batch, seq_len = T.dynamic("batch"), T.dynamic("seq_len")
    q_heads, kv_heads = T.dynamic("q_heads"), T.dynamic("kv_heads")
    scale_log2 = swattn.LOG2E / math.sqrt(head_dim)

    @T.macro
    def consumer(Q, O, LSE, k_ring, v_ring, full, empty, b, qh, q0, lo, n, left, right, *state):
        """One consumer warpgroup's 64 rows; ``state``: ws_common.consumer_state."""
        q_s, s, p, acc, m, m_prev, m_tile, m_safe, alpha, l, l_tile, row_first, row_count = state
        ws_common.start_query_tile(Q, q_s, acc, l, m, row_first, row_count, b, q0, qh, seq_len, left, right)
        if n > 0:
            T.mbarrier_wait_parity(full[0], 0)
            ws_common.scores_init(s, q0, lo * BLOCK_N, row_first, row_count, seq_len, left, right)
            T.gemm(q_s, k_ring[0, :, :], s, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
            swattn.softmax_scores(s, m, m_prev, m_tile, m_safe, alpha, l, l_tile, scale_log2)
            T.copy(s, p)  # acc is still 0: nothing to rescale
            for j in T.serial(n - 1):
                it = j + 1
                T.mbarrier_wait_parity(full[it % STAGES], (it // STAGES) % 2)
                ws_common.scores_init(s, q0, (lo + it) * BLOCK_N, row_first, row_count, seq_len, left, right)
                T.wgmma_gemm(q_s, k_ring[it % STAGES, :, :], s, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                T.wgmma_gemm(p, v_ring[j % STAGES, :, :], acc, policy=T.GemmWarpPolicy.FullRow)
                T.wait_wgmma(1 if overlap else 0)  # S_it is ready; P_j V_j may still run
                swattn.softmax_scores(s, m, m_prev, m_tile, m_safe, alpha, l, l_tile, scale_log2)
                T.wait_wgmma(0)  # P_j V_j done: stage j is free, p and acc may change
                T.mbarrier_arrive(empty[j % STAGES])
                for i, d in T.Parallel(ROWS, head_dim):
                    acc[i, d] *= alpha[i]
                T.copy(s, p)
            T.gemm(p, v_ring[(n - 1) % STAGES, :, :], acc, policy=T.GemmWarpPolicy.FullRow)
            T.mbarrier_arrive(empty[(n - 1) % STAGES])
        swattn.write_rows(O, LSE, acc, l, m_safe, b, q0, qh, seq_len, scale_log2)

    @T.prim_func
    def forward(
        Q: T.Tensor((batch, seq_len, q_heads, head_dim), dtype),
        K: T.Tensor((batch, seq_len, kv_heads, head_dim), dtype),
        V: T.Tensor((batch, seq_len, kv_heads, head_dim), dtype),
        O: T.Tensor((batch, seq_len, q_heads, head_dim), dtype),
        LSE: T.Tensor((batch, q_heads, seq_len), accum),
        left: T.int32,
        right: T.int32,
    ):
        with T.Kernel(T.ceildiv(seq_len, block_m), q_heads, batch, threads=384) as (bx, qh, b):
            T.annotate_min_blocks_per_sm(1)
            k_ring = T.alloc_shared((STAGES, BLOCK_N, head_dim), dtype)
            v_ring = T.alloc_shared((STAGES, BLOCK_N, head_dim), dtype)
            full = T.alloc_barrier([128] * STAGES)  # the producer warpgroup's arrivals (+ the TMA bytes)
            empty = T.alloc_barrier([256] * STAGES)  # both consumer warpgroups, once each per tile
            tx = T.get_thread_binding()
            kvh = qh // (q_heads // kv_heads)
            _, lo, hi = swattn.key_tile_schedule(bx, seq_len, left, right, 0, block_m, BLOCK_N, T.max, T.min)
            n = hi - lo
            frags0, frags1 = (ws_common.consumer_state(ROWS, BLOCK_N, head_dim, dtype) for _ in range(2))
            shared = (Q, O, LSE, k_ring, v_ring, full, empty, b, qh)  # both consumers' common arguments
            if tx < 128:
                T.set_max_nreg(24, 0)
                for it in T.serial(n):
                    if it >= STAGES:
                        T.mbarrier_wait_parity(empty[it % STAGES], (it // STAGES - 1) % 2)
                    k0 = (lo + it) * BLOCK_N
                    T.tma_copy(K[b, k0 : k0 + BLOCK_N, kvh, :], k_ring[it % STAGES, :, :], barrier=full[it % STAGES])
                    T.tma_copy(V[b, k0 : k0 + BLOCK_N, kvh, :], v_ring[it % STAGES, :, :], barrier=full[it % STAGES])
                    T.mbarrier_arrive(full[it % STAGES])
            elif tx < 256:
                T.set_max_nreg(regs, 1)
                consumer(*shared, bx * block_m, lo, n, left, right, *frags0)
            else:
                T.set_max_nreg(regs, 1)
                consumer(*shared, bx * block_m + ROWS, lo, n, left, right, *frags1)

    return forward


def build(arch: str = "sm_90a", **kw):
    return ws_common.compile_kernel(make_overlap_forward(**kw), arch)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--compile", action="store_true", help="only build for sm_90a (no GPU needed)")
    p.add_argument("--no-overlap", action="store_true", help="also time the pipeline with the overlap off")
    args = p.parse_args()
    kerns = {"overlap 128x128": build()}
    if args.no_overlap:
        kerns["same pipeline, no overlap"] = build(overlap=False)
    if args.compile:
        for name, kern in kerns.items():
            print(f"built {name};", len(kern.get_kernel_source()), "chars of CUDA")
        return
    ragged = dict(batch=2, seq=1000, q_heads=4, kv_heads=2, head_dim=128, left=300, right=0)  # GQA, causal-like
    for sh in [ragged, *bench_shapes([3, 4])]:  # then the D = 128 bench shapes
        for name, kern in kerns.items():
            compare_experiment(sh, kern, name)


if __name__ == "__main__":
    main()
