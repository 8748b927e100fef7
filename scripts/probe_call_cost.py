"""Host cost of one forward + backward of the op, piece by piece (GPU).

The small benchmark shapes are host-bound (scripts/probe_bwd_host.py): this
splits the host time of a step into its parts, each the mean over 300 calls
with no synchronisation inside (the GPU runs behind and never stalls Python):

  kernel call (tvm_ffi)   one compiled forward kernel called directly, per
                          TileLang execution backend (tvm_ffi, cython)
  forward, no grad        swattn.sliding_window_attention under no_grad
  forward, grad           the same building the autograd graph
  forward + backward      the training step
  backward impl alone     ops._bwd_impl called directly (no autograd engine)
  identity Function       forward + backward of a torch.autograd.Function that
                          does nothing: the autograd engine's own cost on this host
  step, CUDA graph (GPU)  the GPU time of one forward + backward, replayed from a
                          CUDA graph (no host in the loop; do_bench median): what
                          the step costs when the host does not set the pace

On a bench shape the GPU may still set the pace (the launch queue fills);
``--tiny`` (batch 1, one head, seq 256) leaves it idle, so the numbers are the host's.

    python scripts/probe_call_cost.py [shape index, default 0] [--tiny] [--profile]

``--profile``: cProfile of 200 backward impl calls, 25 functions by own time.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sweep_common import bench_shapes, host_us, print_profile, random_qkv  # noqa: E402


def main() -> None:
    import tilelang
    import torch

    import swattn

    tiny = "--tiny" in sys.argv
    sh = bench_shapes([int(a) for a in sys.argv[1:] if not a.startswith("--")] or [0])[0]
    if tiny:
        sh = dict(sh, batch=1, q_heads=1, kv_heads=1, seq=256)
    q, k, v = random_qkv(sh, torch.float16)
    window = (sh["left"], sh["right"])
    b, s, hq, d = q.shape
    out, lse = torch.empty_like(q), torch.empty(b, hq, s, device="cuda")
    win, kt = swattn._placeholders(q.device)
    args = (q, k, v, out, lse, win, kt, sh["left"], sh["right"], 0, hq, sh["kv_heads"], s, 1)
    rows = []
    for backend in ("tvm_ffi", "cython"):
        try:
            kern = tilelang.compile(
                swattn.make_forward(d, "float16", "sm_90a", None, "window"),
                target={"kind": "cuda", "arch": "sm_90a"},
                pass_configs={"tl.enable_fast_math": True},
                execution_backend=backend,
            )
            rows.append((f"kernel call ({backend})", host_us(lambda kern=kern: kern(*args))))
        except Exception as e:  # a backend that does not build here is reported
            rows.append((f"kernel call ({backend}) failed: {repr(e)[:120]}", float("nan")))

    def fwd():
        with torch.no_grad():
            swattn.sliding_window_attention(q, k, v, window)

    rows.append(("forward, no grad", host_us(fwd)))
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    dout = torch.randn_like(q)
    rows.append(("forward, grad", host_us(lambda: swattn.sliding_window_attention(qg, kg, vg, window))))

    def step():
        qg.grad = kg.grad = vg.grad = None
        swattn.sliding_window_attention(qg, kg, vg, window).backward(dout)

    rows.append(("forward + backward", host_us(step)))
    import ops

    o, l = swattn.sliding_window_attention(q, k, v, window, return_lse=True)
    scalars = (sh["left"], sh["right"], 0, s, 1, hq, sh["kv_heads"])
    tables = (None, None, None)
    rows.append(("backward impl alone", host_us(lambda: ops._bwd_impl(dout, None, q, k, v, o, l, *tables, *scalars))))

    class Identity(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            return g

    def identity_step():
        qg.grad = None
        Identity.apply(qg).backward(dout)

    rows.append(("identity Function", host_us(identity_step)))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    from triton.testing import do_bench

    rows.append(("step, CUDA graph (GPU)", do_bench(graph.replay, warmup=20, rep=200, return_mode="median") * 1e3))
    if "--profile" in sys.argv:
        print_profile(lambda: ops._bwd_impl(dout, None, q, k, v, o, l, *tables, *scalars), top=25)
    print("| part | host us |\n|---|---:|")
    for name, us in rows:
        print(f"| {name} | {us:.1f} |")


if __name__ == "__main__":
    main()
