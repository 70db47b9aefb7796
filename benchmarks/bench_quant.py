"""Micro-benchmarks and the quality report behind glmkit.quant's choices.

    python benchmarks/bench_quant.py kernels [--threads 1,2]   # one row at ChatGLM3-6B's shapes, DRAM-bound
    python benchmarks/bench_quant.py rows [--rows 1,8,256]     # rows per call: every kernel, in cache
    python benchmarks/bench_quant.py overhead                  # per-token cost outside the matrix products
    python benchmarks/bench_quant.py quality [--model DIR]     # perplexity and logits, float vs quantized
    python benchmarks/bench_quant.py full                      # glmkit bench at 6B + transformers bf16, one run
    python benchmarks/bench_quant.py load [--model DIR]        # load time of a quantized checkpoint

`kernels` times x (1, K) @ W.T for each of the 6B model's four block shapes and its output layer: the bf16
packed path (glmkit.packed), then int8 and int4 (group 128 / 32) through torch's kernels ("cpu") and through
glmkit's VNNI kernels ("vnni"), in interleaved rounds. Each timing cycles through enough copies of the weight
to exceed the CPU's caches, so it reads memory as a decode step does; it reports milliseconds and the share
of the bandwidth roofline (weight bytes / the streaming read bandwidth, measured first with the same threads).
`rows` times one layer (in cache: compute) from 1 to 256 rows for every kernel, which is how
kernels.choose was decided. `overhead` times a decode step of a 28-layer model with tiny matrices:
what a token costs beyond reading the weights. `quality` compares a float model with its int8 / int4
versions on held-out text: perplexity and the largest logit difference.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from glmkit.config import ModelConfig
from glmkit.packed import PackedLinear
from glmkit.quant import (
    Int4Linear,
    Int8Linear,
    QuantConfig,
    Scheme,
    kernels,
    quantize_model,
)

# (name, in_features K, out_features N) of ChatGLM3-6B's linears
SHAPES_6B = [("qkv", 4096, 4608), ("dense", 4096, 4096), ("h_to_4h", 4096, 27392), ("4h_to_h", 13696, 4096),
             ("output", 4096, 65024)]
CACHE_BYTES = 600 * 2**20  # cycle through more weight bytes than this: past L2 and the (large, shared) L3


def best_ms(fn, repeats: int = 7) -> float:
    """Median-of-best: the median of the fastest half of `repeats` runs, in ms (a shared machine is noisy)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 4] * 1e3


def make_layers(kind: str, k: int, n: int, copies: int) -> list[torch.nn.Module]:
    """`copies` layers of one kind with random weights, made straight in their format (no float copy)."""
    layers = []
    for i in range(copies):
        if kind == "bf16":
            linear = torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16, device="meta")
            linear.weight = torch.nn.Parameter(torch.empty(n, k, dtype=torch.bfloat16).uniform_(-0.02, 0.02))
            layers.append(PackedLinear(linear))
            continue
        bits, group = (8, 0) if kind == "int8" else (4, int(kind.split("g")[1]))
        cls = Int8Linear if bits == 8 else Int4Linear
        layer = cls(k, n, False, Scheme(bits, group, True), torch.bfloat16)
        if bits == 8:
            layer.weight.random_(-127, 128)
            layer.scales.fill_(0.001)
        else:
            layer.weight.random_(0, 256)
            layer.scales_and_zeros.zero_()[..., 0] = 0.001
        layers.append(layer)
    return layers


def weight_bytes(layer) -> int:
    if isinstance(layer, PackedLinear):
        return layer.in_features * layer.out_features * 2
    return sum(b.nbytes for b in layer.buffers() if b is not None)


# The columns of `kernels`: glmkit.packed's bf16 path, then per format torch's kernel ("cpu") and glmkit's ("vnni").
KERNEL_COLUMNS = [("bf16", "auto"), ("int8", "cpu"), ("int8", "vnni"), ("int4-g128", "cpu"), ("int4-g128", "vnni"),
                  ("int4-g32", "cpu"), ("int4-g32", "vnni")]


def layer_pool(kind: str, k: int, n: int) -> list[torch.nn.Module]:
    """Enough layers of one kind to exceed the caches, so that each call reads memory as a decode step does."""
    first = make_layers(kind, k, n, 1)[0]
    return [first, *make_layers(kind, k, n, max(2, math.ceil(CACHE_BYTES / weight_bytes(first))) - 1)]


def time_pool(pool: list[torch.nn.Module], kernel: str, x: torch.Tensor) -> float:
    """ms per call of x through the layers of `pool` in turn, with `kernel` forced (auto for bf16)."""
    for layer in pool:
        if not isinstance(layer, PackedLinear):
            layer.kernel = kernel
    state = {"i": 0}

    def step():
        pool[state["i"] % len(pool)](x)
        state["i"] += 1

    with torch.inference_mode():
        return best_ms(step, repeats=max(7, 2 * len(pool)))


def cmd_kernels(args) -> None:
    """One row through each 6B shape: ms per call and the share of the bandwidth roofline (weight bytes / read
    bandwidth, measured with the same threads). Columns and the bandwidth are timed in interleaved rounds and
    the best of each is kept, so that a round disturbed by other work on the machine does not count."""
    from glmkit.commands.bench import read_bandwidth

    columns = [c for c in KERNEL_COLUMNS if c[1] != "vnni" or kernels.cpu_kernels.available()]
    wanted = SHAPES_6B if args.shapes is None else args.shapes.split(",")
    shapes = [s for s in SHAPES_6B if s in wanted or s[0] in wanted]
    for threads in args.threads:
        torch.set_num_threads(threads)
        bandwidth, best, nbytes = 0.0, {}, {}
        for name, k, n in shapes:
            pools = {kind: layer_pool(kind, k, n) for kind in dict.fromkeys(kind for kind, _ in columns)}
            nbytes.update({(name, kind): weight_bytes(pool[0]) for kind, pool in pools.items()})
            x = torch.randn(1, k).bfloat16()
            for _ in range(args.rounds):
                bandwidth = max(bandwidth, read_bandwidth(1.0, repeats=1))
                for kind, kernel in columns:
                    ms = time_pool(pools[kind], kernel, x)
                    best[name, kind, kernel] = min(best.get((name, kind, kernel), float("inf")), ms)
            print(f"  {name} measured", file=sys.stderr, flush=True)
            del pools
        print(f"\n{threads} thread(s), read bandwidth {bandwidth / 1e9:.1f} GB/s (best of {len(shapes) * args.rounds}): "
              f"ms per call (share of the roofline), one row, best of {args.rounds} rounds")
        print(f"{'shape (N x K)':<24}" + "".join(f"{kind + ' ' + kernel:>17}" for kind, kernel in columns))
        totals = dict.fromkeys(columns, 0.0)
        for name, k, n in shapes:
            cells = []
            for kind, kernel in columns:
                ms = best[name, kind, kernel]
                totals[kind, kernel] += ms * (28 if name != "output" else 1)
                cells.append(f"{ms:>8.2f} ({nbytes[name, kind] / bandwidth * 1e3 / ms:>4.0%})")
            print(f"{name + f' {n}x{k}':<24}" + "".join(f"{c:>17}" for c in cells), flush=True)
        if len(shapes) == len(SHAPES_6B):
            print(f"{'6B token, weights only':<24}" + "".join(f"{totals[c]:>11.0f} ms   " for c in columns))


def cmd_rows(args) -> None:
    """Rows per call where the float32 path overtakes the integer kernels (and how it fares against bf16).
    One layer of each kind (in cache: this is about compute); the best of 3 interleaved rounds."""
    torch.set_num_threads(args.threads[0])
    k, n = 4096, 4608
    layers = {kind: make_layers(kind, k, n, 1)[0] for kind in ("bf16", "int8", "int4-g128")}
    columns = [("bf16", "auto"), ("int8", "vnni"), ("int8", "cpu"), ("int8", "float32"), ("int4-g128", "vnni"),
               ("int4-g128", "cpu"), ("int4-g128", "float32")]
    columns = [c for c in columns if c[1] != "vnni" or kernels.cpu_kernels.available()]
    if kernels.cpu_kernels.available() and torch.ops.glmkit_cpu.amx_usable():  # the AVX-512 paths, for comparison
        columns += [("int8", "vnni no AMX"), ("int4-g128", "vnni no AMX")]
    print(f"x (rows, {k}) @ ({n}, {k}).T, ms per call, {args.threads[0]} thread(s); bf16 is glmkit.packed")
    print(f"{'rows':>6}" + "".join(f"{kind + ' ' + kernel:>22}" for kind, kernel in columns))
    with torch.inference_mode():
        for rows in args.rows:
            x = torch.randn(rows, k).bfloat16()
            best = dict.fromkeys(columns, float("inf"))
            for _ in range(3):
                for kind, kernel in columns:
                    layer = layers[kind]
                    call = lambda layer=layer, x=x: layer(x)  # noqa: E731
                    if kernel == "vnni no AMX":
                        vnni = kernels.vnni_int8 if kind == "int8" else kernels.vnni_int4
                        call = lambda layer=layer, x=x, vnni=vnni: vnni(layer, x, amx=False)  # noqa: E731
                    elif kind != "bf16":
                        layer.kernel = kernel
                    best[kind, kernel] = min(best[kind, kernel], best_ms(call, repeats=3))
            print(f"{rows:>6}" + "".join(f"{best[c]:>22.2f}" for c in columns), flush=True)


class _NoMatmul(torch.nn.Module):
    """Stands in for a linear: returns zeros of the right shape at once, so only the rest is timed."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


def cmd_overhead(args) -> None:
    """A decode step of the 6B shape with every linear replaced by `_NoMatmul`: attention over the cache,
    norms, rotary, the cache writes and Python, i.e. what a token costs beyond reading the weights."""
    from glmkit.model import ChatGLMForCausalLM

    torch.set_num_threads(args.threads[0])
    config = ModelConfig.preset("chatglm3-6b")
    with torch.device("meta"):
        model = ChatGLMForCausalLM(config)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(parent, name, _NoMatmul(child.out_features))
    model.transformer.embedding.word_embeddings = torch.nn.Embedding(config.padded_vocab_size, 1, device="meta")
    model.to_empty(device="cpu")
    model.transformer.embedding.word_embeddings = _Embedding(config.hidden_size)
    for p in model.parameters():
        p.data = torch.ones_like(p, dtype=torch.bfloat16)
    model.eval()
    for cached in (256, 1024):
        cache = model.new_kv_cache(1, cached + 64)
        with torch.inference_mode():
            model(torch.zeros(1, cached, dtype=torch.long), kv_cache=cache)
            token = torch.tensor([[1]])

            def step(token=token, cache=cache):
                model(token, kv_cache=cache, last_only=True)
                cache.length -= 1  # keep the cache length fixed

            ms = best_ms(step, repeats=21)
        print(f"{ms:.2f} ms per decode step beyond the matrix products (6B shape, {cached} tokens cached, "
              f"{args.threads[0]} thread(s))")


class _Embedding(torch.nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1, hidden, dtype=torch.bfloat16))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight.expand(*ids.shape, -1)


def cmd_quality(args) -> None:
    """Perplexity of a float model and its quantized versions on held-out text; max logit difference."""
    from glmkit.loader import load_model
    from glmkit.tokenizer import load_tokenizer

    if args.model:
        folder = Path(args.model)
        float_model = load_model(folder, dtype=torch.float32)
        tokenizer = load_tokenizer(folder)
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny import real_tokenizer, tiny_model

        float_model, tokenizer = tiny_model(0), real_tokenizer()
    text = Path(args.text).read_text(encoding="utf-8")
    ids = torch.tensor([[tokenizer.token_id("[gMASK]"), tokenizer.token_id("sop")] + tokenizer.encode(text)])
    ids = ids[:, :min(ids.shape[1], args.max_tokens, float_model.config.seq_length)]
    with torch.inference_mode():
        reference = float_model(ids).float()
    print(f"{ids.shape[1]} tokens of {args.text}; model: {args.model or 'tiny (random weights)'}")
    print(f"{'weights':<34}{'perplexity':>12}{'max |logit diff|':>18}{'of max |logit|':>16}")
    print(f"{'float32':<34}{perplexity(reference, ids):>12.3f}{0:>18.4f}{0:>15.2%}")
    for quant in (QuantConfig("int8"), QuantConfig("int4", 32), QuantConfig("int4", 64), QuantConfig("int4", 128),
                  QuantConfig("int4", 32, output="int4")):
        try:
            model = quantize_model(_copy(float_model), quant, torch.float32)
        except ValueError as e:
            print(f"{_label(quant):<34} skipped: {e}")
            continue
        # "reference": the weights' quantization alone, in float32; "vnni": plus inputs rounded to int8 per 32
        for kernel in ("reference", "vnni") if kernels.cpu_kernels.available() else ("reference",):
            for module in model.modules():
                if isinstance(module, (Int8Linear, Int4Linear)):
                    module.kernel = kernel
            with torch.inference_mode():
                logits = model(ids).float()
            diff = (logits - reference).abs().max().item()
            label = _label(quant) + (", vnni" if kernel == "vnni" else "")
            print(f"{label:<34}{perplexity(logits, ids):>12.3f}{diff:>18.4f}{diff / reference.abs().max().item():>15.2%}")


def _label(quant: QuantConfig) -> str:
    group = "per row" if quant.group_size == 0 else f"g{quant.group_size}"
    return f"{quant.mode} {group}, output {quant.output}"


def _copy(model):
    import copy

    return copy.deepcopy(model)


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    return math.exp(loss.item())


def cmd_full(args) -> None:
    """The issue's comparison in one run: `glmkit bench --shape chatglm3-6b` (bf16 / int8 / int4, random
    weights) and transformers' GlmForCausalLM in bf16 (bench_engine.py's run, from its random float16
    checkpoint, written once to bench-out/), each in its own process."""
    import json
    import subprocess

    import bench_engine

    threads = str(args.threads[0])
    report = ROOT / "bench-out" / "bench_quant_full.json"
    report.parent.mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-m", "glmkit.cli", "bench", "--shape", "chatglm3-6b", "--prompt",
                    str(args.prompt), "--new", str(args.new), "--threads", threads, "--json", str(report)],
                   cwd=ROOT, check=True)
    ckpt = ROOT / "bench-out" / "chatglm3-6b-random-fp16"
    bench_engine.write_checkpoint(ModelConfig.preset("chatglm3-6b"), ckpt)
    child = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_engine.py"), "--child", "transformers",
                            "--ckpt", str(ckpt), "--prompt", str(args.prompt), "--new", str(args.new),
                            "--threads", threads], cwd=ROOT, capture_output=True, text=True, check=True)
    hf = json.loads(next(line for line in child.stdout.splitlines() if line.startswith("RESULT "))[7:])
    hf_decode = hf["decode_steps"] / hf["decode_s"]
    ours = json.loads(report.read_text())["results"]
    print(f"\ntransformers GlmForCausalLM bf16: prefill {args.prompt / hf['prefill_s']:.2f} tok/s, decode "
          f"{hf_decode:.3f} tok/s, peak RSS {hf['peak_rss'] / 1e9:.2f} GB")
    for mode, r in ours.items():
        print(f"glmkit {mode} decode / transformers bf16 decode: {r['decode_tok_s'] / hf_decode:.2f}x")


def cmd_load(args) -> None:
    """How long a quantized checkpoint takes to load: `--model DIR`, or (written once to bench-out/) the random
    int4 ChatGLM3-6B. Timed in a fresh process: `load_model`, then the first forward (which pages the weights
    in from a memory-mapped file), and the peak RSS after each."""
    import subprocess

    folder = Path(args.model) if args.model else ROOT / "bench-out" / "chatglm3-6b-random-int4"
    if not (folder / "config.json").exists():
        from glmkit.commands.bench import random_model
        from glmkit.loader import save_model

        save_model(random_model(ModelConfig.preset("chatglm3-6b"), QuantConfig("int4", None)), folder)
    probe = ("import time, torch; from glmkit.loader import load_model; from glmkit.commands.bench import peak_rss; "
             f"t = time.perf_counter(); m = load_model({str(folder)!r}); load = time.perf_counter() - t; "
             "rss = peak_rss(); t = time.perf_counter(); m(torch.tensor([[1, 2, 3]])); first = time.perf_counter() - t; "
             "print(f'load_model {load:.1f} s (peak RSS {rss / 1e9:.2f} GB), first forward {first:.1f} s "
             "(peak RSS {peak_rss() / 1e9:.2f} GB)')")
    subprocess.run([sys.executable, "-c", probe], cwd=ROOT, check=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["kernels", "rows", "overhead", "quality", "full", "load"])
    p.add_argument("--threads", default=str(torch.get_num_threads()),
                   type=lambda s: [int(t) for t in s.split(",")], help="comma-separated thread counts")
    p.add_argument("--model", default=None, help="quality: a float checkpoint (default: the tiny random model); "
                   "load: a quantized checkpoint (default: a random int4 6B one, written once)")
    p.add_argument("--text", default=str(ROOT / "README.md"), help="quality: the held-out text")
    p.add_argument("--max-tokens", type=int, default=1024, help="quality: tokens of the text to score")
    p.add_argument("--prompt", type=int, default=256, help="full: prompt tokens")
    p.add_argument("--new", type=int, default=32, help="full: tokens decoded")
    p.add_argument("--rows", default=[1, 2, 4, 8, 16, 32, 48, 64, 128, 256],
                   type=lambda s: [int(r) for r in s.split(",")], help="rows: comma-separated row counts")
    p.add_argument("--rounds", type=int, default=3, help="kernels: interleaved rounds per shape (best is kept)")
    p.add_argument("--shapes", default=None, help="kernels: comma-separated subset of " +
                   ",".join(name for name, _, _ in SHAPES_6B))
    args = p.parse_args()
    print(f"torch {torch.__version__}; int4 checkpoint layout native to the CPU kernel: "
          f"{kernels.cpu_int4_layout_is_native()}")
    commands = {"kernels": cmd_kernels, "rows": cmd_rows, "overhead": cmd_overhead, "quality": cmd_quality,
                "full": cmd_full, "load": cmd_load}
    commands[args.what](args)


if __name__ == "__main__":
    main()
