"""Experiment (issue 2): the assignment kernel with each query tile's key tiles
split over the warpgroups of one CTA.

    python scripts/probe_assignment_split.py            # on a GPU: check and time against solution.py
    python scripts/probe_assignment_split.py --compile  # anywhere: build for sm_90a only

Why: at the card's sizes (one head, 512-2048 tokens, 8-32 query tiles) the
kernel is a latency chain, not a throughput problem: ~2.5 us of launch, Q
load and O store, then ~0.7 us per key tile walked one after another (load,
Q K^T, softmax, P V); the 5 tiles of a W = 128 window make 5.6 us at 2048
against 12.6 us for the fastest full attention (2.25x; the seed's target is
3.2x, and 1.7x / 2.5x at 512 / 1024). Session 5 split the key tiles over a
thread-block cluster (DSMEM merge, commit d0baf77): the cluster launch and
barriers cost more than they saved. Here the split stays inside one CTA: one
consumer warpgroup per key tile (5 x 128 threads), every K/V tile's TMA load
issued at once (each warpgroup its own, against its own mbarrier), each
warpgroup one Q K^T, softmax and P V, its partial (acc, row max, row sum) to
shared memory, one CTA barrier, and an exact log-sum-exp merge by all
threads. The chain becomes one tile long: predicted ~2.5 + 0.7 + ~0.3 us.

Window: |i - j| <= window (the card's); solution.kv_tile_range gives the key
tiles, so the tested helper is the one this kernel runs. Static shapes as in
solution.py. ``groups`` < tiles: a warpgroup walks several tiles (online
softmax), for when 640-thread CTAs cost more than they save.
"""

import argparse
import functools
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tilelang.language as T  # noqa: E402
import tvm.tirx as tir  # noqa: E402
import ws_common  # noqa: E402

import solution  # noqa: E402
import swattn  # noqa: E402

BLOCK = 64


def tiles_needed(seq_len: int, window: int) -> int:
    """The most key tiles any query tile visits (one warpgroup each)."""
    n_qt = -(-seq_len // BLOCK)
    return max(hi - lo for lo, hi in (solution.kv_tile_range(t, seq_len, window, BLOCK, BLOCK) for t in range(n_qt)))


def make_split_kernel(seq_len: int, head_dim: int, window: int, groups: int | None = None, dtype: str = "float16"):
    """``groups`` consumer warpgroups (default: one per key tile); warpgroup g
    takes key tiles g, g + groups, ... of the query tile's window, in order,
    with the online softmax."""
    window = solution.effective_window(window, seq_len)
    tiles = tiles_needed(seq_len, window)
    groups = groups or tiles
    if not 2 <= groups <= min(tiles, 5):  # the branches below: two to five warpgroups
        raise ValueError(f"window {window} spans {tiles} key tiles; groups must be 2 .. min(that, 5), got {groups}")
    per = -(-tiles // groups)  # key tiles per warpgroup, at most
    accum = "float32"
    scale = solution.LOG2E / math.sqrt(head_dim)
    neg_inf = -T.infinity(accum)

    def visible(qi, kj):
        return tir.all(kj >= qi - window, kj <= qi + window, kj < seq_len)

    def fragments():
        return (
            T.alloc_fragment((BLOCK, BLOCK), accum),
            T.alloc_fragment((BLOCK, BLOCK), dtype),
            T.alloc_fragment((BLOCK, head_dim), accum),
            *(T.alloc_fragment((BLOCK,), accum) for _ in range(7)),
        )

    def merged_max(m_part, i):
        """max over the warpgroups' row maxima (a TIR expression)."""
        return functools.reduce(T.max, [m_part[g, i] for g in range(groups)])

    def weighted_sum(part, m_part, big, *idx):
        """sum over warpgroups g of 2^((m_g - big) scale) * part[g, idx] (a TIR expression)."""
        return sum(T.exp2(m_part[g, idx[0]] * scale - big * scale) * part[(g, *idx)] for g in range(groups))

    @T.macro
    def warpgroup(Q, K, V, q_s, k_s, v_s, kv_bar, q_bar, o_part, m_part, l_part, bx, lo, hi, g, *state):
        """Warpgroup g: its key tiles' loads issued at once, then the online softmax
        over them; its partial (acc, row max, row sum) into shared memory."""
        s, p, acc, m, m_prev, m_tile, m_safe, alpha, l, l_tile = state
        for u in T.unroll(per):
            slot = g + u * groups  # the window's slot-th key tile, in its own buffer and barrier
            if slot < tiles and lo + slot < hi:
                kt = lo + slot
                T.tma_copy(K[kt * BLOCK : (kt + 1) * BLOCK, :], k_s[slot, :, :], barrier=kv_bar[slot])
                T.tma_copy(V[kt * BLOCK : (kt + 1) * BLOCK, :], v_s[slot, :, :], barrier=kv_bar[slot])
                T.mbarrier_arrive(kv_bar[slot])
        if g == 0:
            T.tma_copy(Q[bx * BLOCK : (bx + 1) * BLOCK, :], q_s, barrier=q_bar[0])
            T.mbarrier_arrive(q_bar[0])
        T.fill(acc, 0)
        T.fill(l, 0)
        T.fill(m, neg_inf)
        for u in T.unroll(per):
            slot = g + u * groups
            if slot < tiles and lo + slot < hi:
                kt = lo + slot
                for i, j in T.Parallel(BLOCK, BLOCK):
                    s[i, j] = T.if_then_else(visible(bx * BLOCK + i, kt * BLOCK + j), 0, neg_inf)
                T.mbarrier_wait_parity(q_bar[0], 0)
                T.mbarrier_wait_parity(kv_bar[slot], 0)
                T.gemm(q_s, k_s[slot, :, :], s, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                swattn.softmax_step(s, p, acc, m, m_prev, m_tile, m_safe, alpha, l, l_tile, scale)
                T.gemm(p, v_s[slot, :, :], acc, policy=T.GemmWarpPolicy.FullRow)
        T.copy(acc, o_part[g, :, :])
        for i in T.Parallel(BLOCK):
            m_part[g, i] = m[i]
            l_part[g, i] = l[i]

    @T.prim_func
    def split_attention(
        Q: T.Tensor((seq_len, head_dim), dtype),
        K: T.Tensor((seq_len, head_dim), dtype),
        V: T.Tensor((seq_len, head_dim), dtype),
        O: T.Tensor((seq_len, head_dim), accum),
    ):
        with T.Kernel(T.ceildiv(seq_len, BLOCK), threads=groups * 128) as bx:
            q_s = T.alloc_shared((BLOCK, head_dim), dtype)
            k_s = T.alloc_shared((tiles, BLOCK, head_dim), dtype)
            v_s = T.alloc_shared((tiles, BLOCK, head_dim), dtype)
            o_part = T.alloc_shared((groups, BLOCK, head_dim), accum)
            m_part = T.alloc_shared((groups, BLOCK), accum)
            l_part = T.alloc_shared((groups, BLOCK), accum)
            row_max = T.alloc_shared((BLOCK,), accum)
            row_den = T.alloc_shared((BLOCK,), accum)
            q_bar = T.alloc_barrier([128])  # warpgroup 0 issues Q and arrives
            kv_bar = T.alloc_barrier([128] * tiles)  # one per key tile, for the warpgroup that loads it
            tx = T.get_thread_binding()
            lo, hi = solution.kv_tile_range(bx, seq_len, window, BLOCK, BLOCK, T.max, T.min)
            args = (Q, K, V, q_s, k_s, v_s, kv_bar, q_bar, o_part, m_part, l_part, bx, lo, hi)
            # One branch per warpgroup (Python-level ifs on the static group count):
            # TileLang lays each branch's fragments over its own 128 threads.
            if tx < 128:
                warpgroup(*args, 0, *fragments())
            elif tx < 256:
                warpgroup(*args, 1, *fragments())
            elif tx < 384:
                if groups > 2:
                    warpgroup(*args, 2, *fragments())
            elif tx < 512:
                if groups > 3:
                    warpgroup(*args, 3, *fragments())
            elif groups > 4:
                warpgroup(*args, 4, *fragments())
            # The exact merge: O = sum_g 2^((m_g - M) scale) acc_g / sum_g 2^((m_g - M) scale) l_g,
            # M = max_g m_g (0 for a row that saw no key).
            for i in T.Parallel(BLOCK):
                big = merged_max(m_part, i)
                row_max[i] = T.if_then_else(big == neg_inf, 0, big)
            for i in T.Parallel(BLOCK):
                row_den[i] = weighted_sum(l_part, m_part, row_max[i], i)
            for i, j in T.Parallel(BLOCK, head_dim):
                if bx * BLOCK + i < seq_len:
                    num = weighted_sum(o_part, m_part, row_max[i], i, j)
                    O[bx * BLOCK + i, j] = T.if_then_else(row_den[i] > 0, num / row_den[i], 0)

    return split_attention


def build(seq_len: int = 2048, window: int = 128, groups: int | None = None, arch: str = "sm_90a"):
    return ws_common.compile_kernel(make_split_kernel(seq_len, 64, window, groups), arch)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--compile", action="store_true", help="only build for sm_90a (no GPU needed)")
    p.add_argument("--groups", type=int, nargs="*", default=[5, 3], help="consumer warpgroups per CTA")
    args = p.parse_args()
    if args.compile:
        for groups in args.groups:
            print(f"built, {groups} warpgroups;", len(build(groups=groups).get_kernel_source()), "chars of CUDA")
        return
    import torch

    import bench
    import reference as ref

    peaks = bench.card_peaks()
    print("| seq | kernel | kernel us | rel err | x fastest full |\n|---:|---|---:|---:|---:|")
    for seq in (512, 1024, 2048):
        sets = bench.input_sets(seq, 64, torch.float16)
        q, k, v = sets[0]
        want = ref.sliding_window_attention_ref(q, k, v, 128)
        impls = {"solution.py": (bench.tilelang_impl(128, "assignment"), 128, False)}
        for groups in args.groups:
            kern = build(seq, groups=groups)
            poisoned = torch.full(q.shape, float("nan"), device=q.device)  # unwritten elements fail
            kern(q, k, v, poisoned)
            err = ref.rel_err(poisoned, want)
            print(f"| {seq} | split, {groups} warpgroups, output poisoned first | - | {err:.1e} | - |")

            def split(q, k, v, kern=kern):
                out = torch.empty(q.shape, device=q.device)  # no fill kernel inside the timed graph
                kern(q, k, v, out)
                return out

            impls[f"split, {groups} warpgroups"] = (split, 128, False)
        impls["SDPA flash full"] = (bench.sdpa_flash, None, True)
        impls["tilelang full (W>=S)"] = (bench.tilelang_impl(None, "assignment"), None, True)
        rows = {name: bench.measure_impl(name, fn, w, full, sets, peaks) for name, (fn, w, full) in impls.items()}
        fastest = min(r["kernel_us"] for r in rows.values() if r["attention"] == "full")
        for name, r in rows.items():
            print(f"| {seq} | {name} | {r['kernel_us']:.2f} | {r['rel_err']:.1e} | {fastest / r['kernel_us']:.2f} |")


if __name__ == "__main__":
    main()
