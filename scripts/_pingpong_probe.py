"""Temporary: FA3-style ping-pong of the consumer warpgroups' Q K^T GEMMs (named barriers), D = 128."""
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tilelang  # noqa: E402

import swattn  # noqa: E402
from sweep_common import bench_shapes, compile_all, random_qkv, shape_label, time_us  # noqa: E402

VARIANTS = [((192, 128, 384, 2, 1), False), ((192, 128, 384, 2, 1), True), ((128, 128, 256, 2, 1), False),
            ((128, 128, 256, 2, 1), True), ((192, 128, 384, 3, 1), True)]


@functools.cache
def build(d, tile, pp):
    fn = swattn.make_forward(d, "float16", "sm_90a", tile, "window", True, pp)
    return tilelang.compile(fn, target={"kind": "cuda", "arch": "sm_90a"}, pass_configs={"tl.enable_fast_math": True})


def _compile(job):
    try:
        build(*job)
    except Exception as e:
        return job, repr(e)[:300]
    return job


def main():
    import torch

    import reference as ref

    compile_all(_compile, [(128, t, p) for t, p in VARIANTS])
    for sh in bench_shapes([3, 4]):
        d, hq, hk, s = sh["head_dim"], sh["q_heads"], sh["kv_heads"], sh["seq"]
        for dt in (torch.float16,):
            q, k, v = random_qkv(sh, dt)
            lse = torch.empty(sh["batch"], hq, s, device="cuda")
            win, kt = swattn._placeholders(q.device)
            base = None
            for tile, pp in VARIANTS:
                kern = build(d, tile, pp)
                out = torch.full_like(q, float("nan"))
                call = functools.partial(kern, q, k, v, out, lse, win, kt, sh["left"], sh["right"], 0, hq, hk, s, 1)
                call()
                base = out.clone() if base is None else base
                err = ref.rel_err(out, base)
                print(f"| {shape_label(sh)} | {tile} | pingpong {pp} | {time_us(call):.1f} | {err:.1e} |", flush=True)


if __name__ == "__main__":
    main()
