"""The CUDA launch paths, run on the CPU with stand-in kernels: every call must
pass exactly the arguments its prim_func declares (count, tensor rank and
dtype, int scalars). A wrong launcher otherwise shows only on a GPU."""

from __future__ import annotations

import pytest
import torch

import swattn
from swattn import launch, online
from swattn.kernels import backward as bwd_kernels
from swattn.kernels import forward as fwd_kernels

TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "int32": torch.int32}


class StandIn:
    """Checks a call against ``prim_func`` and fills the float outputs with zeros."""

    def __init__(self, prim_func, outputs):
        self.prim_func, self.outputs, self.calls = prim_func, outputs, 0

    def __call__(self, *args):
        params = self.prim_func.params
        assert len(args) == len(params), f"{len(args)} arguments for {len(params)} parameters"
        for n, (arg, param) in enumerate(zip(args, params, strict=True)):
            buf = self.prim_func.buffer_map.get(param)
            if buf is None:
                if str(param.dtype).startswith("float"):
                    assert isinstance(arg, float), f"argument {n}: {arg!r} for the float {param}"
                    continue
                assert isinstance(arg, int) and not isinstance(arg, bool), f"argument {n}: {arg!r} for {param}"
                assert -(2**31) <= arg < 2**31, f"argument {n} overflows int32: {arg}"
                continue
            assert isinstance(arg, torch.Tensor), f"argument {n} ({buf.name}) is not a tensor"
            assert arg.dim() == len(buf.shape), f"{buf.name}: rank {arg.dim()} for {len(buf.shape)}"
            assert arg.dtype == TORCH_DTYPES[str(buf.dtype)], f"{buf.name}: {arg.dtype} for {buf.dtype}"
            assert arg.is_contiguous(), f"{buf.name} is not contiguous"
        for n in self.outputs:
            args[n].zero_()
        self.calls += 1


@pytest.fixture
def stand_ins(monkeypatch):
    made = []
    monkeypatch.setattr(launch, "on_gpu", lambda x: True)
    monkeypatch.setattr(launch, "cuda_arch", lambda device: "sm_90a")

    def fwd(head_dim, dtype, arch, tile=None, mode="general"):
        tile = tile or launch.tile_config(head_dim, arch)
        made.append(StandIn(fwd_kernels.make_forward(head_dim, dtype, arch, tile, mode), outputs=(3, 4)))
        return made[-1]

    def bwd(head_dim, dtype, arch, tile=None, adaptive=False, kv_grads="float32"):
        tile = tile or launch.tile_config(head_dim, arch, "backward")
        made.append(
            StandIn(bwd_kernels.make_backward(head_dim, dtype, arch, tile, adaptive, kv_grads), outputs=(6, 7, 8))
        )
        return made[-1]

    def pre(head_dim, dtype, arch):
        made.append(StandIn(bwd_kernels.make_preprocess(head_dim, dtype), outputs=(2,)))
        return made[-1]

    monkeypatch.setattr(launch, "compiled_forward", fwd)
    monkeypatch.setattr(launch, "compiled_backward", bwd)
    monkeypatch.setattr(launch, "compiled_preprocess", pre)
    return made


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
    delta = online.output_delta(dout, out, torch.ones(1, 4, 70))
    assert [s.calls for s in stand_ins] == [1]  # the stand-in writes zeros, so delta = 0 - dlse
    assert delta.dtype == torch.float32 and torch.equal(delta, -torch.ones(1, 4, 70))
