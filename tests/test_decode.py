"""swattn.decode: flash_attn_with_kvcache and the ring-buffer cache (issue 19).

Convention (the module's): tensors (batch, seq, heads, head_dim); sequence b has
L = cache_seqlens[b] + new keys, query i of q_len sits at position L - q_len + i
and sees keys pos - left .. pos + right that exist; lse natural log; a row that
sees nothing gives 0 (lse -inf, or the sink). The oracle is
swattn.testing.attention_ref on each sequence's whole history of keys.

CPU: the eager twin against the float64 oracle (contiguous, paged, ring), the
caches' contents after the in-place append, the launchers' arguments against
the prim_funcs (stand-ins), bad input, and that the kernels compile for sm_90a.
GPU (``-m gpu``): the kernels against the oracle, split-KV on and off, paged,
ring, and CUDA-graph capture and replay.
"""

from __future__ import annotations

import itertools
import math
import os
import random
import re

import pytest
import torch
from utils import StandIn

import reference as ref
from swattn import decode as dec
from swattn import launch, testing
from swattn import window as wspec
from swattn.decode import SlidingWindowKVCache, flash_attn_with_kvcache
from swattn.kernels import decode as kernels

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def rand(*shape, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def make_lengths(kind: str, batch: int, most: int, seed: int) -> list[int]:
    """Tokens already cached per sequence: all 0, all ``most`` (full), or ragged from 0 to ``most``."""
    if kind == "zero":
        return [0] * batch
    if kind == "full":
        return [most] * batch
    rng = random.Random(seed)
    return [0, most] + [rng.randint(0, most) for _ in range(batch - 2)] if batch > 1 else [rng.randint(0, most)]


def oracle(q, histories_k, histories_v, **kw):
    """attention_ref per sequence on its whole history: (out, lse) float64."""
    outs, lses = [], []
    for b in range(q.shape[0]):
        o, l_ = testing.attention_ref(q[b : b + 1], histories_k[b][None], histories_v[b][None], return_lse=True, **kw)
        outs.append(o)
        lses.append(l_)
    return torch.cat(outs), torch.cat(lses)


def assert_matches(out, lse, want, want_lse, tol: float, lse_tol: float = 1e-10):
    """out within ``tol`` (relative, float64); lse -inf exactly where the oracle's is, else within lse_tol."""
    assert out.shape == want.shape and lse.shape == want_lse.shape
    assert torch.isfinite(out).all()
    assert ref.rel_err(out, want) <= tol if want.norm() > 0 else out.abs().max() == 0
    lse, want_lse = lse.double().cpu(), want_lse.cpu()
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    finite = torch.isfinite(want_lse)
    if finite.any():
        assert (lse[finite] - want_lse[finite]).abs().max() <= lse_tol


def contiguous_case(batch, cache_len, hq, hk, d, kind, n_new, q_len, dtype=torch.float64, device="cpu", seed=0):
    """q, a cache with random contents everywhere (slots past the lengths too), new k, v,
    the lengths, and each sequence's history (its cached keys, then the new ones)."""
    q = rand(batch, q_len, hq, d, dtype=dtype, device=device, seed=seed)
    kc = rand(batch, cache_len, hk, d, dtype=dtype, device=device, seed=seed + 1)
    vc = rand(batch, cache_len, hk, d, dtype=dtype, device=device, seed=seed + 2)
    k = rand(batch, n_new, hk, d, dtype=dtype, device=device, seed=seed + 3) if n_new else None
    v = rand(batch, n_new, hk, d, dtype=dtype, device=device, seed=seed + 4) if n_new else None
    lens = make_lengths(kind, batch, cache_len - n_new, seed)
    hist_k = [torch.cat([kc[b, : lens[b]]] + ([k[b]] if n_new else [])) for b in range(batch)]
    hist_v = [torch.cat([vc[b, : lens[b]]] + ([v[b]] if n_new else [])) for b in range(batch)]
    return q, kc, vc, k, v, lens, hist_k, hist_v


# (batch, cache_len, q_heads, kv_heads, head_dim, lengths, new tokens, q_len, window_size, causal, softcap, sinks)
CPU_CASES = [
    (3, 40, 4, 2, 16, "ragged", 1, 1, (8, 0), True, 0.0, False),  # decode, GQA
    (3, 40, 4, 2, 16, "zero", 4, 4, (-1, -1), True, 0.0, False),  # prefill into an empty cache
    (2, 40, 4, 1, 16, "full", 0, 1, (5, 0), True, 0.0, False),  # a full cache, nothing appended (MQA)
    (3, 64, 8, 2, 16, "ragged", 16, 16, (100, 0), True, 0.0, False),  # a window wider than the cache
    (2, 50, 2, 2, 8, "ragged", 3, 5, (4, 2), False, 0.0, False),  # q_len > new, keys to the right
    (3, 50, 4, 2, 8, "ragged", 0, 3, (-1, -1), False, 0.0, False),  # full attention to the cache
    (3, 64, 6, 3, 8, "ragged", 8, 8, (7, 0), True, 5.0, False),  # softcap
    (3, 30, 4, 2, 8, "zero", 2, 4, (1, 0), True, 0.0, True),  # sinks; rows before the first key see nothing
    (2, 64, 4, 2, 8, "ragged", 12, 12, (20, 3), False, 2.0, True),  # chunk, softcap and sinks
]


@pytest.mark.parametrize("case", range(len(CPU_CASES)))
def test_eager_contiguous_matches_oracle(case):
    b, cap, hq, hk, d, kind, n_new, sq, window, causal, softcap, with_sinks = CPU_CASES[case]
    q, kc, vc, k, v, lens, hist_k, hist_v = contiguous_case(b, cap, hq, hk, d, kind, n_new, sq, seed=case)
    sinks = rand(hq, seed=case + 9) if with_sinks else None
    before = kc.clone()
    out, lse = flash_attn_with_kvcache(
        q,
        kc,
        vc,
        k,
        v,
        torch.tensor(lens, dtype=torch.int32),
        None,
        None,
        causal,
        window,
        softcap,
        sinks,
        return_lse=True,
    )
    want, want_lse = oracle(q, hist_k, hist_v, window_size=window, causal=causal, softcap=softcap, sinks=sinks)
    assert_matches(out, lse, want, want_lse, 1e-12)
    for s in range(b):  # the new keys sit at cache_seqlens .. + new; nothing else moved
        assert torch.equal(kc[s, : lens[s] + n_new], hist_k[s]) and torch.equal(vc[s, : lens[s] + n_new], hist_v[s])
        assert torch.equal(kc[s, lens[s] + n_new :], before[s, lens[s] + n_new :])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_eager_low_precision(dtype):
    q, kc, vc, k, v, lens, hist_k, hist_v = contiguous_case(2, 48, 4, 2, 32, "ragged", 2, 2, dtype=dtype)
    out, lse = flash_attn_with_kvcache(
        q, kc, vc, k, v, torch.tensor(lens, dtype=torch.int32), window_size=(9, 0), causal=True, return_lse=True
    )
    assert out.dtype == dtype and lse.dtype == torch.float32
    want, want_lse = oracle(q, hist_k, hist_v, window_size=(9, 0), causal=True)
    assert_matches(out, lse, want, want_lse, 1e-2 if dtype != torch.float32 else 1e-6, 1e-5)


def test_int_and_default_cache_seqlens():
    q, kc, vc, _, _, _, _, _ = contiguous_case(2, 20, 2, 2, 8, "full", 0, 3)
    whole = flash_attn_with_kvcache(q, kc, vc, window_size=(4, 0), causal=True)  # None: every slot is cached
    as_int = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=20, window_size=(4, 0), causal=True)
    want, _ = oracle(q, list(kc), list(vc), window_size=(4, 0), causal=True)
    assert ref.rel_err(whole, want) < 1e-12 and torch.equal(whole, as_int)


def paged_copy(kc, vc, page: int, seed: int, spare: int = 3):
    """The contiguous caches (batch, cap, H, D) as pages of ``page`` rows in a random order,
    with ``spare`` pages of garbage no table names: (k_pages, v_pages, block_table)."""
    b, cap, h, d = kc.shape
    pps = cap // page
    n_pages = b * pps + spare
    perm = torch.randperm(n_pages, generator=torch.Generator().manual_seed(seed))[: b * pps]
    table = perm.view(b, pps).to(torch.int32)
    kp = torch.full((n_pages, page, h, d), 1e4, dtype=kc.dtype)  # garbage where no table points
    vp = torch.full((n_pages, page, h, d), -1e4, dtype=kc.dtype)
    kp[perm] = kc.reshape(b * pps, page, h, d)
    vp[perm] = vc.reshape(b * pps, page, h, d)
    return kp, vp, table


@pytest.mark.parametrize("page", [4, 16])
@pytest.mark.parametrize("case", [0, 3, 4, 6, 8])
def test_eager_paged_matches_oracle(case, page):
    b, cap, hq, hk, d, kind, n_new, sq, window, causal, softcap, with_sinks = CPU_CASES[case]
    cap = -(-cap // page) * page
    q, kc, vc, k, v, lens, hist_k, hist_v = contiguous_case(b, cap, hq, hk, d, kind, n_new, sq, seed=case)
    kp, vp, table = paged_copy(kc, vc, page, seed=case)
    sinks = rand(hq, seed=case + 9) if with_sinks else None
    out, lse = flash_attn_with_kvcache(
        q,
        kp,
        vp,
        k,
        v,
        torch.tensor(lens, dtype=torch.int32),
        table,
        None,
        causal,
        window,
        softcap,
        sinks,
        return_lse=True,
    )
    want, want_lse = oracle(q, hist_k, hist_v, window_size=window, causal=causal, softcap=softcap, sinks=sinks)
    assert_matches(out, lse, want, want_lse, 1e-12)
    for s in range(b):  # the appended keys landed in the sequence's own pages
        rows = torch.arange(lens[s] + n_new)
        got_k = kp[table[s].long()[rows // page], rows % page]
        assert torch.equal(got_k, hist_k[s]) and torch.equal(vp[table[s].long()[rows // page], rows % page], hist_v[s])


@pytest.mark.parametrize("softcap,with_sinks", [(0.0, False), (3.0, True)])
def test_ring_matches_full_history_across_wraps(softcap, with_sinks):
    """Many appends of 1 .. new_tokens_max tokens: the ring (128 slots) wraps 4+ times and
    every step equals attention over the full history (a contiguous cache and the oracle);
    sequence 1 starts 5 positions in (zero keys there, as in the ring)."""
    batch, window, n_max, hq, hk, d = 2, 100, 8, 4, 2, 8
    rng = random.Random(0)
    ring = SlidingWindowKVCache(batch, window, n_max, hk, d, dtype=torch.float64)
    assert ring.slots == 128 and ring.nbytes == 2 * batch * 128 * hk * d * 8
    ring.reset(torch.tensor([0, 5]))
    total = 640
    full_k = torch.zeros(batch, total + 5 + n_max, hk, d, dtype=torch.float64)
    full_v = torch.zeros_like(full_k)
    lens = torch.tensor([0, 5], dtype=torch.int32)
    sinks = rand(hq, seed=7) if with_sinks else None
    step = 0
    while int(lens[0]) < total:
        n = rng.randint(1, n_max)
        sq = rng.randint(1, n_max)
        q = rand(batch, sq, hq, d, seed=3 * step)
        k, v = rand(batch, n, hk, d, seed=3 * step + 1), rand(batch, n, hk, d, seed=3 * step + 2)
        left = window if step % 5 else rng.randint(0, window)  # now and then a narrower window
        got, got_lse = ring.update_and_attend(
            q, k, v, window_size=(left, 0), softcap=softcap, sinks=sinks, return_lse=True
        )
        want, want_lse = flash_attn_with_kvcache(
            q,
            full_k,
            full_v,
            k,
            v,
            lens,
            window_size=(left, 0),
            causal=True,
            softcap=softcap,
            sinks=sinks,
            return_lse=True,
        )
        lens += n
        assert torch.equal(ring.seqlens, lens)
        assert_matches(got, got_lse, want.double(), want_lse, 1e-12)
        if step % 16 == 0:
            hist = [full_k[s, : int(lens[s])] for s in range(batch)], [full_v[s, : int(lens[s])] for s in range(batch)]
            o, l_ = oracle(q, *hist, window_size=(left, 0), causal=True, softcap=softcap, sinks=sinks)
            assert_matches(got, got_lse, o, l_, 1e-12)
        step += 1
    for s in range(batch):  # slot p % slots holds position p for the last `slots` positions
        pos = torch.arange(int(lens[s]) - ring.slots, int(lens[s]))
        assert torch.equal(ring.k[s, pos % ring.slots], full_k[s, pos])
        assert torch.equal(ring.v[s, pos % ring.slots], full_v[s, pos])


def test_ring_attend_without_append_and_append_alone():
    ring = SlidingWindowKVCache(1, 3, 2, 1, 4, dtype=torch.float64)
    q = rand(1, 1, 1, 4)
    out, lse = ring.attend(q, return_lse=True)  # nothing appended: no key
    assert torch.equal(out, torch.zeros_like(out)) and lse.item() == float("-inf")
    k, v = rand(1, 2, 1, 4, seed=1), rand(1, 2, 1, 4, seed=2)
    ring.append(k, v)
    out = ring.attend(q)
    want = testing.attention_ref(q, k, v, window_size=(3, 0), causal=True)
    assert ref.rel_err(out, want) < 1e-12


# ---- bad input ------------------------------------------------------------------------------

q0 = rand(2, 1, 4, 8)
kc0 = rand(2, 16, 2, 8)
lens0 = torch.tensor([3, 4], dtype=torch.int32)
BAD = [
    (lambda: flash_attn_with_kvcache(q0[0], kc0, kc0), ValueError, "q must have 4"),
    (lambda: flash_attn_with_kvcache(q0.float(), kc0, kc0), TypeError, "share one dtype"),
    (lambda: flash_attn_with_kvcache(rand(2, 1, 3, 8), kc0, kc0), ValueError, "multiple of kv_heads"),
    (lambda: flash_attn_with_kvcache(q0, kc0, kc0[:, :8]), ValueError, "differ"),
    (lambda: flash_attn_with_kvcache(q0, kc0[:1], kc0[:1]), ValueError, "batch 2"),
    (lambda: flash_attn_with_kvcache(q0, kc0, kc0, k=rand(2, 1, 2, 8)), ValueError, "both k and v"),
    (lambda: flash_attn_with_kvcache(q0, kc0, kc0, rand(2, 1, 2, 8), rand(2, 1, 2, 8)), ValueError, "cache_seqlens"),
    (lambda: flash_attn_with_kvcache(q0, kc0, kc0, rand(2, 1, 3, 8), rand(2, 1, 3, 8), 0), ValueError, "k, v must"),
    (lambda: flash_attn_with_kvcache(q0, kc0, kc0, cache_seqlens=lens0.long()), TypeError, "int32"),
    (lambda: flash_attn_with_kvcache(q0, kc0, kc0, cache_seqlens=lens0[:1]), ValueError, "(batch,)"),
    (lambda: flash_attn_with_kvcache(q0, kc0, kc0, cache_seqlens=17), ValueError, "0 .. 16"),
    (lambda: flash_attn_with_kvcache(q0, kc0, kc0, rand(2, 2, 2, 8), rand(2, 2, 2, 8), 15), ValueError, "0 .. 16"),
    (lambda: flash_attn_with_kvcache(q0, kc0, kc0, block_table=torch.zeros(2, 1)), ValueError, "int32"),
    (
        lambda: flash_attn_with_kvcache(q0, kc0, kc0, block_table=torch.full((2, 1), 2, dtype=torch.int32)),
        ValueError,
        "outside",
    ),
    (lambda: flash_attn_with_kvcache(q0, kc0, kc0, window_size=4), TypeError, "pair"),
    (lambda: flash_attn_with_kvcache(q0, kc0, kc0, window_size=(-2, 0)), ValueError, ">= 0"),
    (lambda: flash_attn_with_kvcache(q0, kc0, kc0, softcap=-1.0), ValueError, "softcap"),
    (lambda: flash_attn_with_kvcache(q0, kc0, kc0, softmax_scale=0.0), ValueError, "scale"),
    (lambda: flash_attn_with_kvcache(q0, kc0, kc0, sinks=torch.zeros(2)), ValueError, "sinks"),
    (lambda: flash_attn_with_kvcache(q0, kc0, kc0, causal=1), TypeError, "causal"),
    (lambda: flash_attn_with_kvcache(q0, kc0, kc0, num_splits=-1), ValueError, "num_splits"),
    (lambda: flash_attn_with_kvcache(q0, kc0, kc0, num_splits=dec.MAX_SPLITS + 1), ValueError, "num_splits"),
    (
        lambda: flash_attn_with_kvcache(q0, rand(2, 32, 2, 8)[:, ::2], rand(2, 32, 2, 8)[:, ::2]),
        ValueError,
        "contiguous",
    ),
    (lambda: SlidingWindowKVCache(1, -1, 1, 1, 8), ValueError, "window"),
    (
        lambda: SlidingWindowKVCache(2, 4, 2, 2, 8, torch.float64).append(rand(2, 3, 2, 8), rand(2, 3, 2, 8)),
        ValueError,
        "new_tokens_max",
    ),
    (lambda: SlidingWindowKVCache(2, 4, 2, 2, 8, torch.float64).attend(q0, window_size=(5, 0)), ValueError, "left"),
    (lambda: SlidingWindowKVCache(2, 4, 2, 2, 8, torch.float64).attend(rand(2, 3, 4, 8)), ValueError, "q_len"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_input_raises(case):
    call, error, words = BAD[case]
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        call()


def test_cuda_only_limits_raise(monkeypatch):
    """What only the kernels refuse, checked before any work (launch.on_gpu patched)."""
    monkeypatch.setattr(launch, "on_gpu", lambda x: True)
    kc = rand(2, 16, 2, 96, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="head_dim"):
        flash_attn_with_kvcache(rand(2, 1, 4, 96, dtype=torch.bfloat16), kc, kc)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        flash_attn_with_kvcache(
            rand(2, 1, 4, 128, dtype=torch.float32), *[rand(2, 16, 2, 128, dtype=torch.float32)] * 2
        )
    pages = rand(4, 16, 2, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="page_size must be a multiple of 64"):
        flash_attn_with_kvcache(
            rand(2, 1, 4, 128, dtype=torch.bfloat16), pages, pages, block_table=torch.zeros(2, 2, dtype=torch.int32)
        )


# ---- the launcher against the prim_funcs (stand-ins) ---------------------------------------------


@pytest.fixture
def stand_ins(monkeypatch):
    made = {"decode": [], "combine": [], "append": []}
    monkeypatch.setattr(launch, "on_gpu", lambda x: True)
    monkeypatch.setattr(launch, "cuda_arch", lambda device: "sm_90a")
    monkeypatch.setattr(dec, "sm_count", lambda device: 132)

    def decode(head_dim, dtype, arch, tile, layout, split, softcap, sinks):
        made["decode"].append(
            StandIn(kernels.make_decode(head_dim, dtype, tile, layout, split, softcap, sinks), (6, 7))
        )
        made["decode"][-1].key = (layout, split, softcap, sinks)
        return made["decode"][-1]

    def combine(head_dim, dtype, arch, sinks):
        made["combine"].append(StandIn(kernels.make_combine(head_dim, dtype, sinks, dec.MAX_SPLITS), (3, 4)))
        return made["combine"][-1]

    def append(head_dim, dtype, arch, layout):
        made["append"].append(StandIn(kernels.make_append(head_dim, dtype, layout), ()))
        made["append"][-1].key = layout
        return made["append"][-1]

    monkeypatch.setattr(dec, "compiled_decode", decode)
    monkeypatch.setattr(dec, "compiled_combine", combine)
    monkeypatch.setattr(dec, "compiled_append", append)
    return made


@pytest.mark.parametrize("num_splits", [1, 0, 5])
@pytest.mark.parametrize("layout", ["contiguous", "paged", "ring"])
@pytest.mark.parametrize("softcap,with_sinks", [(0.0, False), (4.0, True)])
def test_launcher_arguments_match_the_kernels(stand_ins, layout, num_splits, softcap, with_sinks):
    """One kv head, a long cache: the heuristic (num_splits 0) splits; 1 never; 5 always."""
    bf = torch.bfloat16
    q, k, v = rand(1, 2, 4, 128, dtype=bf), rand(1, 2, 1, 128, dtype=bf, seed=1), rand(1, 2, 1, 128, dtype=bf, seed=2)
    sinks = torch.zeros(4) if with_sinks else None
    kw = dict(softcap=softcap, sinks=sinks, return_lse=True, num_splits=num_splits)
    if layout == "ring":
        ring = SlidingWindowKVCache(1, 2000, 2, 1, 128, dtype=bf)
        out, lse = ring.update_and_attend(q, k, v, **kw)
    else:
        kc = rand(1, 4096, 1, 128, dtype=bf)
        table = None
        if layout == "paged":
            kc, table = kc.view(64, 64, 1, 128), torch.arange(64, dtype=torch.int32).view(1, 64)
        out, lse = flash_attn_with_kvcache(q, kc, kc.clone(), k, v, 100, table, window_size=(-1, 0), causal=True, **kw)
    split = num_splits != 1
    assert [s.key for s in stand_ins["decode"]] == [(layout, split, softcap > 0, with_sinks and not split)]
    assert [s.calls for s in stand_ins["decode"] + stand_ins["combine"]] == [1] * (2 if split else 1)
    assert [(s.key, s.calls) for s in stand_ins["append"]] == [(layout, 1)]  # the new keys: one launch
    assert out.shape == q.shape and out.dtype == bf and lse.shape == (1, 4, 2) and lse.dtype == torch.float32


def emulate_kernel(q, kc, vc, seqlens, n_new, left, right, layout, table, block_m, block_n, splits, softcap=0.0):
    """kernels/decode.py's index arithmetic in Python, float64, CTA by CTA: the rows'
    packing, the tile range from the windows' edges, the split shares, the slot of a
    position (contiguous / paged / ring), the interior tiles that skip the mask, and
    the log-sum-exp combine. Returns (out, lse) (natural log; no sinks)."""
    b, sq, hq, d = q.shape
    hk, slots = kc.shape[2], kc.shape[1]
    group, scale = hq // hk, 1 / math.sqrt(d)
    rows = sq * group
    part_o = torch.zeros(splits, b, sq, hq, d, dtype=torch.float64)
    part_l = torch.full((splits, b, hq, sq), float("-inf"), dtype=torch.float64)
    for s, kvh, mt, sp in itertools.product(range(b), range(hk), range(-(-rows // block_m)), range(splits)):
        n_keys = int(seqlens[s]) + n_new
        row0 = mt * block_m
        r = torch.arange(row0, row0 + block_m)
        real = r < rows
        rq = torch.clamp(r, max=rows - 1)
        qs = torch.where(real[:, None], q[s, rq // group, kvh * group + rq % group].double(), 0)
        pos = n_keys - sq + r // group
        first, count = pos - left, torch.clamp(torch.clamp(n_keys - (pos - left), max=left + right + 1), min=0)
        count = torch.where(real, count, 0)
        pos_lo, pos_hi = n_keys - sq + row0 // group, n_keys - sq + (min(row0 + block_m, rows) - 1) // group
        lo = max(pos_lo - left, 0) // block_n
        hi = max(-(-max(min(pos_hi + right + 1, n_keys), 0) // block_n), lo)
        share = -(-(hi - lo) // splits)
        lo, hi = min(lo + sp * share, hi), min(lo + (sp + 1) * share, hi)
        m = torch.full((block_m,), float("-inf"), dtype=torch.float64)
        l_ = torch.zeros(block_m, dtype=torch.float64)
        acc = torch.zeros(block_m, d, dtype=torch.float64)
        for t in range(lo, hi):
            k0 = t * block_n
            if layout == "paged":
                page, slot = int(table[s, k0 // slots]), k0 % slots
            else:
                page, slot = s, k0 % slots if layout == "ring" else k0
            kt = torch.zeros(block_n, d, dtype=torch.float64)  # TMA fills rows past the tensor with 0
            vt = torch.zeros(block_n, d, dtype=torch.float64)
            n = max(min(block_n, slots - slot), 0)
            kt[:n], vt[:n] = kc[page, slot : slot + n, kvh].double(), vc[page, slot : slot + n, kvh].double()
            sc = qs @ kt.T
            sc = softcap * torch.tanh(sc * scale / softcap) if softcap else sc * scale
            if k0 < pos_hi - left or k0 + block_n - 1 > pos_lo + right or k0 + block_n > n_keys:
                j = torch.arange(k0, k0 + block_n)
                seen = (j[None, :] - first[:, None] >= 0) & (j[None, :] - first[:, None] < count[:, None])
                sc = torch.where(seen, sc, float("-inf"))
            m_new = torch.maximum(m, sc.amax(1))
            m_safe = torch.where(torch.isinf(m_new), 0, m_new)
            p = torch.exp(sc - m_safe[:, None])
            alpha = torch.exp(m - m_safe)
            l_, acc, m = l_ * alpha + p.sum(1), acc * alpha[:, None] + p @ vt, m_new
        for i in range(block_m):
            if real[i] and l_[i] > 0:
                qi, qh = int(r[i]) // group, kvh * group + int(r[i]) % group
                part_o[sp, s, qi, qh] = acc[i] / l_[i]
                part_l[sp, s, qh, qi] = m[i] + torch.log(l_[i])
    lse = torch.logsumexp(part_l, 0)
    w = torch.exp(part_l - torch.where(torch.isinf(lse), 0, lse)).permute(0, 1, 3, 2)[..., None]
    return (w * part_o).sum(0), lse


# (layout, batch, slots or page, q_heads, kv_heads, lengths, new, q_len, window_size, splits, softcap)
EMULATED = [
    ("contiguous", 3, 45, 4, 2, "ragged", 1, 1, (7, 0), 1, 0.0),
    ("contiguous", 3, 45, 6, 2, "ragged", 5, 5, (9, 0), 3, 0.0),  # 15 rows: padding in a tile of 8
    ("contiguous", 2, 45, 2, 1, "zero", 9, 9, (-1, -1), 4, 0.0),  # more splits than some ranges have tiles
    ("contiguous", 2, 40, 4, 4, "ragged", 2, 6, (3, 2), 2, 2.0),  # keys to the right, q_len > new, softcap
    ("paged", 3, 8, 4, 2, "ragged", 3, 3, (10, 0), 2, 0.0),
    ("ring", 2, 16, 4, 2, "ragged", 2, 4, (11, 0), 1, 0.0),
    ("ring", 2, 16, 3, 1, "ragged", 3, 3, (13, 0), 3, 0.0),
]


@pytest.mark.parametrize("case", range(len(EMULATED)))
def test_kernel_index_arithmetic_emulated(case):
    """The kernel's tiling (block_m 8, block_n 4: many tiles, padded rows, splits)
    replayed in Python gives the oracle's attention, for every cache layout."""
    layout, b, slots, hq, hk, kind, n_new, sq, window, splits, softcap = EMULATED[case]
    cap = 40 if layout != "contiguous" else slots
    q, kc, vc, k, v, lens, hist_k, hist_v = contiguous_case(b, cap, hq, hk, 8, kind, n_new, sq, seed=case)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    table = None
    if layout == "paged":
        kc, vc, table = paged_copy(kc, vc, slots, seed=case)
    elif layout == "ring":  # a long history: the ring holds its last `slots` positions
        lens = [x + 37 * (i + 1) for i, x in enumerate(lens)]
        seqlens = torch.tensor(lens, dtype=torch.int32)
        full_k = rand(b, max(lens) + n_new, hk, 8, seed=case + 20)
        full_v = rand(b, max(lens) + n_new, hk, 8, seed=case + 21)
        hist_k = [full_k[i, : lens[i] + n_new] for i in range(b)]
        hist_v = [full_v[i, : lens[i] + n_new] for i in range(b)]
        kc = torch.zeros(b, slots, hk, 8, dtype=torch.float64)
        vc = torch.zeros_like(kc)
        for i in range(b):  # the last `slots` positions, at p % slots; the new keys too
            pos = torch.arange(max(lens[i] + n_new - slots, 0), lens[i] + n_new)
            kc[i, pos % slots], vc[i, pos % slots] = full_k[i, pos], full_v[i, pos]
    if layout != "ring" and n_new:  # the launcher appends first; here the cache is written directly
        dec.append_(kc, vc, k, v, seqlens, "paged" if table is not None else "contiguous", table)
    left, right = wspec.normalize_window(window, window[1] == 0, sq, cap + n_new)
    out, lse = emulate_kernel(q, kc, vc, seqlens, n_new, left, right, layout, table, 8, 4, splits, softcap)
    want, want_lse = oracle(q, hist_k, hist_v, window_size=window, causal=window[1] == 0, softcap=softcap)
    assert_matches(out, lse, want, want_lse, 1e-12)


def test_split_heuristic():
    assert dec.choose_splits(ctas=8 * 64 * 1, key_tiles=64, sms=132, occupancy=2) == 1  # the grid fills the GPU
    assert dec.choose_splits(ctas=8, key_tiles=65, sms=132, occupancy=2) == 32  # batch 1 x 8 kv heads
    assert dec.choose_splits(ctas=8, key_tiles=3, sms=132, occupancy=2) == 1  # too few tiles to share
    assert dec.choose_splits(ctas=1, key_tiles=10_000, sms=132, occupancy=2) == dec.MAX_SPLITS


# ---- every kernel variant compiles for sm_90a -------------------------------------------------------


def _compiles(head_dim, dtype, layout, split, softcap, sinks):
    tile = dec.tile_for(head_dim)
    src = dec.compiled_decode(head_dim, dtype, "sm_90a", tile, layout, split, softcap, sinks).get_kernel_source()
    assert "tma_load" in src  # K and V tiles by TMA, in the producer warpgroup
    assert f"__launch_bounds__({tile[2] + 128}, {tile[4]})" in src
    _waits_first(src)


def _waits_first(src):
    """Programmatic dependent launch: the kernel waits for the previous one before it
    reads any tensor (the first global access comes after the wait)."""
    head = src[: src.index("cudaGridDependencySynchronize();")]
    assert "cudaTriggerProgrammaticLaunchCompletion();" in head
    assert "tma_load" not in head
    assert not re.search(r"\b(Q|K|V|CL|BT|SINK|OP|LP|KN|VN)\[", head)


def test_pdl_only_from_hopper():
    assert dec._pdl("sm_90a") and dec._pdl("sm_100a") and dec._pdl("sm_120f")
    assert not dec._pdl("sm_80") and not dec._pdl("sm_89")


def test_compiles_sm90a():
    """The default: one decode variant and one combine (~1 minute on two cores)."""
    _compiles(128, "bfloat16", "contiguous", False, False, False)
    src = dec.compiled_combine(128, "bfloat16", "sm_90a", True).get_kernel_source()
    assert "combine" in src
    _waits_first(src)


@pytest.mark.slow
@pytest.mark.parametrize(
    "head_dim,dtype,layout,split,flags",
    [
        (128, "bfloat16", layout, split, flags)
        for layout in kernels.LAYOUTS
        for split in (False, True)
        for flags in ((False, False), (True, True))
    ]
    + [
        (64, "float16", "contiguous", False, (False, True)),
        (64, "bfloat16", "paged", True, (True, False)),
        (256, "bfloat16", "contiguous", False, (False, False)),
        (256, "float16", "ring", True, (True, True)),
    ],
)
def test_compiles_sm90a_grid(head_dim, dtype, layout, split, flags):
    """~30-120 s each: ``-m slow``."""
    _compiles(head_dim, dtype, layout, split, *flags)


@pytest.mark.slow
@pytest.mark.parametrize("head_dim,dtype", [(64, "float16"), (256, "bfloat16")])
def test_combine_compiles_sm90a(head_dim, dtype):
    assert "combine" in dec.compiled_combine(head_dim, dtype, "sm_90a", False).get_kernel_source()


@pytest.mark.parametrize("layout", kernels.LAYOUTS)
def test_append_compiles_sm90a(layout):
    """The append kernel (a few seconds each): a position outside the cache traps."""
    src = dec.compiled_append(128, "bfloat16", "sm_90a", layout).get_kernel_source()
    assert "__trap()" in src and "append" in src
    _waits_first(src)


# ---- GPU -------------------------------------------------------------------------------------------


# Every variant the GPU tests run (18), compiled in parallel once: serially they take
# ~15 minutes. Under xdist the first worker compiles with every core while the others
# wait on a lock, then find TileLang's disk cache warm.
BOTH = (False, True)
GPU_VARIANTS = (
    [(128, "bfloat16", "contiguous", split, cap, sink) for split in BOTH for cap, sink in ((0, 0), (0, 1), (1, 0))]
    + [(64, "float16", "contiguous", split, False, False) for split in BOTH]
    + [(d, dt, "paged", split, False, False) for d, dt in ((128, "bfloat16"), (64, "float16")) for split in BOTH]
    + [(128, "bfloat16", "ring", split, False, False) for split in BOTH]
    + [(64, "float16", "ring", False, False, False)]
    + [("combine", 128, "bfloat16", False), ("combine", 128, "bfloat16", True), ("combine", 64, "float16", False)]
    + [("append", 128, "bfloat16", layout) for layout in kernels.LAYOUTS]
    + [("append", 64, "float16", layout) for layout in kernels.LAYOUTS]
)


@pytest.fixture(scope="module")
def gpu_kernels():
    import fcntl
    import tempfile
    from pathlib import Path

    stamp = Path(tempfile.gettempdir()) / f"swattn_decode_precompiled_{os.getuid()}_{os.getppid()}"
    with open(str(stamp) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not stamp.exists():
            variants = [v if isinstance(v[0], str) else (*v[:4], bool(v[4]), bool(v[5])) for v in GPU_VARIANTS]
            dec.precompile(variants, launch.cuda_arch(torch.device("cuda")))
            stamp.touch()


def poison_allocator(nbytes: int = 1 << 28):
    """Fill freed device memory with NaN so that outputs the kernels fail to write show
    (the caching allocator hands the same blocks to the next torch.empty)."""
    blocks = [torch.full((nbytes // 4 // 8,), float("nan"), device="cuda") for _ in range(8)]
    del blocks
    torch.cuda.synchronize()


def assert_kernel_matches(out, lse, q, hist_k, hist_v, **kw):
    """out and lse (on their finite entries) within twice PyTorch's own error on the same
    math in q's dtype, plus 2e-4 (house style), against the float64 oracle; lse -inf
    exactly where the oracle's is; out finite (the allocator was poisoned with NaN)."""
    q, hist_k, hist_v = q.cpu(), [h.cpu() for h in hist_k], [h.cpu() for h in hist_v]
    out, lse = out.cpu(), lse.cpu()
    kw = {**kw, "sinks": None if kw.get("sinks") is None else kw["sinks"].cpu()}
    want, want_lse = oracle(q, hist_k, hist_v, **kw)
    low, low_lse = oracle(q, hist_k, hist_v, dtype=q.dtype, **kw)
    assert torch.isfinite(out).all()
    assert ref.rel_err(out, want) <= 2 * ref.rel_err(low, want) + 2e-4
    fin = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    if fin.any():
        assert ref.rel_err(lse[fin], want_lse[fin]) <= 2 * ref.rel_err(low_lse[fin], want_lse[fin]) + 2e-4


# (batch, cache_len, q_heads, kv_heads, lengths, new, q_len, window_size, causal, softcap, sinks)
GPU_CASES = [
    (4, 1000, 8, 2, "ragged", 1, 1, (255, 0), True, 0.0, False),  # decode, GQA 4
    (2, 4096, 32, 8, "ragged", 1, 1, (-1, -1), True, 0.0, False),  # the whole cache
    (3, 700, 4, 4, "ragged", 4, 4, (100, 0), True, 0.0, True),  # speculative tokens, sinks
    (2, 2000, 16, 2, "ragged", 16, 16, (511, 0), True, 30.0, False),  # 8 x 16 = 128 rows: two row tiles
    (2, 1500, 8, 8, "zero", 300, 300, (127, 0), True, 0.0, False),  # chunked prefill into an empty cache
    (1, 3000, 4, 1, "full", 0, 1, (1000, 0), True, 0.0, True),  # MQA, a full cache
    (2, 600, 4, 2, "ragged", 2, 5, (50, 10), False, 0.0, False),  # q_len > new, keys to the right
]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [1, 0, 7])
@pytest.mark.parametrize(
    "case,head_dim,dtype",
    [(c, 128, torch.bfloat16) for c in range(len(GPU_CASES))]
    + [(c, 64, torch.float16) for c in range(len(GPU_CASES)) if not (GPU_CASES[c][9] or GPU_CASES[c][10])],
)
def test_kernel_matches_oracle(case, head_dim, dtype, num_splits, gpu_kernels):
    b, cap, hq, hk, kind, n_new, sq, window, causal, softcap, with_sinks = GPU_CASES[case]
    q, kc, vc, k, v, lens, hist_k, hist_v = contiguous_case(
        b, cap, hq, hk, head_dim, kind, n_new, sq, dtype, "cuda", seed=case
    )
    sinks = rand(hq, dtype=torch.float32, device="cuda", seed=case + 9) if with_sinks else None
    seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    poison_allocator()
    out, lse = flash_attn_with_kvcache(
        q, kc, vc, k, v, seqlens, None, None, causal, window, softcap, sinks, return_lse=True, num_splits=num_splits
    )
    assert_kernel_matches(out, lse, q, hist_k, hist_v, window_size=window, causal=causal, softcap=softcap, sinks=sinks)
    for s in range(b):
        assert torch.equal(kc[s, : lens[s] + n_new], hist_k[s])


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [1, 0])
@pytest.mark.parametrize("head_dim,dtype", [(64, torch.float16), (128, torch.bfloat16)])
def test_paged_kernel_matches_contiguous(head_dim, dtype, num_splits, gpu_kernels):
    """Random page order, spare pages of garbage; page 128 (two key tiles per page at D = 128)."""
    b, cap, hq, hk, page = 3, 2048, 8, 2, 128
    q, kc, vc, k, v, lens, hist_k, hist_v = contiguous_case(b, cap, hq, hk, head_dim, "ragged", 2, 2, dtype, seed=5)
    kp, vp, table = (x.cuda() for x in paged_copy(kc, vc, page, seed=5))
    seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    poison_allocator()
    out, lse = flash_attn_with_kvcache(
        q.cuda(),
        kp,
        vp,
        k.cuda(),
        v.cuda(),
        seqlens,
        table,
        window_size=(700, 0),
        causal=True,
        return_lse=True,
        num_splits=num_splits,
    )
    assert_kernel_matches(out, lse, q, hist_k, hist_v, window_size=(700, 0), causal=True)
    for s in range(b):  # the appended keys landed in the sequence's own pages
        pos = torch.arange(lens[s] + 2)
        rows = table[s].long().cpu()[pos // page] * page + pos % page
        assert torch.equal(kp.cpu().reshape(-1, hk, head_dim)[rows], hist_k[s])
        assert torch.equal(vp.cpu().reshape(-1, hk, head_dim)[rows], hist_v[s])


@gpu
@pytest.mark.gpu
def test_append_outside_the_cache_is_an_error(gpu_kernels, tmp_path):
    """A position past a contiguous cache's capacity stops the append kernel (a trap, an
    error at the next sync, as an out-of-range index_copy_ gives), never a write elsewhere.
    In a child process: a trap ends the CUDA context of the process it happens in."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "overflow.py"
    script.write_text(
        "import torch\n"
        "from swattn.decode import flash_attn_with_kvcache\n"
        "kc = torch.zeros(1, 64, 2, 64, device='cuda', dtype=torch.float16)\n"
        "vc = torch.zeros_like(kc)\n"
        "q = torch.randn(1, 2, 4, 64, device='cuda', dtype=torch.float16)\n"
        "k = torch.randn(1, 2, 2, 64, device='cuda', dtype=torch.float16)\n"
        "seqlens = torch.tensor([63], dtype=torch.int32, device='cuda')\n"
        "flash_attn_with_kvcache(q, kc, vc, k, k, seqlens, causal=True)\n"
        "torch.cuda.synchronize()\n"
        "print('NO ERROR')\n"
    )
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode != 0 and "NO ERROR" not in run.stdout, run.stdout + run.stderr[-2000:]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [1, 0])
def test_ring_kernel_across_wraps(num_splits, gpu_kernels):
    """The ring on the GPU against its eager twin on the CPU, step by step over 5+ wraps."""
    batch, window, n_max, hq, hk, d = 3, 300, 16, 8, 2, 128
    rng = random.Random(1)
    ring = SlidingWindowKVCache(batch, window, n_max, hk, d, torch.bfloat16, "cuda")
    twin = SlidingWindowKVCache(batch, window, n_max, hk, d, torch.bfloat16, "cpu")
    for step in range(200):
        n, sq = rng.randint(1, n_max), rng.randint(1, n_max)
        q = rand(batch, sq, hq, d, dtype=torch.bfloat16, seed=3 * step)
        k, v = (rand(batch, n, hk, d, dtype=torch.bfloat16, seed=3 * step + i) for i in (1, 2))
        out, lse = ring.update_and_attend(q.cuda(), k.cuda(), v.cuda(), return_lse=True, num_splits=num_splits)
        want, want_lse = twin.update_and_attend(q, k, v, return_lse=True)
        assert ref.rel_err(out.cpu(), want) < 2e-2
        assert (lse.cpu() - want_lse).abs().max() < 1e-3
    assert torch.equal(ring.seqlens.cpu(), twin.seqlens) and torch.equal(ring.k.cpu(), twin.k)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [1, 0])
def test_cuda_graph_replay_equals_eager(num_splits, gpu_kernels):
    """Capture append + attend once (static buffers, lengths on the device); replays
    with new tokens and lengths equal fresh calls."""
    b, cap, hq, hk, d = 4, 4096, 32, 8, 128
    dt = torch.bfloat16
    kc = torch.randn(b, cap, hk, d, device="cuda", dtype=dt)
    vc = torch.randn_like(kc)
    kc2, vc2 = kc.clone(), vc.clone()
    q = torch.randn(b, 1, hq, d, device="cuda", dtype=dt)
    k, v = torch.randn(b, 1, hk, d, device="cuda", dtype=dt), torch.randn(b, 1, hk, d, device="cuda", dtype=dt)
    seqlens = torch.tensor([5, 100, 2000, 4000], dtype=torch.int32, device="cuda")

    def step():
        return flash_attn_with_kvcache(
            q, kc, vc, k, v, seqlens, window_size=(1023, 0), causal=True, num_splits=num_splits
        )

    step()  # compile and warm up outside the capture
    kc.copy_(kc2)
    vc.copy_(vc2)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for i in range(4):
        q.normal_()
        k.normal_()
        v.normal_()
        seqlens.add_(i + 1)
        graph.replay()
        want = flash_attn_with_kvcache(
            q, kc2, vc2, k, v, seqlens, window_size=(1023, 0), causal=True, num_splits=num_splits
        )
        torch.cuda.synchronize()
        assert torch.equal(out, want), i
        assert torch.equal(kc, kc2) and torch.equal(vc, vc2)


@gpu
@pytest.mark.gpu
def test_ring_cuda_graph_replay(gpu_kernels):
    ring = SlidingWindowKVCache(2, 127, 1, 2, 64, torch.float16, "cuda")
    twin = SlidingWindowKVCache(2, 127, 1, 2, 64, torch.float16, "cuda")
    q = torch.randn(2, 1, 8, 64, device="cuda", dtype=torch.float16)
    k, v = (
        torch.randn(2, 1, 2, 64, device="cuda", dtype=torch.float16),
        torch.randn(2, 1, 2, 64, device="cuda", dtype=torch.float16),
    )
    ring.update_and_attend(q, k, v)
    twin.update_and_attend(q, k, v)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ring.update_and_attend(q, k, v)
    for _ in range(300):  # two wraps of 128 slots
        graph.replay()
        want = twin.update_and_attend(q, k, v)
        assert torch.equal(out, want)
        q.normal_()
        k.normal_()
        v.normal_()
    assert torch.equal(ring.seqlens, twin.seqlens) and int(ring.seqlens[0]) == 301
    assert math.isfinite(out.float().abs().max().item())
