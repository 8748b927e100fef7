"""The sinks' gradient of a tiny gpt-oss, batch by batch (GPU, bf16): swattn's and eager-bf16's
relative error against eager float32, per batch and pooled over the batches.

    python tools/sink_grad_seeds.py          # -> results/h200_s9/sinkseeds.log on the H200

Why tests/test_transformers.py pools its GPU comparison over eight batches: one batch's ratio of
the two errors swings by an order of magnitude either way (a sink's gradient is one number per
head, a sum of cancelling terms).
"""

import copy
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import test_transformers as tt  # noqa: E402

import swattn.integrations.transformers as swattn_hf  # noqa: E402


def main(batches: int = 8) -> None:
    swattn_hf.register()
    for padding in ("none", "left"):
        cfg = tt._config("gpt_oss", head_dim=64, hidden=128)
        cfg.sliding_window = tt.GPU_WINDOW
        torch.manual_seed(0)
        ref = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="eager")
        tt._scale_attention(ref, "gpt_oss")
        models = {"ref": ref.cuda().float().eval()}
        for impl in ("eager", "swattn"):
            m = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=impl)
            m.load_state_dict(ref.state_dict())
            models[impl] = m.cuda().to(torch.bfloat16).eval()
        pool: dict = {}
        for seed in range(1, batches + 1):
            ids, weight = tt._inputs(seed, batch=4, seq=tt.GPU_SEQ)
            mask = torch.ones_like(ids)
            if padding == "left":
                mask[1, :37] = 0
            ids, weight, mask = ids.cuda(), weight.cuda(), mask.cuda()
            kw = {} if padding == "none" else {"attention_mask": mask}
            grads = {}
            for key, m in models.items():
                m.zero_grad(set_to_none=True)
                (m(input_ids=ids, **kw).logits.float() * weight * mask[..., None]).sum().backward()
                grads[key] = {n: p.grad.double() for n, p in m.named_parameters() if "sinks" in n}
            row = []
            for n, r in grads["ref"].items():
                es, ee = (float((grads[k][n] - r).norm()) for k in ("swattn", "eager"))
                row.append(f"{n.split('.')[2]}: {es / float(r.norm()):.1e}/{ee / float(r.norm()):.1e}")
                acc = pool.setdefault(n, [0.0, 0.0, 0.0])
                acc[0], acc[1], acc[2] = acc[0] + es**2, acc[1] + ee**2, acc[2] + float(r.norm()) ** 2
            print(padding, seed, "swattn/eager-bf16 sinks-grad rel err:", "  ".join(row), flush=True)
        for n, (a, b, c) in pool.items():
            print(padding, "pooled", n, f"{(a / c) ** 0.5:.2e} / {(b / c) ** 0.5:.2e}")


if __name__ == "__main__":
    main()
