"""Online block aggregation (online.py): any order and any split of key blocks
gives the offline result, on CPU (eager path) and on GPU (the TileLang kernel).

Window: query i sees key j iff -left <= j - i <= right, or either is below
global_tokens (reference.local_mask)."""

from __future__ import annotations

import random

import pytest
import torch
from test_swattn import assert_matches_reference

import reference as ref
from swattn import eager, online, testing
from swattn import window as wspec

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def rand(*shape, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype=dtype, device=device)


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
def test_online_any_order_matches_offline(seq_len, bq, bkv, window, causal, g, hk):
    hq = 4
    q, k, v = rand(2, seq_len, hq, 16, seed=4), rand(2, seq_len, hk, 16, seed=5), rand(2, seq_len, hk, 16, seed=6)
    offline = online.OfflineSlidingWindowAttn(window, causal, g)
    want, want_lse = offline(q, k, v)
    left, right = online.window_bounds(window, causal, seq_len)
    mask = testing.local_mask(seq_len, left, right, global_tokens=g)
    oracle, oracle_lse = testing.attention_ref(q, k, v, mask, return_lse=True)
    assert ref.rel_err(want, oracle) < 1e-12 and torch.allclose(want_lse, oracle_lse)

    layer = online.OnlineSlidingWindowAttn(seq_len, bq, bkv, window, causal, g)
    pairs = [(i, j) for i in range(-(-seq_len // bq)) for j in range(-(-seq_len // bkv))]
    random.Random(seq_len + bq).shuffle(pairs)
    out, lse = layer.empty_state(q)
    for i, j in pairs:
        qs, ks = slice(i * bq, (i + 1) * bq), slice(j * bkv, (j + 1) * bkv)
        layer(q[:, qs], k[:, ks], v[:, ks], i, j, out, lse)
    assert torch.isfinite(out).all()
    assert ref.rel_err(out, oracle) < 1e-12
    assert torch.allclose(lse, oracle_lse)


def test_online_rejects_blocks_outside_the_sequence():
    layer = online.OnlineSlidingWindowAttn(20, 8, 8, 3)
    q = rand(1, 8, 2, 4)
    out, lse = layer.empty_state(rand(1, 20, 2, 4))
    with pytest.raises(ValueError, match="outside"):
        layer(q, q, q, 3, 0, out, lse)
    with pytest.raises(ValueError, match="block sizes"):
        layer(q[:, :5], q, q, 0, 0, out, lse)


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
    layer = online.OnlineSlidingWindowAttn(seq_len, bq, bkv, window, causal)
    out, lse = layer.empty_state(q)
    for i in range(-(-seq_len // bq)):
        for j in reversed(range(-(-seq_len // bkv))):
            layer(
                q[:, i * bq : (i + 1) * bq],
                k[:, j * bkv : (j + 1) * bkv],
                v[:, j * bkv : (j + 1) * bkv],
                i,
                j,
                out,
                lse,
            )
    left, right = online.window_bounds(window, causal, seq_len)
    assert_matches_reference(out, lse, q, k, v, testing.local_mask(seq_len, left, right, device="cuda"))


def blocked_gradients(q, k, v, g_out, left, right, bq, bkv, global_tokens=0):
    """dq, dk, dv of <out, g_out> from the blocked forward and backward (online.py)."""
    seq_len = q.shape[1]
    layer = online.OnlineSlidingWindowAttn(seq_len, bq, bkv, (left, right), False, global_tokens)
    out, lse = layer.empty_state(q)
    blocks = [(i, j) for i in range(-(-seq_len // bq)) for j in range(-(-seq_len // bkv))]
    for i, j in blocks:
        layer(q[:, i * bq : (i + 1) * bq], k[:, j * bkv : (j + 1) * bkv], v[:, j * bkv : (j + 1) * bkv], i, j, out, lse)
    delta = online.output_delta(g_out, out)
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
    got = online.output_delta(dout, out, dlse)
    want = (dout.double() * out.double()).sum(-1).transpose(1, 2) - dlse.double()
    assert got.dtype == torch.float32 and got.shape == want.shape and got.is_contiguous()
    assert ref.rel_err(got, want) < 1e-5
