"""Decode benchmark (issue 19): swattn.flash_attn_with_kvcache and the ring cache against
FlashAttention-4 and SDPA, on sliding-window decode, speculative and chunked-prefill shapes.

    python benchmarks/bench_decode.py --quick       # 9 shapes, ~75 s each with FA4 (H200); --shapes 0 1: some
    python benchmarks/bench_decode.py               # the whole table (batch 1/8/64 x W 128/4096 x D 64/128, ...)
    python benchmarks/bench_decode.py --quick --out results/decode --peers sdpa

Convention: tensors (batch, seq, heads, head_dim); W is the window in keys (a query
at position p sees p - W + 1 .. p: window_size=(W - 1, 0), causal; transformers'
sliding_window=W); the caches hold ``cache`` tokens per sequence and the q_len
queries are the last q_len positions (bottom-right aligned). Attention only: the
new keys are already in the cache (the append is one extra row, "+append").

Implementations per shape (all bfloat16):
  swattn          flash_attn_with_kvcache on a contiguous (batch, cache, kv_heads, D) cache
  swattn ring     SlidingWindowKVCache: W - 1 + q_len slots (rounded up to 128) per sequence
  swattn paged    the contiguous cache as pages of 256 tokens in a shuffled order
  swattn +append  swattn with this step's q_len new keys written first (the full decode step)
  swattn s=N      swattn with num_splits=N instead of the heuristic's choice (``--splits N ...``)
  fa4             flash_attn.cute's flash_attn_varlen_func(q, k_cache, v_cache, seqused_k=...,
                  window_size=(W - 1, 0)), when it imports (offline: ../shared/tools/offline-fa4.sh)
  sdpa            F.scaled_dot_product_attention on the window's slice of the cache, GQA heads
                  repeated and the slice copied outside the timing (its best case)
Columns:
  us         median GPU time of one call: a CUDA graph of R calls, each on a different window
             (other positions of the cache, or other rings) so the windows' bytes exceed L2
  % floor    memory floor / us; floor = (windows' K/V bytes + q + o) / bandwidth
             (configs/gpus.json's measured bandwidth for this card, else 4.27e12 B/s)
  replay us  wall time of replaying a graph that holds one call (what a graph-captured decode
             step pays per layer, launch included)
  host us    host time of one eager call (Python, checks, launches; the GPU not awaited)
  cache MiB  the K/V memory this implementation holds: full cache vs ring
  err        ||out - oracle|| / ||oracle||, the float64 oracle (swattn.testing) on one window
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import swattn  # noqa: E402
from bench import call_us, kernel_us  # noqa: E402  (the card's timings)
from swattn import decode as dec  # noqa: E402
from swattn import testing  # noqa: E402
from swattn.decode import SlidingWindowKVCache, flash_attn_with_kvcache  # noqa: E402

DEFAULT_BANDWIDTH = 4.27e12  # B/s, an H200's measured copy bandwidth when configs/gpus.json has no entry
L2_FLUSH_BYTES = 256 << 20  # rotate over more than this: ~5x an H100/H200's 50 MB L2
MAX_ROTATIONS = 32
DTYPE = torch.bfloat16

# (batch, q_heads, kv_heads, head_dim, W, cache, q_len)
QUICK = [
    (1, 32, 8, 128, 4096, 131072, 1),
    (8, 32, 8, 128, 4096, 131072, 1),
    (64, 32, 8, 128, 4096, 16384, 1),
    (64, 32, 8, 128, 128, 16384, 1),
    (1, 32, 8, 64, 128, 131072, 1),
    (8, 64, 8, 128, 4096, 32768, 1),
    (8, 32, 8, 128, 4096, 32768, 8),
    (1, 32, 8, 128, 4096, 32768, 128),
    (1, 32, 8, 128, 4096, 32768, 512),
]


def full_shapes() -> list[tuple]:
    shapes = []
    for d in (64, 128):
        for b in (1, 8, 64):
            for w in (128, 4096):
                shapes.append((b, 32, 8, d, w, 131072 if b <= 8 else 16384, 1))
    shapes += [(8, 64, 8, 128, 4096, 32768, 1), (64, 64, 8, 128, 4096, 16384, 1)]  # 64/8 heads
    shapes += [(8, 32, 8, 128, 4096, 32768, 8), (64, 32, 8, 128, 128, 16384, 8)]  # speculative tokens
    shapes += [(1, 32, 8, 128, 4096, 32768, q) for q in (16, 128, 512)]  # chunked prefill
    return shapes


# ---- environment and the card's bandwidth ---------------------------------------------


def environment() -> str:
    import tilelang

    return (
        f"{torch.cuda.get_device_name()} | torch {torch.__version__} (CUDA {torch.version.cuda}) | "
        f"tilelang {tilelang.__version__}"
    )


def bandwidth() -> float:
    """Bytes/s: configs/gpus.json's measured bandwidth for this card, else DEFAULT_BANDWIDTH."""
    path = ROOT / "configs" / "gpus.json"
    table = json.loads(path.read_text()) if path.exists() else {}
    entry = table.get(torch.cuda.get_device_name())
    return entry["bandwidth_gbps"] * 1e9 if entry else DEFAULT_BANDWIDTH


# ---- compiles, in parallel ---------------------------------------------------------------


def precompile(head_dims, arch: str, jobs: int) -> None:
    """Every variant the table can use, compiled in parallel into TileLang's disk cache."""
    dtype = dec.launch.DTYPES[DTYPE]
    variants = [("combine", d, dtype, False) for d in head_dims]
    variants += [("append", d, dtype, layout) for d in head_dims for layout in ("contiguous", "ring", "paged")]
    variants += [
        (d, dtype, layout, split, False, False)
        for d in head_dims
        for layout in ("contiguous", "ring", "paged")
        for split in (False, True)
    ]
    t0 = time.perf_counter()
    dec.precompile(variants, arch, jobs)
    print(f"precompiled {len(variants)} kernels in {time.perf_counter() - t0:.0f} s", flush=True)


# ---- timing ------------------------------------------------------------------------------------


def replay_us(call, n: int = 200) -> float:
    """Wall time per replay of a graph that holds one call, back to back."""
    call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    for _ in range(10):
        graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


# ---- one shape ------------------------------------------------------------------------------


def fa4_fn():
    try:
        from flash_attn.cute.interface import flash_attn_varlen_func
    except Exception:  # not installed, or its CuTe DSL does not load here
        return None
    return flash_attn_varlen_func


def bench_shape(shape: tuple, bw: float, peers: set[str], log, splits=()) -> list[dict]:
    b, hq, hk, d, w, cache, sq = shape
    left = w - 1
    g = torch.Generator(device="cuda").manual_seed(0)
    kc = torch.randn(b, cache, hk, d, device="cuda", dtype=DTYPE, generator=g)
    vc = torch.randn(b, cache, hk, d, device="cuda", dtype=DTYPE, generator=g)
    q = torch.randn(b, sq, hq, d, device="cuda", dtype=DTYPE, generator=g)
    span = w - 1 + sq  # keys the q_len queries' windows cover
    kv_bytes = 2 * b * min(span, cache) * hk * d * kv_bytes_per(DTYPE)
    floor_us = (kv_bytes + 2 * q.numel() * q.element_size()) / bw * 1e6
    # Rotations: each call reads another window of the cache (disjoint), enough to exceed L2.
    per_call = max(kv_bytes, 1)
    rot = max(1, min(MAX_ROTATIONS, cache // span, -(-L2_FLUSH_BYTES // per_call)))
    ends = [cache - r * span for r in range(rot)]  # keys in the cache for rotation r
    seqlens = [torch.full((b,), e, dtype=torch.int32, device="cuda") for e in ends]
    full_mib = 2 * kc.numel() * kc.element_size() / 2**20
    window = (left, 0)

    # The oracle on rotation 0's window (float64 on the GPU), for the first 8 sequences.
    n_err = min(b, 8)
    k_win, v_win = kc[:n_err, ends[0] - span : ends[0]], vc[:n_err, ends[0] - span : ends[0]]
    want = testing.attention_ref(q[:n_err], k_win, v_win, window_size=window, causal=True)

    def err(out):
        return ((out[:n_err].double() - want).norm() / want.norm()).item()

    impls = {}  # name -> (calls for the rotations, one call, cache MiB)
    impls["swattn"] = (
        [
            lambda s=s: flash_attn_with_kvcache(q, kc, vc, cache_seqlens=s, window_size=window, causal=True)
            for s in seqlens
        ],
        full_mib,
    )
    for n in splits:  # the split count fixed instead of the heuristic's (``--splits``)
        impls[f"swattn s={n}"] = (
            [
                lambda s=s, n=n: flash_attn_with_kvcache(
                    q, kc, vc, cache_seqlens=s, window_size=window, causal=True, num_splits=n
                )
                for s in seqlens
            ],
            full_mib,
        )
    # The ring: W - 1 + q_len slots, rotated over copies until they exceed L2.
    ring = SlidingWindowKVCache(b, left, sq, hk, d, DTYPE, "cuda")
    ring_rot = max(1, min(MAX_ROTATIONS, -(-L2_FLUSH_BYTES // ring.nbytes)))
    rings = [ring] + [SlidingWindowKVCache(b, left, sq, hk, d, DTYPE, "cuda") for _ in range(ring_rot - 1)]
    for r in rings:  # the ring holds rotation 0's window: positions ends[0] - slots .. ends[0] - 1
        pos = torch.arange(ends[0] - r.slots, ends[0], device="cuda")
        r.k[:, pos % r.slots] = kc[:, pos]
        r.v[:, pos % r.slots] = vc[:, pos]
        r.reset(ends[0])
    impls["swattn ring"] = ([lambda r=r: r.attend(q) for r in rings], ring.nbytes / 2**20)
    page = 256
    if cache % page == 0:
        pps = cache // page
        perm = torch.randperm(b * pps, device="cuda", generator=g)
        kp = torch.empty(b * pps, page, hk, d, device="cuda", dtype=DTYPE)
        vp = torch.empty_like(kp)
        kp[perm] = kc.view(b * pps, page, hk, d)
        vp[perm] = vc.view(b * pps, page, hk, d)
        table = perm.view(b, pps).int()
        impls["swattn paged"] = (
            [
                lambda s=s: flash_attn_with_kvcache(
                    q, kp, vp, cache_seqlens=s, block_table=table, window_size=window, causal=True
                )
                for s in seqlens
            ],
            full_mib,
        )
    fa4 = fa4_fn() if "fa4" in peers else None
    if fa4 is not None:
        # FA4 4.0.0b36 has no split-KV kernel on SM 9.x: its heuristic (0) picks one at small batch
        # and asserts ("SplitKV not supported on SM 9.0"), so one split there.
        splits = 1 if torch.cuda.get_device_capability(q.device)[0] == 9 else 0
        impls["fa4"] = (
            [
                lambda s=s: fa4(q, kc, vc, seqused_k=s, causal=True, window_size=window, num_splits=splits)
                for s in seqlens
            ],
            full_mib,
        )
    if "sdpa" in peers:
        group = hq // hk
        qt = q.transpose(1, 2).contiguous()
        one = 2 * b * hq * span * d * q.element_size()
        n_sdpa = max(1, min(rot, (1 << 31) // one))  # the slices are copies: at most 2 GiB of them
        slices = [
            tuple(x[:, e - span : e].transpose(1, 2).repeat_interleave(group, 1).contiguous() for x in (kc, vc))
            for e in ends[:n_sdpa]
        ]
        mask = testing.window_mask(sq, span, window, True, device="cuda") if sq > 1 else None
        impls["sdpa"] = (
            [lambda kv=kv: F.scaled_dot_product_attention(qt, *kv, attn_mask=mask) for kv in slices],
            full_mib,
        )
    # Last: it writes into the cache (the window's own last q_len keys), which the rows above read.
    k_new = torch.randn(b, sq, hk, d, device="cuda", dtype=DTYPE, generator=g)
    v_new = torch.randn_like(k_new)
    before = [s - sq for s in seqlens]
    impls["swattn +append"] = (
        [
            lambda s=s: flash_attn_with_kvcache(q, kc, vc, k_new, v_new, s, window_size=window, causal=True)
            for s in before
        ],
        full_mib,
    )

    rows = []
    for name, (calls, mib) in impls.items():
        try:
            out = calls[0]()
            if name == "sdpa":
                out = out.transpose(1, 2)
            if name == "fa4" and isinstance(out, tuple):
                out = out[0]
            e = err(out) if name != "swattn +append" else None  # its window holds the new keys
            us = kernel_us(calls, reps=max(len(calls), 32))
            row = dict(
                batch=b,
                q_heads=hq,
                kv_heads=hk,
                head_dim=d,
                window=w,
                cache=cache,
                q_len=sq,
                impl=name,
                us=us,
                floor_us=floor_us,
                pct_floor=100 * floor_us / us,
                replay_us=replay_us(calls[0]),
                host_us=call_us(calls[0], n=50, wait=False),
                cache_mib=mib,
                err=e,
                rotations=len(calls),
            )
        except Exception as exc:  # a peer that cannot run this shape: say so, keep the table
            log(f"  {name} failed on {shape}: {type(exc).__name__}: {str(exc)[:300]}")
            continue
        rows.append(row)
        log(line(row))
    torch.cuda.empty_cache()
    return rows


def kv_bytes_per(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


HEAD = (
    "| B | Hq/Hkv | D | W | cache | q | impl | us | % floor | replay us | host us | cache MiB | err |\n"
    "|---:|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"
)


def line(r: dict) -> str:
    return (
        f"| {r['batch']} | {r['q_heads']}/{r['kv_heads']} | {r['head_dim']} | {r['window']} | {r['cache']} | "
        f"{r['q_len']} | {r['impl']} | {r['us']:.1f} | {r['pct_floor']:.0f} | {r['replay_us']:.1f} | "
        f"{r['host_us']:.1f} | {r['cache_mib']:.0f} | {'-' if r['err'] is None else format(r['err'], '.1e')} |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="9 shapes (about 75 s a shape with FA4 on the H200)")
    p.add_argument("--shapes", type=int, nargs="*", help="indices into the (quick or full) shape list")
    p.add_argument("--out", default=str(ROOT / "results"), help="folder for bench_decode.json")
    p.add_argument("--peers", default="fa4,sdpa", help="comma-separated peers: fa4, sdpa (or none)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    p.add_argument("--splits", type=int, nargs="*", default=[], help="extra swattn rows at these num_splits")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_decode.py needs a CUDA GPU.")
    shapes = QUICK if args.quick else full_shapes()
    if args.shapes:
        shapes = [shapes[i] for i in args.shapes]
    t0 = time.perf_counter()
    precompile(sorted({s[3] for s in shapes}), dec.launch.cuda_arch(torch.device("cuda")), args.jobs)
    bw = bandwidth()
    print(f"{environment()} | bandwidth {bw / 1e12:.2f} TB/s | swattn {swattn.__version__}", flush=True)
    print(HEAD, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "env": environment(),
        "date": str(datetime.date.today()),
        "bandwidth": bw,
        "command": " ".join(sys.argv),
        "seconds": 0.0,
    }
    rows = []
    for done, shape in enumerate(shapes, 1):
        rows += bench_shape(shape, bw, set(args.peers.split(",")), lambda s: print(s, flush=True), args.splits)
        # Written after every shape: a run cut short by a time limit keeps what it measured.
        meta |= {"seconds": time.perf_counter() - t0, "shapes_done": f"{done} of {len(shapes)}"}
        (out / "bench_decode.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"\n{meta['env']} | {meta['date']} | {meta['seconds']:.0f} s | results: {out / 'bench_decode.json'}\n")
    print(HEAD)
    print("\n".join(line(r) for r in rows))


if __name__ == "__main__":
    main()
