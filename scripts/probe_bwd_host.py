"""Is forward + backward of the op host-bound on small shapes? (GPU)

Per bench_op shape and dtype: the do_bench median of forward + backward; the host
time to enqueue one forward + backward (no synchronisation, averaged over 30);
and the device time of its kernels (torch.profiler, summed). When the host time
exceeds the device time, the GPU waits on Python and the median measures the host.

    python scripts/probe_bwd_host.py [shape indices] [--profile]

``--profile``: also cProfile 200 steps of the first shape (fp16) and print the
20 functions with the most time of their own: where the host time goes.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sweep_common import bench_shapes, host_us, print_profile, random_qkv  # noqa: E402


def profile_host(sh: dict) -> None:
    """cProfile of 200 forward + backward steps (no synchronisation inside)."""
    import torch

    import swattn

    q, k, v = (x.requires_grad_() for x in random_qkv(sh, torch.float16))
    dout = torch.randn_like(q)
    window = (sh["left"], sh["right"])

    def step():
        q.grad = k.grad = v.grad = None
        swattn.sliding_window_attention(q, k, v, window).backward(dout)

    for _ in range(20):
        step()
    torch.cuda.synchronize()
    print_profile(step)
    torch.cuda.synchronize()


def main() -> None:
    import torch
    from triton.testing import do_bench

    import swattn

    if "--profile" in sys.argv:
        sys.argv.remove("--profile")
        profile_host(bench_shapes([int(a) for a in sys.argv[1:]] or [0])[0])

    print("| shape | dtype | do_bench us | host us / step | kernels us / step | top host ops |")
    print("|---|---|---:|---:|---:|---|")
    for sh in bench_shapes([int(a) for a in sys.argv[1:]] or [0, 1]):
        for dtype in (torch.float16, torch.bfloat16):
            q, k, v = (x.requires_grad_() for x in random_qkv(sh, dtype))
            dout = torch.randn_like(q)
            window = (sh["left"], sh["right"])

            def step(q=q, k=k, v=v, window=window, dout=dout):
                swattn.sliding_window_attention(q, k, v, window).backward(dout)

            def fresh_step(q=q, k=k, v=v, step=step):  # as do_bench's grad_to_none does between calls
                q.grad = k.grad = v.grad = None
                step()

            median = do_bench(step, warmup=50, rep=200, grad_to_none=[q, k, v], return_mode="median") * 1e3
            host = host_us(fresh_step, n=30, warmup=0)  # do_bench warmed up
            with torch.profiler.profile() as prof:
                for _ in range(5):
                    fresh_step()
                torch.cuda.synchronize()
            events = prof.key_averages()
            device = sum(e.self_device_time_total for e in events) / 5
            top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:4]
            tops = ", ".join(f"{e.key} {e.self_cpu_time_total / 5:.0f}" for e in top)
            label = ",".join(str(sh[x]) for x in ("batch", "q_heads", "kv_heads", "seq", "head_dim"))
            print(f"| {label} | {str(dtype)[6:]} | {median:.1f} | {host:.1f} | {device:.1f} | {tops} |", flush=True)


if __name__ == "__main__":
    main()
