"""The general op (swattn.sliding_window_attention): CPU checks of its pieces and masks; GPU checks of the kernel.

Window: query i sees key j iff j = i + k * dilation with -left <= k <= right,
or either index is below global_tokens (reference.local_mask).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from utils import case_ids, gpu, rand

import reference as ref
import swattn
from swattn import launch, testing
from swattn import window as wspec
from swattn.kernels import common
from swattn.kernels import forward as fwd_kernels

# --- CPU: masks and references -----------------------------------------------------


def test_local_mask_generalises_the_assignment_window():
    for seq_len, w in [(50, 0), (50, 3), (50, 49), (7, 100)]:
        assert torch.equal(testing.local_mask(seq_len, w, w), ref.window_mask(seq_len, w))
    causal = testing.local_mask(6, 2, 0)
    assert causal[4].nonzero().flatten().tolist() == [2, 3, 4]
    dilated = testing.local_mask(20, 2, 1, dilation=3)
    assert dilated[10].nonzero().flatten().tolist() == [4, 7, 10, 13]
    glob = testing.local_mask(10, 1, 1, global_tokens=2)
    assert glob[0].all() and glob[:, 1].all() and glob[6].nonzero().flatten().tolist() == [0, 1, 5, 6, 7]


def test_local_mask_matches_flex_attention_semantics():
    """The same window written as a FlexAttention mask_mod gives the same mask."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    left, right, dilation, g = 5, 2, 2, 3

    def mask_mod(b, h, q_idx, kv_idx):
        off = kv_idx - q_idx
        local = (off >= -left * dilation) & (off <= right * dilation) & (off % dilation == 0)
        return local | (q_idx < g) | (kv_idx < g)

    mask = flex.create_mask(mask_mod, 1, 1, 40, 40, device="cpu")[0, 0]
    assert torch.equal(mask, testing.local_mask(40, left, right, dilation, g))


@pytest.mark.parametrize("hq,hk", [(4, 4), (4, 2), (4, 1)])
def test_attention_ref_matches_sdpa(hq, hk):
    q, k, v = rand(2, 33, hq, 16, seed=1), rand(2, 33, hk, 16, seed=2), rand(2, 33, hk, 16, seed=3)
    mask = testing.local_mask(33, 4, 1, dilation=2, global_tokens=1)
    out, lse = testing.attention_ref(q, k, v, mask, return_lse=True)
    kk, vv = (x.repeat_interleave(hq // hk, dim=2) for x in (k, v))
    sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2), attn_mask=mask)
    assert ref.rel_err(out, sdpa.transpose(1, 2)) < 1e-12
    scores = (q.transpose(1, 2) @ kk.permute(0, 2, 3, 1)) / 4.0
    assert torch.allclose(lse, torch.logsumexp(scores.masked_fill(~mask, float("-inf")), -1))


@pytest.mark.parametrize("seq_len,dilation", [(12, 1), (12, 3), (10, 3), (11, 4), (5, 7)])
def test_dilation_as_head_classes(seq_len, dilation):
    """The launcher's trick, with the reference as the kernel: a dilated window is
    an ordinary window over each residue class, and the classes are heads."""
    left, right, hq, hk = 2, 1, 4, 2
    q, k, v = rand(1, seq_len, hq, 8, seed=4), rand(1, seq_len, hk, 8, seed=5), rand(1, seq_len, hk, 8, seed=6)
    qv, kv, vv = (wspec.to_classes(x, dilation) for x in (q, k, v))
    sd = qv.shape[1]
    out = torch.empty_like(qv)
    lse = torch.empty(1, qv.shape[2], sd, dtype=torch.float64)
    for r in range(dilation):  # what the kernel does per head: class-local window, padding hidden
        valid = wspec.class_len(seq_len, r, dilation)
        mask = testing.local_mask(sd, left, right) & (torch.arange(sd)[None, :] < valid)
        heads = slice(r * hq, (r + 1) * hq)
        o, l_ = testing.attention_ref(
            qv[:, :, heads], kv[:, :, r * hk : (r + 1) * hk], vv[:, :, r * hk : (r + 1) * hk], mask, return_lse=True
        )
        out[:, :, heads], lse[:, heads] = o, l_
    out, lse = wspec.from_classes(out, lse, seq_len, dilation)
    want, want_lse = testing.attention_ref(q, k, v, testing.local_mask(seq_len, left, right, dilation), return_lse=True)
    assert ref.rel_err(out, want) < 1e-12
    assert torch.allclose(lse, want_lse)


# --- CPU: the tile schedule the kernel walks --------------------------------------


@pytest.mark.parametrize("block_m,block_n", [(64, 64), (64, 32), (32, 64)])
def test_key_tile_schedule_matches_brute_force(block_m, block_n):
    grid = itertools.product([1, 63, 65, 200, 513], [(0, 0), (1, 1), (127, 0), (10, 100), (600, 600)], [0, 1, 16, 70])
    for seq_len, (left, right), g in grid:
        left, right = min(left, seq_len - 1), min(right, seq_len - 1)
        mask = testing.local_mask(seq_len, left, right, global_tokens=g)
        for qt in range(-(-seq_len // block_m)):
            needed = {j // block_n for j in mask[qt * block_m : (qt + 1) * block_m].any(0).nonzero().flatten().tolist()}
            n_g, lo, hi = wspec.key_tile_schedule(qt, seq_len, left, right, g, block_m, block_n, max, min, None)
            visited = list(range(n_g)) + list(range(lo, hi))
            assert len(visited) == len(set(visited)), "a tile visited twice"
            assert set(visited) == needed, (seq_len, left, right, g, qt)


@pytest.mark.parametrize("block_m,block_n", [(64, 64), (128, 64), (64, 128)])
def test_full_tile_test_matches_brute_force(block_m, block_n):
    """The kernels skip the mask on a tile that ``tile_fully_visible`` calls full:
    it must never call a tile with a hidden pair full (window mode: exactly the
    full tiles; with global tokens it may miss some, which only costs a mask)."""
    # Windows, lengths and global counts around the tile boundaries, where an off-by-one shows.
    near = [*range(60, 68), *range(124, 132)]
    windows = [(w, w) for w in near] + [(w, 0) for w in near] + [(0, w) for w in near] + [(600, 600)]
    grid = itertools.product([129, 191, 193], windows, [0, 63, 64, 127])
    for seq_len, (left, right), g in grid:
        mask = testing.local_mask(seq_len, left, right, global_tokens=g)
        for q0, k0 in itertools.product(range(0, seq_len, block_m), range(0, seq_len, block_n)):
            block = mask[q0 : q0 + block_m, k0 : k0 + block_n]
            whole = block.shape[1] == block_n and bool(block.all())  # rows past the end are padding: never written
            for general in (False, True):
                if g and not general:
                    continue
                full = bool(common.tile_fully_visible(q0, k0, block_m, block_n, seq_len, left, right, g, general))
                assert not full or whole, (seq_len, left, right, g, q0, k0)
                if not g:
                    assert full == whole or block.shape[0] < block_m, (seq_len, left, right, q0, k0)


def test_row_keys_match_the_window_definition():
    """The kernels' per-element test is ``uint32(kj - first) < count or kj < n_global_keys``
    over ``row_keys``' ranges: exactly the window definition, for windows around
    the ends of the sequence, negative offsets (blocks of the online and
    distributed paths), global tokens and rows past the end."""
    select = lambda c, a, b: a if c else b  # noqa: E731

    windows = [(0, 0), (1, 0), (0, 1), (3, 5), (7, 7), (40, 40), (-5, 9), (9, -5), (-3, 2), (-4, -4), (100, 100)]
    for (left, right), g, (valid, q_valid) in itertools.product(windows, [0, 1, 6], [(37, 37), (30, 37), (37, 29)]):
        for qi in range(40):
            first, count, n_glob = common.row_keys(qi, valid, left, right, g, q_valid, max, min, select)
            for kj in range(40):
                got = (kj - first) % 2**32 < count or kj < n_glob
                want = (qi - left <= kj <= qi + right or kj < g or qi < g) and kj < valid and qi < q_valid
                assert got == want, (left, right, g, valid, q_valid, qi, kj)


@pytest.mark.parametrize("block_m,block_n", [(64, 64), (128, 64), (128, 128)])
def test_adaptive_schedule_covers_every_needed_tile(block_m, block_n):
    """Per-row windows: the tiles a query tile visits hold every key one of its
    rows sees, once each; without global tokens the first and last are needed."""
    g = torch.Generator().manual_seed(7)
    for seq_len, n_global, max_w in [(1, 0, 3), (65, 0, 40), (300, 0, 20), (300, 5, 100), (513, 70, 300)]:
        heads = 3
        left = torch.randint(0, max_w + 1, (heads, seq_len), generator=g)
        right = torch.randint(0, max_w + 1, (heads, seq_len), generator=g)
        left[1] = 0  # one head causal-only...
        right[2] = 0  # ...and one looking back only
        valid = torch.tensor([seq_len, max(seq_len - 1, 1), max(seq_len // 2, 1)])  # ragged classes
        kt = wspec.adaptive_schedule(left, right, valid, n_global, block_m, block_n)
        assert kt.shape == (heads, -(-seq_len // block_m), 3) and kt.dtype == torch.int32
        for h in range(heads):
            mask = testing.local_mask(seq_len, left[h], right[h], global_tokens=n_global)
            mask &= torch.arange(seq_len)[None, :] < valid[h]
            mask[valid[h] :] = False  # padding rows see nothing that matters
            for qt in range(kt.shape[1]):
                rows = mask[qt * block_m : (qt + 1) * block_m]
                needed = {j // block_n for j in rows.any(0).nonzero().flatten().tolist()}
                n_g, lo, hi = kt[h, qt].tolist()
                visited = list(range(n_g)) + list(range(lo, hi))
                assert len(visited) == len(set(visited)), "a tile visited twice"
                assert needed <= set(visited), (seq_len, n_global, h, qt)
                if n_global == 0 and needed:
                    assert {lo, hi - 1} <= needed, "the range is not tight"


@pytest.mark.parametrize("block_m,block_n", [(64, 64), (64, 128), (128, 64)])
def test_adaptive_key_side_schedule_covers_every_needed_tile(block_m, block_n):
    """The backward's view: every query tile with a row that sees a key of the key
    tile is visited, once; a key tile nobody sees visits nothing new."""
    g = torch.Generator().manual_seed(11)
    for seq_len, n_global, max_w in [(1, 0, 3), (65, 0, 40), (300, 0, 20), (300, 5, 100), (513, 70, 300)]:
        heads = 3
        left = torch.randint(0, max_w + 1, (heads, seq_len), generator=g)
        right = torch.randint(0, max_w + 1, (heads, seq_len), generator=g)
        left[1] = 0
        right[2] = 0
        valid = torch.tensor([seq_len, max(seq_len - 1, 1), max(seq_len // 2, 1)])
        kt = wspec.adaptive_key_side_schedule(left, right, valid, n_global, block_m, block_n)
        assert kt.shape == (heads, -(-seq_len // block_n), 3) and kt.dtype == torch.int32
        for h in range(heads):
            mask = testing.local_mask(seq_len, left[h], right[h], global_tokens=n_global)
            mask &= torch.arange(seq_len)[None, :] < valid[h]
            mask[valid[h] :] = False
            for t in range(kt.shape[1]):
                cols = mask[:, t * block_n : (t + 1) * block_n]
                needed = {i // block_m for i in cols.any(1).nonzero().flatten().tolist()}
                n_g, lo, hi = kt[h, t].tolist()
                visited = list(range(n_g)) + list(range(lo, hi))
                assert len(visited) == len(set(visited)), "a tile visited twice"
                assert needed <= set(visited), (seq_len, n_global, h, t)
                assert all(q * block_m < valid[h] for q in visited), "a tile past the queries"


def test_adaptive_windows_broadcast_and_validate():
    per_head = torch.tensor([[1], [5]])
    left, right = wspec.adaptive_windows(per_head, False, 2, 6, "cpu")
    assert left.dtype == torch.int32 and left.tolist() == [[1] * 6, [5] * 6] and torch.equal(left, right)
    left, right = wspec.adaptive_windows((torch.arange(6), 2), True, 2, 6, "cpu")
    assert left.tolist() == [[0, 1, 2, 3, 4, 5]] * 2 and right.tolist() == [[0] * 6] * 2
    assert wspec.adaptive_windows(torch.tensor([100]), False, 1, 6, "cpu")[0].tolist() == [[5] * 6]  # clamped
    assert (
        wspec.is_adaptive(torch.tensor(3))
        and wspec.is_adaptive((3, torch.tensor([1])))
        and not wspec.is_adaptive((3, 4))
    )
    with pytest.raises(TypeError, match="integer"):
        wspec.adaptive_windows(torch.tensor([1.5]), False, 2, 6, "cpu")
    with pytest.raises(ValueError, match="broadcast"):
        wspec.adaptive_windows(torch.tensor([1, 2]), False, 3, 6, "cpu")  # (2,): neither heads nor seq
    with pytest.raises(ValueError, match=">= 0"):
        wspec.adaptive_windows(torch.tensor([[-1], [2]]), False, 2, 6, "cpu")


@pytest.mark.parametrize("seq_len,dilation", [(12, 1), (12, 3), (10, 3), (5, 7)])
def test_rows_to_classes_follows_to_classes(seq_len, dilation):
    table = torch.arange(3 * seq_len).view(3, seq_len)  # (heads, seq)
    as_tensor = wspec.to_classes(table.t().contiguous()[None, :, :, None], dilation)[
        0, :, :, 0
    ].t()  # (d * heads, seq / d)
    classes = wspec.rows_to_classes(table, dilation)
    valid = [wspec.class_len(seq_len, r, dilation) for r in range(dilation) for _ in range(3)]
    for h, n in enumerate(valid):
        assert torch.equal(classes[h, :n], as_tensor[h, :n])


# --- CPU: arguments -------------------------------------------------------------------


def test_normalize_window():
    assert wspec.normalize_window(5, False, 100) == (5, 5)
    assert wspec.normalize_window((7, 2), False, 100) == (7, 2)
    assert wspec.normalize_window(5, True, 100) == (5, 0)
    # Beyond seq_q + seq_k a side changes nothing: clamped there (the kernels' int32 sums stay small).
    assert wspec.normalize_window(10**9, False, 100) == (200, 200)
    assert wspec.normalize_window((-1, 3), False, 100) == (200, 3)  # -1: unbounded
    assert wspec.normalize_window(None, True, 100, 30) == (130, 0)
    for bad in (-1, (1, -2), 2.0, True, "3", (1, 2, 3), (1.0, 2)):
        with pytest.raises((TypeError, ValueError)):
            wspec.normalize_window(bad, False, 100)


BAD = {
    "3-D": (lambda q, k, v: (q[0], k[0], v[0]), {}, ValueError, "batch, seq, heads"),
    "int32": (lambda q, k, v: (q.int(), k.int(), v.int()), {}, TypeError, "float32, float64"),
    "mixed dtypes": (lambda q, k, v: (q, k.float(), v), {}, TypeError, "one dtype"),
    "mixed devices": (lambda q, k, v: (q, k.to("meta"), v), {}, ValueError, "one device"),
    "heads": (lambda q, k, v: (q[:, :, :3], k, v), {}, ValueError, "multiple of kv_heads"),
    "seq mismatch": (lambda q, k, v: (q, k[:, :5], v[:, :5]), {}, ValueError, "shapes"),
    "not a tensor": (lambda q, k, v: (q.tolist(), k, v), {}, TypeError, "torch.Tensor"),
    "negative window": (lambda q, k, v: (q, k, v), {"window": -3}, ValueError, ">= 0"),
    "float window": (lambda q, k, v: (q, k, v), {"window": 2.5}, TypeError, "window"),
    "bool window": (lambda q, k, v: (q, k, v), {"window": True}, TypeError, "window"),
    "dilation": (lambda q, k, v: (q, k, v), {"dilation": 0}, ValueError, "dilation"),
    "float dilation": (lambda q, k, v: (q, k, v), {"dilation": 2.0}, ValueError, "dilation"),
    "global": (lambda q, k, v: (q, k, v), {"global_tokens": -1}, ValueError, "global_tokens"),
    "dilated global": (lambda q, k, v: (q, k, v), {"dilation": 2, "global_tokens": 1}, NotImplementedError, "not"),
    "scale": (lambda q, k, v: (q, k, v), {"scale": -1.0}, ValueError, "scale"),
    "layout": (lambda q, k, v: (q, k, v), {"layout": "sbhd"}, ValueError, "layout"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_rejects_bad_input(case):
    make, kwargs, error, words = BAD[case]
    q, k, v = (
        rand(2, 16, 4, 64, dtype=torch.float16),
        rand(2, 16, 2, 64, dtype=torch.float16),
        rand(2, 16, 2, 64, dtype=torch.float16),
    )
    window = kwargs.pop("window", 3)
    with pytest.raises(error, match=words):
        swattn.sliding_window_attention(*make(q, k, v), window, **kwargs)


# --- CPU: every configuration compiles -------------------------------------------------


@pytest.mark.parametrize("mode", fwd_kernels.MODES)
@pytest.mark.parametrize("head_dim,dtype", [(64, "float16"), (128, "bfloat16"), (64, "bfloat16"), (128, "float16")])
def test_compiles_sm90a(head_dim, dtype, mode):
    src = launch.compiled_forward(head_dim, dtype, "sm_90a", None, mode).get_kernel_source()
    _, _, threads, _, occupancy = launch.tile_config(head_dim, "sm_90a")
    assert f"__launch_bounds__({threads + 128}, {occupancy})" in src  # consumers + one producer warpgroup
    if common.consumer_regs(threads, occupancy) < 240:
        assert f"warpgroup_reg_alloc<{common.consumer_regs(threads, occupancy)}>" in src


@pytest.mark.parametrize("producer", [128, None])
@pytest.mark.parametrize("threads,occupancy", [(128, 1), (128, 2), (128, 3), (256, 1), (256, 2), (384, 1)])
def test_consumer_registers_fit_the_launch_pool(threads, occupancy, producer):
    """setmaxnreg only moves registers inside the CTA's launch pool; asking for more hangs the kernel.
    producer None: as many producer threads as consumers (the backward's loop)."""
    producer = producer or threads
    total = threads + producer
    launch = min(255, 65536 // (occupancy * total)) // 8 * 8
    regs = common.consumer_regs(threads, occupancy, producer_threads=producer)
    assert regs % 8 == 0 and 24 <= regs <= 240
    assert threads * regs + producer * 24 <= launch * total


@pytest.mark.slow
@pytest.mark.parametrize(
    "head_dim,dtype,mode",
    [(64, "float16", "general"), (128, "bfloat16", "window"), (64, "bfloat16", "adaptive"), (128, "float16", "window")],
)
def test_compiles_sm80(head_dim, dtype, mode):
    """~3 minutes each (TileLang's Ampere lowering of the dynamic-shape kernel): `-m slow`."""
    assert "forward" in launch.compiled_forward(head_dim, dtype, "sm_80", None, mode).get_kernel_source()


# --- GPU -------------------------------------------------------------------------------

# (batch, q_heads, kv_heads, seq, window, causal, dilation, global_tokens)
GPU_CASES = [
    (2, 4, 4, 1, 0, False, 1, 0),
    (2, 4, 2, 63, 1, False, 1, 0),
    (1, 4, 1, 65, 127, False, 1, 0),
    (2, 4, 4, 1000, 128, False, 1, 0),
    (1, 8, 2, 1000, (200, 17), False, 1, 0),
    (1, 4, 4, 777, 64, True, 1, 0),
    (1, 4, 2, 1024, 5000, False, 1, 0),
    (1, 4, 4, 1000, 30, False, 2, 0),
    (1, 4, 2, 999, 21, True, 3, 0),
    (1, 4, 4, 1000, 50, False, 1, 1),
    (2, 4, 2, 700, 33, True, 1, 16),
]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("case", range(len(GPU_CASES)), ids=case_ids(GPU_CASES, "b hq hk s w causal dil glob"))
def test_kernel_matches_reference(case, head_dim, dtype):
    b, hq, hk, s, window, causal, dil, g = GPU_CASES[case]
    q = rand(b, s, hq, head_dim, dtype=dtype, device="cuda", seed=case)
    k = rand(b, s, hk, head_dim, dtype=dtype, device="cuda", seed=case + 100)
    v = rand(b, s, hk, head_dim, dtype=dtype, device="cuda", seed=case + 200)
    out, lse = swattn.sliding_window_attention(
        q, k, v, window, causal=causal, dilation=dil, global_tokens=g, return_lse=True
    )
    left, right = wspec.normalize_window(window, causal, s)
    assert_matches_reference(out, lse, q, k, v, testing.local_mask(s, left, right, dil, g, device="cuda"))


def assert_matches_reference(out, lse, q, k, v, mask):
    """The kernel's error at most twice PyTorch's own in the input dtype (plus 1e-4),
    against the float64 reference; lse within 1e-3; nothing non-finite."""
    want, want_lse = testing.attention_ref(q, k, v, mask, return_lse=True)
    torch_err = ref.rel_err(testing.attention_ref(q, k, v, mask, dtype=q.dtype), want)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert ref.rel_err(out, want) <= 2 * torch_err + 1e-4
    assert (lse.double() - want_lse).abs().max() < 1e-3


# Adaptive windows: (batch, q_heads, kv_heads, seq, window maker, causal, dilation, global_tokens)
ADAPTIVE_CASES = [
    (2, 4, 2, 300, lambda hq, s, g: torch.tensor([[0], [3], [50], [200]]), False, 1, 0),
    (1, 4, 4, 1000, lambda hq, s, g: torch.randint(0, 100, (s,), generator=g), True, 1, 0),
    (1, 4, 1, 777, lambda hq, s, g: (torch.randint(0, 300, (hq, s), generator=g), 7), False, 1, 0),
    (1, 2, 2, 500, lambda hq, s, g: torch.tensor([[5], [40]]), False, 2, 0),
    (1, 4, 2, 600, lambda hq, s, g: torch.randint(0, 64, (s,), generator=g), False, 1, 16),
]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(
    "case", range(len(ADAPTIVE_CASES)), ids=case_ids(ADAPTIVE_CASES, "b hq hk s _ causal dil glob")
)
def test_adaptive_kernel_matches_reference(case, head_dim, dtype):
    b, hq, hk, s, make_window, causal, dil, g = ADAPTIVE_CASES[case]
    window = make_window(hq, s, torch.Generator().manual_seed(case))
    q = rand(b, s, hq, head_dim, dtype=dtype, device="cuda", seed=case)
    k = rand(b, s, hk, head_dim, dtype=dtype, device="cuda", seed=case + 100)
    v = rand(b, s, hk, head_dim, dtype=dtype, device="cuda", seed=case + 200)
    out, lse = swattn.sliding_window_attention(
        q, k, v, window, causal=causal, dilation=dil, global_tokens=g, return_lse=True
    )
    left, right = wspec.adaptive_windows(window, causal, hq, s, "cuda")
    assert_matches_reference(out, lse, q, k, v, testing.local_mask(s, left, right, dil, g, device="cuda"))  # (hq, s, s)


# --- the nn.Module ----------------------------------------------------------------------


def hf_style_attention(module: swattn.SlidingWindowAttention, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Llama's eager attention, written out: repeat_kv, additive finfo.min mask, softmax in float32."""
    b, s, _ = x.shape
    h, hk, d = module.num_heads, module.num_kv_heads, module.head_dim
    q = module.q_proj(x).view(b, s, h, d).transpose(1, 2)
    k = module.k_proj(x).view(b, s, hk, d).transpose(1, 2)
    v = module.v_proj(x).view(b, s, hk, d).transpose(1, 2)
    k, v = (t[:, :, None].expand(b, hk, h // hk, s, d).reshape(b, h, s, d) for t in (k, v))
    additive = torch.zeros(s, s, dtype=x.dtype).masked_fill(~mask, torch.finfo(x.dtype).min)
    weights = torch.softmax((q @ k.transpose(2, 3)) * d**-0.5 + additive, dim=-1, dtype=torch.float32).to(x.dtype)
    return module.o_proj((weights @ v).transpose(1, 2).reshape(b, s, h * d))


def test_dense_mask_is_the_reference_mask():
    for args in [(40, 3, 3), (40, 5, 0), (41, 4, 2, 3), (40, 2, 2, 1, 5), (1, 0, 0)]:
        assert torch.equal(wspec.dense_mask(*args), testing.local_mask(*args))


@pytest.mark.parametrize("heads,kv_heads,window,causal", [(4, 4, 8, True), (4, 2, (6, 3), False), (8, 1, 100, True)])
def test_module_cpu_matches_hf_style_reference(heads, kv_heads, window, causal):
    torch.manual_seed(0)
    layer = swattn.SlidingWindowAttention(64, heads, kv_heads, window=window, causal=causal).double()
    x = rand(2, 37, 64, seed=9)
    left, right = wspec.normalize_window(window, causal, 37)
    want = hf_style_attention(layer, x, testing.local_mask(37, left, right))
    assert ref.rel_err(layer(x), want) < 1e-6  # HF's softmax runs in float32 even for float64 inputs


@gpu
@pytest.mark.gpu
def test_module_cuda_kernel_matches_cpu_path():
    torch.manual_seed(0)
    layer = swattn.SlidingWindowAttention(512, 8, 2, window=64, causal=True)
    x = rand(2, 300, 512, dtype=torch.float32, seed=10)
    want = layer(x)  # CPU: the SDPA path, float32
    got = layer.to("cuda", torch.bfloat16)(x.to("cuda", torch.bfloat16))
    assert ref.rel_err(got.float().cpu(), want) < 2e-2


def test_module_impl_switch():
    with pytest.raises(ValueError, match="impl"):
        swattn.SlidingWindowAttention(64, 4, impl="flash")
    layer = swattn.SlidingWindowAttention(64, 4, 2, window=3, impl="kernel")
    with pytest.raises(ValueError, match="needs CUDA"):
        layer(torch.zeros(1, 5, 64))
