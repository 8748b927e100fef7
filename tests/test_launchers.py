"""The CUDA launch paths, run on the CPU with stand-in kernels: every call must
pass exactly the arguments its prim_func declares (count, tensor rank and
dtype, int scalars). A wrong launcher otherwise shows only on a GPU."""

from __future__ import annotations

import pytest
import torch

import swattn
from swattn import online, ops


def qkv(seq=70, hq=4, hk=2, d=64, dtype=torch.float16):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, seq, h, d, generator=g).to(dtype).requires_grad_() for h in (hq, hk, hk)]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(window=5),
        dict(window=(9, 0), dilation=3),
        dict(window=4, global_tokens=3),
        dict(window=torch.tensor([[1], [2], [3], [40]])),
        dict(window=torch.arange(70) % 7, dilation=2),
    ],
    ids=["window", "dilation", "global", "adaptive per head", "adaptive per query dilated"],
)
def test_op_forward_and_backward_launches(stand_ins, kwargs):
    q, k, v = qkv()
    window = kwargs.pop("window")
    out, lse = swattn.sliding_window_attention(q, k, v, window, return_lse=True, **kwargs)
    (out.float().sum() + lse.sum()).backward()
    kinds = [type(s.prim_func).__name__ for s in stand_ins]
    assert len(stand_ins) == 3 and all(s.calls == 1 for s in stand_ins), kinds  # forward, preprocess, backward
    # The stand-ins write zeros: the gradients are exactly the kernel's buffers, nothing else added.
    assert all(torch.equal(x.grad, torch.zeros_like(x)) for x in (q, k, v))


def test_block_launches(stand_ins):
    q, k, v = (x.detach() for x in qkv())
    out, lse = online.block_attention(q, k[:, :50], v[:, :50], 100, 40, 30, 30)
    assert out.shape == q.shape and lse.shape == (1, 4, 70)
    delta = torch.zeros(1, 4, 70)
    grads = online.block_attention_backward(q, q, k[:, :50], v[:, :50], lse, delta, 100, 40, 30, 30)
    assert [g.shape for g in grads] == [q.shape, (1, 50, 2, 64), (1, 50, 2, 64)]
    assert [s.calls for s in stand_ins] == [1, 1]  # the forward kernel, then the backward (delta given)


def test_output_delta_launches_the_preprocess_kernel(stand_ins):
    out, dout = (x.detach() for x in qkv()[:2])
    delta = ops.output_delta(dout, out, torch.ones(1, 4, 70))
    assert [s.calls for s in stand_ins] == [1]  # the stand-in writes zeros, so delta = 0 - dlse
    assert delta.dtype == torch.float32 and torch.equal(delta, -torch.ones(1, 4, 70))
