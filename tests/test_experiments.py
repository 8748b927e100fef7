"""The experiments kept in scripts/ for the next GPU session: they must still
build, and their own bookkeeping must be right before a GPU spends time on them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))


def key_tiles_of_two_query_tiles(t: int, left: int, right: int, seq: int, block: int = 64) -> int:
    """Brute force: how many key tiles query tiles t and t + 1 together see."""
    rows = range(t * block, min((t + 2) * block, seq))
    keys = {j for i in rows for j in range(max(0, i - left), min(seq, i + right + 1))}
    return len({j // block for j in keys})


@pytest.mark.parametrize("left,right", [(128, 128), (100, 37), (0, 0), (64, 63), (65, 64), (200, 0), (0, 192)])
def test_resident_ring_bound_covers_every_pair_of_query_tiles(left, right):
    """probe_resident_kv's producer refills a slot only once both consumers released
    its tile: the ring must hold the key tiles of any two consecutive query tiles,
    or the kernel deadlocks. ``ring_fits`` must say so exactly."""
    import probe_resident_kv as probe

    seq = 1536 + 37
    need = max(key_tiles_of_two_query_tiles(t, left, right, seq) for t in range(seq // 64))
    assert probe.ring_fits(left, right, need)
    assert not probe.ring_fits(left, right, need - 1)


@pytest.mark.slow
def test_resident_kernel_builds_sm90a():
    import probe_resident_kv as probe

    source = probe.build().get_kernel_source()
    assert "tma_load" in source and "warpgroup_reg_alloc<104>" in source  # producer TMA, register split
    assert "__launch_bounds__(384, 2)" in source
