"""Time one shape with an older tree of the repository and with this one, in one
run (each in its own process: both import a module named ``swattn``).

    git archive 63351c6 | tar -x -C .device/old       # the tree before the package move
    python tools/bench_ab.py --old .device/old         # bf16, (4,16,16,8192,64), W = 128

Prints one JSON line per tree and a two-row table: forward and forward + backward
medians (triton.testing.do_bench), so a change that should not move the kernels'
time can be shown not to.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def measure(shape: list[int], window: int) -> dict:
    import torch
    from triton.testing import do_bench

    import swattn

    b, h, s, d = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    fwd = lambda: swattn.sliding_window_attention(q, k, v, window)  # noqa: E731
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    dout = torch.randn_like(q)
    fwdbwd = lambda: swattn.sliding_window_attention(qg, kg, vg, window).backward(dout)  # noqa: E731
    fwd(), fwdbwd()
    torch.cuda.synchronize()
    return {
        "file": swattn.__file__,
        "fwd_us": do_bench(fwd, warmup=50, rep=300, return_mode="median") * 1e3,
        "fwdbwd_us": do_bench(fwdbwd, warmup=20, rep=300, grad_to_none=[qg, kg, vg], return_mode="median") * 1e3,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--old", required=True, help="a checkout of the older tree")
    p.add_argument("--shape", type=int, nargs=4, default=[4, 16, 8192, 64], metavar=("B", "H", "S", "D"))
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--child", choices=["old", "new"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        if args.child == "old":
            sys.path.insert(0, os.path.abspath(args.old))
        print(json.dumps({"tree": args.child, **measure(args.shape, args.window)}), flush=True)
        return
    rows = []
    for tree in ("old", "new"):
        cmd = [sys.executable, __file__, "--old", args.old, "--window", str(args.window), "--child", tree, "--shape"]
        out = subprocess.run(cmd + [str(x) for x in args.shape], capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print(f"| tree | B,H,S,D W={args.window} bf16 | fwd us | fwd+bwd us |\n|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['tree']} | {','.join(map(str, args.shape))} | {r['fwd_us']:.1f} | {r['fwdbwd_us']:.1f} |")


if __name__ == "__main__":
    main()
