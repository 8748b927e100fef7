"""Greedy generation from a tiny language model built on swattn.GroupedQueryAttention.

A decoder-only model (token embedding; N blocks of RMSNorm -> attention -> residual,
RMSNorm -> SiLU MLP -> residual; final RMSNorm; LM head) with random weights from a
fixed seed generates greedily from a batch of prompts twice:

* with the (k, v) cache: one prefill call over the prompt, then one token per step,
  passing each layer's ``past_key_value`` and the new token's ``position_ids``. The
  cache is cut to the last ``sliding_window - 1`` keys after every call (all that the
  next query can see), so the explicit position ids are what keep RoPE right: the
  module's default would count positions from the cut cache's length;
* without the cache: the whole sequence re-run every step, its last position's logits
  taken.

Both must give the same tokens. Attention is grouped-query (8 query heads share 2 K/V
heads) and local: in transformers' convention ``sliding_window=W`` lets the query at
position p see keys p - W < j <= p (its own and the W - 1 before it; FlashAttention's
``window_size=(W - 1, 0)`` with causal). W = 16 against a prompt of 12 and 60 new
tokens, so most steps run past the window.

    python examples/generate.py                      # CUDA (bf16, swattn's kernels) if present, else CPU float32
    python examples/generate.py --device cpu --dtype float64 --new-tokens 80

On CUDA with float16/bfloat16 the module runs ``swattn.flash_attn_func`` (the TileLang
kernels; the first call compiles them, so an untimed warm-up runs first), elsewhere its
exact eager path. On the CPU the two lists match exactly; in bf16 the prefill and the
one-token steps round differently, so a near-tie of the random model may, rarely, flip
a late token.
"""

from __future__ import annotations

import argparse
import time

import torch

from swattn import GroupedQueryAttention

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_CONFIG = dict(
    vocab_size=256,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=32,  # on CUDA: a multiple of 8 up to 256 for the kernels
    sliding_window=16,
    attention_dropout=0.0,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
)


class RMSNorm(torch.nn.Module):
    """Llama's RMSNorm, computed in at least float32 (float64 stays float64)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        work = torch.promote_types(x.dtype, torch.float32)
        h = x.to(work)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.to(work) * h).to(x.dtype)


class MLP(torch.nn.Module):
    """Llama's gated SiLU MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = torch.nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = torch.nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = torch.nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(torch.nn.Module):
    def __init__(self, config: dict, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config["hidden_size"], config["rms_norm_eps"])
        self.self_attn = GroupedQueryAttention(config, layer_idx=layer_idx)
        self.post_attention_layernorm = RMSNorm(config["hidden_size"], config["rms_norm_eps"])
        self.mlp = MLP(config["hidden_size"], config["intermediate_size"])

    def forward(self, x, position_ids, past_key_value=None, use_cache=False):
        h, present = self.self_attn(
            self.input_layernorm(x), position_ids=position_ids, past_key_value=past_key_value, use_cache=use_cache
        )
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), present


class TinyLM(torch.nn.Module):
    """Decoder-only LM over ``GroupedQueryAttention``; ``forward(input_ids, position_ids,
    past_key_values, use_cache)`` -> (logits (batch, seq, vocab), presents: one (k, v)
    per layer, each (batch, kv_heads, keys, head_dim), or None)."""

    def __init__(self, **overrides):
        super().__init__()
        self.config = config = {**DEFAULT_CONFIG, **overrides}
        self.embed_tokens = torch.nn.Embedding(config["vocab_size"], config["hidden_size"])
        self.layers = torch.nn.ModuleList(Block(config, i) for i in range(config["num_hidden_layers"]))
        self.norm = RMSNorm(config["hidden_size"], config["rms_norm_eps"])
        self.lm_head = torch.nn.Linear(config["hidden_size"], config["vocab_size"], bias=False)

    @property
    def sliding_window(self) -> int | None:
        return self.layers[0].self_attn.sliding_window

    def forward(self, input_ids, position_ids=None, past_key_values=None, use_cache=False):
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand_as(input_ids)
        x = self.embed_tokens(input_ids)
        past_key_values = past_key_values or [None] * len(self.layers)
        presents = []
        for layer, past in zip(self.layers, past_key_values, strict=True):
            x, present = layer(x, position_ids, past, use_cache)
            presents.append(present)
        return self.lm_head(self.norm(x)), (presents if use_cache else None)


def build_model(seed: int = 0, device="cpu", dtype=torch.float32, **overrides) -> TinyLM:
    """A ``TinyLM`` with random weights from ``seed`` (the same on every device and dtype:
    they are drawn in float32 on the CPU, then moved). The embedding is N(0, 1) and the
    LM head scaled up so that the logits spread over several units (few near-ties)."""
    torch.manual_seed(seed)
    model = TinyLM(**overrides)
    with torch.no_grad():
        torch.nn.init.normal_(model.embed_tokens.weight, std=1.0)
        model.lm_head.weight.mul_(4.0)
        for layer in model.layers:  # sharper attention, so the context (and the window) matters
            layer.self_attn.q_proj.weight.mul_(2.0)
            layer.self_attn.k_proj.weight.mul_(2.0)
    return model.to(device=device, dtype=dtype).eval()


def _cut(cache, keep: int | None):
    """Each layer's (k, v) cut to its last ``keep`` keys (None: all)."""
    if keep is None:
        return cache
    return [(k[:, :, max(0, k.shape[2] - keep) :], v[:, :, max(0, v.shape[2] - keep) :]) for k, v in cache]


@torch.no_grad()
def generate(model, prompt_ids, max_new_tokens: int, use_cache: bool = True, cut_cache: bool = True, logits=False):
    """Greedy decoding: the new tokens (batch, max_new_tokens), and with ``logits=True``
    also each step's logits (batch, max_new_tokens, vocab), in float32 or float64.

    ``use_cache``: one prefill over ``prompt_ids`` (batch, prompt_len; every prompt the
    same length), then one token per step with ``past_key_value`` and its position id;
    ``cut_cache`` keeps only the last ``sliding_window - 1`` keys (all the next query
    sees). Without the cache the whole sequence is re-run every step."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    b, s = prompt_ids.shape
    device = prompt_ids.device
    keep = model.sliding_window - 1 if cut_cache and model.sliding_window is not None else None
    seq, steps = prompt_ids, []
    if use_cache:
        out, cache = model(prompt_ids, torch.arange(s, device=device)[None].expand(b, s), use_cache=True)
        last = out[:, -1]
    for t in range(max_new_tokens):
        if not use_cache:
            last = model(seq)[0][:, -1]
        steps.append(last.to(torch.promote_types(last.dtype, torch.float32)))
        token = last.argmax(-1, keepdim=True)
        seq = torch.cat((seq, token), dim=1)
        if use_cache and t + 1 < max_new_tokens:
            position = torch.full((b, 1), s + t, device=device)
            out, cache = model(token, position, past_key_values=_cut(cache, keep), use_cache=True)
            last = out[:, -1]
    tokens = seq[:, s:]
    return (tokens, torch.stack(steps, dim=1)) if logits else tokens


def _timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: bfloat16 on CUDA, else float32")
    parser.add_argument("--new-tokens", type=int, default=60)
    parser.add_argument("--prompt-len", type=int, default=12)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    dtype = DTYPES[args.dtype or ("bfloat16" if args.device == "cuda" else "float32")]
    model = build_model(args.seed, args.device, dtype)
    g = torch.Generator().manual_seed(args.seed + 1)
    prompt = torch.randint(model.config["vocab_size"], (args.batch, args.prompt_len), generator=g).to(args.device)
    # Warm-up outside the timing: on CUDA it compiles the kernels (prefill and decode shapes), on the
    # CPU it pays the first calls' one-time costs.
    for use_cache in (True, False):
        generate(model, prompt, 2, use_cache=use_cache)

    cached, t_cached = _timed(lambda: generate(model, prompt, args.new_tokens, use_cache=True))
    full, t_full = _timed(lambda: generate(model, prompt, args.new_tokens, use_cache=False))
    window = model.sliding_window
    print(f"device {args.device}, {dtype}, sliding_window {window}, prompt {args.prompt_len}, {args.new_tokens} new")
    for name, tokens, seconds in (("with cache   ", cached, t_cached), ("without cache", full, t_full)):
        print(f"{name} ({seconds * 1e3:8.1f} ms):")
        for row in tokens.tolist():
            print("   ", row)
    same = cached == full
    print("match:", bool(same.all()))
    if not same.all():
        first = int((~same).any(0).nonzero()[0])
        print(f"first difference at new token {first} (position {args.prompt_len + first})")


if __name__ == "__main__":
    main()
