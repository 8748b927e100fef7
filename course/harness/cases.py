"""What each graded item of configs/grading.json checks: the cases of test.py's test of the same name.

Standard library only: the grader imports it, and so do both harness phases.
tests/test_course.py checks these lists against test.py, so the two cannot drift.
"""

from __future__ import annotations

import itertools
import random

HEAD_DIM = 64

# test_kv_tile_range_matches_brute_force: its parameters and its grid.
KV_BLOCKS = [(64, 64), (128, 64), (64, 32), (128, 128), (16, 48)]
KV_SEQS = [1, 7, 63, 64, 65, 200, 511, 1000]
KV_WINDOWS = [0, 1, 31, 64, 100, 128, 999]
KV_RANDOM_SHAPES = 6  # per block pair, drawn from the grading's seed: a table of test.py's grid is not enough

# test_launcher_rejects_bad_input: case -> (exception class, words its message must contain).
# probe.BAD_INPUT_ARGS builds each case's arguments from the same good inputs as test.py.
BAD_INPUTS = {
    "not a tensor": ("TypeError", "torch.Tensor"),
    "3-D": ("ValueError", "2-D"),
    "shape mismatch": ("ValueError", "one shape"),
    "head_dim 48": ("ValueError", "head_dim"),
    "empty": ("ValueError", "seq_len"),
    "float32": ("TypeError", "float16"),
    "mixed dtypes": ("TypeError", "float16"),
    "non-contiguous": ("ValueError", "contiguous"),
    "negative window": ("ValueError", "window"),
    "float window": ("ValueError", "window"),
    "bool window": ("ValueError", "window"),
    "bad out": ("ValueError", "out"),
    "cpu tensors": ("ValueError", "CUDA"),
}

ARCHS = ["sm_90a", "sm_80"]  # test_compiles
BOUNDS = [(1000, 128), (65, 127), (2048, 0)]  # test_no_writes_outside_the_output
BOUNDS_PAD = 256
WINDOW = [(2048, 128), (1000, 37), (300, 0)]  # test_window_constraint
MEMORY_SEQS = [2048, 8192, 32768]  # test_memory_grows_linearly


def effective_window(window: int, seq_len: int) -> int:
    return min(window, max(seq_len - 1, 0))


def shapes(card: dict) -> list[tuple[int, int]]:
    """test.py's SHAPES: (seq_len, window)."""
    return [
        (card["seq_len"], card["window"]),
        (1, 0),
        (63, 1),
        (65, 127),
        (113, 7),
        (1000, 128),
        (1025, 64),
        (2048, 0),
        (2048, 5000),
        (4096, 200),
    ]


def gpu_cases(card: dict, tiles: list[str]) -> list[tuple[int, int, str, str]]:
    """test.py's GPU_CASES: (seq_len, window, tile, dtype)."""
    s = shapes(card)
    return [(n, w, "assignment", "float16") for n, w in s] + [
        (n, w, tile, dtype)
        for (n, w), (tile, dtype) in itertools.product(
            [s[0], (1, 0), (65, 127), (1000, 128), (2048, 5000)],
            [(t, "float16") for t in sorted(tiles) if t != "assignment"] + [("assignment", "bfloat16")],
        )
    ]


def window_rows(seq_len: int) -> list[int]:
    """test_window_constraint's rows."""
    return sorted({0, 1, 63, 64, seq_len // 2, seq_len - 65, seq_len - 1} & set(range(seq_len)))


def kv_groups(seed: int) -> list[dict]:
    """One group per block pair: every (q_tile, seq_len, effective window, block_m, block_n) to ask about."""
    rng = random.Random(seed)
    groups = []
    for bm, bn in KV_BLOCKS:
        shapes_ = list(itertools.product(KV_SEQS, KV_WINDOWS))
        shapes_ += [(rng.randint(1, 1500), rng.randint(0, 1600)) for _ in range(KV_RANDOM_SHAPES)]
        cases = []
        for seq_len, window in shapes_:
            w = effective_window(window, seq_len)
            cases += [[qt, seq_len, w, bm, bn] for qt in range((seq_len + bm - 1) // bm)]
        groups.append({"name": f"block_m={bm}, block_n={bn}", "cases": cases})
    return groups


def launch_configs(card: dict, tiles: list[str]) -> list[tuple[int, int, str, str]]:
    """Every (seq_len, window, tile, dtype) a GPU item runs: the launcher is asked once for each."""
    configs = list(gpu_cases(card, tiles))
    configs += [(n, w, "assignment", "float16") for n, w in BOUNDS + WINDOW]
    configs += [(n, card["window"], "assignment", "float16") for n in MEMORY_SEQS]
    configs += [(card["seq_len"], card["seq_len"], "assignment", card["dtype"])]  # full attention (speedup)
    return list(dict.fromkeys(configs))
