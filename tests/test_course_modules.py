"""The course's OfflineSlidingWindowAttn / OnlineSlidingWindowAttn (swattn/online.py)
against known answers computed here, apart from the modules: plain Python loops
over float64 numbers, one (batch, head, query, key) at a time.

Window (the course's): with s = max(seqlen_q, seqlen_kv), query i sits at
s - seqlen_q + i and key j at s - seqlen_kv + j; key j is visible iff its position
is >= the query's - w and <= the query's (causal) or <= the query's + w; w = None
is unbounded.
"""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
import torch.nn.functional as F
from utils import gpu, rand

from swattn.online import (
    AttnQKVLayout,
    AttnQKVPackFormat,
    GroupRMSNorm,
    OfflineSlidingWindowAttn,
    OnlineSlidingWindowAttn,
)

F64 = torch.float64


def rel_err(a, b) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


# ---- the known answers: loops over Python floats ---------------------------------------


def loop_norm(x, gamma, group: int, eps: float):
    """GroupRMSNorm of x (b, s, h, d) over each token's h * d values in groups of ``group``."""
    b, s, h, d = x.shape
    rows, g = x.reshape(b * s, h * d).tolist(), gamma.tolist()
    out = []
    for row in rows:
        new = []
        for start in range(0, h * d, group):
            part = row[start : start + group]
            r = 1.0 / math.sqrt(sum(t * t for t in part) / group + eps)
            new += [t * r * g[start + n] for n, t in enumerate(part)]
        out.append(new)
    return torch.tensor(out, dtype=F64).reshape(b, s, h, d)


def loop_attention(q, k, v, w=None, causal=False, scale=None, cap=None, temp=1.0, clip=(0.0, 1.0), keep=None):
    """(o (b, sq, hq, d), lse (b, hq, sq)) of the course's steps 3-9, one number at a time.

    q (b, sq, hq, d), k, v (b, sk, hk, d), float64; ``keep`` (b, hq, sq, sk) the dropout
    multipliers (0 or 1 / (1 - rate)) or None."""
    b, sq, hq, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    Q, K, V = q.tolist(), k.tolist(), v.tolist()
    keep = None if keep is None else keep.tolist()
    s = max(sq, sk)
    w = s if w is None else w
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    lo, hi = clip
    o = [[[[0.0] * d for _ in range(hq)] for _ in range(sq)] for _ in range(b)]
    lse = [[[0.0] * sq for _ in range(hq)] for _ in range(b)]
    for bi in range(b):
        for h in range(hq):
            kh = h // (hq // hk)
            for i in range(sq):
                qp = s - sq + i
                logits = []
                for j in range(sk):
                    kp = s - sk + j
                    if not (kp >= qp - w and kp <= (qp if causal else qp + w)):
                        logits.append(None)
                        continue
                    x = sum(Q[bi][i][h][t] * K[bi][j][kh][t] for t in range(d)) * scale
                    logits.append(cap * math.tanh(x / cap) if cap else x / temp)
                seen = [x for x in logits if x is not None]
                if seen:
                    m = max(seen)
                    lse[bi][h][i] = m + math.log(sum(math.exp(x - m) for x in seen))
                else:
                    lse[bi][h][i] = -math.inf
                for j, x in enumerate(logits):
                    p = 0.0 if x is None else math.exp(x - lse[bi][h][i])
                    p = min(max((hi - lo) * p + lo, 0.0), 1.0)
                    if keep is not None:
                        p *= keep[bi][h][i][j]
                    for t in range(d):
                        o[bi][i][h][t] += p * V[bi][j][kh][t]
    return torch.tensor(o, dtype=F64).reshape(b, sq, hq, d), torch.tensor(lse, dtype=F64).reshape(b, hq, sq)


def dropout_keep(shape, rate: float, seed: int):
    """The multipliers ``F.dropout`` draws right after ``torch.manual_seed(seed)`` for a float64 tensor."""
    torch.manual_seed(seed)
    return F.dropout(torch.ones(shape, dtype=F64), rate, training=True)


# ---- offline: every option against the loops ------------------------------------------

# (sq, sk, hq, hk, d, module kwargs, reference kwargs)
OFFLINE_CASES = [
    (9, 9, 4, 2, 8, dict(window_size=2), dict(w=2)),
    (9, 9, 4, 2, 8, dict(window_size=2, causal=True), dict(w=2, causal=True)),
    (8, 8, 2, 2, 4, dict(), dict()),
    (8, 8, 2, 1, 4, dict(causal=True), dict(causal=True)),
    (7, 7, 3, 1, 4, dict(window_size=0), dict(w=0)),
    (9, 5, 4, 2, 4, dict(window_size=1), dict(w=1)),  # sq > skv: the first queries see nothing
    (9, 5, 4, 2, 4, dict(window_size=3, causal=True), dict(w=3, causal=True)),
    (4, 10, 2, 1, 4, dict(window_size=2), dict(w=2)),  # sq < skv: queries sit on the last keys
    (4, 10, 2, 1, 4, dict(window_size=2, causal=True), dict(w=2, causal=True)),
    (4, 10, 2, 2, 4, dict(causal=True), dict(causal=True)),
    (6, 6, 2, 2, 4, dict(window_size=100), dict(w=100)),
    (6, 6, 2, 1, 4, dict(window_size=2, softmax_scale=0.7), dict(w=2, scale=0.7)),
    (6, 8, 2, 1, 4, dict(window_size=3, softmax_cap=0.9, softmax_scale=2.0), dict(w=3, cap=0.9, scale=2.0)),
    (6, 8, 2, 1, 4, dict(softmax_cap=2.0, softmax_temp=5.0), dict(cap=2.0)),  # cap on: temperature off
    (6, 6, 2, 2, 4, dict(window_size=2, softmax_temp=0.3), dict(w=2, temp=0.3)),
    (6, 6, 4, 2, 4, dict(window_size=2, softmax_clip_range=(-0.1, 1.2)), dict(w=2, clip=(-0.1, 1.2))),
    (6, 6, 2, 2, 4, dict(window_size=1, softmax_clip_range=(0.05, 0.9)), dict(w=1, clip=(0.05, 0.9))),
    (
        5,
        7,
        2,
        1,
        4,
        dict(window_size=1, causal=True, softmax_clip_range=(-0.5, 0.5)),
        dict(w=1, causal=True, clip=(-0.5, 0.5)),
    ),
]


@pytest.mark.parametrize("case", range(len(OFFLINE_CASES)))
def test_offline_matches_loops(case):
    sq, sk, hq, hk, d, kwargs, ref_kwargs = OFFLINE_CASES[case]
    q, k, v = rand(2, sq, hq, d, seed=case), rand(2, sk, hk, d, seed=case + 50), rand(2, sk, hk, d, seed=case + 99)
    layer = OfflineSlidingWindowAttn(d, hq, hk, **kwargs)
    got = layer(q, k, v)
    want, _ = loop_attention(q, k, v, **ref_kwargs)
    assert got.dtype == F64 and got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-12


def test_offline_rows_that_see_nothing_give_zeros():
    """sq > skv with w = 0: query i sits at 4 + i against keys at 4..7, so query i < 4 sees
    key i + 0 ... none for the first four (their position is below every key's)."""
    q, k, v = rand(1, 8, 2, 4, seed=1), rand(1, 4, 2, 4, seed=2), rand(1, 4, 2, 4, seed=3)
    got = OfflineSlidingWindowAttn(4, 2, 2, window_size=0)(q, k, v)
    assert torch.isfinite(got).all()
    assert (got[:, :4] == 0).all()
    assert torch.allclose(got[:, 4:], v, atol=1e-15)  # w = 0: each later query sees exactly its own key


def test_offline_float32_and_bfloat16_keep_the_input_dtype():
    q, k, v = rand(2, 9, 4, 8, seed=1), rand(2, 9, 2, 8, seed=2), rand(2, 9, 2, 8, seed=3)
    want, _ = loop_attention(q, k, v, w=3, causal=True)
    layer = OfflineSlidingWindowAttn(8, 4, 2, window_size=3, causal=True)
    out32 = layer(*(x.float() for x in (q, k, v)))
    assert out32.dtype == torch.float32 and rel_err(out32, want) < 1e-6
    out16 = layer(*(x.bfloat16() for x in (q, k, v)))
    assert out16.dtype == torch.bfloat16 and rel_err(out16, want) < 2e-2


# ---- packed formats and layouts -------------------------------------------------------


def test_packed_formats_and_sbhd():
    hq, hk, d = 4, 2, 4
    q, k, v = rand(2, 7, hq, d, seed=1), rand(2, 7, hk, d, seed=2), rand(2, 7, hk, d, seed=3)
    want, _ = loop_attention(q, k, v, w=2, causal=True)
    opts = dict(window_size=2, causal=True)
    qkv = torch.cat([q, k, v], dim=2)  # the heads axis: q heads, then k heads, then v heads
    got = OfflineSlidingWindowAttn(d, hq, hk, qkv_pack_format=AttnQKVPackFormat.QKV, **opts)(qkv)
    assert (got - want).abs().max() < 1e-12
    got = OfflineSlidingWindowAttn(d, hq, hk, qkv_pack_format="q_kv_packed", **opts)(q, torch.cat([k, v], 2))
    assert (got - want).abs().max() < 1e-12
    sb = OfflineSlidingWindowAttn(d, hq, hk, qkv_layout=AttnQKVLayout.SBHD, **opts)
    got = sb(*(x.transpose(0, 1).contiguous() for x in (q, k, v)))
    assert got.shape == (7, 2, hq, d) and (got.transpose(0, 1) - want).abs().max() < 1e-12
    sb_qkv = OfflineSlidingWindowAttn(d, hq, hk, qkv_pack_format="qkv_packed", qkv_layout="sbhd", **opts)
    got = sb_qkv(qkv.transpose(0, 1).contiguous())
    assert (got.transpose(0, 1) - want).abs().max() < 1e-12


THD_CU_Q = [0, 3, 3, 10, 12, 13]  # lengths 3, 0 (an empty sequence), 7, 2, 1
THD_CU_K = [0, 5, 7, 9, 16, 16]  # lengths 5, 2, 2, 7, 0 (queries with no key at all)


@pytest.mark.parametrize(
    "kwargs,ref_kwargs",
    [
        (dict(window_size=1), dict(w=1)),
        (dict(window_size=2, causal=True), dict(w=2, causal=True)),
        (dict(causal=True, softmax_cap=1.5), dict(causal=True, cap=1.5)),
    ],
)
def test_thd_ragged_each_sequence_on_its_own(kwargs, ref_kwargs):
    hq, hk, d = 4, 2, 4
    q, k, v = rand(13, hq, d, seed=4), rand(16, hk, d, seed=5), rand(16, hk, d, seed=6)
    layer = OfflineSlidingWindowAttn(d, hq, hk, qkv_layout=AttnQKVLayout.THD, **kwargs)
    cu_q, cu_k = torch.tensor(THD_CU_Q, dtype=torch.int32), torch.tensor(THD_CU_K, dtype=torch.int32)
    got = layer(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    assert got.shape == q.shape
    for b in range(len(THD_CU_Q) - 1):
        rq, rk = slice(THD_CU_Q[b], THD_CU_Q[b + 1]), slice(THD_CU_K[b], THD_CU_K[b + 1])
        if rq.stop == rq.start:
            continue
        want, _ = loop_attention(q[None, rq], k[None, rk], v[None, rk], **ref_kwargs)
        assert (got[rq] - want[0]).abs().max() < 1e-12, b
    assert (got[12] == 0).all()  # the last sequence has no key
    # packed qkv in THD: one (total, hq + 2 hk, d) tensor, equal q and k lengths
    qkv = torch.cat([q[:13], k[:13], v[:13]], 1)
    cu = torch.tensor([0, 4, 13], dtype=torch.int32)
    packed = OfflineSlidingWindowAttn(d, hq, hk, qkv_pack_format="qkv_packed", qkv_layout="thd", **kwargs)
    got = packed(qkv, cu_seqlens_q=cu, cu_seqlens_k=cu)
    for rows in (slice(0, 4), slice(4, 13)):
        want, _ = loop_attention(q[None, rows], k[None, rows], v[None, rows], **ref_kwargs)
        assert (got[rows] - want[0]).abs().max() < 1e-12


# ---- dropout --------------------------------------------------------------------------


def test_dropout_reproducible_by_seed_and_off_in_eval():
    hq, hk, d, rate = 4, 2, 4, 0.3
    q, k, v = rand(2, 6, hq, d, seed=1), rand(2, 7, hk, d, seed=2), rand(2, 7, hk, d, seed=3)
    layer = OfflineSlidingWindowAttn(d, hq, hk, window_size=2, softmax_dropout_rate=rate, softmax_dropout_seed=7)
    got = layer(q, k, v)
    keep = dropout_keep((2, hq, 6, 7), rate, 7)
    assert 0 < (keep == 0).sum() < keep.numel()  # the case drops some, not all
    want, _ = loop_attention(q, k, v, w=2, keep=keep)
    assert (got - want).abs().max() < 1e-12
    torch.manual_seed(123)  # whatever the global state: the seed decides
    assert torch.equal(layer(q, k, v), got)
    other = OfflineSlidingWindowAttn(d, hq, hk, window_size=2, softmax_dropout_rate=rate, softmax_dropout_seed=8)
    assert not torch.allclose(other(q, k, v), got)
    layer.eval()
    plain, _ = loop_attention(q, k, v, w=2)
    assert (layer(q, k, v) - plain).abs().max() < 1e-12


def test_dropout_after_clip_in_thd_reseeds_per_sequence():
    hq, hk, d, rate, clip = 2, 1, 4, 0.25, (-0.2, 1.1)
    cq, ck = [0, 4, 9], [0, 6, 9]
    q, k, v = rand(9, hq, d, seed=1), rand(9, hk, d, seed=2), rand(9, hk, d, seed=3)
    layer = OfflineSlidingWindowAttn(
        d,
        hq,
        hk,
        qkv_layout="thd",
        window_size=2,
        causal=True,
        softmax_dropout_rate=rate,
        softmax_dropout_seed=3,
        softmax_clip_range=clip,
    )
    got = layer(q, k, v, torch.tensor(cq, dtype=torch.int32), torch.tensor(ck, dtype=torch.int32))
    for b in range(2):
        rq, rk = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        keep = dropout_keep((1, hq, rq.stop - rq.start, rk.stop - rk.start), rate, 3)
        want, _ = loop_attention(q[None, rq], k[None, rk], v[None, rk], w=2, causal=True, clip=clip, keep=keep)
        assert (got[rq] - want[0]).abs().max() < 1e-12


# ---- QK norm --------------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [1, 2, 8, None])
def test_qk_norm_group_sizes(group_size):
    hq, hk, d = 4, 2, 8
    q, k, v = rand(2, 6, hq, d, seed=1), rand(2, 6, hk, d, seed=2), rand(2, 6, hk, d, seed=3)
    opts = dict(apply_qk_norm=True, group_size=group_size, eps=1e-3, init_range=(-0.5, 1.5), init_seed=5)
    layer = OfflineSlidingWindowAttn(d, hq, hk, window_size=2, dtype=F64, **opts)
    # gamma: uniform(init_range) right after torch.manual_seed(init_seed), q's and k's alike
    for norm, hidden in ((layer.q_norm, hq * d), (layer.k_norm, hk * d)):
        torch.manual_seed(5)
        assert torch.equal(norm.weight.detach(), torch.empty(hidden, dtype=F64).uniform_(-0.5, 1.5))
    g = d if group_size is None else group_size
    qn, kn = loop_norm(q, layer.q_norm.weight.detach(), g, 1e-3), loop_norm(k, layer.k_norm.weight.detach(), g, 1e-3)
    want, _ = loop_attention(qn, kn, v, w=2)
    assert (layer(q, k, v) - want).abs().max() < 1e-12


def test_group_rms_norm_float32_math_and_dtype():
    norm = GroupRMSNorm(8, 4, eps=1e-5, init_seed=1, dtype=torch.float32)
    x = rand(3, 8, seed=2).bfloat16()
    y = norm(x)
    assert y.dtype == torch.bfloat16
    want = loop_norm(x.double().view(3, 1, 1, 8), norm.weight.detach().double(), 4, 1e-5).view(3, 8)
    assert (y.double() - want).abs().max() < 2e-2  # one rounding to bfloat16 of values below ~4
    assert rel_err(y, want) < 4e-3


# ---- online: blocks merged into a running state ---------------------------------------

# (seqlen_q, seqlen_kv, block_q, block_kv, hq, hk, module kwargs, reference kwargs)
ONLINE_CASES = [
    (13, 13, 4, 4, 4, 2, dict(window_size=2), dict(w=2)),
    (13, 13, 4, 3, 4, 2, dict(window_size=3, causal=True), dict(w=3, causal=True)),
    (11, 6, 4, 4, 2, 1, dict(window_size=1), dict(w=1)),  # sq > skv, padded blocks on both sides
    (5, 14, 2, 5, 2, 2, dict(window_size=2, causal=True), dict(w=2, causal=True)),  # sq < skv
    (10, 10, 3, 4, 2, 1, dict(causal=True, softmax_cap=1.2), dict(causal=True, cap=1.2)),
    (9, 12, 4, 5, 2, 2, dict(softmax_temp=0.5, softmax_scale=0.8), dict(temp=0.5, scale=0.8)),
    (12, 12, 12, 12, 2, 1, dict(window_size=4), dict(w=4)),  # one block
    (7, 7, 1, 1, 2, 2, dict(window_size=0), dict(w=0)),
]


def padded_blocks(x, size: int, seed: int):
    """x (b, s, h, d) cut into blocks of ``size``, the last one padded with garbage (never to be seen)."""
    n = -(-x.shape[1] // size)
    pad = rand(x.shape[0], n * size - x.shape[1], *x.shape[2:], seed=seed) * 1e3
    full = torch.cat([x, pad], 1)
    return [full[:, i * size : (i + 1) * size] for i in range(n)]


def assert_merged(o, lse, o0, lse0, full, full_lse):
    """(o, lse) is the state (o0, lse0) merged with the whole attention (full, full_lse), to 1e-12."""
    want_lse = torch.logaddexp(lse0, full_lse)
    want = (
        torch.exp(lse0 - want_lse).transpose(1, 2)[..., None] * o0
        + torch.exp(full_lse - want_lse).transpose(1, 2)[..., None] * full
    )
    assert (lse - want_lse).abs().max() < 1e-12 and (o - want).abs().max() < 1e-12


@pytest.mark.parametrize("case", range(len(ONLINE_CASES)))
def test_online_blocks_any_order_into_a_running_state(case):
    sq, sk, bq, bk, hq, hk, kwargs, ref_kwargs = ONLINE_CASES[case]
    d = 4
    q, k, v = rand(2, sq, hq, d, seed=case), rand(2, sk, hk, d, seed=case + 30), rand(2, sk, hk, d, seed=case + 60)
    full, full_lse = loop_attention(q, k, v, **ref_kwargs)
    offline = OfflineSlidingWindowAttn(d, hq, hk, **kwargs)(q, k, v)
    assert (offline - full).abs().max() < 1e-12

    layer = OnlineSlidingWindowAttn(sq, sk, bq, bk, d, hq, hk, **kwargs)
    qb, kb, vb = padded_blocks(q, bq, 1), padded_blocks(k, bk, 2), padded_blocks(v, bk, 3)
    pairs = [(i, j) for i in range(len(qb)) for j in range(len(kb))]
    random.Random(case).shuffle(pairs)
    # from nothing: the offline result and its lse
    o, lse = torch.zeros(2, sq, hq, d, dtype=F64), torch.full((2, hq, sq), -math.inf, dtype=F64)
    for i, j in pairs:
        assert layer(qb[i], kb[j], vb[j], o, lse, i, j) is None
    assert torch.isfinite(o).all() and (o - full).abs().max() < 1e-12
    assert torch.equal(torch.isinf(lse), torch.isinf(full_lse))
    assert (torch.where(torch.isinf(lse), 0, lse - full_lse)).abs().max() < 1e-12
    # from a random finite state: exactly one more merge of the whole attention into it
    o0, lse0 = rand(2, sq, hq, d, seed=7), rand(2, hq, sq, seed=8) * 3
    o, lse = o0.clone(), lse0.clone()
    random.Random(case + 1).shuffle(pairs)
    for i, j in pairs:
        layer(qb[i], kb[j], vb[j], o, lse, i, j)
    assert_merged(o, lse, o0, lse0, full, full_lse)


def test_online_invisible_block_and_padding_leave_the_state_alone():
    layer = OnlineSlidingWindowAttn(12, 12, 4, 4, 4, 2, 2, window_size=1)
    q, k, v = rand(1, 4, 2, 4, seed=1), rand(1, 4, 2, 4, seed=2), rand(1, 4, 2, 4, seed=3)
    o, lse = rand(1, 12, 2, 4, seed=4), rand(1, 2, 12, seed=5)
    lse[:, :, 4:8] = -math.inf  # rows 4-7 have seen nothing (whatever o holds there)
    before = o.clone(), lse.clone()
    layer(q, k, v, o, lse, 0, 2)  # queries 0-3, keys 8-11: all beyond w = 1
    assert torch.equal(o, before[0]) and torch.equal(lse, before[1])
    layer(q, k, v, o, lse, 1, 0)  # queries 4-7, keys 0-3: only query 4 sees key 3
    assert torch.equal(o[:, :4], before[0][:, :4]) and torch.equal(o[:, 8:], before[0][:, 8:])
    assert torch.isfinite(lse[:, :, 4]).all() and torch.isneginf(lse[:, :, 5:8]).all()
    assert torch.equal(o[:, 5:8], before[0][:, 5:8])  # both -inf: the rows stay as they were
    assert (o[:, 4] - v[:, 3]).abs().max() < 1e-12  # query 4 sees key 3 alone: o = its v (one kv head per q head)


def test_online_qk_norm_and_float32_state():
    sq, sk, d, hq, hk = 10, 10, 8, 4, 2
    q, k, v = rand(1, sq, hq, d, seed=1), rand(1, sk, hk, d, seed=2), rand(1, sk, hk, d, seed=3)
    opts = dict(window_size=3, causal=True, apply_qk_norm=True, group_size=2, init_seed=3, dtype=F64)
    layer = OnlineSlidingWindowAttn(sq, sk, 4, 4, d, hq, hk, **opts)
    qn = loop_norm(q, layer.q_norm.weight.detach(), 2, 1e-5)
    kn = loop_norm(k, layer.k_norm.weight.detach(), 2, 1e-5)
    want, want_lse = loop_attention(qn, kn, v, w=3, causal=True)
    o, lse = torch.zeros(1, sq, hq, d), torch.full((1, hq, sq), -math.inf)  # float32, as the course keeps them
    for i in range(3):
        for j in range(3):
            layer(q[:, 4 * i : 4 * i + 4], k[:, 4 * j : 4 * j + 4], v[:, 4 * j : 4 * j + 4], o, lse, i, j)
    assert rel_err(o, want) < 1e-6 and (lse.double() - want_lse).abs().max() < 1e-5


# ---- the kernel route's arithmetic, on the CPU ----------------------------------------


@pytest.fixture
def kernel_route(monkeypatch):
    """Send the modules down their CUDA route (``flash_attn_func`` / ``flash_attn_varlen_func``)
    on the CPU, where those run their exact float64 twin: checks the window, scale and
    softcap the modules hand the kernels, and the online block's shifted window."""
    monkeypatch.setattr(OfflineSlidingWindowAttn, "_use_kernels", lambda self, q: True)


@pytest.mark.parametrize("case", range(len(OFFLINE_CASES) - 3))  # the clip cases never take the kernels
def test_kernel_route_offline(kernel_route, case):
    sq, sk, hq, hk, d, kwargs, ref_kwargs = OFFLINE_CASES[case]
    q, k, v = rand(2, sq, hq, d, seed=case), rand(2, sk, hk, d, seed=case + 50), rand(2, sk, hk, d, seed=case + 99)
    want, _ = loop_attention(q, k, v, **ref_kwargs)
    assert (OfflineSlidingWindowAttn(d, hq, hk, **kwargs)(q, k, v) - want).abs().max() < 1e-12


def test_kernel_route_thd(kernel_route):
    hq, hk, d = 4, 2, 4
    q, k, v = rand(13, hq, d, seed=4), rand(16, hk, d, seed=5), rand(16, hk, d, seed=6)
    layer = OfflineSlidingWindowAttn(d, hq, hk, qkv_layout="thd", window_size=2, causal=True)
    got = layer(q, k, v, torch.tensor(THD_CU_Q, dtype=torch.int32), torch.tensor(THD_CU_K, dtype=torch.int32))
    for b in range(len(THD_CU_Q) - 1):
        rq, rk = slice(THD_CU_Q[b], THD_CU_Q[b + 1]), slice(THD_CU_K[b], THD_CU_K[b + 1])
        if rq.stop > rq.start:
            want, _ = loop_attention(q[None, rq], k[None, rk], v[None, rk], w=2, causal=True)
            assert (got[rq] - want[0]).abs().max() < 1e-12, b


@pytest.mark.parametrize("case", range(len(ONLINE_CASES)))
def test_kernel_route_online_blocks(kernel_route, case):
    sq, sk, bq, bk, hq, hk, kwargs, ref_kwargs = ONLINE_CASES[case]
    d = 4
    q, k, v = rand(2, sq, hq, d, seed=case), rand(2, sk, hk, d, seed=case + 30), rand(2, sk, hk, d, seed=case + 60)
    full, full_lse = loop_attention(q, k, v, **ref_kwargs)
    layer = OnlineSlidingWindowAttn(sq, sk, bq, bk, d, hq, hk, **kwargs)
    qb, kb, vb = padded_blocks(q, bq, 1), padded_blocks(k, bk, 2), padded_blocks(v, bk, 3)
    o0, lse0 = rand(2, sq, hq, d, seed=7), rand(2, hq, sq, seed=8)
    o, lse = o0.clone(), lse0.clone()
    for i in range(len(qb)):
        for j in reversed(range(len(kb))):
            layer(qb[i], kb[j], vb[j], o, lse, i, j)
    assert_merged(o, lse, o0, lse0, full, full_lse)


# ---- errors ---------------------------------------------------------------------------

BAD_ARGS = [
    (dict(group_size=3), ValueError, "group_size"),
    (dict(group_size=0), ValueError, "group_size"),
    (dict(num_q_head=3, num_kv_head=2), ValueError, "multiple"),
    (dict(num_kv_head=0), ValueError, "num_kv_head"),
    (dict(head_dim=0), ValueError, "head_dim"),
    (dict(softmax_temp=0.0), ValueError, "softmax_temp"),
    (dict(softmax_temp=-1.0), ValueError, "softmax_temp"),
    (dict(softmax_cap=0.0), ValueError, "softmax_cap"),
    (dict(softmax_cap=-2.0), ValueError, "softmax_cap"),
    (dict(softmax_clip_range=(0.5, 0.5)), ValueError, "l < r"),
    (dict(softmax_clip_range=(1.0, 0.0)), ValueError, "l < r"),
    (dict(softmax_clip_range=(0.0,)), ValueError, "pair"),
    (dict(window_size=-1), ValueError, "window_size"),
    (dict(window_size=2.5), ValueError, "window_size"),
    (dict(window_size=True), ValueError, "window_size"),
    (dict(window_size=(2, 2)), ValueError, "window_size"),
    (dict(softmax_dropout_rate=1.5), ValueError, "dropout"),
    (dict(softmax_scale=0.0), ValueError, "softmax_scale"),
    (dict(qkv_pack_format="packed"), ValueError, "qkv_pack_format"),
    (dict(qkv_layout="bhsd"), ValueError, "qkv_layout"),
    (dict(causal=1), TypeError, "causal"),
    (dict(init_range=(1.0, -1.0)), ValueError, "init_range"),
    (dict(dtype=torch.int32), TypeError, "dtype"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD_ARGS)
def test_bad_arguments_raise_at_construction(kwargs, exc, match):
    args = dict(head_dim=8, num_q_head=4, num_kv_head=2)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        OfflineSlidingWindowAttn(**args)


def test_bad_inputs_raise():
    layer = OfflineSlidingWindowAttn(4, 4, 2)
    q, k = rand(1, 5, 4, 4), rand(1, 5, 2, 4)
    with pytest.raises(TypeError, match="needs v"):
        layer(q, k)
    with pytest.raises(ValueError, match="4 dims"):
        layer(q[0], k[0], k[0])
    with pytest.raises(ValueError, match="heads"):
        layer(q, q, q)
    with pytest.raises(ValueError, match="head_dim"):
        layer(q, k[..., :3], k[..., :3])
    with pytest.raises(TypeError, match="dtype"):
        layer(q, k.float(), k)
    with pytest.raises(ValueError, match="batch"):
        layer(q, rand(2, 5, 2, 4), rand(2, 5, 2, 4))
    with pytest.raises(ValueError, match="one shape"):
        layer(q, k, k[:, :4])
    with pytest.raises(ValueError, match="THD"):
        layer(q, k, k, cu_seqlens_q=torch.tensor([0, 5], dtype=torch.int32))
    qkv = OfflineSlidingWindowAttn(4, 4, 2, qkv_pack_format="qkv_packed")
    with pytest.raises(ValueError, match="must be None"):
        qkv(rand(1, 5, 8, 4), k)
    with pytest.raises(ValueError, match="4 \\+ 2 \\* 2"):
        qkv(rand(1, 5, 7, 4))
    thd = OfflineSlidingWindowAttn(4, 4, 2, qkv_layout="thd")
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        thd(q[0], k[0], k[0])
    with pytest.raises(ValueError, match="end at the total"):
        thd(q[0], k[0], k[0], torch.tensor([0, 4], dtype=torch.int32), torch.tensor([0, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="disagree"):
        thd(q[0], k[0], k[0], torch.tensor([0, 5], dtype=torch.int32), torch.tensor([0, 2, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="int32"):
        thd(q[0], k[0], k[0], torch.tensor([0.0, 5.0]), torch.tensor([0, 5], dtype=torch.int32))


def test_online_bad_blocks_raise():
    layer = OnlineSlidingWindowAttn(10, 10, 4, 4, 4, 2, 2, window_size=2)
    q = rand(1, 4, 2, 4)
    o, lse = torch.zeros(1, 10, 2, 4), torch.full((1, 2, 10), -math.inf)
    with pytest.raises(ValueError, match="block_idx_q"):
        layer(q, q, q, o, lse, 3, 0)
    with pytest.raises(ValueError, match="block_idx_kv"):
        layer(q, q, q, o, lse, 0, -1)
    with pytest.raises(ValueError, match="q must be"):
        layer(q[:, :3], q, q, o, lse, 0, 0)  # a middle block must be whole
    layer(q[:, :2], q, q, o, lse, 2, 0)  # the last block may come unpadded (2 valid rows)
    with pytest.raises(ValueError, match="global_o"):
        layer(q, q, q, o[:, :9], lse, 0, 0)
    with pytest.raises(TypeError, match="global_lse"):
        layer(q, q, q, o, lse.half(), 0, 0)
    with pytest.raises(ValueError, match="seqlen_q"):
        OnlineSlidingWindowAttn(0, 10, 4, 4, 4, 2, 2)
    with pytest.raises(ValueError, match="block_size_kv"):
        OnlineSlidingWindowAttn(10, 10, 4, 0, 4, 2, 2)


# ---- CUDA: the kernels against the module's own float64 CPU path -----------------------


def _bf16_bound(got, want, low) -> bool:
    """The kernels' error at most twice the CPU path's own in bfloat16, plus a floor."""
    return rel_err(got, want) <= 2 * rel_err(low, want) + 1e-3


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(window_size=64, causal=True),
        dict(window_size=100),
        dict(causal=True, softmax_cap=20.0),
        dict(window_size=32, softmax_temp=0.7, apply_qk_norm=True, group_size=16),
    ],
)
@pytest.mark.parametrize("sq,sk", [(300, 300), (300, 200), (150, 333)])
def test_cuda_offline_matches_cpu_float64(kwargs, sq, sk):
    hq, hk, d = 8, 2, 64
    layer = OfflineSlidingWindowAttn(d, hq, hk, **kwargs)
    q, k, v = rand(2, sq, hq, d, seed=1), rand(2, sk, hk, d, seed=2), rand(2, sk, hk, d, seed=3)
    cuda = copy.deepcopy(layer).to("cuda", torch.bfloat16)
    cpu64 = copy.deepcopy(cuda).to("cpu", F64)  # the same (bfloat16-rounded) gamma
    x16 = [x.to("cuda", torch.bfloat16) for x in (q, k, v)]
    assert cuda._use_kernels(x16[0])
    got = cuda(*x16)
    want = cpu64(*(x.cpu().double() for x in x16))
    low = copy.deepcopy(cuda).cpu()(*(x.cpu() for x in x16))
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert _bf16_bound(got, want, low)


@gpu
@pytest.mark.gpu
def test_cuda_thd_matches_cpu_float64():
    hq, hk, d = 4, 2, 128
    cq, ck = [0, 100, 100, 350, 351], [0, 80, 120, 400, 401]
    q, k, v = rand(351, hq, d, seed=1), rand(401, hk, d, seed=2), rand(401, hk, d, seed=3)
    layer = OfflineSlidingWindowAttn(d, hq, hk, qkv_layout="thd", window_size=50, causal=True)
    cu = [torch.tensor(c, dtype=torch.int32) for c in (cq, ck)]
    x16 = [x.to("cuda", torch.bfloat16) for x in (q, k, v)]
    got = layer.to("cuda")(*x16, *(c.cuda() for c in cu))
    want = layer.cpu()(*(x.cpu().double() for x in x16), *cu)
    low = layer(*(x.cpu() for x in x16), *cu)
    assert _bf16_bound(got, want, low)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("kwargs", [dict(window_size=40, causal=True), dict(window_size=70), dict(softmax_cap=15.0)])
def test_cuda_online_blocks_match_cpu_float64(kwargs):
    sq, sk, bq, bk, hq, hk, d = 300, 260, 64, 96, 4, 2, 64
    q, k, v = rand(1, sq, hq, d, seed=1), rand(1, sk, hk, d, seed=2), rand(1, sk, hk, d, seed=3)
    x16 = [x.to("cuda", torch.bfloat16) for x in (q, k, v)]
    layer = OnlineSlidingWindowAttn(sq, sk, bq, bk, d, hq, hk, **kwargs)
    o, lse = torch.zeros(1, sq, hq, d, device="cuda"), torch.full((1, hq, sq), -math.inf, device="cuda")
    for i in range(-(-sq // bq)):
        for j in range(-(-sk // bk)):
            layer(
                x16[0][:, i * bq : (i + 1) * bq],
                x16[1][:, j * bk : (j + 1) * bk],
                x16[2][:, j * bk : (j + 1) * bk],
                o,
                lse,
                i,
                j,
            )
    offline = OfflineSlidingWindowAttn(d, hq, hk, **kwargs)
    want = offline(*(x.cpu().double() for x in x16))
    low = offline(*(x.cpu() for x in x16))
    assert torch.isfinite(o).all() and _bf16_bound(o, want, low)
