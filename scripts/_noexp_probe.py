"""Temporary: upper bound of what a cheaper exp could give (exp2 replaced by identity; timing only)."""
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tilelang  # noqa: E402

import swattn  # noqa: E402
from sweep_common import bench_shapes, random_qkv, shape_label, time_us  # noqa: E402


def build(d, noexp):
    real = swattn.T.exp2
    if noexp:
        swattn.T.exp2 = lambda x: x * 0.5
    try:
        fn = swattn.make_forward.__wrapped__(d, "float16", "sm_90a", None, "window", True)
    finally:
        swattn.T.exp2 = real
    return tilelang.compile(fn, target={"kind": "cuda", "arch": "sm_90a"}, pass_configs={"tl.enable_fast_math": True})


def main():
    import torch

    for sh in bench_shapes([1, 2, 3]):
        d, hq, hk, s = sh["head_dim"], sh["q_heads"], sh["kv_heads"], sh["seq"]
        q, k, v = random_qkv(sh, torch.float16)
        out = torch.empty_like(q)
        lse = torch.empty(sh["batch"], hq, s, device="cuda")
        win, kt = swattn._placeholders(q.device)
        for noexp in (False, True):
            kern = build(d, noexp)
            call = functools.partial(kern, q, k, v, out, lse, win, kt, sh["left"], sh["right"], 0, hq, hk, s, 1)
            print(f"| {shape_label(sh)} | {'no exp' if noexp else 'exp2'} | {time_us(call):.1f} |", flush=True)


if __name__ == "__main__":
    main()
