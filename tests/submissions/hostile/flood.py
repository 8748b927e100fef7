"""Writes 256 MiB to stdout the first time the tile range is asked for, then answers correctly.

The original grader stored all of it (pytest's capture, then the grader's pipe,
in memory). Past the grader's output limit a write fails; this one shrugs that
off and carries on, so its answers still count.
"""

import os

_solution_kv_tile_range = globals()["kv_tile_range"]
_FLOODED = []


def kv_tile_range(q_tile, seq_len, window, block_m, block_n, maximum=max, minimum=min):
    if not _FLOODED:
        _FLOODED.append(True)
        chunk = b"flood " * (1 << 17)
        for _ in range((256 << 20) // len(chunk)):
            try:
                os.write(1, chunk)
            except OSError:
                break
    return _solution_kv_tile_range(q_tile, seq_len, window, block_m, block_n, maximum, minimum)
