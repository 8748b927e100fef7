"""Greedy generation with a transformers model running swattn's attention.

A tiny random Mistral (sliding_window 8, shorter than prompt + new tokens, so the
window and transformers' sliding KV cache both matter) generates from a
left-padded batch twice from the same weights: attn_implementation="swattn"
(after ``swattn.integrations.transformers.register()``) and "eager". Prints both
token lists and whether they match.

    python examples/hf_generate.py              # CUDA (bf16, the kernels) if present, else CPU (float32)
    python examples/hf_generate.py --device cpu

On the CPU both sides are exact float32 attention and match; on CUDA bf16 rounding
may, rarely, flip a near-tie of a random model.
"""

from __future__ import annotations

import argparse
import copy

import torch
from transformers import AutoModelForCausalLM, MistralConfig

from swattn.integrations.transformers import register


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the kernels take 16-bit

    name = register()  # "swattn"
    config = MistralConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,  # on CUDA: a multiple of 8 up to 256
        sliding_window=8,
        max_position_embeddings=512,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    models = {}
    for impl in ("eager", name):
        # One config object per model: from_config records the implementation on it.
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=impl)
        if models:
            model.load_state_dict(models["eager"].state_dict())
        models[impl] = model.to(device=device, dtype=dtype).eval()

    prompt = torch.randint(3, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(prompt)
    mask[1, :5] = 0  # the second prompt is 7 tokens, left-padded
    prompt = prompt.masked_fill(mask == 0, config.pad_token_id)
    kw = dict(attention_mask=mask.to(device), max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    tokens = {}
    with torch.no_grad():
        for impl, model in models.items():
            tokens[impl] = model.generate(prompt.to(device), **kw)[:, prompt.shape[1] :].cpu()

    print(f"device {device}, dtype {dtype}, sliding_window {config.sliding_window}, {args.new_tokens} new tokens")
    for impl, t in tokens.items():
        print(f"{impl:>7}: {t.tolist()}")
    same = torch.equal(tokens["eager"], tokens[name])
    print("match" if same else "MISMATCH")


if __name__ == "__main__":
    main()
