"""Measure a model's speed and memory in bf16, int8 and int4: prefill, decode, first token, peak RSS.

    glmkit bench --shape chatglm3-6b                 # random weights of ChatGLM3-6B's shape
    glmkit bench --model THUDM/chatglm3-6b --modes int4 --prompt 512 --new 64

Each mode runs in a process of its own (so peak memory is its own): it loads the model (a progress bar
shows on stderr), feeds a prompt of random token ids, then decodes greedily with the KV cache, and
reports load time, time to first token, prefill and decode tokens/s, and peak RSS. The decode speed is
set against the memory-bandwidth roofline: tokens/s <= read bandwidth / bytes of weights read per token.
A shared machine's bandwidth drifts from minute to minute, so the bandwidth (a streaming float32 sum over
2 GiB) is measured in the same process, in rounds interleaved with the decode rounds, and the best round
of each is set against the other. Peak RSS is taken before the bandwidth buffer exists.

With --shape the weights are random and are made layer by layer straight in the mode's format (random
integers and scales for int8 / int4), so no float copy of the model is ever built; with --model a float
checkpoint is quantized while it is read, and a quantized checkpoint is benchmarked in its own mode.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from . import CommandError

MODES = ("bf16", "int8", "int4")


def add_args(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", "-m", metavar="PATH_OR_ID", help="a checkpoint folder or Hugging Face Hub id")
    source.add_argument("--shape", metavar="NAME", help="random weights of a named shape, e.g. chatglm3-6b or tiny")
    parser.add_argument("--modes", default=None, type=_modes, metavar="LIST",
                        help="comma-separated, of bf16, int8, int4 (default: all three; a quantized "
                             "checkpoint's own mode)")
    parser.add_argument("--prompt", type=int, default=256, metavar="N", help="prompt tokens (default: 256)")
    parser.add_argument("--new", type=int, default=32, metavar="N", help="tokens to decode per round (default: 32)")
    parser.add_argument("--rounds", type=int, default=3, metavar="N",
                        help="decode rounds, each after a bandwidth reading; the best counts (default: 3)")
    parser.add_argument("--group-size", type=int, default=None, metavar="G",
                        help="int4 inputs per scale (default: 128; int8 uses one scale per output row)")
    parser.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads (default: one per core)")
    parser.add_argument("--bandwidth-gib", type=float, default=2.0, metavar="GIB",
                        help="size of the buffer read to measure the bandwidth (default: 2; more than the caches)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one mode, in its own process


def _modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise argparse.ArgumentTypeError(f"modes must be among {', '.join(MODES)}, got {text!r}")
    return modes


def main(args: argparse.Namespace) -> int:
    if args.prompt < 1 or args.new < 2 or args.rounds < 1:
        raise CommandError("--prompt and --rounds must be at least 1, --new at least 2")
    if args.threads is not None and args.threads < 1:
        raise CommandError(f"--threads {args.threads} must be at least 1")
    if args.child:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return 0
    modes = args.modes or _default_modes(args)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    if args.bandwidth_gib <= 0:
        raise CommandError(f"--bandwidth-gib {args.bandwidth_gib} must be positive")
    print(f"{threads} threads; torch {torch.__version__}", flush=True)
    results = {mode: _spawn(args, mode, threads) for mode in modes}
    print(format_table(results, args.prompt))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"threads": threads, "prompt": args.prompt, "new": args.new, "rounds": args.rounds,
                       "results": results}, f, indent=2)
    return 0


def _default_modes(args: argparse.Namespace) -> list[str]:
    if args.model is None:
        return list(MODES)
    from glmkit.config import ModelConfig
    from glmkit.loader import CONFIG, resolve_model_dir
    from glmkit.quant.checkpoint import CONFIG_KEY

    try:
        config = ModelConfig.from_json(resolve_model_dir(args.model) / CONFIG)
    except (OSError, ValueError) as e:
        raise CommandError(f"cannot read {args.model!r}: {e}") from None
    recorded = config.extra.get(CONFIG_KEY)
    return [recorded["mode"]] if isinstance(recorded, dict) and "mode" in recorded else list(MODES)


def _spawn(args: argparse.Namespace, mode: str, threads: int) -> dict:
    """Run one mode in a child process; its progress bar goes to our stderr, its result comes back."""
    cmd = [sys.executable, "-m", "glmkit.cli", "bench", "--child", mode, "--prompt", str(args.prompt),
           "--new", str(args.new), "--rounds", str(args.rounds), "--threads", str(threads),
           "--bandwidth-gib", str(args.bandwidth_gib)]
    cmd += ["--model", args.model] if args.model else ["--shape", args.shape]
    if args.group_size is not None:
        cmd += ["--group-size", str(args.group_size)]
    child = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    lines = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
    if child.returncode or not lines:
        raise CommandError(f"the {mode} run failed (exit status {child.returncode}):\n{child.stdout}")
    result = json.loads(lines[-1][len("RESULT "):])
    print(f"{mode}: loaded in {result['load_s']:.1f} s, decode {result['decode_tok_s']:.2f} tok/s, read bandwidth "
          f"{result['bandwidth'] / 1e9:.1f} GB/s", flush=True)
    return result


def read_bandwidth(gib: float = 2.0, repeats: int = 3, buffer=None) -> float:
    """Bytes per second of a streaming float32 read (`sum`) of `gib` GiB (or of `buffer`), best of `repeats`."""
    import torch

    x = torch.ones(int(gib * 2**30) // 4) if buffer is None else buffer
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


def format_table(results: dict[str, dict], prompt: int) -> str:
    head = (f"{'mode':<6}{'load s':>8}{'TTFT s':>9}{'prefill tok/s':>15}{'decode tok/s':>14}"
            f"{'GB/token':>10}{'GB/s':>7}{'roofline':>10}{'of roofline':>13}{'peak RSS GB':>13}")
    rows = [head]
    for mode, r in results.items():
        rows.append(f"{mode:<6}{r['load_s']:>8.1f}{r['ttft_s']:>9.2f}{prompt / r['ttft_s']:>15.2f}"
                    f"{r['decode_tok_s']:>14.2f}{r['bytes_per_token'] / 1e9:>10.2f}{r['bandwidth'] / 1e9:>7.1f}"
                    f"{r['roofline_tok_s']:>10.2f}{r['decode_tok_s'] / r['roofline_tok_s']:>12.0%}"
                    f"{r['peak_rss'] / 1e9:>13.2f}")
    return "\n".join(rows)


# ---- one mode, in the child process ---------------------------------------------------------------------

def run_one(args: argparse.Namespace) -> dict:
    import torch

    from glmkit import cpu_kernels

    if args.threads:
        torch.set_num_threads(args.threads)
    cpu_kernels.available()  # built once per machine (or loaded) before any clock starts
    start = time.perf_counter()
    model = _load(args)
    load_s = time.perf_counter() - start
    vocab = min(model.config.padded_vocab_size, 64789)  # ordinary SentencePiece pieces only
    prompt = torch.randint(0, vocab, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    bandwidth, decode_s, peak = 0.0, float("inf"), 0
    with torch.inference_mode():
        cache = model.new_kv_cache(1, args.prompt + args.rounds * args.new)
        start = time.perf_counter()
        token = model(prompt, kv_cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
        ttft_s = time.perf_counter() - start
        buffer = None
        for _ in range(args.rounds):
            start = time.perf_counter()
            for _ in range(args.new - 1):
                token = model(token, kv_cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
            decode_s = min(decode_s, time.perf_counter() - start)
            if buffer is None:
                peak = peak_rss()  # the model's own peak, before the bandwidth buffer
                buffer = torch.ones(int(args.bandwidth_gib * 2**30) // 4)
            bandwidth = max(bandwidth, read_bandwidth(buffer=buffer))
    steps = args.new - 1
    bytes_per_token = weight_bytes_per_token(model)
    return {"mode": args.child, "load_s": load_s, "ttft_s": ttft_s, "decode_tok_s": steps / decode_s,
            "bytes_per_token": bytes_per_token, "bandwidth": bandwidth, "roofline_tok_s": bandwidth / bytes_per_token,
            "peak_rss": peak, "threads": torch.get_num_threads()}


def peak_rss() -> int:
    """This process's peak resident memory in bytes. Linux's VmHWM, because getrusage's ru_maxrss carries
    the parent's peak over fork and exec."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _load(args: argparse.Namespace):
    import torch

    from glmkit.packed import pack_linears
    from glmkit.quant import QuantConfig, QuantizedChatGLMForCausalLM

    mode = args.child
    quant = None if mode == "bf16" else QuantConfig(mode, args.group_size if mode == "int4" else None)
    try:
        if args.shape:
            from glmkit.config import ModelConfig

            model = random_model(ModelConfig.preset(args.shape), quant)
        else:
            from glmkit.loader import load_model

            # A quantized checkpoint is accepted in its own mode (and group size, when one is given).
            request = None if quant is None else (quant if args.group_size else mode)
            model = load_model(args.model, dtype=torch.bfloat16, quantize=request, progress=True)
            if quant is None and isinstance(model, QuantizedChatGLMForCausalLM):
                raise CommandError(f"{args.model} is a quantized checkpoint ({model.quant_config.mode}): benchmark "
                                   f"it with --modes {model.quant_config.mode}")
    except (OSError, ValueError) as e:
        raise CommandError(f"cannot load the {mode} model: {e}") from None
    return pack_linears(model)  # the bf16 CPU fast path for what stays float


def random_model(config, quant, dtype=None, seed: int = 0):
    """A model of `config` with random weights, made tensor by tensor in its final format: bfloat16 for the
    float parts, random integers and scales for quantized layers (never a float copy of them)."""
    import torch

    from glmkit.loader import _progress_bar
    from glmkit.model import ChatGLMForCausalLM
    from glmkit.quant import quantize_model

    dtype = dtype or torch.bfloat16
    with torch.device("meta"):
        model = ChatGLMForCausalLM(config)
    if quant is not None:
        model = quantize_model(model, quant, dtype)
    else:
        model.to(dtype)
    generator = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    with _progress_bar(True, len(state), f"random {config.num_layers}-layer weights") as bar:
        for name, meta in state.items():
            model.load_state_dict({name: _random_tensor(name, meta, state, generator)}, strict=False, assign=True)
            bar.update(1)
    return model.eval()


def _random_tensor(name: str, meta, state: dict, generator):
    """Random values for one tensor, by its role: sane magnitudes so activations stay finite."""
    import torch

    shape, dtype = meta.shape, meta.dtype
    if dtype in (torch.int8, torch.uint8):
        low, high = (-127, 128) if dtype == torch.int8 else (0, 256)
        return torch.randint(low, high, shape, dtype=dtype, generator=generator)
    if name.endswith(("scales", "scales_and_zeros", "zeros")):
        out = torch.zeros(shape, dtype=dtype)  # zeros stay 0: symmetric-looking weights
        if not name.endswith(".zeros"):
            weight = state[name.rsplit(".", 1)[0] + ".weight"]  # int8 (N, K), int4 (blocks, K, 32)
            spread = 4.6 if weight.dtype == torch.uint8 else 73.0  # std of uniform int4 (q - 8) / int8 levels
            target = 1.0 if "word_embeddings" in name else weight.shape[1] ** -0.5
            (out[..., 0] if name.endswith("scales_and_zeros") else out).fill_(target / spread)
        return out
    if name.endswith("layernorm.weight"):
        return torch.ones(shape, dtype=dtype)
    fan_in = shape[-1] if len(shape) > 1 and "word_embeddings" not in name else 1
    bound = 0.02 if len(shape) == 1 else 3 ** 0.5 * fan_in ** -0.5  # uniform with std fan_in^-0.5
    return torch.empty(shape, dtype=dtype).uniform_(-bound, bound, generator=generator)


def weight_bytes_per_token(model) -> int:
    """Bytes of weights a decode step reads: every tensor but the input embedding, of which it reads a row."""
    from glmkit.packed import PackedLinear

    total = 0
    for name, module in model.named_modules():
        if name.endswith("word_embeddings"):
            continue
        if isinstance(module, PackedLinear):
            total += module.in_features * module.out_features * 2
            total += 0 if module.bias is None else module.bias.nbytes
            continue
        tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        total += sum(t.nbytes for t in tensors if t is not None)
    return total
