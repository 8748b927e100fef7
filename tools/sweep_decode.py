"""Sweep the decode kernel's tile (swattn.decode.TILES) and split count on decode shapes; one table.

Why (issue 19): the decode tiles were chosen from ptxas on the CPU and never timed on a GPU. At
batch 1, D 128, W 4096 a graph-replayed call takes 16.3 us against a goal of 15, and the split
kernel alone is 12.4 us of GPU time (torch.profiler) for K/V reads worth 4 us at the floor: the
time is each CTA's chain (Q gather, the first TMA round trip, two GEMMs and the softmax a key tile,
the partial's store), which the tile's key width, stages and CTAs per SM set.

Per shape and tile (the first PDL_AB tiles also without programmatic dependent launch; each
``--splits`` count besides the heuristic's): the output's relative
error against the shipped tile's, us per call from a CUDA graph of R calls on rotating windows
(bench.kernel_us), the replay of a graph holding one call (bench_decode.replay_us), the same two
with this step's key appended first, and the split count used. ``--profile``: each kernel's GPU
time for the first shape (torch.profiler).

    PYTHONPATH=$PWD python tools/sweep_decode.py --compile-only   # CPU: builds every tile for sm_90a
    PYTHONPATH=$PWD python tools/sweep_decode.py [--profile]      # GPU: check, then time
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tools"), os.path.join(REPO, "benchmarks")]
from sweep_common import DECODE_SHAPES as SHAPES  # noqa: E402

# (block_m, block_n, consumer threads, num_stages, CTAs per SM); the first is the shipped tile.
VARIANTS = {
    128: [
        (64, 64, 128, 2, 2),
        (64, 128, 128, 2, 1),
        (64, 128, 128, 1, 2),
        (64, 64, 128, 4, 1),
        (64, 64, 128, 3, 2),
        (64, 32, 128, 4, 2),
    ],
    64: [
        (64, 128, 128, 2, 2),
        (64, 64, 128, 2, 2),
        (64, 64, 128, 4, 2),
        (64, 128, 128, 1, 2),
    ],
}
PDL_AB = 1  # the first tiles of each list are also timed without programmatic dependent launch


@functools.cache
def _pdl_off():
    from kernel_variant import swapper

    from swattn import decode as dec

    return swapper(dec, "_pdl", lambda arch: False)


def set_pdl(on: bool) -> None:
    """Programmatic dependent launch on or off for the kernels compiled from now on."""
    from swattn import decode as dec

    _pdl_off()(not on)
    for cached in (dec.compiled_decode, dec.compiled_combine, dec.compiled_append):
        cached.cache_clear()


def compile_all(arch: str) -> None:
    from swattn import decode as dec

    for d, tiles in VARIANTS.items():
        for tile in tiles + [(*t, "no PDL") for t in tiles[:PDL_AB]]:
            set_pdl(len(tile) == 5)
            tile = tile[:5]
            for split in (False, True):
                try:
                    dec.compiled_decode(d, "bfloat16", arch, tile, "contiguous", split, False, False)
                except Exception as e:  # a tile that does not build is reported, not fatal
                    print(f"D {d} {tile} split {split}: failed {repr(e)[:200]}", flush=True)
                    continue
                print(f"built D {d} {tile} split {split}", flush=True)
            dec.compiled_combine(d, "bfloat16", arch, False)
            dec.compiled_append(d, "bfloat16", arch, "contiguous")
    set_pdl(True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compile-only", action="store_true", help="build every tile for --arch (no GPU needed)")
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--shapes", type=int, nargs="*", help="indices into SHAPES (default: all)")
    ap.add_argument("--splits", type=int, nargs="*", default=[], help="split counts to time besides the heuristic's")
    ap.add_argument("--profile", action="store_true", help="per-kernel GPU time of every tile on the first shape")
    args = ap.parse_args()
    compile_all(args.arch)
    if args.compile_only:
        return

    import torch
    from sweep_common import decode_calls, decode_row, decode_table, decode_times, kernel_profile

    import reference as ref
    from swattn import decode as dec

    shipped = dict(dec.TILES)
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    lines = decode_table(["tile", "splits", "err vs shipped"], "<>>")
    for si in args.shapes if args.shapes is not None else range(len(SHAPES)):
        b, hq, hk, d, w, cache = SHAPES[si]
        base = None
        for tile in VARIANTS[d] + [(*t, "no PDL") for t in VARIANTS[d][:PDL_AB]]:
            set_pdl(len(tile) == 5)
            dec.TILES[d] = tile[:5]
            for splits in [0, *args.splits]:
                attend, step = decode_calls(b, hq, hk, d, w, cache, num_splits=splits)
                out = attend[0]()
                base = out if base is None else base
                err = ref.rel_err(out, base)
                m_tiles = -(-(hq // hk) // tile[0])  # one query: a row per head of the group
                used = splits or dec.choose_splits(
                    b * hk * m_tiles, -(-w // tile[1]) + 1, dec.sm_count(out.device), tile[4]
                )
                if si == (args.shapes or [0])[0] and args.profile and not splits:
                    kernel_profile(step[0], f"{tile}")
                lines.append(decode_row(SHAPES[si], [str(tile), str(used), f"{err:.1e}"], decode_times(attend, step)))
                print(lines[-1], flush=True)
                del attend, step
        dec.TILES.update(shipped)
        set_pdl(True)
        torch.cuda.empty_cache()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
