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


def simulate(n_tiles, ring, consumers, seed):
    """A model of the experiments' TMA/mbarrier protocol: one producer fills tiles
    0 .. n_tiles - 1 into slot r % ring, after waiting for the slot's previous
    tile to be released by both consumers; each consumer runs its own list of
    ("use", r) (wait for r's fill, then read it until released), ("wait", r)
    (wait for r's fill only) and ("release", r) (arrive on r's empty barrier).
    The three step in a random interleaving (``seed``). An mbarrier is
    (completed phases, arrivals); waiting for parity p passes when the completed
    count's parity differs from p, as in hardware (two phases ahead blocks).
    Returns "ok", "deadlock" or "race" (a slot refilled under a reader, or a
    reader finding another tile there)."""
    rng = random.Random(seed)
    full = [[0, 0] for _ in range(ring)]  # 1 arrival completes a phase
    empty = [[0, 0] for _ in range(ring)]  # 2 (both consumers)
    content, holders = [None] * ring, [set() for _ in range(ring)]
    producer = []
    for r in range(n_tiles):
        if r >= ring:
            producer.append(("wait", empty, r % ring, (r // ring - 1) % 2))
        producer += [("fill", None, r), ("arrive", full, r % ring, 1)]
    programs = [producer]
    for w, ops in enumerate(consumers):
        prog = []
        for op, r in ops:
            if op in ("use", "wait"):
                prog.append(("wait", full, r % ring, (r // ring) % 2))
            if op == "use":
                prog.append(("use", w, r))
            if op == "release":
                prog += [("release", w, r), ("arrive", empty, r % ring, 2)]
        programs.append(prog)
    pcs = [0] * len(programs)
    while any(pc < len(prog) for pc, prog in zip(pcs, programs, strict=True)):
        ready = []
        for a, prog in enumerate(programs):
            if pcs[a] < len(prog):
                op = prog[pcs[a]]
                if not (op[0] == "wait" and op[1][op[2]][0] % 2 == op[3]):
                    ready.append(a)
        if not ready:
            return "deadlock"
        a = rng.choice(ready)
        op = programs[a][pcs[a]]
        pcs[a] += 1
        if op[0] == "fill":
            if holders[op[2] % ring]:
                return "race"
            content[op[2] % ring] = op[2]
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


def protocol_run(seq, chunk, left, right, ring, seed, wait_before_release=True):
    """probe_resident_kv's schedule for every CTA of a head through ``simulate``:
    consumer w takes query tiles t0 + w, t0 + w + 2, ...; reads the window's key
    tiles, then releases every tile below its next window (waiting for each
    one's fill first, unless ``wait_before_release`` is off)."""
    import probe_resident_kv as probe

    n_qt = -(-seq // 64)
    for t0 in range(0, n_qt, chunk):
        t1 = min(t0 + chunk, n_qt)
        ktlo = probe.key_tiles(t0, left, right, seq)[0]
        n_kt = probe.key_tiles(t1 - 1, left, right, seq)[1] - ktlo
        consumers = []
        for w in (0, 1):
            ops, done = [], 0
            for t in range(t0 + w, t1, 2):
                lo, hi = probe.key_tiles(t, left, right, seq)
                ops += [("use", r) for r in range(lo - ktlo, hi - ktlo)]
                nxt = probe.released_after(t, t1, left, right, seq, ktlo, n_kt)
                for r in range(done, nxt):
                    ops += [("wait", r)] * wait_before_release + [("release", r)]
                done = nxt
            consumers.append(ops)
        result = simulate(n_kt, ring, consumers, seed)
        if result != "ok":
            return result
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
    for seq, chunk, seed in [(1000, 16, 16), (1000, 16, 25), (2048, 16, 16)]:
        assert protocol_run(seq, chunk, 200, 0, 6, seed, wait_before_release=False) == "race"
        assert protocol_run(seq, chunk, 200, 0, 6, seed) == "ok"


def overlap_schedule(n: int) -> list:
    """probe_overlap_d128's consumer: tile 0 read; then per tile j >= 1: read j
    (S_j = Q K_j^T), and once P_{j-1} V_{j-1} is done release j - 1; the last released at the end."""
    ops = [("use", 0)] if n else []
    for j in range(1, n):
        ops += [("use", j), ("release", j - 1)]
    return ops + ([("release", n - 1)] if n else [])


@pytest.mark.parametrize("n", [0, 1, 2, 3, 8, 17])
def test_overlap_protocol_never_deadlocks_or_races(n):
    """Both consumers hold two stages at once (K_j for S_j while V_{j-1} feeds P V):
    the two-stage ring still never refills a stage under a reader."""
    for seed in range(30):
        assert simulate(n, 2, [overlap_schedule(n)] * 2, seed) == "ok"


def test_overlap_protocol_needs_two_stages():
    """The model can fail: one stage deadlocks (a consumer holds tile j - 1 while it waits for tile j)."""
    assert simulate(3, 1, [overlap_schedule(3)] * 2, 0) == "deadlock"


@pytest.mark.slow
def test_overlap_kernel_builds_sm90a():
    import probe_overlap_d128 as probe

    source = probe.build().get_kernel_source()
    assert "wait_wgmma<1>" in source and "wait_wgmma<0>" in source  # the softmax overlaps P V
    assert "warpgroup_reg_alloc<240>" in source and "__launch_bounds__(384, 1)" in source


@pytest.mark.slow
def test_resident_kernel_builds_sm90a():
    import probe_resident_kv as probe

    source = probe.build().get_kernel_source()
    assert "tma_load" in source and "warpgroup_reg_alloc<104>" in source  # producer TMA, register split
    assert "__launch_bounds__(384, 2)" in source


@pytest.mark.slow
def test_assignment_split_kernel_builds_sm90a():
    import probe_assignment_split as probe

    assert probe.tiles_needed(2048, 128) == 5  # one warpgroup per key tile of the card's window
    source = probe.build().get_kernel_source()
    assert "__launch_bounds__(640, 1)" in source and source.count("tma_load(K_desc") == 5
    # three warpgroups, two tiles each at most (online softmax within a warpgroup)
    assert "__launch_bounds__(384, 1)" in probe.build(groups=3).get_kernel_source()
    with pytest.raises(ValueError, match="groups must be"):
        probe.make_split_kernel(2048, 64, 128, groups=6)
