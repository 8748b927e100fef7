"""Time a software-pipelined variant of swattn's forward kernel against the shipped one (Hopper).

What it times: the forward of swattn.sliding_window_attention (ops.attention -> launch.forward ->
launch.compiled_forward, mode "window"), bf16, forward only, on two workloads (B, H, S, D, (left, right)):
(4, 16, 8192, 64, (128, 128)) and (4, 16, 8192, 128, (1024, 1024)). The variant "fa3_prefetch" is the
repository's kernels/forward.py with three textual edits applied here at run time (``pipelined_module``;
nothing on disk changes, and the baseline stays the repository's own code path): the key-tile loop gets
T.Pipelined(order=, stage=) with FlashAttention-3's order and no num_stages. Per iteration: K of tile
j + 2 and V of j + 1 are loaded a stage ahead (cp.async, two buffers each), then the mask and S = Q K^T
of j + 1, the rescale and P V of j, and the softmax of j + 1. launch.compiled_forward is wrapped so
that the launcher's tile=None call gets the candidate's tile and factory. Tiles: D = 64 the shipped
one; D = 128 the shipped 192x128x384 spills under this schedule (ptxas C7512: serialised wgmma), so the
variant runs at 128x128 with 256 threads, next to the shipped code at that same tile (the fair
baseline). Before timing, each candidate's out and lse (three launches, to catch races) are compared
with the shipped kernel's. A candidate whose relative error is over --tol is marked WRONG and is not
timed (--time-all overrides). Timing uses triton.testing.do_bench.

Run on the GPU from the repository root, keeping the machine warm between the two calls so that
TileLang's disk cache survives (the D = 128 builds take minutes each):
    PYTHONPATH=$PWD python tools/time_pipelined.py --precompile 12 --compile-only
    PYTHONPATH=$PWD python tools/time_pipelined.py
--compile-only needs no GPU (it builds for sm_90a, or --arch). It also reports whether each
candidate's CUDA source differs from the shipped code's at the same tile, and whether it uses
cp.async or TMA.

CPU-side findings (TileLang 0.1.15, sm_90a): with num_stages set, the warp-specialised pipeline
drops order/stage silently, and the CUDA source is byte-identical to the shipped kernel's. They are
honoured only without num_stages, which turns warp specialisation off: cp.async loads on the consumer
threads, no TMA, mbarriers or setmaxnreg. Every T.gemm still waits for its own wgmma, but nvcc moves
the register-only softmax of tile j + 1 under P V's wgmma (FA3's overlap, from scheduling alone).
"""

import argparse
import concurrent.futures as cf
import math
import multiprocessing as mp
import os
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {64: (4, 16, 8192, 64, (128, 128)), 128: (4, 16, 8192, 128, (1024, 1024))}
ALT_TILE = (128, 128, 256, 2, 1)  # (block_m, block_n, threads, num_stages, occupancy)
SHIPPED = "shipped"
# head_dim -> [(name, tile (None: tiles.json's), pipelined)]; the first is the reference.
PLAN = {
    64: [(SHIPPED, None, False), ("fa3_prefetch", None, True)],
    128: [
        (SHIPPED, None, False),
        ("shipped@128x128x256", ALT_TILE, False),
        ("fa3_prefetch@128x128x256", ALT_TILE, True),
    ],
}

# (old, new) on swattn/kernels/forward.py; each must match exactly once. The variant's factory takes
# schedule="fa3_prefetch" (default "auto": the shipped loop). One entry of order/stage per scheduled
# statement of the loop body, in source order (scalar binds do not count): copy K; the mask (softcap:
# clear, GEMM, cap + mask) and the QK^T GEMM; softmax_step's seven (m_prev, row max, alpha, exp2, row
# sum, l, P) and its rescale of acc; copy V; the P V GEMM. No num_stages: the depth is max(stage) + 1
# (with num_stages TileLang's warp specialisation drops order/stage).
_PIPELINED_EDITS = (
    (
        """    sinks: bool = False,
):
    \"\"\"Kernel factory: forward""",
        """    sinks: bool = False,
    schedule: str = "auto",
):
    \"\"\"Kernel factory: forward""",
    ),
    (
        """    neg_inf = -T.infinity(accum)
""",
        """    neg_inf = -T.infinity(accum)
    if schedule not in ("auto", "fa3_prefetch"):
        raise ValueError(f"schedule must be 'auto' or 'fa3_prefetch', got {schedule!r}")
    pipe_stages, pipe_order, pipe_stage = num_stages, None, None
    if schedule == "fa3_prefetch":
        n_s = 3 if softcap else 2
        pipe_stage = [0] + [1] * (n_s + 7) + [2, 1, 2]
        pipe_order = [0] + [2 + k for k in range(n_s)] + [4 + n_s + k for k in range(7)] + [2 + n_s, 1, 3 + n_s]
        pipe_stages = 0
""",
    ),
    (
        """            for it in T.Pipelined(n_g + hi - lo, num_stages=num_stages):
""",
        """            for it in T.Pipelined(n_g + hi - lo, num_stages=pipe_stages, order=pipe_order, stage=pipe_stage):
""",
    ),
)
_PIPELINED = None
_PIPELINED_CACHE = {}


def repo_on_path():
    if REPO not in sys.path:
        sys.path.insert(0, REPO)


def pipelined_module():
    """The repo's forward kernel module with the edits, as swattn.kernels._forward_pipelined."""
    global _PIPELINED
    if _PIPELINED is None:
        from kernel_variant import edited_module

        from swattn.kernels import forward as fwd

        _PIPELINED = edited_module(fwd, _PIPELINED_EDITS, "swattn.kernels._forward_pipelined")
    return _PIPELINED


def compiled_forward_pipelined(
    head_dim, dtype, arch, tile, mode="general", skip_full_masks=True, varlen=False, softcap=False, sinks=False
):
    """launch.compiled_forward for the fa3_prefetch variant (same kernel ABI, same pass configs)."""
    from swattn import launch

    key = (head_dim, dtype, arch, tile, mode, skip_full_masks, varlen, softcap, sinks)
    if key not in _PIPELINED_CACHE:
        fn = pipelined_module().make_forward(
            head_dim, dtype, arch, tile, mode, skip_full_masks, varlen, softcap, sinks, "fa3_prefetch"
        )
        _PIPELINED_CACHE[key] = launch._compile(fn, arch)
    return _PIPELINED_CACHE[key]


def build(d, tile, pipelined, arch):
    """The compiled kernel of one candidate (mode "window", bf16) and its tile."""
    from swattn import launch

    tile = tile or launch.tile_config(d, arch)
    if pipelined:
        return compiled_forward_pipelined(d, "bfloat16", arch, tile, "window"), tile
    return launch.compiled_forward(d, "bfloat16", arch, tile, "window"), tile


def install_override():
    """Wrap launch.compiled_forward: a tile=None call gets state["cand"] = (tile, pipelined)."""
    from swattn import launch

    original = launch.compiled_forward
    state = {"cand": (None, False)}

    def compiled_forward(head_dim, dtype, arch, tile=None, *rest, **kw):
        if tile is None:
            tile, pipelined = state["cand"]
            tile = tile or launch.tile_config(head_dim, arch)
            if pipelined:
                return compiled_forward_pipelined(head_dim, dtype, arch, tile, *rest, **kw)
        return original(head_dim, dtype, arch, tile, *rest, **kw)

    launch.compiled_forward = compiled_forward
    return state


def _compile_job(name, d, tile, pipelined, arch):
    """Compile one candidate (runs in a worker process; fills TileLang's disk cache)."""
    repo_on_path()
    t0 = time.time()
    try:
        build(d, tile, pipelined, arch)
        return name, d, time.time() - t0, None
    except BaseException as e:  # noqa: BLE001  (SystemExit from a failed edit too)
        return name, d, time.time() - t0, f"{type(e).__name__}: {str(e)[-400:]}"


def precompile(dims, workers, arch):
    jobs = [(name, d, tile, pl) for d in dims for name, tile, pl in PLAN[d]]
    print(f"precompiling {len(jobs)} forward kernels in {workers} processes ...", flush=True)
    failed = {}
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
        futs = [ex.submit(_compile_job, name, d, tile, pl, arch) for name, d, tile, pl in jobs]
        for fut in cf.as_completed(futs):
            name, d, secs, err = fut.result()
            print(f"  D={d} {name}: {'ok' if err is None else 'FAILED'} ({secs:.0f} s)", flush=True)
            if err is not None:
                print(f"    {err}", flush=True)
                failed[(name, d)] = err
    return failed


def describe(kernel, ref):
    """One line on a candidate's CUDA source: vs the shipped code's at the same tile, and its loads."""
    src = kernel.get_kernel_source()
    loads = [w for w, key in (("cp.async", "cp_async"), ("TMA", "tma_load")) if key in src]
    if ref is None:
        return f"loads: {'+'.join(loads) or 'plain'}"
    same = "IDENTICAL to" if src == ref.get_kernel_source() else "differs from"
    return f"CUDA source {same} the shipped code's at this tile; loads: {'+'.join(loads) or 'plain'}"


def rel(a, b):
    import torch

    a, b = a.float(), b.float()
    if not bool(torch.isfinite(a).all()):
        return float("nan")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def tile_str(tile):
    return "x".join(map(str, tile[:3]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128], choices=sorted(SHAPES))
    ap.add_argument("--precompile", type=int, default=0, help="compile in N processes first (0: in this one)")
    ap.add_argument("--compile-only", action="store_true", help="build the kernels and stop (no GPU needed)")
    ap.add_argument("--arch", default="sm_90a", help="target of --compile-only (on a GPU: the device's)")
    ap.add_argument("--tol", type=float, default=2e-2, help="max rel err of out and lse vs the shipped kernel's")
    ap.add_argument("--time-all", action="store_true", help="time candidates marked WRONG too")
    ap.add_argument("--rep", type=int, default=1000, help="do_bench rep (ms)")
    args = ap.parse_args()
    repo_on_path()
    from swattn import launch

    pipelined_module()  # the edits apply, or stop here with the one that does not
    if args.compile_only:
        arch = args.arch
    else:
        import torch

        arch = launch.cuda_arch(torch.device("cuda"))
        print(f"{torch.cuda.get_device_name()}  arch {arch}  shipped forward tiles "
              + ", ".join(f"D={d} {launch.tile_config(d, arch)}" for d in args.dims))  # fmt: skip
    failed = precompile(args.dims, args.precompile, arch) if args.precompile else {}

    if args.compile_only:
        for d in args.dims:
            built = {}
            for name, tile, pl in PLAN[d]:
                if (name, d) in failed:
                    continue
                t0 = time.time()
                try:
                    built[name] = build(d, tile, pl, arch)
                except Exception as e:  # noqa: BLE001
                    traceback.print_exc(limit=2)
                    print(f"D={d} {name}: FAILED {type(e).__name__}: {str(e)[-300:]}", flush=True)
                    failed[(name, d)] = str(e)
                    continue
                print(f"D={d} {name} {tile_str(built[name][1])}: built ({time.time() - t0:.0f} s)", flush=True)
            for name, tile, _ in PLAN[d]:
                if name in built:
                    ref = next((built[n][0] for n, t, p in PLAN[d] if not p and t == tile and n in built), None)
                    print(f"D={d} {name}: {describe(built[name][0], None if built[name][0] is ref else ref)}")
        if failed:
            raise SystemExit(f"{len(failed)} build(s) failed: {', '.join(f'D={d} {n}' for n, d in failed)}")
        return

    import torch
    from triton.testing import do_bench

    import swattn

    state = install_override()
    rows = []
    for d in args.dims:
        b, h, s, _, window = SHAPES[d]
        torch.manual_seed(0)
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))

        def fwd(q=q, k=k, v=v, window=window):
            return swattn.sliding_window_attention(q, k, v, window, return_lse=True)

        ref = None
        shipped_us = None
        for name, tile, pl in PLAN[d]:
            label = tile_str(tile or launch.tile_config(d, arch))
            if (name, d) in failed:
                rows.append((d, name, label, None, None, None, "FAILED to compile"))
                continue
            state["cand"] = (tile, pl)
            try:
                t0 = time.time()
                outs = []
                for _ in range(3):  # a race shows up as a launch-to-launch difference
                    outs.append([x.clone() for x in fwd()])
                torch.cuda.synchronize()
                first = time.time() - t0
                if ref is None:
                    if name != SHIPPED:
                        raise RuntimeError("the shipped kernel did not run: nothing to check against")
                    ref = outs[0]
                errs = [(rel(o, ref[0]), rel(lse, ref[1])) for o, lse in outs]
                err_out, err_lse = (max(e[i] for e in errs) for i in (0, 1))
                ok = all(math.isfinite(e) and e <= args.tol for pair in errs for e in pair)
                note = f"first call {first:.1f} s" if ok else "WRONG"
                us = None
                if ok or args.time_all:
                    us = do_bench(fwd, warmup=100, rep=args.rep) * 1e3
                    if name == SHIPPED:
                        shipped_us = us
                rows.append((d, name, label, us, err_out, err_lse, note))
                print(f"  D={d} {name} {label}: out rel err {err_out:.1e}, lse rel err {err_lse:.1e}, "
                      f"{f'{us:.1f} us' if us else 'not timed'}  {note}", flush=True)  # fmt: skip
            except Exception as e:  # noqa: BLE001
                traceback.print_exc(limit=2)
                msg = str(e).splitlines()[-1][:100] if str(e) else ""
                rows.append((d, name, label, None, None, None, f"FAILED {type(e).__name__}: {msg}"))
            finally:
                torch.cuda.empty_cache()
        for i, r in enumerate(rows):
            if r[0] == d and r[3] and shipped_us:
                rows[i] = (*r, shipped_us / r[3])

    print(f"\nbf16 forward via swattn.sliding_window_attention, (B,H,S,D,window) = "
          f"{', '.join(str(SHAPES[d]) for d in args.dims)}; do_bench, rep {args.rep} ms; "
          f"speedup = shipped us / us (>1: faster than the shipped tile)")  # fmt: skip
    head = ("D", "variant", "tile mxnxthr", "us", "speedup", "out rel err", "lse rel err", "note")
    table = [head]
    for r in rows:
        d, name, label, us, e_out, e_lse, note = r[:7]
        speed = f"{r[7]:.3f}x" if len(r) > 7 else "-"
        table.append(
            (str(d), name, label, f"{us:.1f}" if us else "-", speed,
             f"{e_out:.1e}" if e_out is not None else "-", f"{e_lse:.1e}" if e_lse is not None else "-", note)
        )  # fmt: skip
    widths = [max(len(t[i]) for t in table) for i in range(len(head))]
    for t in table:
        print("  ".join(c.ljust(w) for c, w in zip(t, widths, strict=True)))


if __name__ == "__main__":
    main()
