"""Benchmark: sliding-window vs full attention, one head, the seed's table.

    python bench.py               # `make bench`: seq 512/1024/2048, every implementation
    python bench.py --assignment  # `make run`: compile, verify and time the card's kernel
    python bench.py --measure-peaks   # re-measure this card's FLOP/s and bandwidth

Two times per implementation, because at these sizes a launch costs as much
as the work:
  kernel us  GPU time of one call: CUDA-graph replay of many calls, inputs
             rotated over enough copies to overflow L2, divided by the count;
  call us    host time of one Python call, back to back, then synchronize.
Roofline floor = max(useful FLOPs / peak FLOP/s, bytes / peak bandwidth), with
the two peaks measured on this card (configs/gpus.json). Useful FLOPs count
only the (query, key) pairs inside the window (reference.attention_flops).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import reference as ref
import solution

ROOT = Path(__file__).resolve().parent
GPUS = ROOT / "configs" / "gpus.json"
BENCH = json.loads((ROOT / "configs" / "bench.json").read_text())
L2_FLUSH_BYTES = 256 << 20  # rotate inputs over more than this: ~5x the H100's 50 MB L2


# --- the card's peaks -----------------------------------------------------------------


def measure_peaks() -> dict:
    """Dense fp16 matmul rate and device-to-device copy bandwidth, measured here."""
    from triton.testing import do_bench

    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.float16) for _ in range(2))
    ms = do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median")
    tflops = 2 * n**3 / ms / 1e9
    x = torch.randn(1 << 28, device="cuda", dtype=torch.float16)  # 512 MiB
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
    gbps = 2 * x.numel() * x.element_size() / ms / 1e6  # read + write
    return {"fp16_tflops": round(tflops, 1), "bandwidth_gbps": round(gbps, 1), "measured": str(datetime.date.today())}


def card_peaks(remeasure: bool = False) -> dict:
    name = torch.cuda.get_device_name()
    table = json.loads(GPUS.read_text()) if GPUS.exists() else {}
    if remeasure or name not in table:
        table[name] = measure_peaks()
        GPUS.write_text(json.dumps(table, indent=2) + "\n")
    return table[name]


def floor_us(seq_len: int, head_dim: int, window: int | None, peaks: dict) -> float:
    flops = ref.attention_flops(seq_len, head_dim, window)
    bytes_ = ref.tiled_memory_bytes(seq_len, head_dim)  # Q, K, V read once, O written once
    return max(flops / (peaks["fp16_tflops"] * 1e12), bytes_ / (peaks["bandwidth_gbps"] * 1e9)) * 1e6


# --- timing ---------------------------------------------------------------------------


def kernel_us(calls: list, reps: int = 200) -> float:
    """Median GPU time of one call from a CUDA graph of ``reps`` calls cycling over ``calls``."""
    from triton.testing import do_bench

    for c in calls:  # warm up: compile, autotune, allocate outside the capture
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for r in range(reps):
            calls[r % len(calls)]()
    return do_bench(graph.replay, warmup=50, rep=300, return_mode="median") * 1e3 / reps


def graph_us(fn, leaves=()) -> float:
    """Median GPU time of ``fn`` replayed from a CUDA graph that holds one call: the
    number has no host time in it (Python, checks, launches), which an eager
    do_bench of a call shorter than its host path measures instead. ``leaves``: the
    tensors whose gradients ``fn`` accumulates (a forward + backward); they are
    cleared before the capture, so each replay rewrites the same gradient buffers."""
    from triton.testing import do_bench

    side = torch.cuda.Stream()  # warm up off the capture stream, as torch.cuda.graphs asks
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            for x in leaves:
                x.grad = None
            fn()
    torch.cuda.current_stream().wait_stream(side)
    for x in leaves:
        x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return do_bench(graph.replay, warmup=20, rep=200, return_mode="median") * 1e3


def call_us(call, n: int = 300, wait: bool = True) -> float:
    """Time of one call issued back to back, median of 5 runs: with ``wait``, until the GPU is
    done (Python + launch + kernels); without, the host's time only (launches queued)."""
    call()
    torch.cuda.synchronize()
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            call()
        if wait:
            torch.cuda.synchronize()
        runs.append((time.perf_counter() - t0) / n * 1e6)
        torch.cuda.synchronize()
    return sorted(runs)[2]


def peak_mib(call) -> float:
    """Device memory a call allocates beyond its inputs (torch.cuda.max_memory_allocated)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    call()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


# --- implementations --------------------------------------------------------------------
# Each takes (q, k, v) of shape (seq, dim) and returns the output; `window` None = full.


def tilelang_impl(window, tile):
    def run(q, k, v, out=None):
        return solution.sliding_window_attention_forward(q, k, v, q.shape[0] if window is None else window, tile, out)

    return run


def sdpa_flash(q, k, v):
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q[None, None], k[None, None], v[None, None])[0, 0]


def sdpa_masked_impl(window):
    masks = {}

    def run(q, k, v):
        if q.shape[0] not in masks:
            masks[q.shape[0]] = ref.window_mask(q.shape[0], window, device=q.device)
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION):
            return F.scaled_dot_product_attention(q[None, None], k[None, None], v[None, None], masks[q.shape[0]])[0, 0]

    return run


def naive_impl(window):
    masks = {}

    def run(q, k, v):
        s = (q @ k.t()).float() * (1.0 / math.sqrt(q.shape[1]))
        if window is not None:
            if q.shape[0] not in masks:
                masks[q.shape[0]] = ~ref.window_mask(q.shape[0], window, device=q.device)
            s = s.masked_fill(masks[q.shape[0]], float("-inf"))
        return torch.softmax(s, dim=-1).to(q.dtype) @ v

    return run


def implementations(window: int):
    """name -> (function, window it computes, is it a full-attention baseline)."""
    impls = {f"tilelang SWA ({name})": (tilelang_impl(window, name), window, False) for name in sorted(solution.TILES)}
    impls |= {
        "naive torch SWA": (naive_impl(window), window, False),
        "SDPA mem-eff + mask": (sdpa_masked_impl(window), window, False),
        "tilelang full (W>=S)": (tilelang_impl(None, "assignment"), None, True),
        "SDPA flash full": (sdpa_flash, None, True),
        "naive torch full": (naive_impl(None), None, True),
    }
    return impls


def input_sets(seq_len: int, head_dim: int, dtype) -> list:
    per_set = 3 * seq_len * head_dim * torch.tensor([], dtype=dtype).element_size()
    n = max(2, min(64, L2_FLUSH_BYTES // per_set))
    return [[torch.randn(seq_len, head_dim, device="cuda", dtype=dtype) for _ in range(3)] for _ in range(n)]


def measure_impl(name: str, fn, window, is_full: bool, sets: list, peaks: dict) -> dict:
    q, k, v = sets[0]
    seq_len, head_dim = q.shape
    err = ref.rel_err(fn(q, k, v), ref.sliding_window_attention_ref(q, k, v, window))
    t_kernel = kernel_us([lambda s=s: fn(*s) for s in sets])
    return {
        "seq_len": seq_len,
        "head_dim": head_dim,
        "impl": name,
        "attention": "full" if is_full else "sliding",
        "kernel_us": t_kernel,
        "call_us": call_us(lambda: fn(q, k, v)),
        "tflops": ref.attention_flops(seq_len, head_dim, window) / t_kernel / 1e6,
        "pct_floor": 100 * floor_us(seq_len, head_dim, window, peaks) / t_kernel,
        "peak_mib": peak_mib(lambda: fn(q, k, v)),
        "rel_err": err,
    }


def bench_shape(seq_len: int, head_dim: int, window: int, dtype, peaks: dict) -> list[dict]:
    sets = input_sets(seq_len, head_dim, dtype)
    rows = []
    for name, (fn, w, is_full) in implementations(window).items():
        rows.append(measure_impl(name, fn, w, is_full, sets, peaks) | {"window": window})
    fastest_full = min(r["kernel_us"] for r in rows if r["attention"] == "full")
    for r in rows:
        r["x_vs_full"] = fastest_full / r["kernel_us"]
    return rows


# --- report ------------------------------------------------------------------------------


def environment() -> str:
    import tilelang

    cuda = torch.version.cuda
    return f"{torch.cuda.get_device_name()} | torch {torch.__version__} (CUDA {cuda}) | tilelang {tilelang.__version__}"


def table(rows: list[dict]) -> str:
    head = "| seq | impl | kernel us | call us | TFLOP/s | % floor | x vs fastest full | peak MiB | rel err |"
    lines = [head, "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['seq_len']} | {r['impl']} | {r['kernel_us']:.1f} | {r['call_us']:.1f} | {r['tflops']:.1f} | "
            f"{r['pct_floor']:.1f} | {r['x_vs_full']:.2f} | {r['peak_mib']:.2f} | {r['rel_err']:.1e} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seqs = sorted({r["seq_len"] for r in rows})
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(impls)
    for n, impl in enumerate(impls):
        ys = [next(r["kernel_us"] for r in rows if r["impl"] == impl and r["seq_len"] == s) for s in seqs]
        ax.bar([i + n * width for i in range(len(seqs))], ys, width, label=impl)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(seqs))], [f"seq {s}" for s in seqs])
    ax.set_ylabel("kernel time (us, CUDA graph)")
    ax.set_yscale("log")
    ax.set_title(f"head_dim {rows[0]['head_dim']}, window {rows[0]['window']}: {torch.cuda.get_device_name()}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_bench(args) -> None:
    peaks = card_peaks(args.measure_peaks)
    dtype = solution.DTYPES[BENCH["dtype"]]
    rows = []
    for seq_len in args.seq or BENCH["seq_lens"]:
        rows += bench_shape(seq_len, BENCH["head_dim"], BENCH["window"], dtype, peaks)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"env": environment(), "date": str(datetime.date.today()), "peaks": peaks, "command": " ".join(sys.argv)}
    (out_dir / "bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    plot(rows, out_dir / "bench.png")
    print(f"\n{meta['env']} | {meta['date']} | peaks {peaks}")
    print(table(rows))
    targets = BENCH["targets_speedup_vs_full"]
    for seq_len in args.seq or BENCH["seq_lens"]:
        best = max(r["x_vs_full"] for r in rows if r["seq_len"] == seq_len and r["impl"].startswith("tilelang SWA"))
        target = targets[str(seq_len)]
        print(f"seq {seq_len}: best TileLang SWA {best:.2f}x the fastest full attention (seed target {target}x)")


def run_assignment(json_path: str | None = None) -> None:
    """`make run`: compile the card's kernel; on a GPU verify it and time it.

    ``json_path``: also write the result there (the grader reads it)."""
    card = solution.ASSIGNMENT
    shape = f"Q, K, V ({card['seq_len']}, {card['head_dim']}) {card['dtype']}, window {card['window']}"
    if not torch.cuda.is_available():
        for arch in ("sm_90a", "sm_80"):
            t0 = time.perf_counter()
            solution.compile_assignment(arch)
            print(f"compiled the assignment kernel ({shape}) for {arch} in {time.perf_counter() - t0:.1f} s")
        print("No CUDA GPU here: the kernels compile, but verifying and timing them needs one.")
        return
    dtype = solution.DTYPES[card["dtype"]]
    q, k, v = (torch.randn(card["seq_len"], card["head_dim"], device="cuda", dtype=dtype) for _ in range(3))
    out = torch.full((card["seq_len"], card["head_dim"]), float("nan"), device="cuda")
    solution.sliding_window_attention_forward(q, k, v, card["window"], card["tile"], out)
    err = ref.rel_err(out, ref.sliding_window_attention_ref(q, k, v, card["window"]))
    ok = bool(torch.isfinite(out).all()) and err < 3e-3
    print(environment())
    print(f"assignment kernel, {shape}: rel err vs float64 reference {err:.2e} -> {'OK' if ok else 'FAIL'}")
    sets = input_sets(card["seq_len"], card["head_dim"], dtype)
    times = {
        name: kernel_us([lambda s=s, fn=fn: fn(*s) for s in sets])
        for name, (fn, _, _) in implementations(card["window"]).items()
        if name in ("tilelang SWA (assignment)", "tilelang full (W>=S)", "SDPA flash full")
    }
    for name, us in times.items():
        print(f"  {name:28s} {us:7.1f} us (kernel, CUDA graph)")
    speedup = min(times["tilelang full (W>=S)"], times["SDPA flash full"]) / times["tilelang SWA (assignment)"]
    print(f"  speedup over the fastest full attention: {speedup:.2f}x")
    if json_path:
        result = {"env": environment(), "rel_err": err, "ok": ok, "kernel_us": times, "speedup": speedup}
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    if not ok:
        sys.exit(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--assignment", action="store_true", help="compile, verify and time the card's kernel only")
    p.add_argument("--measure-peaks", action="store_true", help="re-measure this card's peaks into configs/gpus.json")
    p.add_argument("--seq", type=int, nargs="*", help="override the sequence lengths of configs/bench.json")
    p.add_argument("--out", default=str(ROOT / "results"), help="folder for bench.json and bench.png")
    p.add_argument("--json", help="with --assignment: write the result to this file")
    args = p.parse_args()
    if args.assignment:
        run_assignment(args.json)
    elif not torch.cuda.is_available():
        sys.exit("make bench needs a CUDA GPU; `make run` compiles the kernels without one.")
    else:
        run_bench(args)


if __name__ == "__main__":
    main()
