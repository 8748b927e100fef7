"""Shared test setup: tests marked ``gpu`` skip without CUDA (so a file needs only the
marker), and the repository root is importable (the card's reference.py, bench.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from utils import StandIn

from swattn import launch
from swattn.kernels import backward as bwd_kernels
from swattn.kernels import forward as fwd_kernels

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


DTYPE_IDS = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def pytest_make_parametrize_id(config, val, argname):
    """Readable case ids: fp16 / bf16 rather than dtype0 / dtype1."""
    return DTYPE_IDS.get(val) if isinstance(val, torch.dtype) else None


@pytest.fixture
def stand_ins(monkeypatch):
    """The prefill kernels' compile caches replaced by ``StandIn``s (CUDA made to look present):
    the launch paths run on the CPU and each call is checked against its prim_func."""
    made = []
    monkeypatch.setattr(launch, "on_gpu", lambda x: True)
    monkeypatch.setattr(launch, "cuda_arch", lambda device: "sm_90a")

    # The compile caches' signatures: every compile-time flag passes through to the factory.
    def fwd(head_dim, dtype, arch, tile=None, *flags):
        tile = tile or launch.tile_config(head_dim, arch)
        made.append(StandIn(fwd_kernels.make_forward(head_dim, dtype, arch, tile, *flags), outputs=(3, 4)))
        return made[-1]

    def bwd(head_dim, dtype, arch, tile=None, *flags):
        tile = tile or launch.tile_config(head_dim, arch, "backward")
        made.append(StandIn(bwd_kernels.make_backward(head_dim, dtype, arch, tile, *flags), outputs=(6, 7, 8)))
        return made[-1]

    def pre(head_dim, dtype, arch):
        made.append(StandIn(bwd_kernels.make_preprocess(head_dim, dtype), outputs=(2,)))
        return made[-1]

    monkeypatch.setattr(launch, "compiled_forward", fwd)
    monkeypatch.setattr(launch, "compiled_backward", bwd)
    monkeypatch.setattr(launch, "compiled_preprocess", pre)
    return made
