"""The backward kernel with its first two GEMMs in flight together: check it, then time it (Hopper).

Why (issue 22, analysis.md 4.10): on the H200 the backward kernel keeps the tensor pipe busy 22 %
(shape B) to 41 % (shape D) of its cycles (Nsight Compute), and every ``T.gemm`` of its loop ends
in ``warpgroup_wait<0>``: the five GEMMs and the elementwise work between them run one after
another. TileLang 0.1.15 has explicit asynchronous WGMMA (``T.wgmma_gemm`` without the implicit
wait, ``T.wait_wgmma(n)``). Here S^T = K Q^T and dP^T = V dO^T (independent: both read only
shared memory) are issued back to back; the warpgroup waits for the first alone, computes P
(the exponentials and the mask) while the second runs, then waits for it. No shared buffer's
last use falls between an issue and its wait (Q and dO are read again by later GEMMs), so
TileLang's release of a pipeline stage, placed after a buffer's last use, cannot overtake an
in-flight GEMM.

``async_module`` is kernels/backward.py with those edits applied at run time
(``kernel_variant.edited_module``; nothing on disk changes). Per bench shape (bf16, the shipped
tile): the main backward kernel alone, shipped and variant, dQ / dK / dV compared (relative error
against the shipped kernel's), then timed (triton's do_bench median, dQ zeroed in the call).

    PYTHONPATH=$PWD python tools/time_bwd_async.py --compile-only   # CPU: builds for sm_90a
    PYTHONPATH=$PWD python tools/time_bwd_async.py [--shapes 1 2 3 4]
"""

import argparse
import functools
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tools")]

EDITS = (
    (
        """                T.fill(st, 0)
                T.gemm(k_s, q_s, st, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
""",
        """                T.fill(st, 0)
                T.fill(dpt, 0)
                T.wgmma_gemm(k_s, q_s, st, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                T.wgmma_gemm(v_s, do_s, dpt, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                T.wait_wgmma(1)
""",
    ),
    (
        """                T.fill(dpt, 0)
                T.gemm(v_s, do_s, dpt, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
""",
        """                T.wait_wgmma(0)
""",
    ),
)
_MODULE = None


def async_module():
    global _MODULE
    if _MODULE is None:
        from kernel_variant import edited_module

        from swattn.kernels import backward as bwd

        _MODULE = edited_module(bwd, EDITS, "swattn.kernels._backward_async")
    return _MODULE


@functools.cache
def compiled_async(head_dim: int, dtype: str, arch: str, tile: tuple):
    from swattn import launch

    return launch._compile(async_module().make_backward(head_dim, dtype, arch, tile), arch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--shapes", type=int, nargs="*", default=[1, 2, 3, 4])
    args = ap.parse_args()
    from sweep_common import bench_shapes, check_and_time, random_qkv, shape_label

    from swattn import launch

    shapes = bench_shapes(args.shapes)
    for d in sorted({sh["head_dim"] for sh in shapes}):
        tile = launch.tile_config(d, args.arch, "backward")
        src = compiled_async(d, "bfloat16", args.arch, tile).get_kernel_source()
        waits = src.count("wait_wgmma<1>")
        print(f"built D {d} tile {tile}: wait_wgmma<1> x{waits}", flush=True)
        assert waits, "the variant's early wait is missing"
        launch.compiled_backward(d, "bfloat16", args.arch, None)
    if args.compile_only:
        return

    import torch

    import swattn

    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    lines = ["| shape | window | kernel | us | err vs shipped |", "|---|---|---|---:|---:|"]
    for sh in shapes:
        s, hk, d, left, right = sh["seq"], sh["kv_heads"], sh["head_dim"], sh["left"], sh["right"]
        q, k, v = random_qkv(sh, torch.bfloat16)
        do = torch.randn_like(q)
        out, lse = swattn.sliding_window_attention(q, k, v, (left, right), return_lse=True)
        delta = (do.float() * out.float()).sum(-1).transpose(1, 2).contiguous()
        win, kt, cu, _ = launch.placeholders(q.device)
        grads = [torch.empty(x.shape, device="cuda", dtype=torch.float32) for x in (q, k, v)]
        kargs = (q, k, v, do, lse, delta, *grads, win, kt, cu, cu, left, right, 0, hk, s, s, 1, 0, d**-0.5, 0.0)
        tile = launch.tile_config(d, args.arch, "backward")
        base = None
        for name, kern in (
            ("shipped", launch.compiled_backward(d, "bfloat16", args.arch, None)),
            ("async S, dP", compiled_async(d, "bfloat16", args.arch, tile)),
        ):

            def call(kern=kern, grads=grads, kargs=kargs):
                grads[0].zero_()  # dQ accumulates
                kern(*kargs)

            us, err, base = check_and_time(call, grads[1:], grads, base, warmup=20)
            lines.append(f"| {shape_label(sh)} | {name} | {us:.1f} | {err:.1e} |")
            print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
