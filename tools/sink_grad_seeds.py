"""The sinks' gradient of a tiny gpt-oss, batch by batch (GPU, bf16): swattn's and eager-bf16's
relative error against eager float32, per batch and pooled over the batches.

    python tools/sink_grad_seeds.py          # -> results/h200_s9/sinkseeds.log on the H200

Why tests/test_transformers.py pools its GPU comparison over eight batches: one batch's ratio of
the two errors swings by an order of magnitude either way (a sink's gradient is one number per
head, a sum of cancelling terms).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import test_transformers as tt  # noqa: E402


def main(batches: int = 8) -> None:
    for padding in ("none", "left"):
        models = tt._gpu_models("gpt_oss")
        pool: dict = {}
        for seed in range(1, batches + 1):
            outs = tt._gpu_outputs(models, seed, padding)
            row = []
            for n, r in outs["ref"].items():
                if "sinks" not in n:
                    continue
                es, ee = (float((outs[k][n] - r).norm()) for k in ("swattn", "eager"))
                row.append(f"{n.split('.')[2]}: {es / float(r.norm()):.1e}/{ee / float(r.norm()):.1e}")
                acc = pool.setdefault(n, [0.0, 0.0, 0.0])
                acc[0], acc[1], acc[2] = acc[0] + es**2, acc[1] + ee**2, acc[2] + float(r.norm()) ** 2
            print(padding, seed, "swattn/eager-bf16 sinks-grad rel err:", "  ".join(row), flush=True)
        for n, (a, b, c) in pool.items():
            print(padding, "pooled", n, f"{(a / c) ** 0.5:.2e} / {(b / c) ** 0.5:.2e}")


if __name__ == "__main__":
    main()
