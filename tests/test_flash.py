"""The FlashAttention-style functions (swattn.flash_attn_func / flash_attn_varlen_func):
bottom-right windows for seqlen_q != seqlen_k, packed sequences, softcap, learned
sinks and head dims up to 256, against the float64 oracle (swattn.testing).

Convention: query i sits at key position i + seqlen_k - seqlen_q and sees keys
pos - left .. pos + right (-1 unbounded; causal sets right = 0); lse natural log;
a row that sees no key gives out 0 and lse -inf (or its sink).
"""

from __future__ import annotations

import pytest
import torch
from utils import gpu, rand

import reference as ref
import swattn
from swattn import launch, testing


def cu(lengths, device="cpu"):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


# (batch, hq, hk, seqlen_q, seqlen_k, window_size, causal, softcap, sinks)
CASES = [
    (2, 4, 2, 37, 37, (5, 3), False, 0.0, False),
    (1, 4, 4, 10, 50, (7, 0), True, 0.0, False),  # decode-like: fewer queries than keys
    (2, 4, 1, 50, 20, (-1, 0), True, 0.0, False),  # more queries than keys: the first rows see nothing
    (1, 6, 2, 33, 65, (-1, -1), False, 0.0, True),
    (2, 4, 2, 40, 40, (9, 9), False, 0.5, False),  # a cap that binds (scores well past it)
    (1, 4, 4, 30, 45, (4, 2), True, 2.0, True),
    (1, 2, 2, 25, 25, (0, 0), False, 0.0, True),  # window 0: the diagonal only
]
IDS = ["sym", "sq<sk causal", "sq>sk causal", "full sinks", "softcap", "cap+sinks", "window 0"]


def sink_logits(hq, seed, device="cpu", dtype=torch.float64):
    """Large and negative sinks: +8 swamps a row, -8 barely shows."""
    return torch.tensor([8.0, -8.0, 1.5, -0.5, 3.0, 0.0]).repeat(hq)[:hq].to(device=device, dtype=dtype)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_cpu_path_matches_the_oracle_with_gradients(case):
    b, hq, hk, sq, sk, ws, causal, cap, has_sinks = case
    q = rand(b, sq, hq, 16, seed=1, scale=3.0 if cap else 1.0).requires_grad_()
    k = rand(b, sk, hk, 16, seed=2, scale=3.0 if cap else 1.0).requires_grad_()
    v = rand(b, sk, hk, 16, seed=3).requires_grad_()
    sinks = sink_logits(hq, 0).requires_grad_() if has_sinks else None
    kw = dict(causal=causal, window_size=ws, softcap=cap, sinks=sinks)
    out, lse = swattn.flash_attn_func(q, k, v, return_lse=True, **kw)
    want, want_lse = testing.attention_ref(q, k, v, return_lse=True, **kw)
    assert ref.rel_err(out, want) < 1e-12
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    fin = torch.isfinite(want_lse)
    assert (lse[fin] - want_lse[fin]).abs().max() < 1e-12
    g_out, g_lse = rand(*out.shape, seed=7), rand(*lse.shape, seed=8)
    params = [q, k, v] + ([sinks] if has_sinks else [])

    def grads(o, l_):
        return torch.autograd.grad((o * g_out).sum() + (torch.where(fin, l_, 0) * g_lse).sum(), params)

    for name, a, w in zip("qkvs", grads(out, lse), grads(want, want_lse), strict=False):
        assert ref.rel_err(a, w) < 1e-10, name
    if cap:  # the cap binds: without it the answer differs
        assert ref.rel_err(testing.attention_ref(q, k, v, window_size=ws, causal=causal, sinks=sinks), want) > 0.05


def test_rows_that_see_no_key_give_zero_and_their_sink():
    q, k, v = rand(1, 12, 2, 8, seed=1), rand(1, 4, 2, 8, seed=2), rand(1, 4, 2, 8, seed=3)
    out, lse = swattn.flash_attn_func(q, k, v, causal=True, return_lse=True)
    assert torch.equal(out[:, :8], torch.zeros_like(out[:, :8])) and torch.isneginf(lse[:, :, :8]).all()
    assert torch.isfinite(out[:, 8:]).all() and (out[:, 8:] != 0).any()
    sinks = torch.tensor([0.5, -2.0], dtype=torch.float64)
    out, lse = swattn.flash_attn_func(q, k, v, causal=True, sinks=sinks, return_lse=True)
    assert torch.equal(out[:, :8], torch.zeros_like(out[:, :8]))
    assert torch.allclose(lse[0, :, :8], sinks[:, None].expand(2, 8))


def test_varlen_matches_the_oracle_per_sequence():
    lq, lk = [1, 7, 127, 0, 40], [3, 7, 100, 5, 40]
    q = rand(sum(lq), 4, 16, seed=1).requires_grad_()
    k, v = (rand(sum(lk), 2, 16, seed=s).requires_grad_() for s in (2, 3))
    sinks = sink_logits(4, 0).requires_grad_()
    cq, ck = cu(lq), cu(lk)
    kw = dict(causal=True, window_size=(20, -1), softcap=1.5, sinks=sinks)
    out, lse = swattn.flash_attn_varlen_func(q, k, v, cq, ck, max(lq), max(lk), return_lse=True, **kw)
    want, want_lse = testing.varlen_ref(q, k, v, cq, ck, return_lse=True, **kw)
    assert out.shape == q.shape and lse.shape == (4, sum(lq))
    assert ref.rel_err(out, want) < 1e-12 and ref.rel_err(lse, want_lse) < 1e-12
    g = rand(*out.shape, seed=9)
    got = torch.autograd.grad((out * g).sum() + lse.sum(), (q, k, v, sinks))
    exp = torch.autograd.grad((want * g).sum() + want_lse.sum(), (q, k, v, sinks))
    for name, a, w in zip("qkvs", got, exp, strict=True):
        assert ref.rel_err(a, w) < 1e-10, name
    # max_seqlen None: read from the offsets.
    auto = swattn.flash_attn_varlen_func(q, k, v, cq, ck, None, None, **kw)
    assert torch.equal(auto, out)
    # The batch of one sequence is the unpacked call.
    one = swattn.flash_attn_varlen_func(q[8:135], k[10:110], v[10:110], cu([127]), cu([100]), 127, 100, **kw)
    assert torch.allclose(one, swattn.flash_attn_func(q[None, 8:135], k[None, 10:110], v[None, 10:110], **kw)[0])


def test_a_nan_outside_the_window_stays_outside():
    """A NaN key and value row reaches only the rows whose window holds it."""
    q, k, v = rand(1, 40, 2, 8, seed=1), rand(1, 40, 2, 8, seed=2), rand(1, 40, 2, 8, seed=3)
    k[0, 20], v[0, 20] = float("nan"), float("inf")
    out = swattn.flash_attn_func(q, k, v, window_size=(3, 3))
    bad = torch.isnan(out).any(-1).any(-1)[0]
    assert bad.nonzero().flatten().tolist() == list(range(17, 24))
    out = swattn.sliding_window_attention(q, k, v, 3)
    assert torch.isnan(out).any(-1).any(-1)[0].nonzero().flatten().tolist() == list(range(17, 24))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda q, k, v: swattn.flash_attn_func(q, k, v, window_size=5), "pair"),
        (lambda q, k, v: swattn.flash_attn_func(q, k, v, window_size=(-2, 0)), ">= 0"),
        (lambda q, k, v: swattn.flash_attn_func(q, k, v, window_size=(1.5, 0)), "window_size"),
        (lambda q, k, v: swattn.flash_attn_func(q, k, v, softcap=-1.0), "softcap"),
        (lambda q, k, v: swattn.flash_attn_func(q, k, v, softmax_scale=0.0), "scale"),
        (lambda q, k, v: swattn.flash_attn_func(q, k, v, sinks=torch.zeros(3)), "sinks"),
        (lambda q, k, v: swattn.flash_attn_func(q, k, v, causal=1), "causal"),
        (lambda q, k, v: swattn.flash_attn_func(q, *(x[:, :, :1].expand(-1, -1, 3, -1) for x in (k, v))), "multiple"),
        (lambda q, k, v: swattn.flash_attn_func(q, k.float(), v), "dtype"),
        (lambda q, k, v: swattn.flash_attn_varlen_func(q[0], k[0], v[0], cu([5, 5]).long(), cu([5, 5]), 5, 5), "int32"),
        (lambda q, k, v: swattn.flash_attn_varlen_func(q[0], k[0], v[0], cu([5, 5]), cu([5]), 5, 5), "batch"),
        (lambda q, k, v: swattn.flash_attn_varlen_func(q[0], k[0], v[0], cu([6, 6]), cu([5, 5]), 6, 5), "end"),
        (lambda q, k, v: swattn.flash_attn_varlen_func(q[0], k[0], v[0], cu([5, 5]), cu([5, 5]), 4, 5), "max"),
        (lambda q, k, v: swattn.flash_attn_varlen_func(q, k, v, cu([5, 5]), cu([5, 5]), 5, 5), "total"),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_bad_arguments_raise_clearly(call, match):
    q, k, v = rand(1, 10, 4, 8), rand(1, 10, 2, 8), rand(1, 10, 2, 8)
    with pytest.raises((ValueError, TypeError), match=match):
        call(q, k, v)


def test_torch_compile_sees_one_opaque_op_with_sinks_and_varlen():
    """fullgraph=True fails on any graph break; aot_eager traces the custom ops'
    forward and backward (sinks' gradient included)."""
    q = rand(30, 4, 16, seed=1, dtype=torch.float32).requires_grad_()
    k, v = (rand(30, 2, 16, seed=s, dtype=torch.float32).requires_grad_() for s in (2, 3))
    sinks = torch.tensor([1.0, -1.0, 0.5, 2.0], requires_grad=True)
    c = cu([10, 20])

    def loss(q, k, v, sinks):
        out, lse = swattn.flash_attn_varlen_func(
            q, k, v, c, c, 20, 20, causal=True, window_size=(5, 0), softcap=3.0, sinks=sinks, return_lse=True
        )
        return out.square().sum() + lse.sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(q, k, v, sinks), (q, k, v, sinks))
    want = torch.autograd.grad(loss(q, k, v, sinks), (q, k, v, sinks))
    assert all(torch.allclose(a, w, atol=1e-6) for a, w in zip(got, want, strict=True))


# --- the launch paths on the CPU, with stand-ins -----------------------------------------


@pytest.mark.parametrize("head_dim", [64, 72, 256])
@pytest.mark.parametrize(
    "varlen,cap,sinks", [(False, 0.0, False), (True, 0.0, True), (False, 5.0, True), (True, 5.0, False)]
)
def test_flash_launches(stand_ins, head_dim, varlen, cap, sinks):
    hq, hk = 4, 2
    s = torch.zeros(hq, requires_grad=True) if sinks else None
    if varlen:
        q = torch.randn(30, hq, head_dim, dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(40, hk, head_dim, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        out, lse = swattn.flash_attn_varlen_func(
            q, k, v, cu([10, 20]), cu([25, 15]), 20, 25, causal=True, softcap=cap, sinks=s, return_lse=True
        )
        assert lse.shape == (hq, 30)
    else:
        q = torch.randn(2, 10, hq, head_dim, dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(2, 17, hk, head_dim, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        out, lse = swattn.flash_attn_func(q, k, v, window_size=(5, 1), softcap=cap, sinks=s, return_lse=True)
        assert lse.shape == (2, hq, 10)
    assert out.shape == q.shape
    (out.float().sum() + lse.sum()).backward()
    assert [m.calls for m in stand_ins] == [1, 1, 1]  # forward, preprocess, backward
    assert q.grad.shape == q.shape and k.grad.shape == k.shape
    assert sinks == (s is not None and s.grad is not None and s.grad.shape == (hq,))


@pytest.mark.parametrize(
    "head_dim,varlen,softcap,sinks",
    [
        (64, True, True, True),  # every flag in one build: the default run
        pytest.param(128, False, True, False, marks=pytest.mark.slow),
        pytest.param(256, False, False, True, marks=pytest.mark.slow),
    ],
)
def test_flash_forward_variants_compile_sm90a(head_dim, varlen, softcap, sinks):
    src = launch.compiled_forward(
        head_dim, "bfloat16", "sm_90a", None, "window", True, varlen, softcap, sinks
    ).get_kernel_source()
    assert ("tanh" in src) == softcap


@pytest.mark.parametrize(
    "head_dim,varlen,softcap",
    [
        (64, True, True),
        pytest.param(128, True, False, marks=pytest.mark.slow),
        pytest.param(256, False, False, marks=pytest.mark.slow),
    ],
)
def test_flash_backward_variants_compile_sm90a(head_dim, varlen, softcap):
    src = launch.compiled_backward(
        head_dim, "bfloat16", "sm_90a", None, False, "bfloat16", varlen, softcap
    ).get_kernel_source()
    assert ("tanh" in src) == softcap
    # Asynchronous GEMMs in the register form; D = 256's shared-memory form waits for each.
    assert ("wait_wgmma<0>" in src) == (head_dim != 256)


# --- GPU: the kernels against the float64 oracle -------------------------------------------

# (batch, hq, hk, seqlen_q, seqlen_k, window_size, causal, softcap, sinks)
GPU_CASES = [
    (2, 4, 2, 300, 300, (64, 64), False, 0.0, False),
    (1, 8, 2, 100, 1000, (127, 0), True, 0.0, False),
    (2, 4, 4, 777, 300, (-1, 0), True, 0.0, False),
    (1, 4, 1, 513, 700, (-1, -1), False, 0.0, True),
    (2, 4, 2, 400, 400, (100, 0), True, 20.0, False),
    (1, 8, 2, 333, 500, (33, 5), False, 10.0, True),
    (1, 2, 2, 1, 65, (16, 0), False, 0.0, True),
]
GPU_IDS = ["sym", "sq<sk", "sq>sk", "full sinks", "softcap", "cap sinks", "one query"]


def check_against_oracle(kernel, oracle, inputs, grads_of, dtype):
    """(out, lse, grads) of the kernel within twice PyTorch's own error in ``dtype``
    (the oracle run in that dtype) plus a floor, against the float64 oracle."""
    want = grads_of(oracle, [x.detach().double().requires_grad_() for x in inputs])
    low = grads_of(oracle, [x.detach().to(dtype if x.dim() > 1 else x.dtype).requires_grad_() for x in inputs])
    got = grads_of(kernel, [x.detach().clone().requires_grad_() for x in inputs])
    names = ["out", "lse", "dq", "dk", "dv", "dsinks"]
    for name, a, lo, w in zip(names, got, low, want, strict=False):
        fin = torch.isfinite(w)
        assert torch.equal(torch.isfinite(a), fin), name
        assert ref.rel_err(a[fin], w[fin]) <= 2 * ref.rel_err(lo[fin], w[fin]) + 2e-4, name


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128, 256, 72])
@pytest.mark.parametrize("case", GPU_CASES, ids=GPU_IDS)
def test_kernels_match_the_oracle(case, head_dim, dtype):
    b, hq, hk, sq, sk, ws, causal, cap, has_sinks = case
    sc = 4.0 if cap else 1.0
    q = rand(b, sq, hq, head_dim, dtype=dtype, device="cuda", seed=sq, scale=sc)
    k = rand(b, sk, hk, head_dim, dtype=dtype, device="cuda", seed=sk + 1, scale=sc)
    v = rand(b, sk, hk, head_dim, dtype=dtype, device="cuda", seed=sk + 2)
    inputs = [q, k, v] + ([sink_logits(hq, 0, "cuda", torch.float32)] if has_sinks else [])
    g = torch.Generator(device="cuda").manual_seed(5)
    g_out = torch.randn(q.shape, device="cuda", generator=g)
    g_lse = torch.randn(b, hq, sq, device="cuda", generator=g)

    def run(fn, xs):
        s = xs[3] if has_sinks else None
        return fn(*xs[:3], window_size=ws, causal=causal, softcap=cap, sinks=s, return_lse=True)

    def grads_of(fn, xs):
        out, lse = run(fn, xs)
        fin = torch.isfinite(lse)
        loss = (out.double() * g_out.double()).sum() + (torch.where(fin, lse, 0).double() * g_lse.double()).sum()
        return [out, lse, *torch.autograd.grad(loss, xs)]

    def oracle(q, k, v, **kw):
        out, lse = testing.attention_ref(q, k, v, dtype=q.dtype if q.dtype != torch.float32 else torch.float64, **kw)
        return out, lse

    check_against_oracle(swattn.flash_attn_func, oracle, inputs, grads_of, dtype)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("cap,has_sinks", [(0.0, False), (30.0, True)])
def test_varlen_kernels_match_the_oracle(head_dim, dtype, cap, has_sinks):
    lq, lk = [1, 7, 127, 1000, 0, 300], [1, 20, 127, 1000, 9, 200]
    q = rand(sum(lq), 4, head_dim, dtype=dtype, device="cuda", seed=1, scale=3.0 if cap else 1.0)
    k = rand(sum(lk), 2, head_dim, dtype=dtype, device="cuda", seed=2, scale=3.0 if cap else 1.0)
    v = rand(sum(lk), 2, head_dim, dtype=dtype, device="cuda", seed=3)
    cq, ck = cu(lq, "cuda"), cu(lk, "cuda")
    inputs = [q, k, v] + ([sink_logits(4, 0, "cuda", torch.float32)] if has_sinks else [])
    g_out = rand(*q.shape, device="cuda", seed=4)

    def grads_of(fn, xs):
        s = xs[3] if has_sinks else None
        out, lse = fn(
            *xs[:3], cq, ck, max(lq), max(lk), window_size=(64, -1), causal=True, softcap=cap, sinks=s, return_lse=True
        )
        fin = torch.isfinite(lse)
        loss = (out.double() * g_out).sum() + torch.where(fin, lse, 0).double().sum()
        return [out, lse, *torch.autograd.grad(loss, xs)]

    def oracle(q, k, v, cq, ck, mq, mk, **kw):
        kw.pop("return_lse")
        return testing.varlen_ref(q, k, v, cq, ck, dtype=q.dtype, return_lse=True, **kw)

    check_against_oracle(swattn.flash_attn_varlen_func, oracle, inputs, grads_of, dtype)


@gpu
@pytest.mark.gpu
def test_varlen_is_one_launch_for_lengths_1_to_100k():
    lengths = [1, 17, 1000, 100_000, 3, 4096]
    q = rand(sum(lengths), 8, 64, dtype=torch.bfloat16, device="cuda", seed=1)
    k, v = (rand(sum(lengths), 2, 64, dtype=torch.bfloat16, device="cuda", seed=s) for s in (2, 3))
    c = cu(lengths, "cuda")
    out = torch.full_like(q, float("nan"))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = swattn.flash_attn_varlen_func(
            q, k, v, c, c, max(lengths), max(lengths), causal=True, window_size=(511, 0)
        )
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert sum("forward" in n for n in kernels) == 1, kernels
    for b in (0, 2, 4):  # spot-check short sequences against the oracle
        r = slice(int(c[b]), int(c[b + 1]))
        want = testing.attention_ref(q[None, r], k[None, r], v[None, r], causal=True, window_size=(511, 0))[0]
        assert ref.rel_err(out[r], want) < 1e-2


@gpu
@pytest.mark.gpu
def test_varlen_with_sinks_replays_from_a_cuda_graph():
    """Forward + backward of a packed batch with softcap and sinks, captured once and
    replayed with new inputs: no host read-back anywhere on the path."""
    lengths = [5, 300, 77]
    c = cu(lengths, "cuda")
    q = rand(sum(lengths), 4, 64, dtype=torch.bfloat16, device="cuda", seed=1).requires_grad_()
    k, v = (rand(sum(lengths), 2, 64, dtype=torch.bfloat16, device="cuda", seed=s).requires_grad_() for s in (2, 3))
    sinks = sink_logits(4, 0, "cuda", torch.float32).requires_grad_()
    dout = torch.randn_like(q)
    params = (q, k, v, sinks)

    def step():
        for x in params:
            x.grad = None
        out = swattn.flash_attn_varlen_func(
            q, k, v, c, c, 300, 300, causal=True, window_size=(40, 0), softcap=5.0, sinks=sinks
        )
        out.backward(dout)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    with torch.no_grad():
        q.mul_(1.5)
    for x in params:
        x.grad.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    got = [x.grad.clone() for x in params]
    step()  # eager, same inputs
    for name, a, x in zip("qkvs", got, params, strict=True):
        assert ref.rel_err(a, x.grad) < 1e-3, name
