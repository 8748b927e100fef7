"""Split-KV decode without the combine kernel: check it, then time it against the shipped path (Hopper).

Why (issue 19, analysis.md 4.8): at batch 1, D 128, W 4096 a layer's decode call replays from a CUDA
graph in 16.3 us (18.0 with the append) against a goal of 15, while its K/V reads take 4 us at the
floor. The split count is not the lever (4-64 splits: 17.4-27.8 us); the fixed cost of each kernel
is (6.3-6.7 us for a decode kernel that reads two key tiles), and the split path is two dependent
kernels: split, then combine. This variant ("merged") drops the second: after a CTA has written its
partial it fences, and one consumer thread counts it with an acq_rel atomic on a per-row-tile
counter; the CTA that brings the count to num_splits merges every split's partial of its rows
(the combine's log-sum-exp, the sink added there) into the output and resets the counter, so the
next call, and a CUDA-graph replay, find it at 0 again.

How: ``merged_module`` is the repository's kernels/decode.py with exact textual edits applied at
run time (``kernel_variant.edited_module``; nothing on disk changes): ``make_decode`` gains
``merge`` and three arguments (CNT, the counters; OF, LSEF, the merged output and lse). TileLang
0.1.15 maps the edit's ``thread 0`` and ``T.sync_threads`` to the first consumer thread and a named
barrier of the consumer warpgroup (checked in the generated CUDA: ``tl::__sync_thread_partial(3,
128)``, the atomic ``AtomicAddRet(..., 1, 4)``). ``decode_merged`` is ``swattn.decode.decode``'s
split branch calling it; ``flash_attn_with_kvcache`` is pointed at it for the checks and timings.

Checks (GPU): ragged batches, GQA, 1-16 queries, windows, sinks, 3 / 7 / 32 splits: out and lse
against the shipped split path (the same partials, merged by the combine kernel) and against the
float64 oracle; each case called three times in a row (the counters reset) and replayed five times
from a CUDA graph with new lengths. A candidate that fails a check is not timed.

Timing: per shape, swattn's shipped call and the merged one, attention only and with the append,
at the heuristic's split count: us per call from a CUDA graph of R calls on rotating windows
(bench.kernel_us), and the replay of a graph holding one call (bench_decode.replay_us).

    PYTHONPATH=$PWD python tools/time_decode_merge.py --compile-only   # CPU: builds for sm_90a
    PYTHONPATH=$PWD python tools/time_decode_merge.py                  # GPU: check, then time
"""

import argparse
import functools
import inspect
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

# (old, new) on swattn/kernels/decode.py; each must match exactly once.
EDITS = (
    (
        "from .common import LN2, LOG2E, consumer_regs, row_keys, row_sees, softmax_step\n",
        "from .common import LN2, LOG2E, consumer_regs, row_keys, row_sees, softmax_step\n"
        "MERGE_SPLITS = 64  # swattn.decode.MAX_SPLITS\n",
    ),
    (
        '''    sinks: bool = False,
):
    """Kernel factory: windowed attention''',
        '''    sinks: bool = False,
    merge: bool = True,
):
    """Kernel factory: windowed attention''',
    ),
    (
        """    bt_rows, bt_cols, n_sink = T.dynamic("bt_rows"), T.dynamic("bt_cols"), T.dynamic("n_sink")""",
        """    bt_rows, bt_cols, n_sink = T.dynamic("bt_rows"), T.dynamic("bt_cols"), T.dynamic("n_sink")
    n_cnt = T.dynamic("n_cnt")""",
    ),
    (
        """        O: T.Tensor(out_shape, out_dtype),
        LSE: T.Tensor(lse_shape, accum),
""",
        """        O: T.Tensor(out_shape, out_dtype),
        LSE: T.Tensor(lse_shape, accum),
        CNT: T.Tensor((n_cnt,), "int32"),  # one counter per row tile, zero between calls
        OF: T.Tensor((batch, q_len, q_heads, head_dim), dtype),  # the merged output
        LSEF: T.Tensor((batch, q_heads, q_len), accum),  # the merged lse (natural log)
""",
    ),
    (
        """                        LSE[b, qh, i] = m_tile[r] * LN2
""",
        """                        LSE[b, qh, i] = m_tile[r] * LN2
            if merge and split:
                # Count this CTA's partial once every thread's stores are visible GPU-wide; the
                # last of the row tile's splits to arrive merges them all and resets the counter.
                last_s = T.alloc_shared((1,), "int32")
                lse_m = T.alloc_shared((MERGE_SPLITS,), accum)
                w_m = T.alloc_shared((MERGE_SPLITS,), accum)
                acc_m = T.alloc_fragment((head_dim,), accum)
                top = T.alloc_local((1,), accum)
                tot = T.alloc_local((1,), accum)
                lse2 = T.alloc_local((1,), accum)
                tx = T.get_thread_binding()
                cnt = (b * kv_heads + kvh) * m_tiles + mt
                T.call_extern("void", "__threadfence")
                T.sync_threads()
                if tx == 0:
                    prev = T.atomic_add(CNT[cnt], 1, memory_order="acq_rel", return_prev=True)
                    last_s[0] = T.if_then_else(prev == num_splits - 1, 1, 0)
                T.sync_threads()
                if last_s[0] == 1:
                    T.call_extern("void", "__threadfence")
                    # Only the tile's valid rows (4 at batch-1 decode of a 4-head group, not
                    # block_m), a thread per element of D; every split's partial of the row is
                    # loaded at once (64-way unrolled, predicated): the loads are L2 hits whose
                    # latency, paid once per split in series, cost ~1 ms in the first version.
                    for r in T.serial(T.min(block_m, rows - row0)):
                        i, qh = div(row0 + r, group), kvh * group + mod(row0 + r, group)
                        for s2 in T.Parallel(MERGE_SPLITS):
                            ls = LSE[T.min(s2, num_splits - 1), b, qh, i] * LOG2E
                            lse_m[s2] = T.if_then_else(s2 < num_splits, ls, neg_inf)
                        top[0] = neg_inf
                        for s2 in T.serial(num_splits):
                            top[0] = T.max(top[0], lse_m[s2])
                        if sinks:
                            top[0] = T.max(top[0], SINK[qh] * LOG2E)
                        top[0] = T.if_then_else(top[0] == neg_inf, 0, top[0])
                        tot[0] = 0
                        for s2 in T.serial(num_splits):
                            tot[0] += T.exp2(lse_m[s2] - top[0])
                        if sinks:
                            tot[0] += T.exp2(SINK[qh] * LOG2E - top[0])
                        lse2[0] = T.if_then_else(tot[0] > 0, top[0] + T.log2(tot[0]), neg_inf)
                        for s2 in T.Parallel(MERGE_SPLITS):
                            w_m[s2] = T.if_then_else(tot[0] > 0, T.exp2(lse_m[s2] - lse2[0]), 0)
                        T.fill(acc_m, 0)
                        for s2 in T.unroll(MERGE_SPLITS):
                            for d in T.Parallel(head_dim):
                                acc_m[d] += T.if_then_else(
                                    s2 < num_splits, w_m[s2] * O[T.min(s2, num_splits - 1), b, i, qh, d], 0
                                )
                        for d in T.Parallel(head_dim):
                            OF[b, i, qh, d] = acc_m[d]
                        LSEF[b, qh, i] = lse2[0] * LN2
                    if tx == 0:
                        CNT[cnt] = 0
""",
    ),
)
# The shipped combine kernel with its loop over the partials unrolled to max_splits, each load
# predicated: every split's partial in flight at once instead of one L2 round trip per split.
EDITS_COMBINE = (
    (
        """            for sp in T.serial(num_splits):
                for d in T.Parallel(head_dim):
                    acc[d] += w_s[sp] * OP[sp, b, i, h, d]
""",
        """            for sp in T.unroll(max_splits):
                for d in T.Parallel(head_dim):
                    acc[d] += T.if_then_else(sp < num_splits, w_s[sp] * OP[T.min(sp, num_splits - 1), b, i, h, d], 0)
""",
    ),
)
MAX_COUNTERS = 1 << 16  # batch x kv_heads x row tiles of one call; more: the shipped path


@functools.cache
def merged_module():
    from kernel_variant import edited_module

    from swattn.kernels import decode as kernels

    return edited_module(kernels, EDITS, "swattn.kernels._decode_merged")


@functools.cache
def unrolled_module():
    from kernel_variant import edited_module

    from swattn.kernels import decode as kernels

    return edited_module(kernels, EDITS_COMBINE, "swattn.kernels._decode_unrolled")


@functools.cache
def compiled_combine_unrolled(head_dim, dtype, arch, sinks):
    from swattn import decode as dec
    from swattn import launch

    return launch._compile(unrolled_module().make_combine(head_dim, dtype, sinks, dec.MAX_SPLITS), arch)


@functools.cache
def compiled_merged(head_dim, dtype, arch, tile, layout, softcap, sinks):
    from swattn import launch

    return launch._compile(merged_module().make_decode(head_dim, dtype, tile, layout, True, softcap, sinks), arch)


@functools.cache
def counters(device) -> torch.Tensor:
    """The zeroed counters, made once per device (before any capture): each call leaves them at 0."""
    return torch.zeros(MAX_COUNTERS, dtype=torch.int32, device=device)


def decode_merged(*args):
    """``swattn.decode.decode`` with the merged split kernel (same arguments, positional as its
    caller passes them, and the same results); one split, or too many row tiles: the shipped path."""
    from swattn import decode as dec
    from swattn import launch

    a = inspect.signature(ORIGINAL_DECODE).bind(*args)
    a.apply_defaults()
    a = a.arguments
    q, k_cache, sinks, softcap, scale, left, right = (
        a[n] for n in ("q", "k_cache", "sinks", "softcap", "scale", "left", "right")
    )
    b, sq, hq, d = q.shape
    hk = k_cache.shape[2]
    tile = a["tile"] or dec.tile_for(d)
    m_tiles = -(-sq * (hq // hk) // tile[0])
    num_splits = a["num_splits"]
    if num_splits <= 0:
        key_tiles = -(-a["key_span"] // tile[1]) + 1
        num_splits = dec.choose_splits(b * hk * m_tiles, key_tiles, dec.sm_count(q.device), tile[4])
    if num_splits == 1 or b * hk * m_tiles > MAX_COUNTERS:
        return ORIGINAL_DECODE(*args)
    bt_none, sink_none = dec.placeholders(q.device)
    if softcap:
        scalars = (hq // hk, a["n_new"], left, right, dec.LOG2E, float(softcap), scale / softcap)
    else:
        scalars = (hq // hk, a["n_new"], left, right, scale * dec.LOG2E, 0.0, 0.0)
    out = torch.empty_like(q)
    lse = torch.empty(b, hq, sq, device=q.device, dtype=torch.float32)
    part_out = torch.empty(num_splits, b, sq, hq, d, device=q.device, dtype=torch.float32)
    part_lse = torch.empty(num_splits, b, hq, sq, device=q.device, dtype=torch.float32)
    layout = a["layout"]
    kernel = compiled_merged(
        d, launch.DTYPES[q.dtype], launch.cuda_arch(q.device), tile, layout, bool(softcap), sinks is not None
    )
    tensors = (q, k_cache, a["v_cache"], a["cache_seqlens"], a["block_table"] if layout == "paged" else bt_none)
    sink = sink_none if sinks is None else sinks
    kernel(*tensors, sink, part_out, part_lse, counters(q.device), out, lse, *scalars)
    return out, lse


ORIGINAL_DECODE = None
ORIGINAL_COMBINE = None
IMPLS = ("shipped", "unrolled", "merged")


def use(impl) -> None:
    """Point swattn.decode's launcher at an implementation: "shipped", "unrolled" (the combine
    kernel's loop over splits unrolled) or "merged" (True: no combine kernel)."""
    global ORIGINAL_DECODE, ORIGINAL_COMBINE
    from swattn import decode as dec

    impl = {True: "merged", False: "shipped"}.get(impl, impl)
    if ORIGINAL_DECODE is None:
        ORIGINAL_DECODE, ORIGINAL_COMBINE = dec.decode, dec.compiled_combine
    dec.decode = decode_merged if impl == "merged" else ORIGINAL_DECODE
    dec.compiled_combine = compiled_combine_unrolled if impl == "unrolled" else ORIGINAL_COMBINE


# (batch, cache, q_heads, kv_heads, D, q_len = new, window, splits, sinks, softcap)
CASES = [
    (1, 4096, 32, 8, 128, 1, (4095, 0), 32, False, 0.0),
    (3, 3000, 8, 2, 128, 1, (1000, 0), 7, True, 0.0),
    (4, 2048, 16, 4, 64, 4, (255, 0), 3, False, 20.0),
    (2, 1500, 32, 2, 128, 16, (511, 0), 7, True, 0.0),  # 16 x 16 rows: four row tiles
]


def check(args, impl: str) -> bool:
    import reference as ref
    from swattn import testing
    from swattn.decode import flash_attn_with_kvcache

    ok = True
    for n, (b, cap, hq, hk, d, sq, window, splits, with_sinks, softcap) in enumerate(CASES):
        g = torch.Generator(device="cuda").manual_seed(n)
        dt = torch.bfloat16
        kc = torch.randn(b, cap, hk, d, device="cuda", dtype=dt, generator=g)
        vc = torch.randn(b, cap, hk, d, device="cuda", dtype=dt, generator=g)
        q = torch.randn(b, sq, hq, d, device="cuda", dtype=dt, generator=g)
        k = torch.randn(b, sq, hk, d, device="cuda", dtype=dt, generator=g)
        v = torch.randn(b, sq, hk, d, device="cuda", dtype=dt, generator=g)
        sinks = torch.randn(hq, device="cuda", generator=g) if with_sinks else None
        lens = torch.randint(0, cap - sq, (b,), device="cuda", generator=g, dtype=torch.int32)
        kw = dict(window_size=window, causal=True, softcap=softcap, sinks=sinks, return_lse=True, num_splits=splits)
        use(False)
        kc0, vc0 = kc.clone(), vc.clone()
        want, want_lse = flash_attn_with_kvcache(q, kc0, vc0, k, v, lens, **kw)
        hist_k = [kc0[i, : int(lens[i]) + sq].double().cpu() for i in range(b)]
        hist_v = [vc0[i, : int(lens[i]) + sq].double().cpu() for i in range(b)]
        oracle = []
        for i in range(b):
            o, l_ = testing.attention_ref(
                q[i : i + 1].double().cpu(),
                hist_k[i][None],
                hist_v[i][None],
                window_size=window,
                causal=True,
                softcap=softcap,
                sinks=None if sinks is None else sinks.double().cpu(),
                return_lse=True,
            )
            oracle.append((o, l_))
        use(impl)
        errs = []
        for _ in range(3):  # the counters must be back at 0 after each call
            kc1, vc1 = kc.clone(), vc.clone()
            out, lse = flash_attn_with_kvcache(q, kc1, vc1, k, v, lens, **kw)
            torch.cuda.synchronize()
            errs.append(max(ref.rel_err(out.float(), want.float()), ref.rel_err(lse, want_lse)))
            for i in range(b):
                errs.append(ref.rel_err(out[i : i + 1].double().cpu(), oracle[i][0]) / 20)  # bf16: a looser bound
        # a CUDA graph of one call, replayed with new lengths
        kc1, vc1 = kc.clone(), vc.clone()
        lens_g = lens.clone()
        flash_attn_with_kvcache(q, kc1, vc1, k, v, lens_g, **kw)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out_g, lse_g = flash_attn_with_kvcache(q, kc1, vc1, k, v, lens_g, **kw)
        for _ in range(5):
            lens_g.copy_(torch.randint(0, cap - sq, (b,), device="cuda", generator=g, dtype=torch.int32))
            graph.replay()
            use(False)
            kc2, vc2 = kc1.clone(), vc1.clone()
            ref_out, ref_lse = flash_attn_with_kvcache(q, kc2, vc2, None, None, lens_g + sq, **{**kw})
            use(impl)
            torch.cuda.synchronize()
            errs.append(max(ref.rel_err(out_g.float(), ref_out.float()), ref.rel_err(lse_g, ref_lse)))
        worst = max(errs)
        good = worst < args.tol and torch.isfinite(torch.tensor(errs)).all()
        ok = ok and bool(good)
        print(f"{impl} case {n} {CASES[n]}: worst rel err {worst:.2e} {'ok' if good else 'FAILED'}", flush=True)
    use(False)
    return ok


SHAPES = [  # (batch, q_heads, kv_heads, D, W, cache)
    (1, 32, 8, 128, 4096, 131072),
    (1, 32, 8, 64, 4096, 131072),
    (8, 32, 8, 128, 4096, 131072),
    (1, 32, 8, 128, 1024, 131072),
]


def shape_calls(b, hq, hk, d, w, cache):
    """(attention calls, append + attention calls), one per rotating window: disjoint windows of
    the cache whose K/V together exceed L2."""
    from swattn.decode import flash_attn_with_kvcache

    g = torch.Generator(device="cuda").manual_seed(0)
    kc = torch.randn(b, cache, hk, d, device="cuda", dtype=torch.bfloat16, generator=g)
    vc = torch.randn_like(kc)
    q = torch.randn(b, 1, hq, d, device="cuda", dtype=torch.bfloat16, generator=g)
    kn, vn = (torch.randn(b, 1, hk, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    lens = [torch.full((b,), cache - r * w, dtype=torch.int32, device="cuda") for r in range(min(32, cache // w))]
    kw = dict(window_size=(w - 1, 0), causal=True)
    attend = [functools.partial(flash_attn_with_kvcache, q, kc, vc, cache_seqlens=s, **kw) for s in lens]
    step = [functools.partial(flash_attn_with_kvcache, q, kc, vc, kn, vn, s - 1, **kw) for s in lens]
    return attend, step


def kernel_profile(fn, impl: str) -> None:
    """Each kernel of one call: its name and mean GPU time over 50 calls (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / e.count) for e in prof.key_averages() if e.device_time_total > 0]
    print(f"  {impl}: " + "; ".join(f"{name[:40]} {t:.1f} us" for name, t in rows), flush=True)


def timing(impls) -> None:
    from bench_decode import replay_us

    from bench import kernel_us

    print("per-kernel GPU time (profiler), first shape:")
    attend, step = shape_calls(*SHAPES[0])
    for impl in impls:
        use(impl)
        kernel_profile(step[0], impl)
    use("shipped")
    print("| B | Hq/Hkv | D | W | impl | us (graph of R) | replay us | +append us | +append replay |")
    print("|---:|---|---:|---:|---|---:|---:|---:|---:|")
    for shape in SHAPES:
        attend, step = shape_calls(*shape)
        for impl in impls:
            use(impl)
            row = [kernel_us(attend, reps=64), replay_us(attend[0]), kernel_us(step, reps=64), replay_us(step[0])]
            b, hq, hk, d, w, _ = shape
            print(f"| {b} | {hq}/{hk} | {d} | {w} | {impl} | " + " | ".join(f"{x:.1f}" for x in row) + " |", flush=True)
        use("shipped")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compile-only", action="store_true", help="build the variants for --arch (no GPU needed)")
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--tol", type=float, default=5e-3, help="max rel err vs the shipped path (and oracle / 20)")
    args = ap.parse_args()
    from swattn import decode as dec

    variants = [
        (d, "bfloat16", dec.tile_for(d), "contiguous", cap, sinks)
        for d, cap, sinks in ((128, False, False), (128, False, True), (64, True, False))
    ]
    for v in variants:
        src = compiled_merged(*v[:2], args.arch, *v[2:]).get_kernel_source()
        assert "AtomicAddRet" in src and "__threadfence" in src, "the merge epilogue is missing"
        compiled_combine_unrolled(v[0], v[1], args.arch, v[5])
        print(f"built D {v[0]} softcap {v[4]} sinks {v[5]}", flush=True)
    if args.compile_only:
        return
    impls = ["shipped"] + [impl for impl in IMPLS[1:] if check(args, impl)]
    timing(impls)


if __name__ == "__main__":
    main()
