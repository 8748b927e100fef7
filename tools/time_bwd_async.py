"""The backward's asynchronous GEMMs against the synchronous form, and a lazier dQ store: check, time (Hopper).

Why (issue 22, analysis.md 4.10-4.11): on the H200 the backward kernel kept the tensor pipe busy
22 % (shape B) to 41 % (shape D) of its cycles (Nsight Compute) while every ``T.gemm`` of its loop
ended in ``warpgroup_wait<0>``: the five GEMMs and the elementwise work between them ran one after
another. The shipped kernel (``overlap`` in kernels/backward.py) issues them with
``T.wgmma_gemm`` and waits with ``T.wait_wgmma(n)``: S^T with dP^T, dV with the dS arithmetic,
dK with the dS^T store and the barrier before dQ's GEMM.

Variants, each kernels/backward.py with exact edits applied at run time
(``kernel_variant.edited_module``; nothing on disk changes):
  synchronous   every GEMM waits for itself at once (the kernel before the overlap);
  dQ rows       on top of the shipped kernel, each dQ tile is added row by row with 1-D bulk
                reduce-adds, one thread a row, whose shared-memory reads are waited for at the
                next tile rather than at once (TileLang's TMA reduce-add waits for its read before
                the issuing thread goes on, and that thread's warpgroup issues its next GEMM only
                when all four warps arrive). Rows padded by 8 floats against bank conflicts.
                Rejected (analysis.md 4.11): 64 small reduce-adds cost more than one box.

Per bench shape (bf16, the shipped tile): the main backward kernel alone, shipped and variants,
dQ / dK / dV compared (relative error against the shipped kernel's), then timed (triton's
do_bench median, dQ zeroed in the call).

    PYTHONPATH=$PWD python tools/time_bwd_async.py --compile-only   # CPU: builds for sm_90a
    PYTHONPATH=$PWD python tools/time_bwd_async.py [--shapes 1 2 3 4]
"""

import argparse
import functools
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tools")]

SYNCHRONOUS = (
    (
        """    overlap = arch == "sm_90a" and not kv_ss
""",
        """    overlap = False
""",
    ),
)
DQ_ROWS = (
    (
        """            dq_s = T.alloc_shared((block_m, head_dim), accum)  # used with dq_tma only
""",
        """            dq_s = T.alloc_shared((block_m, head_dim + 8), accum)  # used with dq_tma only
""",
    ),
    (
        """                T.fill(st, 0)
                if overlap:
""",
        """                T.call_extern("handle", "tl::tma_store_wait<0, true>")
                T.fill(st, 0)
                if overlap:
""",
    ),
    (
        """                    T.copy(dq, dq_s)
                    rq = q_base + qt * block_m
                    T.atomic_add(dQ[bi, rq : rq + block_m, qh, :], dq_s, annotations={"use_tma": 1})
""",
        """                    T.copy(dq, dq_s[:, 0:head_dim])
                    for i in T.Parallel(block_m):
                        if qt * block_m + i < q_rows:
                            T.call_extern("handle", "tl::fence_proxy_async")
                            T.call_extern(
                                "handle",
                                "tl::tma_store_add",
                                dq_s.access_ptr("r", offset=i * (head_dim + 8), extent=head_dim),
                                T.address_of(dQ[bi, q_base + qt * block_m + i, qh, 0]),
                                head_dim * 4,
                            )
                            T.call_extern("handle", "tl::tma_store_arrive")
""",
    ),
    (
        """            for j, d in T.Parallel(block_n, head_dim):
                if bx * block_n + j < k_rows:""",
        """            T.call_extern("handle", "tl::tma_store_wait<0, true>")
            for j, d in T.Parallel(block_n, head_dim):
                if bx * block_n + j < k_rows:""",
    ),
)
VARIANTS = {"synchronous": SYNCHRONOUS, "dQ rows": DQ_ROWS}


@functools.cache
def variant_module(name: str):
    from kernel_variant import edited_module

    from swattn.kernels import backward as bwd

    tag = name.replace(",", "").replace(" ", "_")
    return edited_module(bwd, VARIANTS[name], f"swattn.kernels._backward_{tag}")


@functools.cache
def compiled_variant(name: str, head_dim: int, dtype: str, arch: str, tile: tuple):
    from swattn import launch

    if tile[6]:
        raise SystemExit("the variants edit the register form (kv_ss False) only")
    return launch._compile(variant_module(name).make_backward(head_dim, dtype, arch, tile), arch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--shapes", type=int, nargs="*", default=[1, 2, 3, 4])
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()
    from sweep_common import bench_shapes, check_and_time, random_qkv, shape_label

    from swattn import launch

    shapes = bench_shapes(args.shapes)
    for d in sorted({sh["head_dim"] for sh in shapes}):
        tile = launch.tile_config(d, args.arch, "backward")
        for name in args.variants:
            src = compiled_variant(name, d, "bfloat16", args.arch, tile).get_kernel_source()
            waits = src.count("wait_wgmma<1>")
            print(f"built D {d} tile {tile} {name}: wait_wgmma<1> x{waits}", flush=True)
            assert bool(waits) == (name != "synchronous"), "the variant's waits are not as described"
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
        kernels = [("shipped", launch.compiled_backward(d, "bfloat16", args.arch, None))]
        kernels += [(name, compiled_variant(name, d, "bfloat16", args.arch, tile)) for name in args.variants]
        for name, kern in kernels:

            def call(kern=kern, grads=grads, kargs=kargs):
                grads[0].zero_()  # dQ accumulates
                kern(*kargs)

            us, err, base = check_and_time(call, grads[1:], grads, base, warmup=20)
            lines.append(f"| {shape_label(sh)} | {name} | {us:.1f} | {err:.1e} |")
            print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
