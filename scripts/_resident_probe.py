"""Temporary probe (removed next): is the D = 64 forward bound by its K/V loads?

Timing only (the probe variants compute on stale shared memory): the shipped
kernel against the same kernel with its K/V tile loads removed from the loop
("no K/V loads": what a CTA that kept every K/V tile resident in shared memory
could at best reach) and the same kernel with the loop unpipelined but the
loads kept ("serial loads": the price of synchronous loads). If "no K/V loads"
is not clearly faster than shipped, a persistent CTA that slides its window
and keeps the overlapping K/V tiles resident cannot pay off.
"""

import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tilelang  # noqa: E402
from sweep_common import bench_shapes, random_qkv, shape_label, time_us  # noqa: E402

import swattn  # noqa: E402

T = swattn.T


KERNELS = {}  # both shapes have D = 64: one compile per variant


def build(d, variant, tile=None):
    real_copy, real_pipe = T.copy, T.Pipelined

    def copy(src, dst, *a, **kw):
        name = getattr(getattr(src, "buffer", None), "name", None)
        if variant == "noload" and name in ("K", "V"):
            return None
        return real_copy(src, dst, *a, **kw)

    def pipelined(n, num_stages=None, **kw):
        return T.serial(n)

    T.copy = copy
    if variant in ("noload", "serial"):
        T.Pipelined = pipelined
    try:
        fn = swattn.make_forward.__wrapped__(d, "float16", "sm_90a", tile, "window", True)
    finally:
        T.copy, T.Pipelined = real_copy, real_pipe
    return tilelang.compile(fn, target={"kind": "cuda", "arch": "sm_90a"}, pass_configs={"tl.enable_fast_math": True})


def main():
    import torch

    for sh in bench_shapes([1, 2]):
        d, hq, hk, s = sh["head_dim"], sh["q_heads"], sh["kv_heads"], sh["seq"]
        q, k, v = random_qkv(sh, torch.float16)
        out = torch.empty_like(q)
        lse = torch.empty(sh["batch"], hq, s, device="cuda")
        win, kt = swattn._placeholders(q.device)
        for variant in ("shipped", "serial", "noload"):
            kern = KERNELS.get(variant) or KERNELS.setdefault(variant, build(d, variant))
            call = functools.partial(kern, q, k, v, out, lse, win, kt, sh["left"], sh["right"], 0, hq, hk, s, 1)
            print(f"| {shape_label(sh)} | {variant} | {time_us(call):.1f} |", flush=True)


if __name__ == "__main__":
    main()
