"""A model that learns through the kernel: a small causal sliding-window
transformer (GQA, window well below the context) trained twice from the same
seed on the same batches, once with the TileLang op and once with PyTorch's
SDPA + the same window as a dense mask. The two loss curves must agree to
within bf16 noise, and the kernel run should be faster.

    python examples/train.py                     # on a GPU: both runs, results/train.{json,png}
    python examples/train.py --steps 3 --tiny    # a CPU smoke run (SDPA only)

The text is the repository's own sources (README, *.py, analysis.md), read as
bytes: nothing to download. Window (the repository's one definition): token i
attends tokens i - W .. i (causal, right = 0).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from swattn import SlidingWindowAttention

ROOT = Path(__file__).resolve().parent.parent  # the repository: its sources are the corpus


def corpus() -> torch.Tensor:
    files = sorted(ROOT.glob("*.py")) + sorted(ROOT.glob("*.md")) + sorted(ROOT.glob("tests/*.py"))
    data = b"\n".join(f.read_bytes() for f in files)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


class Block(torch.nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, window: int, impl: str):
        super().__init__()
        self.norm1, self.norm2 = torch.nn.RMSNorm(dim), torch.nn.RMSNorm(dim)
        self.attn = SlidingWindowAttention(
            dim, heads, kv_heads, window=window, causal=True, impl="sdpa" if impl == "sdpa" else "auto"
        )
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SlidingWindowLM(torch.nn.Module):
    def __init__(self, context: int, dim: int, layers: int, heads: int, kv_heads: int, window: int, impl: str):
        super().__init__()
        self.tok = torch.nn.Embedding(256, dim)
        self.pos = torch.nn.Embedding(context, dim)
        self.blocks = torch.nn.ModuleList(Block(dim, heads, kv_heads, window, impl) for _ in range(layers))
        self.norm = torch.nn.RMSNorm(dim)
        self.head = torch.nn.Linear(dim, 256, bias=False)

    def forward(self, tokens):
        x = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def batches(data: torch.Tensor, steps: int, batch: int, context: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, len(data) - context - 1, (batch,), generator=g)
        chunk = torch.stack([data[s : s + context + 1] for s in start.tolist()])
        yield chunk[:, :-1], chunk[:, 1:]


def train(impl: str, args, device, data: torch.Tensor) -> dict:
    torch.manual_seed(args.seed)
    model = SlidingWindowLM(args.context, args.dim, args.layers, args.heads, args.kv_heads, args.window, impl).to(
        device
    )
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    losses, times = [], []
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    for x, y in batches(data, args.steps, args.batch, args.context, args.seed):
        x, y = x.to(device), y.to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with amp:
            loss = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    steady = sorted(times[len(times) // 5 :])  # past compilation and warm-up
    return {"impl": impl, "losses": losses, "step_ms_median": 1e3 * steady[len(steady) // 2] if steady else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="a small model for a CPU smoke run")
    p.add_argument("--out", default=str(ROOT / "results"))
    args = p.parse_args()
    if args.tiny:
        args.context, args.dim, args.layers, args.heads, args.kv_heads, args.window, args.batch = 64, 64, 2, 4, 2, 16, 4
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    impls = ["kernel", "sdpa"] if device.type == "cuda" else ["sdpa"]
    data = corpus()
    runs = [train(impl, args, device, data) for impl in impls]
    for r in runs:
        print(f"{r['impl']:6s} loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}, step {r['step_ms_median']:.1f} ms")
    if len(runs) == 2:
        diff = max(abs(a - b) for a, b in zip(runs[0]["losses"], runs[1]["losses"], strict=True))
        speedup = runs[1]["step_ms_median"] / runs[0]["step_ms_median"]
        print(f"largest loss difference: {diff:.4f}; kernel step {speedup:.2f}x faster than SDPA + mask")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.json").write_text(
        json.dumps({"args": vars(args), "device": str(device), "runs": runs}, indent=1) + "\n"
    )
    if len(runs) == 2:
        plot(runs, out / "train.png")


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        ax.plot(r["losses"], label=f"{r['impl']} ({r['step_ms_median']:.1f} ms/step)", alpha=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/byte)")
    ax.set_title(f"sliding-window LM, same seed: {torch.cuda.get_device_name()}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
