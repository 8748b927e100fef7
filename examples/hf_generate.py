"""Greedy generation with transformers models running swattn's attention.

Tiny random Mistral and gpt-oss models (sliding_window 8, shorter than prompt + new
tokens, so the window and transformers' sliding KV cache both matter; gpt-oss
alternates sliding and full layers and has learned sinks) generate from a
left-padded batch twice from the same weights: attn_implementation="swattn"
(after ``swattn.integrations.transformers.register()``) and "eager". Prints both
token lists, whether they match, and the KV cache each layer holds at the end: a
sliding layer keeps its last W - 1 keys (O(W), whatever the length), a full layer
every key. ``--new-tokens 16 256`` shows both sizes.

    python examples/hf_generate.py              # CUDA (bf16, the kernels) if present, else CPU (float32)
    python examples/hf_generate.py --device cpu --models mistral

On the CPU both sides are exact float32 attention and match; on CUDA bf16 rounding
may, rarely, flip a near-tie of a random model.
"""

from __future__ import annotations

import argparse
import copy

import torch
import transformers

from swattn.integrations.transformers import register

COMMON = dict(
    vocab_size=256,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,  # on CUDA: a multiple of 8 up to 256
    sliding_window=8,
    pad_token_id=0,
)
MODELS = {  # name -> (config class, extra kwargs)
    "mistral": ("MistralConfig", dict(max_position_embeddings=512)),
    "gpt_oss": (
        "GptOssConfig",
        dict(
            layer_types=["sliding_attention", "full_attention"],
            num_local_experts=4,
            num_experts_per_tok=2,
            max_position_embeddings=131072,  # = 32 x YaRN's original 4096: no mismatch warning
        ),
    ),
}


def cache_bytes(cache) -> list[int]:
    """Bytes of K and V each layer of a transformers Cache holds."""
    return [sum(t.numel() * t.element_size() for t in (layer.keys, layer.values)) for layer in cache.layers]


def first_difference(eager, prompt, mask, want, got) -> str:
    """Where the two token lists first part, and the float32 eager model's logits of both
    tokens there (same weights, on the CPU, fed the common prefix): a gap far below the
    16-bit rounding of the logits is a near-tie that either rounding may break."""
    row, step = next(
        (r, int((want[r] != got[r]).nonzero()[0])) for r in range(want.shape[0]) if not torch.equal(want[r], got[r])
    )
    ids = torch.cat([prompt[row], want[row, :step]])[None]
    keep = torch.cat([mask[row], torch.ones(step, dtype=mask.dtype)])[None]
    ref = copy.deepcopy(eager).float().cpu()
    with torch.no_grad():
        logits = ref(input_ids=ids, attention_mask=keep).logits[0, -1]
    a, b = int(want[row, step]), int(got[row, step])
    return (
        f"first difference: row {row}, new token {step}: eager {a}, swattn {b}; float32 eager logits "
        f"{logits[a]:.4f} vs {logits[b]:.4f} (gap {abs(logits[a] - logits[b]):.4f}, "
        f"largest |logit| {logits.abs().max():.2f})"
    )


def run(name: str, new_tokens: int, device, dtype, attn: str) -> dict:
    cls_name, extra = MODELS[name]
    cls = getattr(transformers, cls_name, None)
    if cls is None:
        print(f"{name}: transformers {transformers.__version__} has no {cls_name}; skipped")
        return {}
    config = cls(**COMMON, **extra)
    torch.manual_seed(0)
    models = {}
    for impl in ("eager", attn):
        # One config object per model: from_config records the implementation on it.
        model = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=impl)
        if models:
            model.load_state_dict(models["eager"].state_dict())
        models[impl] = model.to(device=device, dtype=dtype).eval()

    prompt = torch.randint(3, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(prompt)
    mask[1, :5] = 0  # the second prompt is 7 tokens, left-padded
    prompt = prompt.masked_fill(mask == 0, config.pad_token_id)
    kw = dict(attention_mask=mask.to(device), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    tokens, sizes = {}, {}
    with torch.no_grad():
        for impl, model in models.items():
            out = model.generate(prompt.to(device), return_dict_in_generate=True, **kw)
            tokens[impl] = out.sequences[:, prompt.shape[1] :].cpu()
            sizes[impl] = cache_bytes(out.past_key_values)
    layer_types = getattr(config, "layer_types", None) or ["sliding_attention"] * config.num_hidden_layers
    print(f"{name}: {device}, {dtype}, sliding_window {config.sliding_window}, {new_tokens} new tokens")
    for impl, t in tokens.items():
        print(f"{impl:>7}: {t.tolist()}")
    same = torch.equal(tokens["eager"], tokens[attn])
    print("match" if same else "MISMATCH")
    if not same:
        print(first_difference(models["eager"], prompt, mask, tokens["eager"], tokens[attn]))
    print(
        "KV cache at the end (bytes per layer, swattn): "
        + ", ".join(f"{kind.split('_')[0]} {n}" for kind, n in zip(layer_types, sizes[attn], strict=True))
    )
    return {"model": name, "new_tokens": new_tokens, "match": same, "cache_bytes": sizes[attn]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[16])
    parser.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS))
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the kernels take 16-bit
    attn = register()  # "swattn"
    for name in args.models:
        for n in args.new_tokens:
            run(name, n, device, dtype, attn)


if __name__ == "__main__":
    main()
