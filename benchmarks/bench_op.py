"""Benchmark of the general op (swattn.sliding_window_attention) against its peers, on the shapes of
configs/bench_op.json (issue 3): batched, multi-head, GQA, long sequences.

    python benchmarks/bench_op.py                 # every shape, fp16 and bf16
    python benchmarks/bench_op.py --dtypes float16 --out results/op
    python benchmarks/bench_op.py --backward      # forward + backward (backward = 2.5x the forward's FLOPs)
    python benchmarks/bench_op.py --graph         # each call replayed from a CUDA graph: GPU time, no host

Columns, per shape and dtype (medians of triton.testing.do_bench, inputs made
once outside the timing):
  swattn      this repository's TileLang kernel, (batch, seq, heads, dim) in
  flex        torch.compile(flex_attention) with a BlockMask of the same window
  fa4         FlashAttention-4 (flash_attn.cute, CuTe DSL) with window_size =
              (left, right), (batch, seq, heads, dim) in; only when
              flash_attn.cute imports (offline: ../shared/tools/offline-fa4.sh)
  sdpa        SDPA flash on the whole sequence (causal when right = 0): the
              full-attention cost a sliding window saves
TFLOP/s counts only the (query, key) pairs inside the window; % floor is the
roofline floor max(FLOPs / peak, bytes / bandwidth) over the time, with the
card's peaks from configs/gpus.json (bench.card_peaks). "err vs flex" is
||swattn - flex|| / ||flex||, a sanity column: tests/test_swattn.py holds the
real correctness checks against the float64 reference.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the card's bench.py (peaks, environment) and reference.py

import reference as ref  # noqa: E402
import swattn  # noqa: E402
from bench import card_peaks, environment, graph_us  # noqa: E402

CONFIG = json.loads((ROOT / "configs" / "bench_op.json").read_text())
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def visible_pairs(seq_len: int, left: int, right: int) -> int:
    """(query, key) pairs inside the window |clipped to the sequence|, summed over queries."""
    i = torch.arange(seq_len)
    return int((torch.clamp(i + right, max=seq_len - 1) - torch.clamp(i - left, min=0) + 1).sum())


def floor_us(sh: dict, flops: float, peaks: dict, passes: int = 1, elem: int = 2) -> float:
    """Roofline floor: max(FLOPs / peak, bytes / bandwidth). ``passes``: how many
    times the tensors move (forward 1; forward + backward ~3: Q, K, V, O, dO read
    again and dQ, dK, dV written)."""
    b, s, d = sh["batch"], sh["seq"], sh["head_dim"]
    bytes_ = passes * elem * b * s * d * (2 * sh["q_heads"] + 2 * sh["kv_heads"])  # Q, O and K, V once each
    return max(flops / (peaks["fp16_tflops"] * 1e12), bytes_ / (peaks["bandwidth_gbps"] * 1e9)) * 1e6


def flex_impl(sh: dict):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    left, right = sh["left"], sh["right"]

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx >= q_idx - left) & (kv_idx <= q_idx + right)

    # One compile per shape and dtype: more than dynamo's default limit of 8 recompiles,
    # past which it would silently run flex_attention eagerly (O(S^2) memory).
    torch._dynamo.config.recompile_limit = 64
    block_mask = create_block_mask(mask_mod, None, None, sh["seq"], sh["seq"], device="cuda")
    compiled = torch.compile(flex_attention, dynamic=False)
    gqa = sh["q_heads"] != sh["kv_heads"]
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask, enable_gqa=gqa)


def fa4_impl(sh: dict):
    """FlashAttention-4's local attention, or None where flash_attn.cute is missing."""
    try:
        from flash_attn.cute import flash_attn_func
    except Exception:  # not installed, or its CuTe DSL does not load here
        return None

    def run(q, k, v):
        out = flash_attn_func(q, k, v, window_size=(sh["left"], sh["right"]))
        return out[0] if isinstance(out, tuple) else out

    return run


def sdpa_impl(sh: dict):
    group = sh["q_heads"] // sh["kv_heads"]

    def run(q, k, v):
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=sh["right"] == 0)

    return run, group


def bench_shape(
    sh: dict, dtype: torch.dtype, peaks: dict, backward: bool = False, graph: bool = False, only=None
) -> list[dict]:
    """One row per implementation; ``backward``: time forward + backward (dO given),
    counting the backward as 2.5x the forward's FLOPs. ``graph``: time each call
    replayed from a CUDA graph (GPU time, no host path); an implementation that
    cannot be captured keeps its eager time, marked in "timing". ``only``: the
    implementations to time (names' first words; None: all). The "x vs" column is
    against flex when it is timed, else FA4."""
    from triton.testing import do_bench

    b, s, hq, hk, d = sh["batch"], sh["seq"], sh["q_heads"], sh["kv_heads"], sh["head_dim"]
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, s, hq, d, device="cuda", dtype=dtype, generator=g)
    k, v = (torch.randn(b, s, hk, d, device="cuda", dtype=dtype, generator=g) for _ in range(2))
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # (B, H, S, D) for flex and SDPA
    sdpa, group = sdpa_impl(sh)
    kr, vr = (x.repeat_interleave(group, dim=1) for x in (kt, vt))  # SDPA flash: no GQA; full-attention cost only
    window = (sh["left"], sh["right"])
    flex = flex_impl(sh)
    impls = {
        "swattn": lambda: swattn.sliding_window_attention(q, k, v, window),
        "flex": lambda: flex(qt, kt, vt),
        "sdpa " + ("causal" if sh["right"] == 0 else "full"): lambda: sdpa(qt, kr, vr),
    }
    fa4 = fa4_impl(sh)
    if fa4 is not None:
        impls["fa4"] = lambda: fa4(q, k, v)
    if only:
        impls = {n: f for n, f in impls.items() if n.split()[0] in only}
    # a sanity column against flex (FA4 when flex is not timed: compiling flex takes a while)
    if "flex" in impls or "fa4" not in impls:
        err, err_key = (
            ref.rel_err(swattn.sliding_window_attention(q, k, v, window).transpose(1, 2), flex(qt, kt, vt)),
            "err_vs_flex",
        )
    else:
        err, err_key = ref.rel_err(swattn.sliding_window_attention(q, k, v, window), fa4(q, k, v)), "err_vs_fa4"
    flops = 4 * b * hq * d * visible_pairs(s, *window) * (3.5 if backward else 1)
    floor = floor_us(sh, flops, peaks, passes=3 if backward else 1)
    leaves = [q, k, v, qt, kt, vt, kr, vr]  # SDPA's repeated K/V too, or it would skip their gradients
    if backward:
        for x in leaves:
            x.requires_grad_()
        dout = torch.randn_like(q)

        def step(forward, grad):
            return lambda: forward().backward(grad)

        # swattn returns (B, S, H, D); flex and SDPA (B, H, S, D)
        impls = {n: step(f, dout if n in ("swattn", "fa4") else dout.transpose(1, 2)) for n, f in impls.items()}
    rows = []
    for name, fn in impls.items():
        timing = "eager"
        us = do_bench(fn, warmup=50, rep=200, grad_to_none=leaves if backward else None, return_mode="median") * 1e3
        if graph:
            try:
                us, timing = graph_us(fn, leaves if backward else ()), "graph"
            except Exception as e:  # noqa: BLE001  (not capturable: the eager time stands)
                print(f"  {name}: no CUDA graph ({type(e).__name__}: {str(e)[:120]}); eager time", flush=True)
        rows.append(
            {
                **sh,
                "dtype": str(dtype).removeprefix("torch."),
                "impl": name,
                "pass": "fwd+bwd" if backward else "fwd",
                "us": us,
                "timing": timing,
                "tflops": flops / us / 1e6,
                "pct_floor": 100 * floor / us,
                "floor_us": floor,
                err_key: err,
            }
        )
    by_name = {r["impl"]: r for r in rows}
    base = by_name.get("flex") or by_name.get("fa4") or rows[0]
    for r in rows:
        r["x_vs"], r["base"] = base["us"] / r["us"], base["impl"]
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        f"| B,Hq,Hkv,S,D | (left,right) | dtype | impl | us | TFLOP/s | % floor | x vs {rows[0]['base']} | floor us |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        shape = f"{r['batch']},{r['q_heads']},{r['kv_heads']},{r['seq']},{r['head_dim']}"
        lines.append(
            f"| {shape} | ({r['left']},{r['right']}) | {r['dtype']} | {r['impl']} | {r['us']:.1f} | "
            f"{r['tflops']:.0f} | {r['pct_floor']:.0f} | {r['x_vs']:.2f} | {r['floor_us']:.0f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(
        dict.fromkeys(
            (r["batch"], r["q_heads"], r["kv_heads"], r["seq"], r["head_dim"], r["left"], r["right"], r["dtype"])
            for r in rows
        )
    )
    impls = list(dict.fromkeys(r["impl"].split()[0] for r in rows))
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.8 / len(impls)
    for n, impl in enumerate(impls):
        ys = [
            next(
                r["pct_floor"]
                for r in rows
                if r["impl"].split()[0] == impl
                and (
                    r["batch"],
                    r["q_heads"],
                    r["kv_heads"],
                    r["seq"],
                    r["head_dim"],
                    r["left"],
                    r["right"],
                    r["dtype"],
                )
                == key
            )
            for key in keys
        ]
        ax.bar([i + n * width for i in range(len(keys))], ys, width, label=impl)
    labels = [f"{k[0]}x{k[1]}/{k[2]}\nS{k[3]} D{k[4]}\n({k[5]},{k[6]}) {k[7][:4]}" for k in keys]
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))], labels, fontsize=7)
    ax.set_ylabel("% of the roofline floor (higher is better)")
    passes = "forward + backward" if rows[0].get("pass") == "fwd+bwd" else "forward"
    ax.set_title(f"sliding-window attention {passes}: {device}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", nargs="*", default=CONFIG["dtypes"])
    p.add_argument("--shapes", type=int, nargs="*", help="indices into configs/bench_op.json's shapes")
    p.add_argument("--out", default=str(ROOT / "results"))
    p.add_argument("--backward", action="store_true", help="time forward + backward (results/bench_op_bwd.*)")
    p.add_argument("--graph", action="store_true", help="time calls replayed from CUDA graphs (no host time)")
    p.add_argument("--impls", nargs="*", help="time only these: swattn flex sdpa fa4 (default: all)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_op.py needs a CUDA GPU.")
    peaks = card_peaks()
    shapes = [CONFIG["shapes"][i] for i in args.shapes] if args.shapes else CONFIG["shapes"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"env": environment(), "date": str(datetime.date.today()), "peaks": peaks, "command": " ".join(sys.argv)}
    stem = "bench_op_bwd" if args.backward else "bench_op"
    rows = []
    for sh in shapes:
        for dt in args.dtypes:
            new = bench_shape(sh, DTYPES[dt], peaks, args.backward, args.graph, args.impls)
            rows += new
            print("\n".join(table(new).splitlines()[2:]), flush=True)
            # after every shape: a call stopped at its time limit keeps what it measured
            (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    plot(rows, out / f"{stem}.png", torch.cuda.get_device_name())
    print(f"\n{meta['env']} | {meta['date']} | peaks {peaks}")
    print(table(rows))


if __name__ == "__main__":
    main()
