"""glmkit against transformers' GlmForCausalLM at the full ChatGLM3-6B shape, random weights.

One run: measure the memory read bandwidth; write (once, cached) a random float16 checkpoint in the
official layout (7 `.bin` shards + index, about 12.5 GB); then, each in its own process so that peak
memory is its own, load it and time a 256-token prefill and 64 greedy decode steps:
  - glmkit: `glmkit.load_model(dir, dtype=bfloat16)` (what a user runs);
  - transformers: `GlmForCausalLM` built on the meta device with the same weights, bfloat16, SDPA.
Prints one table with the roofline (weight bytes read per token / measured bandwidth).

    python benchmarks/bench_engine.py [--prompt 256] [--new 64] [--threads 2] [--ckpt DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from glmkit.commands.bench import peak_rss, read_bandwidth  # noqa: E402
from glmkit.config import ModelConfig  # noqa: E402


def write_checkpoint(config: ModelConfig, out: Path, num_shards: int = 7, seed: int = 0) -> None:
    """A random float16 checkpoint in the official layout: pytorch_model-0000N-of-0000M.bin + index."""
    if (out / "pytorch_model.bin.index.json").exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    with torch.device("meta"):
        from glmkit.model import ChatGLMForCausalLM
        shapes = {k: v.shape for k, v in ChatGLMForCausalLM(config).state_dict().items()}
    total = sum(s.numel() for s in shapes.values()) * 2
    per_shard, shard, size, weight_map, n = total / num_shards, {}, 0, {}, 1

    def flush():
        nonlocal shard, size, n
        name = f"pytorch_model-{n:05d}-of-{num_shards:05d}.bin"
        torch.save(shard, out / name)
        weight_map.update({k: name for k in shard})
        shard, size, n = {}, 0, n + 1

    for key, shape in shapes.items():
        if key.endswith("layernorm.weight"):
            t = 1 + 0.1 * torch.randn(shape)
        elif key.endswith(".bias"):
            t = 0.02 * torch.randn(shape)
        else:
            t = torch.randn(shape) * (shape[-1] ** -0.5)
        shard[key] = t.half()
        size += t.numel() * 2
        if size >= per_shard and n < num_shards:
            flush()
    rd = config.rotary_dim
    shard["transformer.rotary_pos_emb.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, rd, 2).float() / rd)
    flush()
    (out / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save_json(out / "config.json")


def time_run(step, prompt: torch.Tensor, new_tokens: int) -> dict:
    """step(ids, first) -> next token id; returns prefill and decode seconds."""
    with torch.inference_mode():
        t0 = time.perf_counter()
        tok = step(prompt, True)
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            tok = step(tok, False)
        t2 = time.perf_counter()
    return {"prefill_s": t1 - t0, "decode_s": t2 - t1, "decode_steps": new_tokens - 1}


def run_glmkit(ckpt: Path, prompt: torch.Tensor, new_tokens: int) -> dict:
    from glmkit.loader import load_model
    from glmkit.packed import pack_linears

    t = time.perf_counter()
    model = load_model(ckpt, dtype=torch.bfloat16)
    load_s = time.perf_counter() - t
    pack_linears(model)
    ready_s = time.perf_counter() - t
    cache = model.new_kv_cache(1, prompt.shape[1] + new_tokens)

    def step(ids, first):
        return model(ids, kv_cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)

    return {"load_s": load_s, "ready_s": ready_s, **time_run(step, prompt, new_tokens)}


def run_transformers(ckpt: Path, prompt: torch.Tensor, new_tokens: int) -> dict:
    from transformers import DynamicCache, GlmForCausalLM

    from glmkit.loader import load_model
    from tests.reference import glm_config, to_glm_state_dict

    t = time.perf_counter()
    ours = load_model(ckpt, dtype=torch.bfloat16)  # the same weights, read by the same reader
    config = ours.config
    state = ours.state_dict()
    del ours
    hf_config = glm_config(config, "sdpa")
    with torch.device("meta"):
        model = GlmForCausalLM(hf_config)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=hf_config)  # its buffers are derived
    mapped = {k: v for k, v in to_glm_state_dict(state, config, copy=False).items()}
    del state
    model.load_state_dict(mapped, assign=True, strict=True)
    del mapped
    model.eval()
    load_s = time.perf_counter() - t
    cache = DynamicCache()

    def step(ids, first):
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        return logits[:, -1].argmax(-1, keepdim=True)

    return {"load_s": load_s, "ready_s": load_s, **time_run(step, prompt, new_tokens)}


def child(args) -> None:
    torch.set_num_threads(args.threads)
    prompt = torch.randint(0, 64789, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    run = run_glmkit if args.child == "glmkit" else run_transformers
    result = run(Path(args.ckpt), prompt, args.new)
    result["peak_rss"] = peak_rss()
    print("RESULT " + json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--shape", default="chatglm3-6b")
    p.add_argument("--ckpt", default=str(ROOT / "bench-out" / "chatglm3-6b-random-fp16"))
    p.add_argument("--only", choices=["glmkit", "transformers"], action="append")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    torch.set_num_threads(args.threads)
    config = ModelConfig.preset(args.shape)
    bandwidth = read_bandwidth(4.0)
    t = time.perf_counter()
    write_checkpoint(config, Path(args.ckpt))
    print(f"checkpoint ready at {args.ckpt} ({time.perf_counter() - t:.0f} s)", flush=True)
    weight_bytes = config.num_parameters() * 2
    read_per_token = config.num_parameters(include_embedding=False) * 2
    roofline = bandwidth / read_per_token

    results = {}
    for name in args.only or ["glmkit", "transformers"]:
        cmd = [sys.executable, __file__, "--child", name, "--ckpt", args.ckpt, "--prompt", str(args.prompt),
               "--new", str(args.new), "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode or not line:
            sys.exit(f"{name} run failed:\n{out.stdout}\n{out.stderr}")
        results[name] = json.loads(line[0][7:])
        print(name, results[name], flush=True)

    print(f"\nmachine: {os.cpu_count()} cores, {args.threads} threads, torch {torch.__version__}; "
          f"read bandwidth {bandwidth / 1e9:.1f} GB/s; bf16 weights {weight_bytes / 1e9:.2f} GB; "
          f"decode roofline {roofline:.2f} tok/s")
    print(f"{'engine':<13}{'load s':>8}{'prefill tok/s':>15}{'decode tok/s':>14}{'of roofline':>13}"
          f"{'peak RSS GB':>13}{'RSS/weights':>13}")
    for name, r in results.items():
        decode = r["decode_steps"] / r["decode_s"]
        print(f"{name:<13}{r['load_s']:>8.1f}{args.prompt / r['prefill_s']:>15.2f}{decode:>14.3f}"
              f"{decode / roofline:>12.0%}{r['peak_rss'] / 1e9:>13.2f}{r['peak_rss'] / weight_bytes:>13.2f}")
    if len(results) == 2:
        a, b = results["glmkit"], results["transformers"]
        print(f"glmkit / transformers: prefill {b['prefill_s'] / a['prefill_s']:.2f}x, decode "
              f"{(b['decode_s'] / b['decode_steps']) / (a['decode_s'] / a['decode_steps']):.2f}x")


if __name__ == "__main__":
    main()
