"""Shared test setup: tests marked ``gpu`` skip without CUDA (so a file needs only the
marker), and the repository root is importable (the card's reference.py, bench.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

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
