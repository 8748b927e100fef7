"""No TileLang at all: stand-in objects that answer every question the tests ask.

`sliding_window_attention` is an object with TIR-like `params` and `buffer_map`;
`compile_kernel` returns an object whose "kernel source" names the kernel; the
launcher computes with PyTorch. Only the pure-Python tile range and the input
checks are real. The original grader gave it all 35 CPU points.
"""

import functools
import json
import math
from pathlib import Path

import torch

CONFIGS = Path(__file__).resolve().parent / "configs"
ASSIGNMENT = json.loads((CONFIGS / "assignment.json").read_text())
TILES = {k: v for k, v in json.loads((CONFIGS / "tiles.json").read_text()).items() if not k.startswith("_")}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
HEAD_DIMS = (64,)


def kv_tile_range(q_tile, seq_len, window, block_m, block_n, maximum=max, minimum=min):
    first_key = maximum(q_tile * block_m - window, 0)
    end_key = minimum(q_tile * block_m + block_m + window, seq_len)
    return first_key // block_n, (end_key + block_n - 1) // block_n


def effective_window(window, seq_len):
    return min(window, max(seq_len - 1, 0))


class _Buffer:
    def __init__(self, name, dtype):
        self.name, self.shape, self.dtype = name, (ASSIGNMENT["seq_len"], ASSIGNMENT["head_dim"]), dtype


class _FakePrimFunc:
    def __init__(self):
        self.params = ["Q", "K", "V", "O"]
        dtypes = [ASSIGNMENT["dtype"]] * 3 + ["float32"]
        self.buffer_map = {p: _Buffer(p, d) for p, d in zip(self.params, dtypes, strict=True)}


sliding_window_attention = _FakePrimFunc()


class _FakeKernel:
    def get_kernel_source(self):
        return "__global__ void sliding_window_attention() {}"

    def __call__(self, q, k, v, out):
        n = q.shape[0]
        idx = torch.arange(n, device=q.device)
        mask = (idx[:, None] - idx[None, :]).abs() <= self.window
        s = (q.float() @ k.float().t()) / math.sqrt(q.shape[1])
        out.copy_(torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v.float())


@functools.cache
def compile_kernel(seq_len, head_dim, window, tile="assignment", dtype="float16", arch="sm_90a"):
    k = _FakeKernel()
    k.window = window
    return k


def cuda_target(device=None):
    major, minor = torch.cuda.get_device_capability(device)
    return {"kind": "cuda", "arch": f"sm_{major}{minor}{'a' if major == 9 else ''}"}


def _check_inputs(q, k, v, window, out):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"{name} must be 2-D (seq_len, head_dim), got shape {tuple(x.shape)}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError("q, k, v must have one shape")
    if q.shape[0] < 1:
        raise ValueError("seq_len must be >= 1")
    if q.shape[1] not in HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {HEAD_DIMS}")
    if q.dtype not in DTYPES.values() or not (q.dtype == k.dtype == v.dtype):
        raise TypeError("q, k, v must all be float16 or all bfloat16")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be an int >= 0, got {window!r}")
    if out is not None and (out.shape != q.shape or out.dtype != torch.float32 or not out.is_contiguous()):
        raise ValueError("out must be a contiguous float32 tensor")
    if any(x.device.type != "cuda" for x in (q, k, v)):
        raise ValueError("q, k, v (and out) must be on one CUDA device")


def sliding_window_attention_forward(q, k, v, window=ASSIGNMENT["window"], tile="assignment", out=None):
    _check_inputs(q, k, v, window, out)
    kernel = compile_kernel(*q.shape, effective_window(window, q.shape[0]), tile, "float16", cuda_target()["arch"])
    if out is None:
        out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    kernel(q, k, v, out)
    return out
