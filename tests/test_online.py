"""Online block aggregation (online.py's functions: block_attention, merge_, the
blocked backward): any order and any split of key blocks gives the whole
sequence's result, on CPU (eager path) and on GPU (the TileLang kernel). The
course's modules have their own file, test_course_modules.py.

Window: query i sees key j iff -left <= j - i <= right, or either is below
global_tokens (reference.local_mask)."""

from __future__ import annotations

import math
import random

import pytest
import torch
from test_swattn import assert_matches_reference
from utils import gpu, rand

import reference as ref
from swattn import online, ops, testing
from swattn import window as wspec


def test_merge_is_exact_and_nan_free():
    q, k, v = rand(1, 6, 2, 4, seed=1), rand(1, 10, 2, 4, seed=2), rand(1, 10, 2, 4, seed=3)
    mask = torch.ones(6, 10, dtype=torch.bool)
    want, want_lse = testing.attention_ref(q, k[:, :10], v[:, :10], mask[:, :10], return_lse=True)
    out, lse = online.empty_state(q)
    for part in (slice(0, 3), slice(3, 10)):  # two disjoint key sets
        o, l_ = online.block_attention(q, k[:, part], v[:, part], 0, part.start, 100, 100)
        online.merge_(out, lse, o, l_)
    assert ref.rel_err(out, want) < 1e-12 and torch.allclose(lse, want_lse)
    # a block nobody can see leaves the state as it is
    blind_out, blind_lse = torch.zeros_like(out), torch.full_like(lse, float("-inf"))
    before = out.clone(), lse.clone()
    online.merge_(out, lse, blind_out, blind_lse)
    assert torch.equal(out, before[0]) and torch.equal(lse, before[1])
    # and an empty state merged with an invisible block stays empty, without NaN
    out, lse = online.empty_state(q)
    online.merge_(out, lse, blind_out, blind_lse)
    assert torch.isfinite(out).all() and (out == 0).all() and torch.isneginf(lse).all()


def blocked_forward(q, k, v, left, right, bq, bkv, global_tokens=0, order_seed=None):
    """(out, lse) of the blocked forward: every (query block, key block) pair of the
    sequence through ``block_attention``, merged with ``merge_`` into ``empty_state``;
    the pairs in a shuffled order when ``order_seed`` is given, invisible ones skipped."""
    seq_len = q.shape[1]
    pairs = [(i, j) for i in range(-(-seq_len // bq)) for j in range(-(-seq_len // bkv))]
    if order_seed is not None:
        random.Random(order_seed).shuffle(pairs)
    out, lse = online.empty_state(q)
    for i, j in pairs:
        qs, ks = slice(i * bq, (i + 1) * bq), slice(j * bkv, (j + 1) * bkv)
        nq, nk = q[:, qs].shape[1], k[:, ks].shape[1]
        if not wspec.block_visible(qs.start, nq, ks.start, nk, left, right, global_tokens):
            continue  # nothing of this key block is visible to these queries: the state stays
        o, l_ = online.block_attention(q[:, qs], k[:, ks], v[:, ks], qs.start, ks.start, left, right, global_tokens)
        online.merge_(out[:, qs], lse[:, :, qs], o, l_)
    return out, lse


@pytest.mark.parametrize(
    "seq_len,bq,bkv,window,causal,g,hk",
    [
        (37, 8, 8, 5, False, 0, 2),
        (37, 8, 5, 5, True, 0, 1),
        (64, 16, 32, (20, 3), False, 0, 4),
        (50, 7, 11, 100, False, 0, 2),  # window >= seq: full attention
        (50, 10, 10, 0, False, 0, 2),  # self only
        (45, 9, 6, 4, False, 3, 2),  # global tokens
        (30, 30, 30, None, True, 0, 2),  # one block, full causal
    ],
)
def test_blocks_any_order_match_the_whole_sequence(seq_len, bq, bkv, window, causal, g, hk):
    """The functions' blocks merged in any order equal one block over the whole sequence
    (the repository's window at global positions), and the oracle."""
    hq = 4
    q, k, v = rand(2, seq_len, hq, 16, seed=4), rand(2, seq_len, hk, 16, seed=5), rand(2, seq_len, hk, 16, seed=6)
    left, right = online.window_bounds(window, causal, seq_len)
    whole, whole_lse = online.block_attention(q, k, v, 0, 0, left, right, g)
    mask = testing.local_mask(seq_len, left, right, global_tokens=g)
    oracle, oracle_lse = testing.attention_ref(q, k, v, mask, return_lse=True)
    assert ref.rel_err(whole, oracle) < 1e-12 and torch.allclose(whole_lse, oracle_lse)

    out, lse = blocked_forward(q, k, v, left, right, bq, bkv, g, order_seed=seq_len + bq)
    assert torch.isfinite(out).all()
    assert ref.rel_err(out, oracle) < 1e-12
    assert torch.allclose(lse, oracle_lse)


def test_course_online_module_matches_the_functions():
    """The course's OnlineSlidingWindowAttn (window w, equal lengths: |i - j| <= w)
    gives what the functions give for the window (w, w)."""
    seq_len, bq, bkv, w = 37, 8, 5, 4
    q, k, v = rand(2, seq_len, 4, 16, seed=4), rand(2, seq_len, 2, 16, seed=5), rand(2, seq_len, 2, 16, seed=6)
    want, want_lse = blocked_forward(q, k, v, w, w, bq, bkv)
    layer = online.OnlineSlidingWindowAttn(seq_len, seq_len, bq, bkv, 16, 4, 2, window_size=w)
    out, lse = layer.empty_state(q)
    for i in reversed(range(-(-seq_len // bq))):
        for j in range(-(-seq_len // bkv)):
            qs, ks = slice(i * bq, (i + 1) * bq), slice(j * bkv, (j + 1) * bkv)
            layer(q[:, qs], k[:, ks], v[:, ks], out, lse, i, j)
    assert ref.rel_err(out, want) < 1e-12 and torch.allclose(lse, want_lse)


def test_merge_keeps_rows_that_saw_nothing_and_merges_finite_states():
    """Both -inf: the row stays (out and lse); a finite state (even lse > 0) merges exactly."""
    out = rand(1, 3, 2, 4, seed=1)
    lse = torch.tensor([[[-math.inf, 2.5, 40.0], [-math.inf, -3.0, 0.0]]], dtype=torch.float64)
    block_out = rand(1, 3, 2, 4, seed=2)
    block_lse = torch.tensor([[[-math.inf, 1.0, -math.inf], [4.0, 39.0, 0.0]]], dtype=torch.float64)
    o0, l0 = out.clone(), lse.clone()
    online.merge_(out, lse, block_out, block_lse)
    assert torch.equal(out[0, 0, 0], o0[0, 0, 0]) and torch.isneginf(lse[0, 0, 0])
    for h, r in [(0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]:
        a, b = l0[0, h, r].item(), block_lse[0, h, r].item()
        m = max(a, b)
        new = m + math.log(math.exp(a - m) + math.exp(b - m))
        want = math.exp(a - new) * o0[0, r, h] + math.exp(b - new) * block_out[0, r, h]
        assert abs(lse[0, h, r].item() - new) < 1e-12 and (out[0, r, h] - want).abs().max() < 1e-12
    # a bfloat16 state is merged in float32 and rounded once
    low, low_lse = o0.bfloat16(), l0.float()
    online.merge_(low, low_lse, block_out, block_lse)
    assert ref.rel_err(low, out) < 4e-3


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "bq,bkv,window,causal", [(128, 128, 100, False), (200, 64, (300, 7), False), (96, 160, 50, True)]
)
def test_online_kernel_blocks_match_reference(bq, bkv, window, causal, dtype):
    """On CUDA each block runs the TileLang kernel with the offsets folded into the window."""
    seq_len, hq, hk, d = 1000, 4, 2, 64
    q = rand(1, seq_len, hq, d, dtype=dtype, device="cuda", seed=7)
    k, v = (rand(1, seq_len, hk, d, dtype=dtype, device="cuda", seed=s) for s in (8, 9))
    left, right = online.window_bounds(window, causal, seq_len)
    out, lse = blocked_forward(q, k, v, left, right, bq, bkv, order_seed=1)
    assert_matches_reference(out, lse, q, k, v, testing.local_mask(seq_len, left, right, device="cuda"))


def blocked_gradients(q, k, v, g_out, left, right, bq, bkv, global_tokens=0):
    """dq, dk, dv of <out, g_out> from the blocked forward and backward (online.py)."""
    seq_len = q.shape[1]
    out, lse = blocked_forward(q, k, v, left, right, bq, bkv, global_tokens)
    blocks = [(i, j) for i in range(-(-seq_len // bq)) for j in range(-(-seq_len // bkv))]
    delta = ops.output_delta(g_out, out)
    dq, dk, dv = (torch.zeros(x.shape, dtype=out.dtype, device=x.device) for x in (q, k, v))
    for i, j in blocks:
        qs, ks = slice(i * bq, (i + 1) * bq), slice(j * bkv, (j + 1) * bkv)
        if wspec.block_visible(qs.start, q[:, qs].shape[1], ks.start, k[:, ks].shape[1], left, right, global_tokens):
            gq, gk, gv = online.block_attention_backward(
                g_out[:, qs],
                q[:, qs],
                k[:, ks],
                v[:, ks],
                lse[:, :, qs],
                delta[:, :, qs],
                qs.start,
                ks.start,
                left,
                right,
                global_tokens,
            )
            dq[:, qs] += gq
            dk[:, ks] += gk
            dv[:, ks] += gv
    return dq, dk, dv


@pytest.mark.parametrize("bq,bkv,left,right,g", [(8, 8, 5, 5, 0), (7, 11, 20, 0, 0), (16, 5, 3, 9, 4)])
def test_blocked_backward_matches_autograd(bq, bkv, left, right, g):
    q, k, v = rand(2, 45, 4, 8, seed=1), rand(2, 45, 2, 8, seed=2), rand(2, 45, 2, 8, seed=3)
    g_out = rand(2, 45, 4, 8, seed=4)
    full = [x.clone().requires_grad_() for x in (q, k, v)]
    want = testing.attention_ref(*full, testing.local_mask(45, left, right, global_tokens=g))
    want_grads = torch.autograd.grad((want * g_out).sum(), full)
    for got, w in zip(blocked_gradients(q, k, v, g_out, left, right, bq, bkv, g), want_grads, strict=True):
        assert ref.rel_err(got, w) < 1e-12


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])  # each head_dim has its own backward tile
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_blocked_backward_kernel_matches_reference(dtype, head_dim):
    """On CUDA every block's backward runs the TileLang kernel with the offsets folded
    in, writing dK/dV in float32 (the blocks sum them)."""
    q = rand(1, 700, 4, head_dim, dtype=dtype, device="cuda", seed=1)
    k, v = (rand(1, 700, 2, head_dim, dtype=dtype, device="cuda", seed=s) for s in (2, 3))
    g_out = rand(1, 700, 4, head_dim, dtype=dtype, device="cuda", seed=4)
    mask = testing.local_mask(700, 150, 30, device="cuda")
    full = [x.double().requires_grad_() for x in (q, k, v)]
    want_grads = torch.autograd.grad((testing.attention_ref(*full, mask) * g_out.double()).sum(), full)
    low = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    low_grads = torch.autograd.grad((testing.attention_ref(*low, mask, dtype=dtype) * g_out).sum(), low)
    got = blocked_gradients(q, k, v, g_out, 150, 30, 128, 192)
    for name, a, lo, w in zip("qkv", got, low_grads, want_grads, strict=True):
        assert ref.rel_err(a, w) <= 2 * ref.rel_err(lo, w) + 1e-4, name


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_output_delta_kernel_matches_eager(dtype, head_dim):
    """The preprocess kernel's rowsum(dout * out) - dlse, ragged length (70 rows: one
    full 64-row tile and a partial one), against float64."""
    out, dout = (rand(2, 70, 3, head_dim, dtype=dtype, device="cuda", seed=s) for s in (1, 2))
    dlse = rand(2, 3, 70, dtype=torch.float32, device="cuda", seed=3)
    got = ops.output_delta(dout, out, dlse)
    want = (dout.double() * out.double()).sum(-1).transpose(1, 2) - dlse.double()
    assert got.dtype == torch.float32 and got.shape == want.shape and got.is_contiguous()
    assert ref.rel_err(got, want) < 1e-5
