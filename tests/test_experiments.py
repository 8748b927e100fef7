"""The experiments kept in scripts/ for the next GPU session: they must still
build, and their own bookkeeping must be right before a GPU spends time on them."""

from __future__ import annotations

import random
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


def protocol_run(seq, chunk, left, right, ring, seed, wait_before_release=True):
    """A model of probe_resident_kv's barrier protocol for every CTA of a head, the
    producer and the two consumers stepping in a random interleaving (``seed``).
    An mbarrier is (completed phases, arrivals); waiting for parity p passes when
    the completed count's parity differs from p (as in hardware: a barrier two
    phases ahead blocks). Returns "ok", "deadlock" or "race" (a slot refilled
    while a consumer still reads the tile in it, or a consumer reading the wrong tile)."""
    import probe_resident_kv as probe

    rng = random.Random(seed)
    n_qt = -(-seq // 64)
    for t0 in range(0, n_qt, chunk):
        t1 = min(t0 + chunk, n_qt)
        ktlo = probe.key_tiles(t0, left, right, seq)[0]
        n_kt = probe.key_tiles(t1 - 1, left, right, seq)[1] - ktlo
        full = [[0, 0] for _ in range(ring)]  # (completed phases, arrivals); 1 arrival completes
        empty = [[0, 0] for _ in range(ring)]  # 2 arrivals (both consumers) complete
        content, holders = [None] * ring, [set() for _ in range(ring)]
        programs = [[]]
        for r in range(n_kt):  # the producer
            if r >= ring:
                programs[0].append(("wait", empty, r % ring, (r // ring - 1) % 2))
            programs[0] += [("fill", r), ("arrive", full, r % ring, 1)]
        for w in (0, 1):
            prog, done = [], 0
            for t in range(t0 + w, t1, 2):
                lo, hi = probe.key_tiles(t, left, right, seq)
                for r in range(lo - ktlo, hi - ktlo):
                    prog += [("wait", full, r % ring, (r // ring) % 2), ("use", w, r)]
                nxt = probe.released_after(t, t1, left, right, seq, ktlo, n_kt)
                for r in range(done, nxt):
                    if wait_before_release:
                        prog.append(("wait", full, r % ring, (r // ring) % 2))
                    prog += [("release", w, r), ("arrive", empty, r % ring, 2)]
                done = nxt
            programs.append(prog)
        pcs = [0, 0, 0]
        while any(pc < len(prog) for pc, prog in zip(pcs, programs, strict=True)):
            ready = [
                a
                for a, prog in enumerate(programs)
                if pcs[a] < len(prog)
                and not (prog[pcs[a]][0] == "wait" and prog[pcs[a]][1][prog[pcs[a]][2]][0] % 2 == prog[pcs[a]][3])
            ]
            if not ready:
                return "deadlock"
            a = rng.choice(ready)
            op = programs[a][pcs[a]]
            pcs[a] += 1
            if op[0] == "fill":
                if holders[op[1] % ring]:
                    return "race"
                content[op[1] % ring] = op[1]
            elif op[0] == "use":
                if content[op[2] % ring] != op[2]:
                    return "race"
                holders[op[2] % ring].add(op[1])
            elif op[0] == "release":
                holders[op[2] % ring].discard(op[1])
            elif op[0] == "arrive":
                bar = op[1][op[2]]
                bar[1] += 1
                if bar[1] == op[3]:
                    bar[0], bar[1] = bar[0] + 1, 0
    return "ok"


@pytest.mark.parametrize("left,right", [(128, 128), (100, 37), (0, 0), (64, 63), (200, 0), (0, 192)])
def test_resident_protocol_never_deadlocks_or_races(left, right):
    """Every interleaving tried finishes with each consumer reading the tile it
    waited for, for ragged lengths, chunks of one to many query tiles, and small
    windows (where a consumer releases tiles it never reads)."""
    for seq in (64, 1000, 2048):
        for chunk in (1, 2, 3, 8, 16):
            for seed in range(8):
                assert protocol_run(seq, chunk, left, right, 6, seed) == "ok", (seq, chunk, seed)


def test_resident_protocol_model_catches_early_release():
    """The model can fail: without waiting for a tile's fill before releasing it,
    a consumer running ahead completes the slot's previous phase early and the
    producer overwrites a tile the other consumer is still reading."""
    # interleavings (seq, chunk, seed) in which the early release races, window (200, 0)
    for seq, chunk, seed in [(1000, 3, 6), (2048, 8, 16), (2048, 16, 11)]:
        assert protocol_run(seq, chunk, 200, 0, 6, seed, wait_before_release=False) == "race"
        assert protocol_run(seq, chunk, 200, 0, 6, seed) == "ok"


@pytest.mark.slow
def test_resident_kernel_builds_sm90a():
    import probe_resident_kv as probe

    source = probe.build().get_kernel_source()
    assert "tma_load" in source and "warpgroup_reg_alloc<104>" in source  # producer TMA, register split
    assert "__launch_bounds__(384, 2)" in source
