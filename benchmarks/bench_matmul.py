"""Matrix products of the CPU fast path: which kernel wins at how many rows, on the model's shapes.

x (M, K) @ W.T for W of shape (N, K), for M = 1 .. 256 rows, with the weights
  - packed: `glmkit.packed.PackedLinear` as it is (bf16 weights in, its own choice of kernel: glmkit's
            compiled float32 kernel over the packed weight where the CPU kernels build);
  - bf16:   oneDNN with bf16 weights prepacked (`torch.ops.mkldnn._reorder_linear_weight`), bf16 x;
  - fp16:   the same with float16 weights and x (the avx512_fp16 kernels, where the CPU has them);
  - fp32:   `F.linear` in float32 (MKL).
Kinds are timed interleaved, round after round, in one process, and each cell is the fastest call: on a
shared machine only the ratios inside one run mean something. Up to 32 rows a product is bound by
memory, so each round cycles through enough copies of the weight to exceed the caches (--cache-mb), as
a decode step does; more rows are compute-bound and time 3 copies. The last column is the speed of
fp16 against bf16 (above 1: fp16 is faster). On a CPU without AVX512-FP16 the fp16 kind is left out.

Shapes: `bench` is the serving benchmark's model (hidden 1024, 8 layers, ffn 3424, vocabulary 65024);
`6b` is ChatGLM3-6B's (28 layers). The last table adds up one forward step of the whole model's
linears (each layer's four, times the layers, plus the output layer), per kind and rows.

    python benchmarks/bench_matmul.py [--shapes bench,6b] [--rows 1,4,16,32,64,256] [--kinds packed,bf16,fp16,fp32]
        [--threads 2] [--rounds 5] [--cache-mb 600]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from glmkit.packed import PackedLinear

# (name, out_features N, in_features K), and how many of each one forward step multiplies by
SHAPES = {
    "bench": ([("qkv", 1536, 1024), ("dense", 1024, 1024), ("h_to_4h", 6848, 1024), ("4h_to_h", 1024, 3424),
               ("output", 65024, 1024)], 8),
    "6b": ([("qkv", 4608, 4096), ("dense", 4096, 4096), ("h_to_4h", 27392, 4096), ("4h_to_h", 4096, 13696),
            ("output", 65024, 4096)], 28),
}
KINDS = ("packed", "bf16", "fp16", "fp32")
MEMORY_BOUND_ROWS = 32  # above this many rows a product is compute-bound: a few copies suffice


def make_kernel(kind: str, weight: torch.Tensor):
    """A callable x (M, K) bf16 -> (M, N) for one bf16 weight, as `kind` computes it, and its bytes."""
    N, K = weight.shape
    if kind == "packed":
        linear = torch.nn.Linear(K, N, bias=False, device="meta", dtype=torch.bfloat16)
        linear.weight = torch.nn.Parameter(weight, requires_grad=False)
        layer = PackedLinear(linear)
        return layer, N * K * 2
    if kind in ("bf16", "fp16"):
        dtype = torch.bfloat16 if kind == "bf16" else torch.float16
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.to(dtype), 1)

        def onednn(x: torch.Tensor) -> torch.Tensor:
            return torch.ops.mkldnn._linear_pointwise(x.to(dtype), packed, None, "none", [], "")
        return onednn, N * K * 2
    if kind == "fp32":
        w32 = weight.float()
        return (lambda x: F.linear(x.float(), w32)), N * K * 4
    raise ValueError(f"unknown kind {kind!r}; choose from {', '.join(KINDS)}")


def time_shape(N: int, K: int, rows: list[int], kinds: list[str], rounds: int, cache_bytes: int) -> dict:
    """{(kind, M): best ms per call} for the weight shape (N, K)."""
    copies = {kind: [] for kind in kinds}
    for kind in kinds:
        while True:
            weight = torch.empty(N, K, dtype=torch.bfloat16).uniform_(-0.05, 0.05)
            fn, nbytes = make_kernel(kind, weight)
            copies[kind].append(fn)
            del weight
            if len(copies[kind]) * nbytes >= cache_bytes:
                break
    best = {}
    for M in rows:
        x = torch.randn(M, K).bfloat16()
        for kind in kinds:  # warm up: oneDNN builds its primitive for each new shape
            copies[kind][0](x)
        for _ in range(rounds):
            for kind in kinds:
                # Each call timed alone, the best kept: on a busy machine the fastest call is the one
                # that ran undisturbed. Every copy once per round where rows are few (memory-bound).
                for fn in copies[kind] if M <= MEMORY_BOUND_ROWS else copies[kind][:3]:
                    start = time.perf_counter()
                    fn(x)
                    ms = (time.perf_counter() - start) * 1e3
                    best[kind, M] = min(best.get((kind, M), math.inf), ms)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="bench", help="comma-separated: " + ", ".join(SHAPES))
    ap.add_argument("--rows", default="1,4,16,32,64,256")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cache-mb", type=int, default=600, help="weight bytes cycled through per timing")
    ap.add_argument("--only", default="", help="comma-separated layer names to time (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    kinds = args.kinds.split(",")
    for kind in kinds:
        if kind not in KINDS:
            ap.error(f"unknown kind {kind!r}; choose from {', '.join(KINDS)}")
    if "fp16" in kinds and not torch.ops.mkldnn._is_mkldnn_fp16_supported():
        print("this CPU has no float16 kernels in oneDNN (AVX512-FP16): the fp16 kind is left out")
        kinds.remove("fp16")
    only = set(filter(None, args.only.split(",")))
    print(f"{args.threads} thread(s), best of {args.rounds} interleaved rounds; ms per call (GFLOP/s)")
    with torch.inference_mode():
        for shape_set in args.shapes.split(","):
            layers, num_layers = SHAPES[shape_set]
            step = {(kind, M): 0.0 for kind in kinds for M in rows}
            for name, N, K in layers:
                if only and name not in only:
                    continue
                best = time_shape(N, K, rows, kinds, args.rounds, args.cache_mb * 2**20)
                print(f"\n{shape_set} {name}: ({N}, {K})")
                print(f"{'rows':>6}" + "".join(f"{k:>20}" for k in kinds) + "   fp16 vs bf16")
                for M in rows:
                    cells = "".join(f"{best[k, M]:>10.3f} ({2 * M * N * K / best[k, M] / 1e6:>6.1f})" for k in kinds)
                    ratio = f"{best['bf16', M] / best['fp16', M]:>9.2f}x" if {"bf16", "fp16"} <= set(kinds) else ""
                    print(f"{M:>6}{cells}{ratio}", flush=True)
                    for k in kinds:
                        step[k, M] += best[k, M] * (1 if name == "output" else num_layers)
            if not only:
                print(f"\n{shape_set}: one forward step's linears ({num_layers} layers + output), ms")
                print(f"{'rows':>6}" + "".join(f"{k:>12}" for k in kinds))
                for M in rows:
                    print(f"{M:>6}" + "".join(f"{step[k, M]:>12.1f}" for k in kinds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
