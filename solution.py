"""Sliding-window attention in TileLang: the assignment kernel.

Problem. Q, K, V are (seq_len, head_dim) half-precision matrices; O is
(seq_len, head_dim) float32. Query i attends key j iff |i - j| <= window
(2 * window + 1 keys in the interior, clipped at the sequence ends; window >=
seq_len - 1 is full attention). O = softmax(Q K^T / sqrt(head_dim) + mask) V.

Algorithm (FlashAttention-2's forward, restricted to a band):
  * One CTA owns a tile of ``block_m`` queries, rows [r0, r0 + block_m).
  * Block range: those rows need keys [r0 - W, r0 + block_m - 1 + W], so the
    CTA walks only the key tiles of ``block_n`` that intersect that interval
    (``kv_tile_range``); the rest of the sequence is never read. Work per CTA
    is O((block_m + 2W) * head_dim), independent of seq_len.
  * Each K/V tile goes global -> shared memory (pipelined ``num_stages`` deep);
    S = Q K^T and O += P V run on the tensor cores with float32 accumulators.
  * Masking: a tile at the window's edge, or past the end of the sequence,
    holds keys some rows may not see. Their scores are set to -inf before the
    softmax, so exp2 turns them into exactly 0.
  * Online softmax in float32: a running row max m and row sum l. When a new
    tile raises m, the old accumulator and sum are rescaled by
    exp2(m_old - m_new) before the tile's contribution is added, so the result
    equals the softmax over all visible keys without ever storing a row.

Shapes live once, in configs/assignment.json (the card's 2048 x 64, window
128) and configs/tiles.json (block sizes, threads, stages). Everything else is
a parameter of ``make_kernel``, the one factory, so the benchmark runs
seq 512/1024/2048 and full attention (window >= seq) through the same code.

This file never imports reference.py: the tests compare the two.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import tilelang
import tilelang.language as T
import torch
import tvm.tirx as tir  # tvm ships inside tilelang; importable once tilelang is

CONFIGS = Path(__file__).resolve().parent / "configs"
ASSIGNMENT = json.loads((CONFIGS / "assignment.json").read_text())
TILES = {k: v for k, v in json.loads((CONFIGS / "tiles.json").read_text()).items() if not k.startswith("_")}

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
HEAD_DIMS = (64,)  # what the GPU tests cover; other multiples of 16 compile but are unverified
LOG2E = 1.4426950408889634


def kv_tile_range(q_tile, seq_len: int, window: int, block_m: int, block_n: int, maximum=max, minimum=min):
    """Half-open range [lo, hi) of key tiles that query tile ``q_tile`` must visit.

    Rows r0 = q_tile * block_m .. r0 + block_m - 1 see keys from r0 - window to
    r0 + block_m - 1 + window, clipped to [0, seq_len). The first tile holding
    such a key is floor(max(0, r0 - window) / block_n); the last is the one
    holding key min(seq_len, r0 + block_m + window) - 1.

    The kernel calls this with ``maximum=T.max, minimum=T.min`` on its block
    index; the tests call it with Python ints and check it against a brute-force
    scan, so the tested helper is the one the kernel runs.
    """
    # >>> SOLUTION block range
    # Return (lo, hi): the key tiles holding any key j, 0 <= j < seq_len, with
    # |i - j| <= window for some row i of this tile. Use maximum/minimum (not
    # max/min): the kernel passes T.max/T.min, the tests Python's.
    first_key = maximum(q_tile * block_m - window, 0)
    end_key = minimum(q_tile * block_m + block_m + window, seq_len)
    return first_key // block_n, (end_key + block_n - 1) // block_n
    # <<< SOLUTION


def effective_window(window: int, seq_len: int) -> int:
    """Clamp: any window >= seq_len - 1 is full attention, so they share one kernel."""
    return min(window, max(seq_len - 1, 0))


def make_kernel(
    seq_len: int,
    head_dim: int,
    window: int,
    block_m: int = 64,
    block_n: int = 64,
    threads: int = 128,
    num_stages: int = 2,
    dtype: str = "float16",
    arch: str = "sm_90a",
):
    """Kernel factory: a ``T.prim_func`` computing O from Q, K, V for static shapes.

    Args: seq_len, head_dim: shapes of Q, K, V (seq_len, head_dim) in ``dtype``
    and O (seq_len, head_dim) float32. window: |i - j| <= window (clamped to
    seq_len - 1). block_m, block_n: query rows and keys per tile. threads: per
    CTA. num_stages: depth of the K/V copy pipeline. arch: the CUDA target the
    function will be compiled for (only the loop's form depends on it).
    """
    window = effective_window(window, seq_len)
    accum = "float32"
    # Fold log2(e) into the softmax scale: exp(x / sqrt(d)) = exp2(x * scale),
    # and exp2(x * scale - m * scale) is one FFMA and one MUFU.EX2.
    scale = LOG2E / math.sqrt(head_dim)
    neg_inf = -T.infinity(accum)

    # The loop over key tiles [lo, hi) is written in one of two equivalent forms
    # because TileLang 0.1.15 mis-lowers each on one target: Hopper's
    # warp-specialised TMA pipeline trips its simplifier on the one-tile range
    # [bx, bx + 1) (window 0, block_m == block_n), so there it counts 0 .. hi - lo;
    # Ampere's cp.async pipeline emits a non-constant wait_group for that count
    # form, so there it runs over [lo, hi) directly.
    count_from_zero = arch.startswith("sm_9")

    def loop_extent(lo, hi):
        return (hi - lo,) if count_from_zero else (lo, hi)

    def key_tile(lo, it):
        """Key tile index of loop iteration ``it``, in either loop form."""
        return lo + it if count_from_zero else it

    def visible(qi, kj):
        """The window, |qi - kj| <= window, and the sequence end."""
        return tir.all(kj >= qi - window, kj <= qi + window, kj < seq_len)

    @T.prim_func
    def sliding_window_attention(
        Q: T.Tensor((seq_len, head_dim), dtype),
        K: T.Tensor((seq_len, head_dim), dtype),
        V: T.Tensor((seq_len, head_dim), dtype),
        O: T.Tensor((seq_len, head_dim), accum),
    ):
        with T.Kernel(T.ceildiv(seq_len, block_m), threads=threads) as bx:
            q_s = T.alloc_shared((block_m, head_dim), dtype)
            k_s = T.alloc_shared((block_n, head_dim), dtype)
            v_s = T.alloc_shared((block_n, head_dim), dtype)
            s = T.alloc_fragment((block_m, block_n), accum)  # scores, then probabilities
            p = T.alloc_fragment((block_m, block_n), dtype)  # probabilities as MMA operand
            acc = T.alloc_fragment((block_m, head_dim), accum)
            m = T.alloc_fragment((block_m,), accum)  # running row max (raw scores)
            m_prev = T.alloc_fragment((block_m,), accum)
            m_tile = T.alloc_fragment((block_m,), accum)
            m_safe = T.alloc_fragment((block_m,), accum)
            alpha = T.alloc_fragment((block_m,), accum)  # rescale factor exp2(m_prev - m)
            l = T.alloc_fragment((block_m,), accum)  # running row sum of exp2
            l_tile = T.alloc_fragment((block_m,), accum)

            T.copy(Q[bx * block_m, 0], q_s)
            T.fill(acc, 0)
            T.fill(l, 0)
            T.fill(m, neg_inf)

            lo, hi = kv_tile_range(bx, seq_len, window, block_m, block_n, T.max, T.min)
            for it in T.Pipelined(*loop_extent(lo, hi), num_stages=num_stages):
                T.copy(K[key_tile(lo, it) * block_n, 0], k_s)
                # Masking. Start the score tile at 0 where (query, key) is inside
                # the window and the sequence, at -inf elsewhere; the GEMM adds
                # onto it, and -inf + x stays -inf. Only the tiles at the window's
                # two edges and at the ragged end of the sequence hold masked
                # pairs, but skipping the comparisons on the others (branch or
                # select) measured no faster: the per-tile cost is the GEMM ->
                # softmax -> GEMM latency chain, not this arithmetic.
                # >>> SOLUTION masking
                # s[i, j] = 0 where query bx * block_m + i may see key
                # key_tile(lo, it) * block_n + j (see visible()), else neg_inf.
                for i, j in T.Parallel(block_m, block_n):
                    s[i, j] = T.if_then_else(visible(bx * block_m + i, key_tile(lo, it) * block_n + j), 0, neg_inf)
                # <<< SOLUTION
                T.gemm(q_s, k_s, s, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)

                # Online softmax: new running max, then rescale what came before.
                # >>> SOLUTION online softmax
                # Update m (row max of raw scores) and l (row sum of exp2), write
                # P = exp2(s * scale - m * scale) into p, rescale acc by
                # alpha = exp2((m_prev - m) * scale). Mind rows whose max is -inf.
                T.copy(m, m_prev)
                T.reduce_max(s, m_tile, dim=1, clear=True)
                for i in T.Parallel(block_m):
                    m[i] = T.max(m_prev[i], m_tile[i])
                    # A row whose window has missed every tile so far has max
                    # -inf; exponentiate against 0 instead so exp2(-inf - 0)
                    # gives 0, not exp2(-inf + inf) = NaN. m itself stays -inf,
                    # so a real score seen later is not compared against 0.
                    m_safe[i] = T.if_then_else(m[i] == neg_inf, 0, m[i])
                    alpha[i] = T.exp2(m_prev[i] * scale - m_safe[i] * scale)
                for i, j in T.Parallel(block_m, block_n):
                    s[i, j] = T.exp2(s[i, j] * scale - m_safe[i] * scale)
                T.reduce_sum(s, l_tile, dim=1)
                for i in T.Parallel(block_m):
                    l[i] = l[i] * alpha[i] + l_tile[i]
                T.copy(s, p)
                for i, j in T.Parallel(block_m, head_dim):
                    acc[i, j] *= alpha[i]
                # <<< SOLUTION
                T.copy(V[key_tile(lo, it) * block_n, 0], v_s)
                T.gemm(p, v_s, acc, policy=T.GemmWarpPolicy.FullRow)

            # Normalise and store. Rows past seq_len (ragged last tile) are not
            # written; a padding row may have l == 0, so guard the division too.
            for i, j in T.Parallel(block_m, head_dim):
                if bx * block_m + i < seq_len:
                    O[bx * block_m + i, j] = T.if_then_else(l[i] > 0, acc[i, j] / l[i], 0)

    return sliding_window_attention


def tile_options(tile: str) -> tuple[dict, dict]:
    """(``make_kernel`` keyword arguments, TileLang pass configs) of a named tile configuration.

    Fast math turns exp2f into one MUFU.EX2 and the final division into an
    approximate one; -inf still maps to 0 (ex2.approx(-inf) = +0).
    """
    kwargs = dict(TILES[tile])
    return kwargs, {"tl.enable_fast_math": kwargs.pop("fast_math", False)}


@functools.cache
def _assignment_kernel():
    a = ASSIGNMENT
    return make_kernel(a["seq_len"], a["head_dim"], a["window"], dtype=a["dtype"], **tile_options(a["tile"])[0])


def __getattr__(name: str):
    """``solution.sliding_window_attention``: the card's kernel, Q, K, V (2048, 64)
    float16 -> O (2048, 64) float32, window 128, tiles 64 x 64. Built on first
    use, so the module imports even where the kernel cannot be built yet (the
    student handout, before its TODOs are done)."""
    if name == "sliding_window_attention":
        return _assignment_kernel()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def cuda_target(device: torch.device | int | None = None) -> dict:
    """TileLang target for a CUDA device: sm_90a on Hopper (wgmma needs the 'a')."""
    major, minor = torch.cuda.get_device_capability(device)
    return {"kind": "cuda", "arch": f"sm_{major}{minor}{'a' if major == 9 else ''}"}


@functools.cache
def compile_kernel(
    seq_len: int,
    head_dim: int,
    window: int,
    tile: str = "assignment",
    dtype: str = "float16",
    arch: str = "sm_90a",
):
    """Compile ``make_kernel`` once per static configuration (cached)."""
    kwargs, pass_configs = tile_options(tile)
    func = make_kernel(seq_len, head_dim, effective_window(window, seq_len), dtype=dtype, arch=arch, **kwargs)
    return tilelang.compile(func, target={"kind": "cuda", "arch": arch}, pass_configs=pass_configs)


def compile_assignment(arch: str = "sm_90a"):
    """The card's configuration (configs/assignment.json), compiled for ``arch``."""
    a = ASSIGNMENT
    return compile_kernel(a["seq_len"], a["head_dim"], a["window"], a["tile"], a["dtype"], arch)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, out) -> None:
    """Clear errors for bad input; the kernel itself checks nothing."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"{name} must be 2-D (seq_len, head_dim), got shape {tuple(x.shape)}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v must have one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    seq_len, head_dim = q.shape
    if seq_len < 1:
        raise ValueError("seq_len must be >= 1")
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {HEAD_DIMS}, got {head_dim}")
    if q.dtype not in DTYPES.values() or not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must all be float16 or all bfloat16, got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous (row-major (seq_len, head_dim)); call .contiguous()")
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be an int >= 0, got {window!r}")
    if out is not None and (out.shape != q.shape or out.dtype != torch.float32 or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous float32 tensor of shape {tuple(q.shape)}")
    devices = {x.device for x in (q, k, v)} | ({out.device} if out is not None else set())
    if any(d.type != "cuda" for d in devices) or len(devices) != 1:
        raise ValueError(f"q, k, v (and out) must be on one CUDA device, got {sorted(map(str, devices))}")


def sliding_window_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int = ASSIGNMENT["window"],
    tile: str = "assignment",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the kernel on torch tensors.

    Args:
        q, k, v: (seq_len, head_dim) CUDA tensors, float16 or bfloat16, contiguous.
        window: query i attends keys j with |i - j| <= window (>= 0).
        tile: a named tile configuration from configs/tiles.json.
        out: optional (seq_len, head_dim) float32 tensor to write into.
    Returns:
        (seq_len, head_dim) float32 attention output.
    """
    _check_inputs(q, k, v, window, out)
    dtype = next(name for name, t in DTYPES.items() if t == q.dtype)
    kernel = compile_kernel(*q.shape, effective_window(window, q.shape[0]), tile, dtype, cuda_target(q.device)["arch"])
    if out is None:
        out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    kernel(q, k, v, out)
    return out
