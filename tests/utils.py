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
    """Ids for tuples of case fields named by ``names`` (space-separated), e.g. 'b2 hq4 hk2 s1000 w(128, 128)'."""
    keys = names.split()
    return [" ".join(f"{k}{v}" for k, v in zip(keys, c, strict=False)) for c in cases]
