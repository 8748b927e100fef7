"""The assignment kernel with each query tile's key tiles spread over a cluster.

Why. At the card's shape (one head, seq 2048) solution.py launches 32 CTAs on a
132-SM card, and each walks 5 key tiles one after another: the time is one
CTA's serial chain (~2.5 us fixed + ~0.7 us per key tile, analysis.md), not
the card's throughput. Here the ``split`` CTAs of a thread-block cluster share
one query tile: CTA r takes key tiles lo + r, lo + r + split, ... (at W = 128
and split 5, one each), keeps its own online-softmax state (acc, m, l), and
pushes it into the leader's (rank 0) shared memory over the cluster's
distributed shared memory; the leader merges the partial softmaxes exactly,

    M = max_r m_r,  L = sum_r l_r 2^(m_r - M),  O = sum_r acc_r 2^(m_r - M) / L

(scores scaled by log2(e) / sqrt(d)), and stores O. The chain becomes one key
tile plus the exchange.

Same problem, window and layout as solution.py (query i sees key j iff
|i - j| <= window; Q, K, V (seq, d) half, O (seq, d) float32); its block range
``kv_tile_range`` is reused, so the tiles visited are the tested ones.
Hopper only (clusters and DSMEM are sm_90 features).
"""

from __future__ import annotations

import functools
import math

import tilelang
import tilelang.language as T
import torch
import tvm.tirx as tir

import solution
import swattn  # consumer_regs: the register split for two CTAs per SM

# st.shared::cluster to the same offset in the leader's (rank 0) shared memory.
STORE_REMOTE = r"""
__device__ __forceinline__ void store_remote(float* local, float value) {
  unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(local)), remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, 0;" : "=r"(remote) : "r"(addr));
  asm volatile("st.shared::cluster.f32 [%0], %1;" :: "r"(remote), "f"(value) : "memory");
}
"""


def make_split_kernel(
    seq_len: int,
    head_dim: int,
    window: int,
    split: int = 5,
    block_m: int = 64,
    block_n: int = 64,
    threads: int = 128,
    dtype: str = "float16",
):
    """Kernel factory (static shapes, as solution.make_kernel): ``split`` CTAs per
    query tile in one cluster, merged in the leader's shared memory."""
    window = solution.effective_window(window, seq_len)
    accum = "float32"
    scale = solution.LOG2E / math.sqrt(head_dim)
    neg_inf = -T.infinity(accum)
    n_q_tiles = (seq_len + block_m - 1) // block_m
    peers = max(split - 1, 1)  # receive slots in the leader (every CTA allocates them)

    def visible(qi, kj):
        return tir.all(kj >= qi - window, kj <= qi + window, kj < seq_len)

    @T.prim_func
    def split_attention(
        Q: T.Tensor((seq_len, head_dim), dtype),
        K: T.Tensor((seq_len, head_dim), dtype),
        V: T.Tensor((seq_len, head_dim), dtype),
        O: T.Tensor((seq_len, head_dim), accum),
    ):
        with T.Kernel(n_q_tiles * split, threads=threads, cluster_dims=(split, 1, 1), prelude=STORE_REMOTE) as bid:
            # Two CTAs per SM: at seq 2048 the 160 CTAs then run in one wave (at
            # TileLang's default 240 registers per consumer only one fits).
            T.annotate_min_blocks_per_sm(2)
            T.annotate_producer_reg_dealloc(24)
            T.annotate_consumer_reg_alloc(swattn.consumer_regs(threads, 2))
            qt = bid // split
            rank = bid % split  # the cluster is split consecutive CTAs along x
            q_s = T.alloc_shared((block_m, head_dim), dtype)
            k_s = T.alloc_shared((block_n, head_dim), dtype)
            v_s = T.alloc_shared((block_n, head_dim), dtype)
            # The leader receives every peer's (acc, m, l) in recv (all CTAs allocate it).
            recv = T.alloc_shared((peers, block_m, head_dim), accum)
            recv_ml = T.alloc_shared((peers, 2, block_m), accum)
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

            # DSMEM may be written only once the target CTA runs: arrive now, wait
            # before the first remote store (the work in between hides the barrier).
            T.cluster_arrive_relaxed()
            T.copy(Q[qt * block_m, 0], q_s)
            T.fill(acc, 0)
            T.fill(l, 0)
            T.fill(m, neg_inf)

            lo, hi = solution.kv_tile_range(qt, seq_len, window, block_m, block_n, T.max, T.min)
            n_mine = T.max(hi - lo - rank + split - 1, 0) // split
            for it in T.Pipelined(n_mine, num_stages=1):
                kt = lo + rank + it * split
                T.copy(K[kt * block_n, 0], k_s)
                for i, j in T.Parallel(block_m, block_n):
                    s[i, j] = T.if_then_else(visible(qt * block_m + i, kt * block_n + j), 0, neg_inf)
                T.gemm(q_s, k_s, s, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                T.copy(m, m_prev)
                T.reduce_max(s, m_tile, dim=1, clear=True)
                for i in T.Parallel(block_m):
                    m[i] = T.max(m_prev[i], m_tile[i])
                    m_safe[i] = T.if_then_else(m[i] == neg_inf, 0, m[i])
                    alpha[i] = T.exp2(m_prev[i] * scale - m_safe[i] * scale)
                for i, j in T.Parallel(block_m, block_n):
                    s[i, j] = T.exp2(s[i, j] * scale - m_safe[i] * scale)
                T.reduce_sum(s, l_tile, dim=1)
                for i in T.Parallel(block_m):
                    l[i] = l[i] * alpha[i] + l_tile[i]
                T.copy(s, p)
                for i, j in T.Parallel(block_m, head_dim):
                    acc[i, j] *= alpha[i]
                T.copy(V[kt * block_n, 0], v_s)
                T.gemm(p, v_s, acc, policy=T.GemmWarpPolicy.FullRow)

            T.cluster_wait()
            if rank > 0:
                # Straight from the registers into the leader's recv slot. (T.copy_cluster
                # stages through shared memory and syncs the CTA once per element.)
                for i, j in T.Parallel(block_m, head_dim):
                    T.evaluate(T.call_extern("void", "store_remote", T.address_of(recv[rank - 1, i, j]), acc[i, j]))
                for i in T.Parallel(block_m):
                    T.evaluate(T.call_extern("void", "store_remote", T.address_of(recv_ml[rank - 1, 0, i]), m[i]))
                    T.evaluate(T.call_extern("void", "store_remote", T.address_of(recv_ml[rank - 1, 1, i]), l[i]))
            # Release the peers' stores, acquire them in the leader.
            T.cluster_sync()
            if rank == 0:
                # Merge: M = max over the partials, each scaled by 2^(m_r - M).
                for i in T.Parallel(block_m):
                    m_tile[i] = m[i]
                    for r in T.serial(split - 1):
                        m_tile[i] = T.max(m_tile[i], recv_ml[r, 0, i])
                    m_safe[i] = T.if_then_else(m_tile[i] == neg_inf, 0, m_tile[i])
                    alpha[i] = T.exp2(m[i] * scale - m_safe[i] * scale)
                    l_tile[i] = l[i] * alpha[i]
                    for r in T.serial(split - 1):
                        l_tile[i] += recv_ml[r, 1, i] * T.exp2(recv_ml[r, 0, i] * scale - m_safe[i] * scale)
                for i, j in T.Parallel(block_m, head_dim):
                    acc[i, j] *= alpha[i]
                    for r in T.serial(split - 1):
                        acc[i, j] += recv[r, i, j] * T.exp2(recv_ml[r, 0, i] * scale - m_safe[i] * scale)
                for i, j in T.Parallel(block_m, head_dim):
                    if qt * block_m + i < seq_len:
                        O[qt * block_m + i, j] = T.if_then_else(l_tile[i] > 0, acc[i, j] / l_tile[i], 0)

    return split_attention


@functools.cache
def compiled_split(seq_len: int, head_dim: int, window: int, split: int, dtype: str = "float16"):
    """Compile once per static configuration (Hopper: clusters need sm_90)."""
    return tilelang.compile(
        make_split_kernel(seq_len, head_dim, solution.effective_window(window, seq_len), split, dtype=dtype),
        target={"kind": "cuda", "arch": "sm_90a"},
        pass_configs={"tl.enable_fast_math": True},
    )


def split_attention(q, k, v, window: int, split: int = 5, out: torch.Tensor | None = None) -> torch.Tensor:
    """solution.sliding_window_attention_forward's contract, key tiles over ``split`` CTAs:
    q, k, v (seq_len, head_dim) CUDA float16/bfloat16 -> (seq_len, head_dim) float32."""
    solution._check_inputs(q, k, v, window, out)
    if not isinstance(split, int) or not 1 <= split <= 8:
        raise ValueError(f"split must be an int in 1..8 (a portable cluster), got {split!r}")
    dtype = next(name for name, t in solution.DTYPES.items() if t == q.dtype)
    kernel = compiled_split(*q.shape, solution.effective_window(window, q.shape[0]), split, dtype)
    if out is None:
        out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    kernel(q, k, v, out)
    return out
