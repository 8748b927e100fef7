"""Experiment (issue 8): a forward whose CTA keeps the sliding window's K/V tiles resident.

    python scripts/probe_resident_kv.py            # on a GPU: check against swattn, then time both
    python scripts/probe_resident_kv.py --compile  # anywhere: build for sm_90a only

Why: with its K/V loads deleted, the shipped D = 64 forward drops from 178 to
130 us at (4,16,16,8192,64, W 128) (results/gpu_s6/resident.log): every
64-row query tile reloads the 5 K/V tiles of its window. Here one CTA walks
``chunk`` consecutive query tiles of one head, and each K/V tile is loaded
once per CTA into a ring of ``ring`` shared-memory slots (tile r of the CTA's
key range lives in slot r % ring), by a producer warpgroup with TMA and
mbarriers written out by hand (TileLang's T.Pipelined multi-versions whole
buffers per iteration, which a ring cannot use):

    warpgroup 0   producer: for each key tile r: wait until slot r % ring is
                  free (both consumers released tile r - ring), TMA K and V
                  into it, arrive on full[slot]
    warpgroups    consumers: consumer w takes the CTA's query tiles
    1, 2          t0 + w, t0 + w + 2, ...; for each, loads its Q tile, walks
                  the window's key tiles (wait full[slot] at the tile's
                  phase), the online softmax of the shipped kernel; after a
                  query tile it releases (arrives on empty[slot]) every key
                  tile below the window of its next query tile

A consumer arrives for a tile only after it has seen the tile's fill (else a
consumer running ahead could complete the slot's previous phase while the
other still reads it: tests/test_experiments.py models the protocol and
finds that race without the wait). A slot is refilled only after both
consumers released its tile, so the ring must hold the key tiles of two
consecutive query tiles:
ceil(left / 64) + floor((right + 63) / 64) + 2 <= ring (6 at W = 128). Both
consumers walk their window in key order, so the newest tile is needed last:
its load overlaps the compute over the tiles already resident.

Window: query i sees key j iff -left <= j - i <= right (the repository's one
definition), left, right >= 0; no dilation or global tokens. D = 64, 64-row
tiles, GQA by q_heads // kv_heads. Not wired into the op: it first has to be
correct and faster on the GPU (this script says which).
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

BLOCK = 64


def key_tiles(t, left, right, seq_len, maximum=max, minimum=min):
    """Key tiles [lo, hi) that query tile t's window reaches: the op's own
    ``swattn.key_tile_schedule`` (the kernel's with T.max/T.min, the protocol
    model's with Python's)."""
    return swattn.key_tile_schedule(t, seq_len, left, right, 0, BLOCK, BLOCK, maximum, minimum)[1:]


def released_after(t, t1, left, right, seq_len, ktlo, n_kt, maximum=max, minimum=min, select=None):
    """After query tile t a consumer has released every key tile (relative to the
    CTA's first, ktlo) below the window of its next query tile t + 2, or all
    n_kt once t was its last."""
    nxt = key_tiles(t + 2, left, right, seq_len, maximum, minimum)[0] - ktlo
    if select is None:
        return nxt if t + 2 < t1 else n_kt
    return select(t + 2 < t1, nxt, n_kt)


def ring_fits(left: int, right: int, ring: int) -> bool:
    """The key tiles of two consecutive query tiles fit the ring (else the producer deadlocks)."""
    return -(-left // BLOCK) + (right + BLOCK - 1) // BLOCK + 2 <= ring


@functools.cache
def make_resident_forward(head_dim: int = 64, dtype: str = "float16", ring: int = 6, chunk: int = 16):
    accum = "float32"
    bm = bn = BLOCK
    regs = swattn.consumer_regs(256, 2)  # two consumer warpgroups, two CTAs per SM: 104
    batch, seq_len = T.dynamic("batch"), T.dynamic("seq_len")
    q_heads, kv_heads = T.dynamic("q_heads"), T.dynamic("kv_heads")
    scale_log2 = swattn.LOG2E / math.sqrt(head_dim)

    def lo_tile(t, left):
        return key_tiles(t, left, 0, seq_len, T.max, T.min)[0]

    def hi_tile(t, right):  # exclusive
        return key_tiles(t, 0, right, seq_len, T.max, T.min)[1]

    @T.macro
    def consumer(Q, O, LSE, k_ring, v_ring, full, empty, b, qh, t0, t1, ktlo, n_kt, left, right, w, *state):
        """Consumer warpgroup w; ``state``: ws_common.consumer_state and the released-tile counter."""
        q_s, s, p, acc, m, m_prev, m_tile, m_safe, alpha, l, l_tile, row_first, row_count, done = state
        done[0] = 0  # key tiles (relative to ktlo) this warpgroup has released
        for j in T.serial(T.max(t1 - t0 - w + 1, 0) // 2):
            t = t0 + w + 2 * j
            ws_common.start_query_tile(Q, q_s, acc, l, m, row_first, row_count, b, t * bm, qh, seq_len, left, right)
            lo_t = lo_tile(t, left)
            for it in T.serial(hi_tile(t, right) - lo_t):
                r = lo_t + it - ktlo
                T.mbarrier_wait_parity(full[r % ring], (r // ring) % 2)
                ws_common.scores_init(s, t * bm, (lo_t + it) * bn, row_first, row_count, seq_len, left, right)
                T.gemm(q_s, k_ring[r % ring, :, :], s, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                swattn.softmax_step(s, p, acc, m, m_prev, m_tile, m_safe, alpha, l, l_tile, scale_log2)
                T.gemm(p, v_ring[r % ring, :, :], acc, policy=T.GemmWarpPolicy.FullRow)
            swattn.write_rows(O, LSE, acc, l, m_safe, b, t * bm, qh, seq_len, scale_log2)
            # release the key tiles below the window of this warpgroup's next query tile
            nxt = released_after(t, t1, left, right, seq_len, ktlo, n_kt, T.max, T.min, T.if_then_else)
            for r in T.serial(nxt - done[0]):
                # Arrive for a tile only once its fill is seen: releasing ahead (the
                # tiles past this window, at the end or for small windows) could
                # otherwise complete the slot's previous phase while the other
                # consumer still reads the tile there.
                T.mbarrier_wait_parity(full[(done[0] + r) % ring], ((done[0] + r) // ring) % 2)
                T.mbarrier_arrive(empty[(done[0] + r) % ring])
            done[0] = nxt

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
        with T.Kernel(T.ceildiv(T.ceildiv(seq_len, bm), chunk), q_heads, batch, threads=384) as (bx, qh, b):
            T.annotate_min_blocks_per_sm(2)
            k_ring = T.alloc_shared((ring, bn, head_dim), dtype)
            v_ring = T.alloc_shared((ring, bn, head_dim), dtype)
            full = T.alloc_barrier([128] * ring)  # the producer warpgroup's arrivals (+ the TMA bytes)
            empty = T.alloc_barrier([256] * ring)  # both consumer warpgroups' arrivals

            tx = T.get_thread_binding()
            n_qt = T.ceildiv(seq_len, bm)
            t0 = bx * chunk
            t1 = T.min(t0 + chunk, n_qt)
            kvh = qh // (q_heads // kv_heads)
            ktlo = lo_tile(t0, left)
            n_kt = hi_tile(t1 - 1, right) - ktlo  # key tiles this CTA loads, each once

            frags0, frags1 = (
                (*ws_common.consumer_state(bm, bn, head_dim, dtype), T.alloc_local((1,), "int32")) for _ in range(2)
            )

            if tx < 128:
                T.set_max_nreg(24, 0)
                for r in T.serial(n_kt):
                    if r >= ring:  # slot r % ring holds tile r - ring until both consumers release it
                        T.mbarrier_wait_parity(empty[r % ring], (r // ring - 1) % 2)
                    kt = ktlo + r
                    T.tma_copy(K[b, kt * bn : (kt + 1) * bn, kvh, :], k_ring[r % ring, :, :], barrier=full[r % ring])
                    T.tma_copy(V[b, kt * bn : (kt + 1) * bn, kvh, :], v_ring[r % ring, :, :], barrier=full[r % ring])
                    T.mbarrier_arrive(full[r % ring])
            elif tx < 256:
                T.set_max_nreg(regs, 1)
                consumer(Q, O, LSE, k_ring, v_ring, full, empty, b, qh, t0, t1, ktlo, n_kt, left, right, 0, *frags0)
            else:
                T.set_max_nreg(regs, 1)
                consumer(Q, O, LSE, k_ring, v_ring, full, empty, b, qh, t0, t1, ktlo, n_kt, left, right, 1, *frags1)

    return forward


def build(arch: str = "sm_90a", **kw):
    return ws_common.compile_kernel(make_resident_forward(**kw), arch)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--compile", action="store_true", help="only build for sm_90a (no GPU needed)")
    p.add_argument("--chunks", type=int, nargs="*", default=[8, 16, 32])
    args = p.parse_args()
    if args.compile:
        kern = build()
        print("built;", len(kern.get_kernel_source()), "chars of CUDA")
        return
    ragged = dict(batch=2, seq=1000, q_heads=4, kv_heads=2, head_dim=64, left=100, right=37)  # GQA, seq % 64 != 0
    for sh in [ragged, *bench_shapes([0, 1])]:  # then the W = 128, D = 64 bench shapes
        for chunk in args.chunks:
            compare_experiment(sh, build(chunk=chunk), f"resident, chunk {chunk}")


if __name__ == "__main__":
    main()
