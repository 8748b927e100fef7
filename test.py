"""Tests for the assignment kernel: `make test` (CPU part runs in CI, GPU part on a CUDA card).

Window: query i attends key j iff |i - j| <= window, everywhere in this file.

CPU: the two references agree with each other and with SDPA given the window
mask; the block-range helper the kernel uses visits exactly the right tiles;
every shipped tile configuration compiles for sm_90a and sm_80; the launcher
rejects bad input with a clear error.
GPU (marker `gpu`): kernel vs float64 reference on fresh random inputs with a
poisoned output; the window constraint; O(N) memory.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import reference as ref
import solution

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
CARD = solution.ASSIGNMENT

# (seq_len, window): the card's shape, ragged lengths, edge windows.
SHAPES = [
    (CARD["seq_len"], CARD["window"]),  # the assignment
    (1, 0),  # one token
    (63, 1),  # shorter than one tile
    (65, 127),  # one row into the second tile; window >= seq
    (113, 7),  # ragged, narrow window
    (1000, 128),  # not a multiple of the tile
    (1025, 64),  # one past a multiple
    (2048, 0),  # attention to self only
    (2048, 5000),  # window >= seq: full attention
    (4096, 200),  # window not a multiple of the tile
]


def make_qkv(seq_len: int, head_dim: int, dtype, device, seed: int):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(seq_len, head_dim, generator=g).to(dtype=dtype, device=device) for _ in range(3)]


# --- CPU: the references ------------------------------------------------------


@pytest.mark.parametrize("case", range(len(SHAPES)))
def test_references_agree(case):
    seq_len, window = SHAPES[case]
    if seq_len > 2048:
        pytest.skip("naive reference is O(N^2): covered by smaller shapes")
    q, k, v = make_qkv(seq_len, 32, torch.float64, "cpu", seed=case)
    naive = ref.sliding_window_attention_ref(q, k, v, window)
    banded = ref.sliding_window_attention_banded(q, k, v, window, block=48)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=ref.window_mask(seq_len, window))
    assert ref.rel_err(banded, naive) < 1e-12
    assert ref.rel_err(sdpa, naive) < 1e-12


def test_window_definition():
    """|i - j| <= W, 2W + 1 keys in the interior, clipped at the ends."""
    mask = ref.window_mask(10, 2)
    assert mask[5].nonzero().flatten().tolist() == [3, 4, 5, 6, 7]
    assert mask[0].nonzero().flatten().tolist() == [0, 1, 2]
    assert mask[9].nonzero().flatten().tolist() == [7, 8, 9]
    for seq_len, window in [(10, 2), (10, 0), (10, 9), (10, 50), (1, 0)]:
        assert torch.equal(ref.visible_keys(seq_len, window), ref.window_mask(seq_len, window).sum(1))
    assert ref.window_mask(7, 0).equal(torch.eye(7, dtype=torch.bool))


def test_weights_are_a_masked_softmax():
    q, k, _ = make_qkv(300, 64, torch.float64, "cpu", seed=1)
    p = ref.attention_weights(q, k, 17)
    assert torch.allclose(p.sum(-1), torch.ones(300, dtype=torch.float64))
    assert (p[~ref.window_mask(300, 17)] == 0).all()
    assert (p[ref.window_mask(300, 17)] > 0).all()


def test_full_attention_is_a_wide_window():
    """Both references against PyTorch's own SDPA (float64 math), computed apart."""
    q, k, v = make_qkv(200, 64, torch.float64, "cpu", seed=2)
    sdpa = F.scaled_dot_product_attention(q[None], k[None], v[None])[0]
    assert ref.rel_err(ref.full_attention_ref(q, k, v), sdpa) < 1e-13
    assert ref.rel_err(ref.sliding_window_attention_ref(q, k, v, None), sdpa) < 1e-13
    assert ref.rel_err(ref.sliding_window_attention_ref(q, k, v, 199), sdpa) < 1e-13
    assert ref.rel_err(ref.sliding_window_attention_ref(q, k, v, 198), sdpa) > 1e-6  # one key short


def test_memory_model():
    """The models count the tensors a call really holds: the kernel's inputs and
    output, plus (naive) the score and softmax matrices PyTorch materialises."""
    for s in (256, 2048):
        q, k, v = make_qkv(s, 64, torch.float16, "cpu", seed=0)
        out = torch.empty(s, 64, dtype=torch.float32)
        held = sum(x.numel() * x.element_size() for x in (q, k, v, out))
        assert ref.tiled_memory_bytes(s, 64) == held
        scores = q.float() @ k.float().T
        probs = torch.softmax(scores, -1)
        assert ref.naive_memory_bytes(s, 64) == held + sum(x.numel() * x.element_size() for x in (scores, probs))
    # One CTA's tile (Q tile, double-buffered K/V tiles, S and O in registers) fits an SM.
    block_m, block_n, d, stages = 64, 64, 64, 2
    q_tile, kv_tiles = block_m * d * 2, 2 * stages * block_n * d * 2
    assert (
        ref.tile_working_set_bytes(block_m, block_n, d, stages)
        == q_tile + kv_tiles + (block_m * block_n + block_m * d) * 4
    )
    assert ref.tile_working_set_bytes(block_m, block_n, d, stages) < 228 * 1024


# --- CPU: the block range the kernel walks ------------------------------------


@pytest.mark.parametrize("block_m,block_n", [(64, 64), (128, 64), (64, 32), (128, 128), (16, 48)])
def test_kv_tile_range_matches_brute_force(block_m, block_n):
    """The kernel's helper visits exactly the key tiles that hold a key some
    query of the tile can see: no tile missed, no tile wasted."""
    for seq_len, window in itertools.product([1, 7, 63, 64, 65, 200, 511, 1000], [0, 1, 31, 64, 100, 128, 999]):
        window = solution.effective_window(window, seq_len)
        mask = ref.window_mask(seq_len, window)
        for qt in range((seq_len + block_m - 1) // block_m):
            rows = mask[qt * block_m : (qt + 1) * block_m]
            needed = {j // block_n for j in rows.any(0).nonzero().flatten().tolist()}
            lo, hi = solution.kv_tile_range(qt, seq_len, window, block_m, block_n)
            assert set(range(lo, hi)) == needed, (seq_len, window, qt, lo, hi, sorted(needed))


# --- CPU: every shipped configuration compiles -----------------------------------


@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
@pytest.mark.parametrize("tile", sorted(solution.TILES))
def test_compiles(tile, arch):
    key = (CARD["seq_len"], CARD["head_dim"], CARD["window"], tile, CARD["dtype"], arch)
    kernel = solution.compile_kernel(*key)
    assert "sliding_window_attention" in kernel.get_kernel_source()
    assert solution.compile_kernel(*key) is kernel  # cached: compiled once per static configuration


def test_card_prim_func_has_the_starter_signature():
    params = solution.sliding_window_attention.params
    buffers = [solution.sliding_window_attention.buffer_map[p] for p in params]
    assert [b.name for b in buffers] == ["Q", "K", "V", "O"]
    assert [tuple(int(x) for x in b.shape) for b in buffers] == [(2048, 64)] * 4
    assert [str(b.dtype) for b in buffers] == ["float16"] * 3 + ["float32"]


# --- CPU: bad input -------------------------------------------------------------


def _good(device="cpu"):
    return [torch.randn(128, 64, dtype=torch.float16, device=device) for _ in range(3)]


BAD_INPUTS = {
    "not a tensor": (lambda q, k, v: ([q.tolist(), k, v], {}), TypeError, "torch.Tensor"),
    "3-D": (lambda q, k, v: ([q[None], k[None], v[None]], {}), ValueError, "2-D"),
    "shape mismatch": (lambda q, k, v: ([q, k[:64], v], {}), ValueError, "one shape"),
    "head_dim 48": (lambda q, k, v: ([q[:, :48], k[:, :48], v[:, :48]], {}), ValueError, "head_dim"),
    "empty": (lambda q, k, v: ([q[:0], k[:0], v[:0]], {}), ValueError, "seq_len"),
    "float32": (lambda q, k, v: ([q.float(), k.float(), v.float()], {}), TypeError, "float16"),
    "mixed dtypes": (lambda q, k, v: ([q, k.bfloat16(), v], {}), TypeError, "float16"),
    "non-contiguous": (lambda q, k, v: ([q.t().contiguous().t(), k, v], {}), ValueError, "contiguous"),
    "negative window": (lambda q, k, v: ([q, k, v], {"window": -1}), ValueError, "window"),
    "float window": (lambda q, k, v: ([q, k, v], {"window": 2.5}), ValueError, "window"),
    "bool window": (lambda q, k, v: ([q, k, v], {"window": True}), ValueError, "window"),
    "bad out": (lambda q, k, v: ([q, k, v], {"out": torch.empty(128, 64)[:, :32]}), ValueError, "out"),
    "cpu tensors": (lambda q, k, v: ([q, k, v], {}), ValueError, "CUDA"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_launcher_rejects_bad_input(case):
    make, error, words = BAD_INPUTS[case]
    args, kwargs = make(*_good())
    with pytest.raises(error, match=words):
        solution.sliding_window_attention_forward(*args, **kwargs)


# --- GPU: correctness -----------------------------------------------------------

# The assignment tile on every shape; the other tiles and bf16 on a ragged subset.
GPU_CASES = [(s, w, "assignment", "float16") for s, w in SHAPES] + [
    (s, w, tile, dtype)
    for (s, w), (tile, dtype) in itertools.product(
        [SHAPES[0], (1, 0), (65, 127), (1000, 128), (2048, 5000)],
        [(t, "float16") for t in sorted(solution.TILES) if t != "assignment"] + [("assignment", "bfloat16")],
    )
]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("case", range(len(GPU_CASES)), ids=lambda i: "-".join(map(str, GPU_CASES[i])))
def test_kernel_matches_reference(case):
    seq_len, window, tile, dtype = GPU_CASES[case]
    q, k, v = make_qkv(seq_len, CARD["head_dim"], solution.DTYPES[dtype], "cuda", seed=100 + case)
    out = torch.full((seq_len, CARD["head_dim"]), float("nan"), device="cuda")  # poison: unwritten -> NaN
    solution.sliding_window_attention_forward(q, k, v, window, tile=tile, out=out)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all(), "non-finite output: NaN/inf, or elements left unwritten (poisoned with NaN)"

    expected = ref.sliding_window_attention_ref(q, k, v, window)  # float64 on the GPU
    torch_err = ref.rel_err(ref.sliding_window_attention_ref(q, k, v, window, dtype=q.dtype), expected)
    err = ref.rel_err(out, expected)
    # The kernel may round no worse than a small multiple of PyTorch doing the
    # same math in the input dtype, plus a floor for float32 accumulation.
    assert err <= 2 * torch_err + 1e-4, f"rel err {err:.2e} vs PyTorch's own {torch_err:.2e}"
    assert err < (3e-3 if dtype == "float16" else 1e-2)
    torch.testing.assert_close(out, expected.float(), rtol=1e-2, atol=1e-2)  # the seed's check


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("seq_len,window", [(1000, 128), (65, 127), (2048, 0)])
def test_no_writes_outside_the_output(seq_len, window):
    """The output is a slice of a larger poisoned buffer: the rows before and
    after it must keep their poison (catches out-of-bounds stores)."""
    q, k, v = make_qkv(seq_len, CARD["head_dim"], torch.float16, "cuda", seed=seq_len + 1)
    pad = 256
    buf = torch.full((seq_len + 2 * pad, CARD["head_dim"]), 12345.0, device="cuda")
    solution.sliding_window_attention_forward(q, k, v, window, out=buf[pad : pad + seq_len])
    torch.cuda.synchronize()
    assert (buf[:pad] == 12345.0).all() and (buf[pad + seq_len :] == 12345.0).all(), "wrote outside the output"
    assert torch.isfinite(buf[pad : pad + seq_len]).all()


@gpu
@pytest.mark.gpu
def test_card_prim_func_runs():
    """The module-level fixed-shape `sliding_window_attention` prim_func itself."""
    import tilelang

    kernel = tilelang.compile(solution.sliding_window_attention, target=solution.cuda_target())
    q, k, v = make_qkv(CARD["seq_len"], CARD["head_dim"], torch.float16, "cuda", seed=7)
    out = torch.full_like(q, float("nan"), dtype=torch.float32)
    kernel(q, k, v, out)
    assert ref.rel_err(out, ref.sliding_window_attention_ref(q, k, v, CARD["window"])) < 3e-3


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("seq_len,window", [(2048, 128), (1000, 37), (300, 0)])
def test_window_constraint(seq_len, window):
    """Keys and values outside query i's window cannot change row i (bit for bit);
    one key inside it does."""
    q, k, v = make_qkv(seq_len, CARD["head_dim"], torch.float16, "cuda", seed=seq_len + window)
    run = lambda k, v: solution.sliding_window_attention_forward(q, k, v, window).clone()  # noqa: E731
    base = run(k, v)
    g = torch.Generator(device="cpu").manual_seed(0)
    for i in sorted({0, 1, 63, 64, seq_len // 2, seq_len - 65, seq_len - 1} & set(range(seq_len))):
        outside = (torch.arange(seq_len, device="cuda") - i).abs() > window
        k2, v2 = k.clone(), v.clone()
        k2[outside] = torch.randn(int(outside.sum()), k.shape[1], generator=g).to(k2)
        v2[outside] = torch.randn(int(outside.sum()), v.shape[1], generator=g).to(v2)
        assert torch.equal(run(k2, v2)[i], base[i]), f"row {i} saw a key outside its window"
        j = min(i + window, seq_len - 1)  # the window's far edge
        v3 = v.clone()
        v3[j] = -v3[j] * 3
        assert not torch.equal(run(k, v3)[i], base[i]), f"row {i} ignored value {j} inside its window"
        if j != i:  # with one visible key its score cannot matter: softmax of one entry is 1
            k3 = k.clone()
            k3[j] = -k3[j] * 3
            assert not torch.equal(run(k3, v)[i], base[i]), f"row {i} ignored key {j} inside its window"


@gpu
@pytest.mark.gpu
def test_memory_grows_linearly():
    """Peak allocation of a call is the output alone: O(N d), not O(N^2)."""
    peaks = {}
    for seq_len in (2048, 8192, 32768):
        q, k, v = make_qkv(seq_len, CARD["head_dim"], torch.float16, "cuda", seed=seq_len)
        solution.sliding_window_attention_forward(q, k, v, CARD["window"])  # compile outside the measurement
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        solution.sliding_window_attention_forward(q, k, v, CARD["window"])
        torch.cuda.synchronize()
        peaks[seq_len] = torch.cuda.max_memory_allocated() - before
        assert peaks[seq_len] <= ref.tiled_memory_bytes(seq_len, CARD["head_dim"]), peaks
    assert peaks[32768] / peaks[2048] <= 16 * 1.05, peaks  # 16x the length -> 16x the memory
