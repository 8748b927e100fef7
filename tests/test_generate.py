"""examples/generate.py: greedy decoding with the (k, v) cache equals re-running the
whole sequence, past the sliding window.

CPU (float64): tokens and every step's logits (cached step vs the full run's last
position, 1e-6), with the cache cut to the last W - 1 keys and kept whole; that the
window binds (a full-attention twin agrees until the sequence outgrows it, then not);
main() end to end. GPU (``-m gpu``): bf16 through swattn's kernels, against each other
and the CPU float64 model.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def _load_example(name: str):
    """examples/<name>.py as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"swattn_example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _load_example("generate")
WINDOW = gen.DEFAULT_CONFIG["sliding_window"]
PROMPT_LEN, NEW = 8, 40  # 48 positions, three windows of 16


def prompt(batch=2, length=PROMPT_LEN, seed=1):
    return torch.randint(
        gen.DEFAULT_CONFIG["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed)
    )


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: one thread is faster, and steadier on a shared, loaded CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model64():
    return gen.build_model(dtype=torch.float64)


@pytest.fixture(scope="module")
def full_run(model64):
    return gen.generate(model64, prompt(), NEW, use_cache=False, logits=True)


@pytest.mark.parametrize("cut_cache", [True, False], ids=["cut", "whole"])
def test_cache_matches_full_run(model64, full_run, cut_cache):
    assert PROMPT_LEN + NEW > 2 * WINDOW  # well past the window
    tokens, logits = gen.generate(model64, prompt(), NEW, use_cache=True, cut_cache=cut_cache, logits=True)
    full_tokens, full_logits = full_run
    assert tokens.shape == (2, NEW) and logits.shape == (2, NEW, gen.DEFAULT_CONFIG["vocab_size"])
    assert logits.dtype == torch.float64
    assert torch.equal(tokens, full_tokens)
    torch.testing.assert_close(logits, full_logits, rtol=0, atol=1e-6)
    assert not torch.equal(tokens[0], tokens[1])  # two different rows, not one copied


def test_window_binds(model64, full_run):
    """A twin with the same weights and no window agrees while the sequence fits in the
    window (prompt + t <= W at step t) and not at the first step that outgrows it."""
    unbounded = gen.build_model(dtype=torch.float64, sliding_window=None)
    assert unbounded.sliding_window is None and model64.sliding_window == WINDOW
    first = WINDOW - PROMPT_LEN + 1  # the first step whose sequence is longer than the window
    _, logits = gen.generate(unbounded, prompt(), first + 1, use_cache=False, logits=True)
    windowed = full_run[1]
    torch.testing.assert_close(logits[:, :first], windowed[:, :first], rtol=0, atol=1e-12)
    assert (logits[:, first] - windowed[:, first]).abs().max() > 1e-3


def test_main(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["generate.py", "--device", "cpu", "--dtype", "float64", "--new-tokens", "24"])
    gen.main()
    out = capsys.readouterr().out
    assert "match: True" in out and "with cache" in out and "without cache" in out


def test_generate_rejects_zero_tokens(model64):
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen.generate(model64, prompt(), 0)


@gpu
@pytest.mark.gpu
def test_cuda_bf16_kernels():
    """bf16 on CUDA (the module runs swattn.flash_attn_func: prefill and one-query decode
    steps): cached and uncached runs agree on the first step's logits with the CPU float64
    model within a bf16 tolerance, on each other's logits while their tokens agree, and
    on the tokens for at least 16 steps, unless the float64 model itself has a near-tie
    where they part."""
    tol, steps = 0.15, 24  # bf16 logits (spread ~2.3) sit ~0.05 from float64 on the CPU's eager path
    p = prompt(length=12, seed=3)
    ref = gen.build_model(dtype=torch.float64)
    model = gen.build_model(device="cuda", dtype=torch.bfloat16)
    cached, lc = gen.generate(model, p.cuda(), steps, use_cache=True, logits=True)
    full, lf = gen.generate(model, p.cuda(), steps, use_cache=False, logits=True)
    cached, full, lc, lf = cached.cpu(), full.cpu(), lc.cpu().double(), lf.cpu().double()

    with torch.no_grad():
        ref0 = ref(p)[0][:, -1]
    torch.testing.assert_close(lc[:, 0], ref0, rtol=0, atol=tol)
    torch.testing.assert_close(lf[:, 0], ref0, rtol=0, atol=tol)

    differ = (cached != full).any(0)
    n = int(differ.nonzero()[0]) if differ.any() else steps
    # Up to and including step n both runs decoded the same tokens: their logits agree.
    torch.testing.assert_close(lc[:, : n + 1], lf[:, : n + 1], rtol=0, atol=tol)
    if n < 16:
        seq = torch.cat((p, cached[:, :n]), dim=1)
        with torch.no_grad():
            top2 = ref(seq)[0][:, -1].topk(2, dim=-1).values
        rows = cached[:, n] != full[:, n]
        gap = (top2[:, 0] - top2[:, 1])[rows]
        assert (gap < 2 * tol).all(), f"tokens part at step {n} without a near-tie (float64 top-2 gaps {gap})"


def test_hf_example_cpu():
    """examples/hf_generate.py on the CPU: swattn's tokens equal eager's for Mistral and
    gpt-oss, and a sliding layer's cache stays W - 1 keys long while a full layer's grows."""
    hf = _load_example("hf_generate")
    from swattn.integrations.transformers import register

    attn = register()
    for name in ("mistral", "gpt_oss"):
        short, long = (hf.run(name, n, torch.device("cpu"), torch.float32, attn) for n in (10, 30))
        if not short:  # this transformers lacks the model
            continue
        assert short["match"] and long["match"]
        kv_bytes = 2 * 2 * hf.COMMON["num_key_value_heads"] * hf.COMMON["head_dim"] * 4  # K + V, batch 2, float32
        assert short["cache_bytes"][0] == long["cache_bytes"][0] == (hf.COMMON["sliding_window"] - 1) * kv_bytes
        if name == "gpt_oss":  # layer 1 is full attention: every key stays
            assert long["cache_bytes"][1] - short["cache_bytes"][1] == 20 * kv_bytes
