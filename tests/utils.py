"""What the test files share: seeded random tensors and the GPU skip."""

from __future__ import annotations

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def rand(*shape, dtype=torch.float64, device="cpu", seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    """Standard normal values (times ``scale``) drawn on the CPU from ``seed``, then cast and moved:
    the same numbers on every device and dtype."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=device)


def case_ids(cases, names: str) -> list[str]:
    """Ids for tuples of case fields named by ``names`` (space-separated), e.g. 'b2 hq4 hk2 s1000 w(128, 128)';
    a field named "_" is left out. Every id must be the same in every process: pytest-xdist's workers
    each collect the tests and refuse to run when their ids differ (a function's repr holds its address)."""
    keys = names.split()
    ids = [" ".join(f"{k}{v}" for k, v in zip(keys, c, strict=False) if k != "_") for c in cases]
    assert not any(" at 0x" in i for i in ids), f"an id holds an object's address: {ids}"
    return ids


TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "int32": torch.int32}


class StandIn:
    """A compiled kernel's stand-in for the CPU tests of the launch paths: checks a call
    against ``prim_func`` (argument count, tensor rank, dtype and contiguity, int32 scalars
    in range, float32 scalars as floats) and fills the output tensors ``outputs`` with
    zeros. A wrong launcher otherwise shows only on a GPU."""

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
