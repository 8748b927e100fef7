"""Time swattn's D = 256 backward tile candidates on a CUDA machine (Hopper).

Run with the repository as cwd:  PYTHONPATH=. python /path/to/time_d256.py [options]
(or copy this file into the repository's working tree first, then run it from there).

Workload (transformers' Gemma 2 layer): B=2, S=8192, Hq=16, Hkv=8, D=256, bf16, causal with
window (4095, 0), softcap 0 and 50, through swattn.flash_attn_func (the flash path:
launch.flash_backward, kv_grads in the input dtype, adaptive off). The forward keeps its
shipped tile; only the backward's tile changes: launch.compiled_backward is wrapped so that
the tile=None that flash_backward passes becomes the candidate's tile (for head_dim 256 only).

Each candidate's dq, dk, dv are compared with the shipped tile's (relative Frobenius error;
candidates above --tol are flagged BAD and not timed). Then triton.testing.do_bench times
forward, backward (autograd.grad with retain_graph) and forward+backward.

Candidates: named in CANDIDATES, name -> tile = (block_m, block_n, threads, num_stages,
occupancy, dq_tma, kv_ss) (tiles.json's fields; None: the shipped tile), or given with --tiles
"64,64,128,1,1,1,0;64,64,256,1,1,0,1". kv_ss = 1: P^T and dS^T through shared memory for the
dV/dK GEMMs (wgmma SS; kernels/backward.py), which lets two warpgroups split dK/dV by columns
without a spill; kv_ss = 0: the register (RS) form, whose D = 256 tiles all spill (one
warpgroup holds 2 x 64 x 256 float32 accumulators). The shipped D = 256 tile is the SS one with
the dQ TMA reduce-add (64,64,256,1,1,1,1: 2.3x faster than the RS 64,64,128 tile it replaced,
H200, analysis.md). Caveat: the non-varlen softcap build of the SS tile fails in TileLang
0.1.15's ThreadSync pass ("shared-memory sync inside a divergent region with 219 participating
threads"); launch.flash_backward runs that case through the varlen kernels, and so does this
tool's --via-varlen (B packed sequences; the RS tiles likewise). Compiles are slow
(30-120 s each); --precompile N compiles them in N processes first (TileLang's disk cache then
serves the timing process), --compile-only stops after that (to split the work across
commands that have a 10-minute limit each; keep the machine warm between them so the cache
survives). A candidate that fails to compile or launch is reported and skipped.
"""

import argparse
import concurrent.futures as cf
import math
import multiprocessing as mp
import time
import traceback

import torch

SHIPPED = "shipped"
# name -> backward tile (block_m, block_n, threads, num_stages, occupancy, dq_tma); None = tiles.json's.
CANDIDATES = {
    SHIPPED: None,  # tiles.json: 64,64,256,1,1,1,1 (SS, dQ TMA)
    "ss_64x64_2wg": (64, 64, 256, 1, 1, False, True),  # SS, per-element dQ atomics: 146 KB smem
    "ss_64x64_2wg_st2": (64, 64, 256, 2, 1, True, True),  # SS + double-buffered Q/dO
    "rs_64x64": (64, 64, 128, 1, 1, False, False),  # the RS tile shipped before (3.1 KB spill/thread)
    "rs_64x64_tma": (64, 64, 128, 1, 1, True, False),  # RS + dQ TMA (same spill)
}
B, S, HQ, HKV, D = 2, 8192, 16, 8, 256
WINDOW = (4095, 0)


def parse_tiles(text):
    out = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        f = [int(x) for x in part.split(",")]
        if len(f) != 7:
            raise SystemExit(f"a tile has 7 fields (block_m,block_n,threads,stages,occupancy,dq_tma,kv_ss): {part}")
        out[("ss_" if f[6] else "rs_") + "_".join(map(str, f))] = (*f[:5], bool(f[5]), bool(f[6]))
    return out


def install_override():
    """Wrap launch.compiled_backward: a tile=None call at head_dim 256 gets state['cand']
    (None: the shipped tile)."""
    from swattn import launch

    original = launch.compiled_backward
    state = {"cand": None}

    def compiled_backward(head_dim, dtype, arch, tile=None, *rest):
        if tile is None and head_dim == 256:
            tile = state["cand"]
        return original(head_dim, dtype, arch, tile, *rest)

    launch.compiled_backward = compiled_backward
    return state, original


def _compile_job(tile, softcap, varlen, arch):
    """Compile one backward (runs in a worker process; fills TileLang's disk cache)."""
    from swattn import launch

    t0 = time.time()
    try:
        launch.compiled_backward(256, "bfloat16", arch, tile, False, "bfloat16", varlen, softcap)
        return tile, softcap, varlen, time.time() - t0, None
    except Exception as e:  # noqa: BLE001
        return tile, softcap, varlen, time.time() - t0, f"{type(e).__name__}: {str(e)[-400:]}"


def precompile(cands, workers, varlens, arch, softcaps):
    from swattn import launch

    jobs = []
    for name, tile in cands.items():
        t = launch.tile_config(256, arch, "backward") if tile is None else tile
        for sc in softcaps:
            for vl in varlens:
                jobs.append((name, t, sc, vl))
    print(f"precompiling {len(jobs)} backward kernels in {workers} processes ...", flush=True)
    failed = set()
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
        futs = {ex.submit(_compile_job, t, sc, vl, arch): name for name, t, sc, vl in jobs}
        for fut in cf.as_completed(futs):
            tile, sc, vl, secs, err = fut.result()
            print(
                f"  {futs[fut]} {tile} softcap={sc} varlen={vl}: {'ok' if err is None else 'FAILED'} ({secs:.0f} s)"
                + ("" if err is None else f"\n    {err}"),
                flush=True,
            )
            if err is not None:
                failed.add((futs[fut], sc))  # (candidate, softcap on): skipped at timing
    return failed


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def window_pairs(s, left, right):
    """(query, key) pairs inside the causal window, per (batch, head)."""
    return sum(min(i, left) + 1 + min(right, s - 1 - i) for i in range(s))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", default="", help='extra candidates "bm,bn,thr,stages,occ,dq_tma,kv_ss;..."')
    ap.add_argument("--only", default="", help="comma-separated candidate names to keep (shipped always kept)")
    ap.add_argument("--softcaps", default="0,50")
    ap.add_argument("--precompile", type=int, default=0, help="compile in N processes first (0: lazily)")
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--varlen", action="store_true", help="also check flash_attn_varlen_func (2 packed sequences)")
    ap.add_argument(
        "--via-varlen",
        action="store_true",
        help="time every candidate through flash_attn_varlen_func (B packed sequences of S): the "
        "varlen kernels (the kv_ss 64x64x256 tile compiles with softcap only there: the "
        "non-varlen softcap build fails in TileLang's ThreadSync)",
    )
    ap.add_argument("--tol", type=float, default=2e-2, help="max rel err vs the shipped tile's grads")
    ap.add_argument("--rep", type=int, default=1000, help="do_bench rep (ms)")
    args = ap.parse_args()

    from triton.testing import do_bench

    import swattn
    from swattn import launch

    cands = dict(CANDIDATES)
    cands.update(parse_tiles(args.tiles))
    if args.only:
        keep = set(args.only.split(",")) | {SHIPPED}
        cands = {k: v for k, v in cands.items() if k in keep}
    softcaps = tuple(float(x) for x in args.softcaps.split(","))
    dev = torch.device("cuda")
    arch = launch.cuda_arch(dev)
    shipped_tile = launch.tile_config(256, arch, "backward")
    print(f"{torch.cuda.get_device_name(dev)}  arch {arch}  shipped D=256 backward tile {shipped_tile}")
    if args.precompile:
        varlens = (True,) if args.via_varlen else (False, True) if args.varlen else (False,)
        failed = precompile(cands, args.precompile, varlens, arch, tuple(sorted({c > 0 for c in softcaps})))
    else:
        failed = set()
    if args.compile_only:
        return

    state, _ = install_override()
    torch.manual_seed(0)
    q = torch.randn(B, S, HQ, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, S, HKV, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, S, HKV, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn(B, S, HQ, D, device=dev, dtype=torch.bfloat16)
    pairs = window_pairs(S, *WINDOW) * B * HQ
    bwd_flop = 10 * pairs * D  # 5 GEMMs of 2 * pairs * D each (S, dP, dV, dK, dQ)

    def fwd(cap):
        return swattn.flash_attn_func(q, k, v, causal=True, window_size=WINDOW, softcap=cap)

    cu = torch.arange(B + 1, device=dev, dtype=torch.int32) * S
    qp, kp, vp = (x.detach().reshape(B * S, *x.shape[2:]).requires_grad_() for x in (q, k, v))
    doutp = dout.reshape(B * S, HQ, D)

    def fwd_varlen(cap):
        return swattn.flash_attn_varlen_func(qp, kp, vp, cu, cu, S, S, causal=True, window_size=WINDOW, softcap=cap)

    def varlen_grads(cap):
        return [g.view(B, S, *g.shape[1:]) for g in torch.autograd.grad(fwd_varlen(cap), (qp, kp, vp), doutp)]

    if args.via_varlen:  # every candidate (the shipped one too) through the varlen kernels
        fwd, inputs, dout_t = fwd_varlen, (qp, kp, vp), doutp
    else:
        inputs, dout_t = (q, k, v), dout

    def grads(cap):
        return torch.autograd.grad(fwd(cap), inputs, dout_t)

    rows, ref = [], {}
    for cap in softcaps:
        for name, tile in cands.items():
            state["cand"] = tile
            label = f"{name} {','.join(str(int(x)) for x in (shipped_tile if tile is None else tile))}"
            if (name, cap > 0) in failed:
                rows.append((cap, label, [float("nan")] * 3, float("nan"), None, None, None, "FAILED to compile"))
                continue
            try:
                t0 = time.time()
                g = grads(cap)  # compiles on first use unless precompiled
                torch.cuda.synchronize()
                first = time.time() - t0
                if name == SHIPPED:
                    ref[cap] = [x.clone() for x in g]
                errs = [rel(a, b) for a, b in zip(g, ref[cap], strict=True)] if cap in ref else [float("nan")] * 3
                bad = any(not math.isfinite(x.float().abs().sum().item()) for x in g) or (
                    name != SHIPPED and max(errs) > args.tol
                )
                vl_err = float("nan")
                if args.varlen and not args.via_varlen:
                    vl_err = max(rel(a, b) for a, b in zip(varlen_grads(cap), g, strict=True))
                    bad = bad or vl_err > args.tol
                if bad:
                    rows.append((cap, label, errs, vl_err, None, None, None, "BAD grads"))
                    print(f"softcap {cap:g} {label}: BAD grads rel err {errs} varlen {vl_err:.1e}", flush=True)
                    continue
                out = fwd(cap)
                t_f = do_bench(lambda cap=cap: fwd(cap), warmup=100, rep=args.rep)
                t_b = do_bench(
                    lambda out=out: torch.autograd.grad(out, inputs, dout_t, retain_graph=True),
                    warmup=100,
                    rep=args.rep,
                )
                t_fb = do_bench(lambda cap=cap: grads(cap), warmup=100, rep=args.rep)
                del out
                rows.append((cap, label, errs, vl_err, t_f, t_b, t_fb, f"first call {first:.0f} s"))
                print(
                    f"softcap {cap:g} {label}: fwd {t_f:.2f} ms  bwd {t_b:.2f} ms  fwd+bwd {t_fb:.2f} ms  "
                    f"bwd {bwd_flop / t_b / 1e9:.0f} TFLOP/s  rel err {max(errs):.1e}",
                    flush=True,
                )
            except Exception as e:  # noqa: BLE001
                traceback.print_exc(limit=2)
                rows.append(
                    (
                        cap,
                        label,
                        [float("nan")] * 3,
                        float("nan"),
                        None,
                        None,
                        None,
                        f"FAILED {type(e).__name__}: {str(e).splitlines()[-1][:120] if str(e) else ''}",
                    )
                )
            finally:
                torch.cuda.empty_cache()

    print(
        f"\n{'varlen kernels, ' if args.via_varlen else ''}B={B} S={S} Hq={HQ} Hkv={HKV} D={D} bf16 "
        f"window {WINDOW} causal; "
        f"bwd TFLOP/s = {bwd_flop / 1e12:.2f} TFLOP / time; tile = bm,bn,threads,stages,occ,dq_tma"
    )
    print(
        f"{'cap':>4} {'candidate':<42} {'fwd ms':>7} {'bwd ms':>7} {'f+b ms':>7} {'bwdTF/s':>7} "
        f"{'dq err':>7} {'dk err':>7} {'dv err':>7} {'vl err':>7}  note"
    )

    def f(x):
        return f"{x:7.2f}" if x is not None else f"{'-':>7}"

    for cap, label, errs, vl_err, t_f, t_b, t_fb, note in rows:
        tf = f"{bwd_flop / t_b / 1e9:7.0f}" if t_b else f"{'-':>7}"
        print(
            f"{cap:4g} {label:<42} {f(t_f)} {f(t_b)} {f(t_fb)} {tf} "
            + " ".join(f"{e:7.1e}" for e in errs)
            + f" {vl_err:7.1e}  {note}"
        )


if __name__ == "__main__":
    main()
