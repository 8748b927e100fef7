"""Lesson 15's GroupedQueryAttention and repeat_kv (swattn/modules.py) against a
reference written here: the layer's own weights through F.linear, rotary
embeddings as complex rotations of the pairs (i, i + d / 2), and the float64
oracle ``testing.attention_ref`` under an explicit mask.

Window: causal, bottom-right aligned (query i of q_len sits at key position
k_len - q_len + i); ``sliding_window=W`` keeps keys p - W + 1 .. p of the query at p.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from utils import gpu, rand

from swattn import testing
from swattn.modules import GroupedQueryAttention, SlidingWindowAttention, repeat_kv

F64 = torch.float64


def rel_err(a, b) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm()).item()


def make_layer(heads=4, kv_heads=2, hidden=32, seed=0, **extra):
    torch.manual_seed(seed)
    config = dict(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads, attention_dropout=0.0)
    config.update(extra)
    return GroupedQueryAttention(config).double()


def rope_ref(x, pos, theta):
    """x (b, s, h, d) rotated: the pair (x_i, x_{i + d/2}) as a complex number times exp(i p theta^(-2i/d))."""
    half = x.shape[-1] // 2
    freq = theta ** (-2.0 * torch.arange(half, dtype=F64) / x.shape[-1])
    angle = pos.double()[..., None] * freq  # (b, s, half)
    z = torch.complex(x[..., :half], x[..., half:]) * torch.polar(torch.ones_like(angle), angle)[:, :, None]
    return torch.cat([z.real, z.imag], -1)


def reference(layer, x, mask=None, window=None, pos=None, theta=10000.0):
    """The layer's output over the whole x (b, s, hidden): causal, the window, and ``mask``
    (boolean, broadcasting to (b, 1, s, s)) combined."""
    b, s, _ = x.shape
    hq, hk, d = layer.num_heads, layer.num_key_value_heads, layer.head_dim
    pos = torch.arange(s)[None].expand(b, s) if pos is None else pos
    q = rope_ref(F.linear(x, layer.q_proj.weight).view(b, s, hq, d), pos, theta)
    k = rope_ref(F.linear(x, layer.k_proj.weight).view(b, s, hk, d), pos, theta)
    v = F.linear(x, layer.v_proj.weight).view(b, s, hk, d)
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    seen = (j <= i) & (torch.ones(s, s, dtype=torch.bool) if window is None else (j > i - window))
    seen = seen[None, None] if mask is None else seen & mask
    o = testing.attention_ref(q, k, v, seen)
    return F.linear(o.reshape(b, s, hq * d), layer.o_proj.weight)


# ---- repeat_kv ------------------------------------------------------------------------


def test_repeat_kv_shapes_and_order():
    x = rand(2, 3, 5, 4)
    y = repeat_kv(x, 4)
    assert y.shape == (2, 12, 5, 4)
    for h in range(12):
        assert torch.equal(y[:, h], x[:, h // 4])  # head h * n + r is K/V head h
    assert repeat_kv(x, 1) is x
    with pytest.raises(ValueError, match="positive"):
        repeat_kv(x, 0)
    with pytest.raises(ValueError, match="batch"):
        repeat_kv(x[0], 2)


# ---- the layer against the reference ------------------------------------------------------


@pytest.mark.parametrize(
    "heads,kv_heads,extra,window",
    [
        (4, 4, {}, None),
        (4, 2, {}, None),
        (4, 1, {"rope_theta": 500.0}, None),
        (4, 2, {"sliding_window": 3}, 3),
        (8, 2, {"sliding_window": 1}, 1),  # each query sees itself alone
    ],
)
def test_forward_matches_reference(heads, kv_heads, extra, window):
    layer = make_layer(heads, kv_heads, **extra)
    x = rand(2, 9, 32, seed=1)
    out, present = layer(x)
    assert present is None
    want = reference(layer, x, window=window, theta=extra.get("rope_theta", 10000.0))
    assert (out - want).abs().max() < 1e-12


def test_forward_with_sliding_window_combines_causal_and_window():
    layer = make_layer()
    x = rand(2, 12, 32, seed=2)
    out, _ = layer.forward_with_sliding_window(x, window_size=4)
    assert (out - reference(layer, x, window=4)).abs().max() < 1e-12
    wide, _ = layer.forward_with_sliding_window(x, window_size=12)  # as wide as the sequence: plain causal
    assert (wide - layer(x)[0]).abs().max() < 1e-12
    assert (out - wide).abs().max() > 1e-3  # and a narrow window does change the answer
    with pytest.raises(ValueError, match="window_size"):
        layer.forward_with_sliding_window(x, window_size=0)


@pytest.mark.parametrize("window", [None, 3])
def test_cache_decode_step_by_step_equals_the_full_forward(window):
    layer = make_layer(4, 2)
    x = rand(2, 10, 32, seed=3)

    def run(chunk, past):
        if window is None:
            return layer(chunk, past_key_value=past, use_cache=True)
        return layer.forward_with_sliding_window(chunk, window_size=window, past_key_value=past, use_cache=True)

    full, (k_full, v_full) = run(x, None)
    assert k_full.shape == v_full.shape == (2, 2, 10, 8)
    out, past = run(x[:, :4], None)  # a prefill of 4 tokens, then one token at a time
    steps = [out]
    for t in range(4, 10):
        out, past = run(x[:, t : t + 1], past)
        assert past[0].shape[2] == t + 1
        steps.append(out)
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-12
    assert (past[0] - k_full).abs().max() < 1e-12 and (past[1] - v_full).abs().max() < 1e-12


def test_position_ids_default_and_explicit():
    layer = make_layer()
    x = rand(2, 6, 32, seed=4)
    assert torch.equal(layer(x, position_ids=torch.arange(6))[0], layer(x)[0])
    shifted = torch.arange(6)[None].expand(2, 6) + torch.tensor([[3], [10]])
    got, _ = layer(x, position_ids=shifted)
    assert (got - reference(layer, x, pos=shifted)).abs().max() < 1e-12
    # relative positions: shifting every position alike changes nothing (RoPE sees differences only)
    assert (got - layer(x)[0]).abs().max() < 1e-10


def test_attention_mask_is_honoured():
    layer = make_layer()
    x = rand(2, 7, 32, seed=5)
    keep = torch.ones(2, 1, 7, 7, dtype=torch.bool)
    keep[0, :, :, :2] = False  # the first sequence left-padded by two tokens
    keep[0, :, :2, :] = False  # whose own rows see nothing
    got, _ = layer(x, attention_mask=keep)
    want = reference(layer, x, mask=keep)
    assert (got - want).abs().max() < 1e-12
    assert (got[0, :2] == 0).all()  # a row that sees no key gives 0 (no bias in o_proj)
    additive = torch.zeros(2, 1, 7, 7, dtype=F64).masked_fill(~keep, float("-inf"))
    assert (layer(x, attention_mask=additive)[0] - want).abs().max() < 1e-12
    assert (got - layer(x)[0]).abs().max() > 1e-3  # the mask did change something
    # an additive bias of finite values, written out
    bias = rand(1, 1, 7, 7, seed=6)
    b, s, hq, hk, d = 2, 7, 4, 2, 8
    pos = torch.arange(s)[None].expand(b, s)
    q = rope_ref(F.linear(x, layer.q_proj.weight).view(b, s, hq, d), pos, 10000.0).transpose(1, 2)
    k = rope_ref(F.linear(x, layer.k_proj.weight).view(b, s, hk, d), pos, 10000.0).transpose(1, 2)
    v = F.linear(x, layer.v_proj.weight).view(b, s, hk, d).transpose(1, 2)
    k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = (q @ k.transpose(-1, -2)) / d**0.5 + bias
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    o = (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(b, s, hq * d)
    assert (layer(x, attention_mask=bias)[0] - F.linear(o, layer.o_proj.weight)).abs().max() < 1e-12
    with pytest.raises(ValueError, match="broadcast"):
        layer(x, attention_mask=keep[:, :, :5])
    with pytest.raises(TypeError, match="boolean or floating"):
        layer(x, attention_mask=keep.int())


def test_attention_mask_in_a_decode_step():
    """A padding mask over cache + new token: the step equals the masked full forward's last row."""
    layer = make_layer()
    x = rand(1, 6, 32, seed=7)
    keep = torch.ones(1, 1, 6, 6, dtype=torch.bool)
    keep[..., 1] = False  # token 1 is padding
    full, _ = layer(x, attention_mask=keep)
    _, past = layer(x[:, :5], attention_mask=keep[..., :5, :5], use_cache=True)
    step, _ = layer(x[:, 5:], past_key_value=past, attention_mask=keep[..., 5:, :])
    assert (step[:, 0] - full[:, 5]).abs().max() < 1e-12


def test_attention_dropout_only_in_training():
    layer = make_layer(attention_dropout=0.5)
    x = rand(1, 8, 32, seed=8)
    layer.eval()
    assert (layer(x)[0] - reference(layer, x)).abs().max() < 1e-12
    layer.train()
    torch.manual_seed(0)
    a = layer(x)[0]
    torch.manual_seed(0)
    assert torch.equal(layer(x)[0], a)
    assert (a - reference(layer, x)).abs().max() > 1e-3


@pytest.mark.parametrize(
    "config,match",
    [
        (dict(hidden_size=30, num_attention_heads=4, num_key_value_heads=2), "multiple of num_attention_heads"),
        (dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=3), "multiple of num_key_value_heads"),
        (dict(hidden_size=32, num_attention_heads=0), "num_attention_heads"),
        (dict(hidden_size=24, num_attention_heads=8), "even"),
        (dict(hidden_size=32, num_attention_heads=4, attention_dropout=2.0), "attention_dropout"),
        (dict(hidden_size=32, num_attention_heads=4, sliding_window=0), "sliding_window"),
        (dict(hidden_size=32, num_attention_heads=4, rope_theta=-1.0), "rope_theta"),
        (dict(num_attention_heads=4), "hidden_size"),
    ],
)
def test_config_errors(config, match):
    with pytest.raises(ValueError, match=match):
        GroupedQueryAttention(config)


def test_config_object_and_cache_errors():
    config = type(
        "Config", (), dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.0)
    )
    layer = GroupedQueryAttention(config()).double()
    assert layer.num_key_value_groups == 2 and layer.sliding_window is None and layer.rope_theta == 10000.0
    x = rand(1, 3, 32)
    with pytest.raises(ValueError, match="past_key_value"):
        layer(x, past_key_value=(rand(1, 4, 2, 8), rand(1, 4, 2, 8)))  # 4 K/V heads, not 2
    with pytest.raises(ValueError, match="hidden_states"):
        layer(x[..., :16])


# ---- CUDA: the kernels against the same weights in float64 on the CPU ---------------------


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 64])
def test_cuda_gqa_matches_cpu_float64(window):
    torch.manual_seed(0)
    config = dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=2, attention_dropout=0.0)
    layer = GroupedQueryAttention(dict(config, sliding_window=window)).to("cuda", torch.bfloat16)
    cpu64 = copy.deepcopy(layer).to("cpu", F64)
    x = rand(2, 300, 512, dtype=torch.bfloat16, device="cuda", seed=1)
    got, _ = layer(x)
    want, _ = cpu64(x.cpu().double())
    low, _ = copy.deepcopy(layer).cpu()(x.cpu())  # the eager path in bfloat16: PyTorch's own rounding
    assert torch.isfinite(got).all()
    assert rel_err(got, want) <= 2 * rel_err(low, want) + 1e-3
    # a decode step on the GPU: the cache, bottom-right alignment, q of length 1
    _, past = layer(x[:, :299], use_cache=True)
    step, _ = layer(x[:, 299:], past_key_value=past)
    assert rel_err(step[:, 0], want[:, 299]) <= 2 * rel_err(low[:, 299], want[:, 299]) + 1e-3
    # a mask that matters sends the layer down the eager path, on the GPU too
    keep = torch.ones(2, 1, 300, 300, dtype=torch.bool, device="cuda")
    keep[1, ..., :10] = False
    masked, _ = layer(x, attention_mask=keep)
    want_masked, _ = cpu64(x.cpu().double(), attention_mask=keep.cpu())
    assert rel_err(masked, want_masked) < 2e-2


@gpu
@pytest.mark.gpu
def test_cuda_sliding_window_attention_float32_falls_back_to_sdpa():
    torch.manual_seed(0)
    layer = SlidingWindowAttention(256, 4, 2, window=16, causal=True)
    x = rand(1, 100, 256, dtype=torch.float32, seed=2)
    want = layer(x)
    got = layer.cuda()(x.cuda())
    assert rel_err(got, want) < 1e-4
