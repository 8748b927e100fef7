"""The forward with the online softmax's lazy rescale: check it, then time it against the shipped kernel (Hopper).

Why (issue 22, analysis.md 5.3 and 5.9): at D 64, W 512 (shape C) the forward is bound by the
instructions of its loop body, ~250 SASS a warp per unmasked key tile, of which FMUL 34: 32 are
the accumulator's rescale by alpha, paid on every tile although the running row max rarely moves
after the first tiles. FlashAttention-4 rescales only when a row's max grows by more than a
threshold (here 8 in log2 units): the stale max stays, P may reach 2^8 (fine for 16-bit P and a
float32 sum), and out and lse stay exact because l, acc and the lse all use the same max. With
the max kept, alpha is exactly 1, and a warp whose rows all kept theirs skips the rescale: the
skip is a warp vote (`__any_sync`) because a per-row `if` compiles to predicated FMULs that still
issue (checked in the SASS: with the vote, one `@!P0 BRA` jumps over the 32 FMULs).

``rescale_forward`` is kernels/forward.py on an edited kernels/common.py, both built at run time
(``kernel_variant``; nothing on disk changes); ``launch.compiled_forward`` is pointed at it for
the variant's calls. Per bench shape (bf16): swattn.sliding_window_attention's out and lse
against the shipped kernel's, then do_bench medians of both.

Result on the H200: rejected (analysis.md 4.11).

    PYTHONPATH=$PWD python tools/time_fwd_rescale.py --compile-only   # CPU: builds for sm_90a
    PYTHONPATH=$PWD python tools/time_fwd_rescale.py [--shapes 1 2 3 4]
"""

import argparse
import functools
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tools")]

RESCALE_LOG2 = 8.0  # keep a row's max until a tile's exceeds it by this (log2 units): P <= 2^8
COMMON_EDITS = (
    (
        """    for i in T.Parallel(rows):
        m[i] = T.max(m_prev[i], m_tile[i])
        # -inf max (no visible key yet): exponentiate against 0, not -inf.
        m_safe[i] = T.if_then_else(m[i] == neg_inf, 0, m[i])
        alpha[i] = T.exp2(m_prev[i] * scale_log2 - m_safe[i] * scale_log2)
""",
        f"""    for i in T.Parallel(rows):
        # Lazy rescale: the max moves only when this tile's exceeds it by {RESCALE_LOG2} (log2 units);
        # from -inf (no key yet) any finite max is growth. Otherwise alpha is exactly 1.
        grow = m_tile[i] * scale_log2 > m_prev[i] * scale_log2 + {RESCALE_LOG2}
        m[i] = T.if_then_else(grow, m_tile[i], m_prev[i])
        m_safe[i] = T.if_then_else(m[i] == neg_inf, 0, m[i])
        alpha[i] = T.if_then_else(grow, T.exp2(m_prev[i] * scale_log2 - m_safe[i] * scale_log2), 1)
""",
    ),
    (
        """    for i, j in T.Parallel(acc.shape[0], acc.shape[1]):
        acc[i, j] *= alpha[i]
""",
        """    need = T.alloc_var("int32", init=0)
    for i in T.Parallel(acc.shape[0]):
        need = T.max(need, T.if_then_else(alpha[i] != 1, 1, 0))
    # A warp vote, so that nvcc branches over the FMULs instead of predicating them.
    if T.call_extern("int32", "__any_sync", 0xFFFFFFFF, need) != 0:
        for i, j in T.Parallel(acc.shape[0], acc.shape[1]):
            acc[i, j] *= alpha[i]
""",
    ),
)
FORWARD_EDITS = (("from .common import (\n", "from ._common_rescale import (\n"),)


@functools.cache
def rescale_forward():
    """kernels/forward.py built on the edited common.py (imported first, under the name
    the edited forward.py imports)."""
    from kernel_variant import edited_module

    from swattn.kernels import common, forward

    edited_module(common, COMMON_EDITS, "swattn.kernels._common_rescale")
    return edited_module(forward, FORWARD_EDITS, "swattn.kernels._forward_rescale")


@functools.cache
def compiled_rescale(head_dim, dtype, arch, tile=None, mode="general", skip=True, varlen=False, cap=False, sinks=False):
    from swattn import launch

    tile = tile or launch.tile_config(head_dim, arch)
    fn = rescale_forward().make_forward(head_dim, dtype, arch, tile, mode, skip, varlen, cap, sinks)
    return launch._compile(fn, arch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--shapes", type=int, nargs="*", default=[1, 2, 3, 4])
    args = ap.parse_args()
    from sweep_common import bench_shapes, random_qkv, shape_label, time_us

    from swattn import launch

    shapes = bench_shapes(args.shapes)
    for d in sorted({sh["head_dim"] for sh in shapes}):
        src = compiled_rescale(d, "bfloat16", args.arch, None, "window").get_kernel_source()
        assert "__any_sync" in src, "the lazy rescale's vote is missing"
        launch.compiled_forward(d, "bfloat16", args.arch, None, "window")
        print(f"built D {d}", flush=True)
    if args.compile_only:
        return

    import torch
    from kernel_variant import swapper

    import reference as ref
    import swattn

    use = swapper(launch, "compiled_forward", compiled_rescale)

    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    lines = ["| shape | window | kernel | us | out err vs shipped | lse err |", "|---|---|---|---:|---:|---:|"]
    for sh in shapes:
        q, k, v = random_qkv(sh, torch.bfloat16)
        window = (sh["left"], sh["right"])
        base = None
        for variant in ("shipped", "lazy rescale"):
            use(variant != "shipped")
            out, lse = swattn.sliding_window_attention(q, k, v, window, return_lse=True)
            base = (out, lse) if base is None else base
            us = time_us(lambda: swattn.sliding_window_attention(q, k, v, window))  # noqa: B023
            lines.append(
                f"| {shape_label(sh)} | {variant} | {us:.1f} | {ref.rel_err(out, base[0]):.1e} | "
                f"{ref.rel_err(lse, base[1]):.1e} |"
            )
            print(lines[-1], flush=True)
        use(False)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
