"""Takes 6 GiB the first time the tile range is asked for, then answers correctly.

The original grader set no memory limit: the step took the 6 GiB and passed.
"""

_solution_kv_tile_range = globals()["kv_tile_range"]
_HOG = []


def kv_tile_range(q_tile, seq_len, window, block_m, block_n, maximum=max, minimum=min):
    if not _HOG:
        _HOG.append(bytearray(6 << 30))  # zero-filled: every page resident, not just reserved
    return _solution_kv_tile_range(q_tile, seq_len, window, block_m, block_n, maximum, minimum)
