"""The continuous-batching engine against one-request-at-a-time generation, in one process.

A random-weight model of a mid-size shape (hidden 1024, 8 layers by default: big enough that the
model, not Python, is the cost), bf16 with `pack_linears` on a CPU. N greedy requests with prompts of
different lengths, each generating exactly --new tokens (no stop ids):
  - sequential: `glmkit.generate.generate` on each request in turn;
  - engine: all N added to one `LLMEngine` at once, stepped to completion.
Rounds alternate the two (the machine may be shared); the best round of each is reported, with
output tokens/s, the ratio, and how many replies are identical token for token (bf16 batched and
single-row kernels round differently, so an occasional greedy tie may break differently).

    python benchmarks/bench_serving_engine.py [--requests 16] [--prompt 64] [--new 64] [--rounds 2]
        [--hidden 1024] [--layers 8] [--threads 2] [--max-batched-tokens 2048] [--profile]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from glmkit.config import ModelConfig
from glmkit.engine import LLMEngine
from glmkit.generate import generate
from glmkit.model import ChatGLMForCausalLM
from glmkit.packed import pack_linears
from glmkit.sampling import SamplingParams
from glmkit.tokenizer import load_tokenizer

TOKENIZER = ROOT.parent / "shared/testdata/chatglm3/tokenizer.model"


def mid_size_model(hidden: int, layers: int, dtype: torch.dtype, seed: int = 0) -> ChatGLMForCausalLM:
    torch.manual_seed(seed)
    heads = hidden // 128
    config = dataclasses.replace(ModelConfig.preset("tiny"), num_layers=layers, hidden_size=hidden,
                                 ffn_hidden_size=hidden * 13696 // 4096, num_attention_heads=heads, kv_channels=128,
                                 multi_query_group_num=2, seq_length=4096)
    with torch.device("meta"):
        model = ChatGLMForCausalLM(config)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.normal_(0, 0.02)
            else:
                p.normal_(0, p.shape[-1] ** -0.5)
    model = model.to(dtype).eval()
    return pack_linears(model) if dtype == torch.bfloat16 else model


def make_prompts(n: int, length: int, vocab: int, seed: int = 1) -> list[list[int]]:
    """n prompts of lengths spread around `length` (0.5x to 1.5x), random ordinary ids."""
    g = torch.Generator().manual_seed(seed)
    lengths = [max(2, int(length * (0.5 + i / max(1, n - 1)))) for i in range(n)]
    return [[64790, 64792] + torch.randint(100, vocab, (m - 2,), generator=g).tolist() for m in lengths]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=64, help="mean prompt length")
    ap.add_argument("--new", type=int, default=64, help="tokens generated per request")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-batched-tokens", type=int, default=2048, help="prefill tokens per step (padded)")
    ap.add_argument("--profile", action="store_true", help="print where the engine's time goes")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    tok = load_tokenizer(TOKENIZER)
    model = mid_size_model(args.hidden, args.layers, getattr(torch, args.dtype))
    prompts = make_prompts(args.requests, args.prompt, 60000)
    params = SamplingParams(temperature=0, max_new_tokens=args.new, stop_token_ids=[])
    print(f"model: hidden {args.hidden}, {args.layers} layers, {args.dtype}, "
          f"{model.config.num_parameters() / 1e6:.0f}M parameters; {args.requests} requests, prompts "
          f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens, {args.new} new tokens each; "
          f"{args.threads} threads")
    generate(model, tok, prompts[0][:8], dataclasses.replace(params, max_new_tokens=4))  # warm up

    best_seq = best_eng = float("inf")
    for r in range(args.rounds):
        t = time.perf_counter()
        sequential = [generate(model, tok, p, params) for p in prompts]
        best_seq = min(best_seq, time.perf_counter() - t)

        engine = LLMEngine(model, tok, max_num_seqs=max(64, args.requests),
                           max_num_batched_tokens=args.max_batched_tokens)
        t = time.perf_counter()
        if args.profile and r == args.rounds - 1:
            import cProfile
            import pstats
            with cProfile.Profile() as prof:
                batched = engine.generate(prompts, params)
            pstats.Stats(prof).sort_stats("tottime").print_stats(15)
        else:
            batched = engine.generate(prompts, params)
        best_eng = min(best_eng, time.perf_counter() - t)
        same = sum(a.token_ids == b.token_ids for a, b in zip(sequential, batched))
        print(f"round {r + 1}: sequential {args.requests * args.new / best_seq:.1f} tok/s, "
              f"engine {args.requests * args.new / best_eng:.1f} tok/s; identical replies {same}/{args.requests}")

    tokens = args.requests * args.new
    print(f"\nsequential generate: {tokens / best_seq:7.1f} output tok/s ({best_seq:.2f} s)")
    print(f"LLMEngine, {args.requests} at once: {tokens / best_eng:7.1f} output tok/s ({best_eng:.2f} s)")
    print(f"ratio: {best_seq / best_eng:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
