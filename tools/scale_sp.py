"""Scaling of sequence-parallel attention (distributed.py) over the GPUs of one host.

    python tools/scale_sp.py [--seqs 131072 262144] [--windows 4096 full] [--gpus 1 2 4]
                               [--modes fwd fwdbwd] [--out results/scale_sp.json]
    python tools/scale_sp.py --plot results/scale_sp.json   # the PNG beside it (no GPU needed)
    python tools/scale_sp.py --smoke                        # gloo ranks on the CPU, tiny shapes

For each (seq, window, mode) and GPU count P: the time of one call, forward
(``fwd``) or forward + backward (``fwdbwd``), every rank synchronised, the
slowest rank counts; scaling efficiency T(1) / (P * T(P)); and the exposed
communication 1 - T(kernels only) / T(P), where "kernels only" runs the same
attention blocks (forward, and backward for fwdbwd) on local tensors with no
transfer. One GPU runs the single-device op (swattn.sliding_window_attention),
not the distributed code with one rank. D = 128, GQA 32 query / 8 kv heads,
bf16, batch 1; NCCL with NCCL_NVLS_ENABLE=0 and TORCH_SYMM_MEM_DISABLE_MULTICAST=1.

Each GPU count is one spawn whose ranks walk every case (one NCCL set-up and
one compile per count). Repetitions adapt to the cost: median of up to five
calls within ~6 s after a warm-up call; a call longer than that is timed once
(the kernels were compiled on a small case first, so its first call is warm).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPE = dict(heads=32, kv_heads=8, dim=128, dtype=torch.bfloat16, min_shard=8192, device="cuda")  # the job
SMOKE = dict(heads=4, kv_heads=2, dim=64, dtype=torch.float32, min_shard=128, device="cpu")  # --smoke: gloo on the CPU
BUDGET_S, MAX_REPS = 6.0, 5


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
    if dist.is_initialized():
        dist.barrier()


def slowest(x: float, device) -> float:
    """The largest value over the ranks (every rank gets it)."""
    if not dist.is_initialized():
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def timed(fn, device) -> float:
    """Milliseconds of one call of fn: the slowest rank's, median over adaptive reps."""

    def once() -> float:
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        return slowest(time.perf_counter() - t0, device)

    first = once()
    reps = min(MAX_REPS, int(BUDGET_S / first))  # equal on every rank: `first` is agreed
    if reps == 0:
        return first * 1e3
    return statistics.median(once() for _ in range(reps)) * 1e3


def inputs(n: int, shape: dict, device, seed: int, grad: bool):
    g = torch.Generator(device=device).manual_seed(seed)

    def rand(heads):
        x = torch.randn(1, n, heads, shape["dim"], device=device, dtype=shape["dtype"], generator=g)
        return x.requires_grad_(grad)

    return rand(shape["heads"]), rand(shape["kv_heads"]), rand(shape["kv_heads"])


def with_backward(fn, q, k, v, dout):
    """fn(q, k, v) -> out, and its gradients if asked (dout not None)."""
    out = fn(q, k, v)
    if dout is not None:
        torch.autograd.grad(out, (q, k, v), dout)


def kernels_only(q, k, v, dout, rank, world, seq, window, device):
    """The attention blocks rank ``rank`` computes, on local tensors (no transfer):
    the ring's visible blocks (full) or one block over the keys the window reaches."""
    from swattn.online import block_attention, block_attention_backward, window_bounds
    from swattn.window import block_visible

    n = q.shape[1]
    left, right = window_bounds(None if window == "full" else int(window), False, seq)
    q, k, v = (x.detach() for x in (q, k, v))
    if window == "full":
        blocks = [(k, v, s * n) for s in range(world) if block_visible(rank * n, n, s * n, n, left, right, 0)]
    else:
        lo, hi = max(0, rank * n - left), min(seq, (rank + 1) * n + right)
        g = torch.Generator(device=device).manual_seed(world)
        kk, vv = (torch.randn(1, hi - lo, *k.shape[2:], device=device, dtype=k.dtype, generator=g) for _ in range(2))
        blocks = [(kk, vv, lo)]

    def run():
        # final: like distributed.py's halo path, a window block keeps the kernel's dtype (the ring merges in float32)
        final = window != "full"
        outs = [block_attention(q, kb, vb, rank * n, k0, left, right, final=final) for kb, vb, k0 in blocks]
        if dout is not None:
            lse = outs[0][1]  # a stand-in for the merged lse: same shapes, same work
            delta = torch.zeros_like(lse)
            for kb, vb, k0 in blocks:
                block_attention_backward(dout, q, kb, vb, lse, delta, rank * n, k0, left, right)

    return run


def worker(rank, world, port, cases, shape, results):
    """One rank: time every (seq, window, mode) case; rank 0 reports (ms, kernels-only ms)."""
    import swattn
    from swattn import distributed

    cuda = shape["device"] == "cuda"  # (a spawned rank gets a copy of the dict: compare by value)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    spmd = world > 1 or not cuda  # the CPU smoke runs one rank through distributed.py too
    if spmd:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NCCL_NVLS_ENABLE="0")
        os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
        kw = dict(device_id=device) if cuda else {}
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world, **kw)
    if cuda:
        torch.cuda.set_device(device)

    def case(seq, window, mode):
        n, grad = seq // world, mode == "fwdbwd"
        q, k, v = inputs(n, shape, device, rank, grad)
        dout = torch.randn_like(q) if grad else None
        w = None if window == "full" else int(window)

        def op(q, k, v):
            if spmd:
                return distributed.sliding_window_attention_sp(q, k, v, w)
            return swattn.sliding_window_attention(q, k, v, seq if w is None else w)

        total = timed(lambda: with_backward(op, q, k, v, dout), device)
        compute = timed(kernels_only(q, k, v, dout, rank, world, seq, window, device), device) if world > 1 else total
        return total, compute

    # compile (and warm) every kernel on a small case first, so no timed call pays for it
    for window, mode in sorted({c[1:] for c in cases}):
        case(world * max(shape["min_shard"], 2 * (0 if window == "full" else int(window))), window, mode)
    for c in cases:
        res = case(*c)
        if rank == 0:
            print(f"  [{time.strftime('%H:%M:%S')}] {world} GPU(s) {c}: {res[0]:.1f} ms", file=sys.stderr, flush=True)
            results.put((c, res))
        if cuda:
            torch.cuda.empty_cache()
    if spmd:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(cases, gpus, shape, earlier: list[dict] = ()) -> list[dict]:
    """Time every case on each GPU count. ``earlier``: rows of an earlier run whose
    one-GPU times are the baseline of the cases not timed on one GPU here (a split
    run: one GPU in one device call, the rest in the next); same device only."""
    ctx = mp.get_context("spawn")
    device = torch.cuda.get_device_name() if shape["device"] == "cuda" else "cpu (gloo smoke)"
    base, rows = {}, []
    for r in earlier:
        if r["gpus"] == 1:
            if r["device"] != device:  # efficiencies divide within one card
                raise ValueError(f"baseline row measured on {r['device']}, this run is on {device}")
            base[(r["seq"], r["window"], r["mode"])] = r["ms"]
    print("| seq | window | mode | GPUs | ms | efficiency | exposed comm |", flush=True)
    print("|---:|---|---|---:|---:|---:|---:|", flush=True)
    worlds = set(gpus) | ({1} if any(c not in base for c in cases) else set())
    for world in sorted(worlds):  # one GPU first: the efficiencies divide by it
        results = ctx.Queue()
        if world == 1 and shape["device"] == "cuda":  # the single-device op, in this process
            worker(0, 1, None, cases, shape, results)
            torch.cuda.empty_cache()
        else:
            mp.spawn(worker, args=(world, free_port(), cases, shape, results), nprocs=world, join=True)
        for _ in cases:
            (seq, window, mode), (total, compute) = results.get()
            if world == 1:  # measured here: this run's own baseline
                base[(seq, window, mode)] = total
            t1 = base[(seq, window, mode)]
            row = dict(seq=seq, window=window, mode=mode, gpus=world, ms=round(total, 2), kernels_ms=round(compute, 2))
            row.update(efficiency=round(t1 / (world * total), 3), exposed_comm=round(max(0.0, 1 - compute / total), 3))
            rows.append(row | dict(device=device))
            comm = "-" if world == 1 else f"{100 * row['exposed_comm']:.0f} %"
            eff = row["efficiency"]
            print(f"| {seq} | {window} | {mode} | {world} | {total:.1f} | {eff:.2f} | {comm} |", flush=True)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({r["mode"] for r in rows}, key=["fwd", "fwdbwd"].index)
    devices = sorted({r["device"] for r in rows})  # a series is one device's: efficiencies divide within it
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.2), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        series = sorted({(r["seq"], r["window"], r["device"]) for r in rows if r["mode"] == mode})
        for seq, window, device in series:
            mine = [r for r in rows if (r["seq"], r["window"], r["mode"], r["device"]) == (seq, window, mode, device)]
            pts = sorted((r["gpus"], r["efficiency"]) for r in mine)
            style = "--" if window == "full" else "-"
            label = f"{seq // 1024}K, {window}" + (f", {device.split()[1]}" if len(devices) > 1 else "")
            ax.plot(*zip(*pts, strict=True), style, marker="o", label=label)
        top = max(1.05, max(r["efficiency"] for r in rows) + 0.05)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set(xlabel="GPUs", ylabel="scaling efficiency T(1) / (P T(P))", ylim=(0, top))
        ax.set_title({"fwd": "forward", "fwdbwd": "forward + backward"}[mode])
        ax.set_xticks(sorted({r["gpus"] for r in rows}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="seq, window")
    fig.suptitle(f"Sequence-parallel attention, D 128, GQA 32/8, bf16 ({', '.join(devices)})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seqs", type=int, nargs="*", default=[131072, 262144])
    p.add_argument("--windows", nargs="*", default=["4096", "full"])
    p.add_argument("--modes", nargs="*", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    p.add_argument("--gpus", type=int, nargs="*", default=None, help="GPU counts (default 1 and all)")
    p.add_argument("--out", help="JSON of the rows (appended to, if it exists); the PNG beside it")
    p.add_argument("--plot", help="only draw the PNG of this JSON")
    p.add_argument("--base", help="JSON whose one-GPU rows are the baseline (then 1 need not be in --gpus)")
    p.add_argument("--smoke", action="store_true", help="gloo ranks on the CPU, tiny shapes (checks this script)")
    args = p.parse_args()
    if args.plot:
        plot(json.loads(Path(args.plot).read_text()), Path(args.plot).with_suffix(".png"))
        return
    shape = SMOKE if args.smoke else SHAPE
    if args.smoke:
        args.seqs, args.windows = [512], ["48", "full"]
    gpus = args.gpus or ([1, 2] if args.smoke else [1, torch.cuda.device_count()])
    cases = [(s, w, m) for s in args.seqs for w in args.windows for m in args.modes]
    earlier = json.loads(Path(args.base).read_text()) if args.base else []
    rows = measure(cases, gpus, shape, earlier)
    if args.out:
        out = Path(args.out)
        old = json.loads(out.read_text()) if out.exists() else []
        keys = {(r["seq"], r["window"], r["mode"], r["gpus"]) for r in rows}
        rows = [r for r in old if (r["seq"], r["window"], r["mode"], r["gpus"]) not in keys] + rows
        out.write_text(json.dumps(rows, indent=1) + "\n")
        plot(rows, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
