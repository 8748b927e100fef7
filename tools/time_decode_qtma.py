"""Decode with Q loaded by the producer's TMA instead of gathered by every thread: check, then time (Hopper).

Why (issue 19's batch-1 cell, analysis.md 4.10): in the generated CUDA of the decode kernel every
thread gathers Q into shared memory *before* the warp-specialised split, then `__syncthreads()`,
and only then does the producer read the lengths and issue its first K/V TMA load: a global round
trip in series with the first load's. With one query per sequence (a decode step) the rows of a
kv head's group are contiguous heads of Q[b, 0], so one TMA box (block_m heads x D, rows past
q_heads zero-filled, rows of the next groups finite and never written: each row's softmax and
output are its own) loads them, and TileLang's warp specialisation hands that copy to the producer
next to the K/V loads. (Keeping the gathered rows in registers instead measured 1.5x slower.)

``qtma_module`` is kernels/decode.py with the edits applied at run time (``kernel_variant``;
nothing on disk changes): ``make_decode`` gains ``q_tma``. The tool points
``swattn.decode.compiled_decode`` at it for one-query calls whose group fits one row tile, and
compares out with the shipped kernel's on the same caches, then times both
(``tools/sweep_decode.py``'s columns: graph of R rotating calls, one-call replay, the same with
the append).

Result on the H200: rejected (analysis.md 4.11).

    PYTHONPATH=$PWD python tools/time_decode_qtma.py --compile-only   # CPU: builds for sm_90a
    PYTHONPATH=$PWD python tools/time_decode_qtma.py                  # GPU: check, then time
"""

import argparse
import functools
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tools"), os.path.join(REPO, "benchmarks")]
from sweep_common import DECODE_SHAPES  # noqa: E402

# The batch-1 cells (the goal's first), then batch 8 and 64 at D 128, W 4096.
SHAPES = [DECODE_SHAPES[i] for i in (0, 1, 5, 2, 3)]

EDITS = (
    (
        """    pdl: bool = False,
):
    \"\"\"Kernel factory: windowed attention""",
        """    pdl: bool = False,
    q_tma: bool = False,
):
    \"\"\"Kernel factory: windowed attention""",
    ),
    (
        """            for r, d in T.Parallel(block_m, head_dim):
                qr = T.min(row0 + r, rows - 1)
                q_s[r, d] = T.if_then_else(row0 + r < rows, Q[b, div(qr, group), kvh * group + mod(qr, group), d], 0)
""",
        """            if q_tma:  # one query, one row tile: the rows are heads kvh * group .. of Q[b, 0]
                T.copy(Q[b, 0, kvh * group : kvh * group + block_m, :], q_s)
            else:
                for r, d in T.Parallel(block_m, head_dim):
                    qr = T.min(row0 + r, rows - 1)
                    q_s[r, d] = T.if_then_else(
                        row0 + r < rows, Q[b, div(qr, group), kvh * group + mod(qr, group), d], 0
                    )
""",
    ),
)


@functools.cache
def qtma_module():
    from kernel_variant import edited_module

    from swattn.kernels import decode as kernels

    return edited_module(kernels, EDITS, "swattn.kernels._decode_qtma")


@functools.cache
def compiled_qtma(head_dim, dtype, arch, tile, layout, split, softcap, sinks):
    from swattn import decode as dec
    from swattn import launch

    fn = qtma_module().make_decode(head_dim, dtype, tile, layout, split, softcap, sinks, dec._pdl(arch), True)
    return launch._compile(fn, arch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--arch", default="sm_90a")
    args = ap.parse_args()
    from swattn import decode as dec

    for d in sorted({s[3] for s in SHAPES}):
        for split in (False, True):
            src = compiled_qtma(d, "bfloat16", args.arch, dec.tile_for(d), "contiguous", split, False, False)
            src = src.get_kernel_source()
            assert src.count("tma_load(Q_desc") == 1, "Q is not loaded by TMA"
            print(f"built D {d} split {split}: Q by TMA", flush=True)
            dec.compiled_decode(d, "bfloat16", args.arch, dec.tile_for(d), "contiguous", split, False, False)
    if args.compile_only:
        return

    import torch
    from kernel_variant import swapper
    from sweep_common import decode_calls, decode_row, decode_table, decode_times

    import reference as ref

    use = swapper(dec, "compiled_decode", compiled_qtma)  # one-query calls only here

    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    lines = decode_table(["kernel", "err vs shipped"], "<>")
    for shape in SHAPES:
        base = None
        for variant in ("shipped", "Q by TMA"):
            use(variant != "shipped")
            attend, step = decode_calls(*shape)
            out = attend[0]().clone()
            base = out if base is None else base
            lines.append(decode_row(shape, [variant, f"{ref.rel_err(out, base):.1e}"], decode_times(attend, step)))
            print(lines[-1], flush=True)
            del attend, step
        use(False)
        torch.cuda.empty_cache()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
