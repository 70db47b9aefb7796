"""`glmkit serve` under load: the batched engine against the sequential backend, in one run.

Writes (once, cached) a random-weight checkpoint of a mid-size shape (hidden 1024, 8 layers, the
real vocabulary: big enough that the model, not Python, is the cost), then for each backend starts
`glmkit serve --backend B --dtype bfloat16` in its own process and drives it over loopback HTTP with
concurrency 1, 4, 16, 64: each level sends max(concurrency, --min-requests) streaming
/v1/completions requests, `concurrency` at a time, each with a distinct prompt of about --prompt
tokens and exactly --new output tokens (`ignore_eos`). The raw completions endpoint streams one
chunk per token, so the client times every token. Reported per level: requests/s, output tokens/s,
time to first token p50/p99 and inter-token latency p50/p99, and the batched/sequential ratio of
output tokens/s.

    python benchmarks/bench_serving.py                       # the real run (minutes)
    python benchmarks/bench_serving.py --hidden 128 --layers 2 --new 8 --levels 1 4   # a quick check
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TOKENIZER = ROOT.parent / "shared/testdata/chatglm3/tokenizer.model"
WORDS = ("the model serves many users at once 模型 同时 服务 许多 用户 with a paged cache and "
         "continuous batching 分页 缓存 连续 批处理").split()


def write_checkpoint(folder: Path, hidden: int, layers: int, seed: int = 0) -> Path:
    """A random-weight checkpoint of the mid-size shape with the real tokenizer; reused when present."""
    if (folder / "config.json").exists():
        return folder
    import torch

    from glmkit.config import ModelConfig
    from glmkit.loader import save_model
    from glmkit.model import ChatGLMForCausalLM

    heads = max(2, hidden // 128)  # 128-dim heads as ChatGLM3's, in 2 KV groups
    config = dataclasses.replace(ModelConfig.preset("tiny"), num_layers=layers, hidden_size=hidden,
                                 ffn_hidden_size=hidden * 13696 // 4096, num_attention_heads=heads,
                                 kv_channels=hidden // heads, multi_query_group_num=2, seq_length=4096)
    torch.manual_seed(seed)
    model = ChatGLMForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0, p.shape[-1] ** -0.5)
    save_model(model.to(torch.bfloat16), folder)
    shutil.copyfile(TOKENIZER, folder / "tokenizer.model")
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: Path, backend: str, port: int, threads: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    process = subprocess.Popen(
        [sys.executable, "-m", "glmkit.cli", "serve", "--model", str(checkpoint), "--backend", backend,
         "--port", str(port), "--dtype", "bfloat16", "--max-num-seqs", "64", "--log-level", "warning"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            sys.exit(f"the {backend} server did not start:\n{process.stderr.read()}")
        time.sleep(0.5)


def prompt_text(i: int, words: int) -> str:
    return f"{i}: " + " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(words))


async def one_request(client: httpx.AsyncClient, model: str, prompt: str, new: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": new, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    times, usage = [], None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                usage = chunk["usage"]
            elif chunk["choices"] and chunk["choices"][0]["finish_reason"] is None:
                times.append(time.perf_counter())  # one chunk per generated token
    tokens = usage["completion_tokens"]
    if tokens != new or len(times) != new:
        raise RuntimeError(f"expected {new} tokens, got {tokens} ({len(times)} token chunks)")
    return {"ttft": times[0] - sent, "itl": [b - a for a, b in zip(times, times[1:])], "tokens": tokens}


async def run_level(url: str, model: str, concurrency: int, requests: int, prompt_words: int, new: int,
                    offset: int) -> dict:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(offset + i)
    results = []
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(1800), limits=limits) as client:
        async def worker():
            while not queue.empty():
                i = queue.get_nowait()
                results.append(await one_request(client, model, prompt_text(i, prompt_words), new))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ttft = sorted(r["ttft"] for r in results)
    itl = sorted(x for r in results for x in r["itl"])
    return {"concurrency": concurrency, "requests": len(results), "wall_s": wall,
            "requests_per_s": len(results) / wall, "output_tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "ttft_p50_ms": 1000 * percentile(ttft, 50), "ttft_p99_ms": 1000 * percentile(ttft, 99),
            "itl_p50_ms": 1000 * percentile(itl, 50), "itl_p99_ms": 1000 * percentile(itl, 99)}


def percentile(sorted_values: list[float], p: float) -> float:
    """The nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return float("nan")
    return sorted_values[max(0, min(len(sorted_values), math.ceil(p / 100 * len(sorted_values))) - 1)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--prompt", type=int, default=64, help="about this many prompt tokens per request")
    p.add_argument("--new", type=int, default=64, help="output tokens per request (exactly)")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 64], help="concurrency levels")
    p.add_argument("--min-requests", type=int, default=8, help="requests per level at least (default 8)")
    p.add_argument("--backends", nargs="+", default=["sequential", "batched"], choices=["sequential", "batched"])
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of the server")
    p.add_argument("--ckpt", default=None, help="checkpoint folder (default: bench-out/serving-HIDDENxLAYERS)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    args = p.parse_args()

    checkpoint = Path(args.ckpt or ROOT / "bench-out" / f"serving-{args.hidden}x{args.layers}")
    t = time.perf_counter()
    write_checkpoint(checkpoint, args.hidden, args.layers)
    print(f"checkpoint {checkpoint} ready ({time.perf_counter() - t:.0f} s)", flush=True)
    words = max(1, args.prompt // 2)  # about two tokens per word of this text (prompt tokens are reported)

    results: dict[str, list[dict]] = {}
    for backend in args.backends:
        port = free_port()
        server = start_server(checkpoint, backend, port, args.threads)
        url = f"http://127.0.0.1:{port}"
        try:
            asyncio.run(run_level(url, checkpoint.name, 2, 2, words, min(args.new, 8), offset=10_000))  # warm up
            results[backend] = []
            for i, level in enumerate(args.levels):
                row = asyncio.run(run_level(url, checkpoint.name, level, max(level, args.min_requests), words,
                                            args.new, offset=1000 * i))
                results[backend].append(row)
                print(f"{backend:<11} " + "  ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                                                    for k, v in row.items()), flush=True)
            stats = httpx.get(url + "/health").json()
        finally:
            server.terminate()
            server.wait(60)
        print(f"{backend:<11} server stats: {stats}", flush=True)

    import torch

    print(f"\nmachine: {os.cpu_count()} cores, server threads {args.threads}, torch {torch.__version__}; model: "
          f"hidden {args.hidden}, {args.layers} layers, bf16, random weights; ~{args.prompt} prompt tokens, "
          f"{args.new} output tokens per request; /v1/completions streamed over loopback")
    print("| backend | concurrency | requests | req/s | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms "
          "| ITL p99 ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for backend, rows in results.items():
        for r in rows:
            print(f"| {backend} | {r['concurrency']} | {r['requests']} | {r['requests_per_s']:.2f} | "
                  f"{r['output_tokens_per_s']:.1f} | {r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | "
                  f"{r['itl_p50_ms']:.1f} | {r['itl_p99_ms']:.1f} |")
    if {"sequential", "batched"} <= results.keys():
        ratios = [f"c={b['concurrency']}: {b['output_tokens_per_s'] / s['output_tokens_per_s']:.2f}x"
                  for s, b in zip(results["sequential"], results["batched"])]
        print("batched / sequential output tokens/s: " + ", ".join(ratios))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
