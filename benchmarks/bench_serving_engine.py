"""The continuous-batching engine against one-request-at-a-time generation, in one process.

A random-weight model of a mid-size shape (hidden 1024, 8 layers by default: big enough that the
model, not Python, is the cost), bf16 with `pack_linears` on a CPU. N greedy requests with prompts of
different lengths, all arriving at once, each generating exactly --new tokens (no stop ids):
  - sequential: `glmkit.generate.generate_stream` on each request in turn;
  - engine: all N added to one `LLMEngine`, stepped to completion.
Rounds alternate the two (the machine may be shared); the best round of each is reported: output
tokens/s, the ratio, time to first token and inter-token latency p50/p99/max (what prompts' prefill
does to the others' next tokens shows in the ITL tail), and how many replies are identical token for
token (bf16 batched and single-row kernels round differently, so greedy near-ties of a random-weight
model may break differently). --profile prints torch.profiler's table of the engine's last round.

    python benchmarks/bench_serving_engine.py [--requests 16] [--prompt 64] [--new 64] [--rounds 2]
        [--hidden 1024] [--layers 8] [--threads 2] [--max-batched-tokens 512] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from glmkit.config import ModelConfig
from glmkit.engine import LLMEngine
from glmkit.engine.scheduler import DEFAULT_MAX_NUM_BATCHED_TOKENS
from glmkit.generate import generate, generate_stream
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


class Run:
    """One backend's round: each request's token ids and the times its tokens came, from a common start."""

    def __init__(self, n: int):
        self.start = time.perf_counter()
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.times: list[list[float]] = [[] for _ in range(n)]

    def add(self, i: int, token: int) -> None:
        self.tokens[i].append(token)
        self.times[i].append(time.perf_counter() - self.start)

    @property
    def wall(self) -> float:
        return max(t[-1] for t in self.times)

    def latencies_ms(self) -> dict[str, float]:
        ttft = [t[0] for t in self.times]
        itl = [b - a for t in self.times for a, b in itertools.pairwise(t)]
        q_ttft, q_itl = statistics.quantiles(ttft, n=100), statistics.quantiles(itl, n=100)
        return {"TTFT p50": 1e3 * statistics.median(ttft), "TTFT p99": 1e3 * q_ttft[98],
                "ITL p50": 1e3 * statistics.median(itl), "ITL p99": 1e3 * q_itl[98], "ITL max": 1e3 * max(itl)}


def run_sequential(model, tok, prompts, params) -> Run:
    run = Run(len(prompts))
    for i, prompt in enumerate(prompts):
        for delta in generate_stream(model, tok, prompt, params):
            if delta.token_id is not None:
                run.add(i, delta.token_id)
    return run


def run_engine(model, tok, prompts, params, max_batched_tokens: int) -> Run:
    engine = LLMEngine(model, tok, max_num_seqs=max(64, len(prompts)), max_num_batched_tokens=max_batched_tokens)
    index = {engine.add_request(p, params): i for i, p in enumerate(prompts)}
    run = Run(len(prompts))
    run.start = time.perf_counter()
    while engine.has_unfinished():
        for request_id, delta in engine.step():
            if delta.token_id is not None:
                run.add(index[request_id], delta.token_id)
    return run


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
    ap.add_argument("--max-batched-tokens", type=int, default=DEFAULT_MAX_NUM_BATCHED_TOKENS,
                    help="prompt tokens per step (default: the engine's)")
    ap.add_argument("--profile", action="store_true", help="print where the engine's time goes (torch.profiler)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    tok = load_tokenizer(TOKENIZER)
    model = mid_size_model(args.hidden, args.layers, getattr(torch, args.dtype))
    prompts = make_prompts(args.requests, args.prompt, 60000)
    params = SamplingParams(temperature=0, max_new_tokens=args.new, stop_token_ids=[])
    print(f"model: hidden {args.hidden}, {args.layers} layers, {args.dtype}, "
          f"{model.config.num_parameters() / 1e6:.0f}M parameters; {args.requests} requests, prompts "
          f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens, {args.new} new tokens each; "
          f"{args.threads} threads; engine: {args.max_batched_tokens} prompt tokens per step")
    generate(model, tok, prompts[0][:8], dataclasses.replace(params, max_new_tokens=4))  # warm up

    best: dict[str, Run] = {}
    for r in range(args.rounds):
        sequential = run_sequential(model, tok, prompts, params)
        profiling = args.profile and r == args.rounds - 1
        with torch.profiler.profile() if profiling else contextlib.nullcontext() as prof:
            batched = run_engine(model, tok, prompts, params, args.max_batched_tokens)
        if profiling:
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
        for name, run in (("sequential", sequential), ("engine", batched)):
            if name not in best or run.wall < best[name].wall:
                best[name] = run
        same = sum(a == b for a, b in zip(sequential.tokens, batched.tokens))
        print(f"round {r + 1}: sequential {args.requests * args.new / sequential.wall:.1f} tok/s, "
              f"engine {args.requests * args.new / batched.wall:.1f} tok/s; identical replies {same}/{args.requests}")

    tokens = args.requests * args.new
    print()
    for name, label in (("sequential", "sequential generate"), ("engine", f"LLMEngine, {args.requests} at once")):
        run = best[name]
        latencies = "  ".join(f"{k} {v:.0f} ms" for k, v in run.latencies_ms().items())
        print(f"{label:<24} {tokens / run.wall:7.1f} output tok/s ({run.wall:.2f} s)  {latencies}")
    print(f"ratio: {best['sequential'].wall / best['engine'].wall:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
