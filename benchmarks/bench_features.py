"""The model-ready rows: swattn's FlashAttention-style features against
FlashAttention-4 with the same features, forward and forward + backward.

    python benchmarks/bench_features.py [--out results] [--rows 0 1 2]

Rows (configs/bench_features.json): a gpt-oss layer (sinks, and the same
without), a Gemma 2 layer (head_dim 256, softcap 50, and the same without), a
packed batch of 7 sequences through the varlen functions. Times: medians of
triton.testing.do_bench (inputs made once, gradients cleared between calls):
"us" is what an eager caller waits, host path included (a call shorter than its
Python launch path is host-bound: FA4's forward under ~250 us, and at the
gpt-oss rows both implementations' forward + backward); with --graph, "graph us"
replays the call from a CUDA graph: GPU time only. FLOPs count only
the visible (query, key) pairs; the floor is max(FLOPs / peak, bytes / bandwidth)
with the card's peaks (bench.card_peaks). FA4 = flash_attn.cute when it imports
(offline: ../shared/tools/offline-fa4.sh).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import swattn  # noqa: E402
from bench import card_peaks, environment, graph_us  # noqa: E402

CONFIG = json.loads((ROOT / "configs" / "bench_features.json").read_text())


def fa4():
    try:
        from flash_attn.cute import flash_attn_func, flash_attn_varlen_func
    except Exception:
        return None
    return flash_attn_func, flash_attn_varlen_func


def visible_pairs(lq: int, lk: int, left: int, right: int) -> int:
    """(query, key) pairs a bottom-right window keeps in one sequence."""
    pos = torch.arange(lq) + (lk - lq)
    lo = torch.clamp(pos - left, min=0) if left >= 0 else torch.zeros_like(pos)
    hi = torch.clamp(pos + right, max=lk - 1) if right >= 0 else torch.full_like(pos, lk - 1)
    return int(torch.clamp(hi - lo + 1, min=0).sum())


def make_row(row: dict, dtype, backward: bool, impls=("swattn", "fa4")):
    """(calls by implementation, FLOPs, bytes) for one row."""
    g = torch.Generator(device="cuda").manual_seed(0)
    hq, hk, d = row["q_heads"], row["kv_heads"], row["head_dim"]
    ws, cap = tuple(row["window"]), row.get("softcap", 0.0)
    lengths = row.get("lengths") or [row["seq"]] * row["batch"]
    total = sum(lengths)
    varlen = "lengths" in row
    shape_q = (total, hq, d) if varlen else (row["batch"], row["seq"], hq, d)
    shape_k = (total, hk, d) if varlen else (row["batch"], row["seq"], hk, d)
    q = torch.randn(shape_q, device="cuda", dtype=dtype, generator=g)
    k, v = (torch.randn(shape_k, device="cuda", dtype=dtype, generator=g) for _ in range(2))
    sinks = torch.randn(hq, device="cuda", generator=g) if row.get("sinks") else None
    leaves = [q, k, v] + ([sinks] if sinks is not None else [])
    if backward:
        for x in leaves:
            x.requires_grad_()
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    m = max(lengths)
    kw = dict(causal=ws[1] == 0, window_size=ws, softcap=cap)
    calls = {}
    if "swattn" in impls and varlen:
        calls["swattn"] = lambda: swattn.flash_attn_varlen_func(q, k, v, cu, cu, m, m, sinks=sinks, **kw)
    elif "swattn" in impls:  # the padded batch
        calls["swattn"] = lambda: swattn.flash_attn_func(q, k, v, sinks=sinks, **kw)
    peer = fa4() if "fa4" in impls else None
    if peer is not None:
        fa4_ws = tuple(None if w < 0 else w for w in ws)
        fkw = dict(causal=ws[1] == 0, window_size=fa4_ws, softcap=cap, learnable_sink=sinks)
        if varlen:
            calls["fa4"] = lambda: peer[1](
                q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=m, max_seqlen_k=m, **fkw
            )
        else:
            calls["fa4"] = lambda: peer[0](q, k, v, **fkw)
    calls = {n: (lambda f=f: (lambda o: o[0] if isinstance(o, tuple) else o)(f())) for n, f in calls.items()}
    if backward:
        dout = torch.randn(shape_q, device="cuda", dtype=dtype, generator=g)
        calls = {n: (lambda f=f: f().backward(dout)) for n, f in calls.items()}
    pairs = sum(visible_pairs(n, n, *ws) for n in lengths)
    flops = 4 * hq * d * pairs * (3.5 if backward else 1)
    bytes_ = (3 if backward else 1) * 2 * total * d * (2 * hq + 2 * hk)
    return calls, leaves, flops, bytes_


def profile(label: str, fn, leaves: list, calls: int = 10) -> None:
    """Where one call's GPU time goes: the kernels of ``calls`` calls after a warm-up, per call."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            for x in leaves:
                x.grad = None
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    events.sort(key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in events) / calls
    print(f"{label}: {total:.1f} us of kernels a call", flush=True)
    for e in events[:10]:
        print(f"    {e.device_time_total / calls:9.1f} us  x{e.count // calls}  {e.key[:100]}", flush=True)


def main() -> None:
    from triton.testing import do_bench

    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, nargs="*")
    p.add_argument("--out", default=str(ROOT / "results"))
    p.add_argument("--profile", action="store_true", help="per-kernel GPU times a call (torch.profiler), no table")
    p.add_argument("--impls", default="swattn,fa4", help="comma-separated: swattn, fa4")
    p.add_argument(
        "--graph", action="store_true", help="also time each call replayed from a CUDA graph (GPU time, no host)"
    )
    args = p.parse_args()
    impls = args.impls.split(",")
    if not set(impls) <= {"swattn", "fa4"}:
        p.error(f"--impls takes swattn and fa4, got {args.impls!r}")
    peaks = card_peaks()
    rows = [CONFIG["rows"][i] for i in args.rows] if args.rows else CONFIG["rows"]
    results = []
    env = environment()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / "bench_features.json"
    for backward in (False, True):
        for row in rows:
            calls, leaves, flops, bytes_ = make_row(row, torch.bfloat16, backward, impls)
            floor = max(flops / (peaks["fp16_tflops"] * 1e12), bytes_ / (peaks["bandwidth_gbps"] * 1e9)) * 1e6
            if args.profile:
                for name, fn in calls.items():
                    profile(f"{row['name']} {name} {'fwd+bwd' if backward else 'fwd'}", fn, leaves if backward else [])
                continue
            for name, fn in calls.items():
                try:
                    us = do_bench(
                        fn, warmup=20, rep=200, grad_to_none=leaves if backward else None, return_mode="median"
                    )
                    us *= 1e3
                except Exception as e:  # a peer that lacks a feature here is reported, not fatal
                    print(f"{row['name']} {name}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                graph = None
                if args.graph:
                    try:
                        graph = graph_us(fn, leaves if backward else ())
                    except Exception as e:  # a call that cannot be captured: the eager column stands
                        print(f"{row['name']} {name} graph: {type(e).__name__}: {str(e)[:200]}", flush=True)
                results.append(
                    dict(
                        row=row["name"],
                        impl=name,
                        pass_="fwd+bwd" if backward else "fwd",
                        us=us,
                        tflops=flops / us / 1e6,
                        pct_floor=100 * floor / us,
                        floor_us=floor,
                        graph_us=graph,
                    )
                )
                print(results[-1], flush=True)
                # Written after every row: a run cut short by a time limit keeps what it measured.
                path.write_text(json.dumps({"env": env, "rows": results}, indent=1))
    lines = [
        env,
        "",
        "| row | pass | impl | us | TFLOP/s | % floor | x vs fa4 | graph us | graph x vs fa4 |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        other = [x for x in results if x["row"] == r["row"] and x["pass_"] == r["pass_"] and x["impl"] == "fa4"]
        ratio = f"{other[0]['us'] / r['us']:.2f}" if other and r["impl"] == "swattn" else ""
        g, g_other = r.get("graph_us"), other[0].get("graph_us") if other else None
        g_ratio = f"{g_other / g:.2f}" if g and g_other and r["impl"] == "swattn" else ""
        lines.append(
            f"| {r['row']} | {r['pass_']} | {r['impl']} | {r['us']:.1f} | {r['tflops']:.0f} | "
            f"{r['pct_floor']:.0f} | {ratio} | {'-' if g is None else format(g, '.1f')} | {g_ratio} |"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
