"""Training throughput of glmkit's loop: tokens/s for a model shape, method and batch.

    python benchmarks/bench_train.py                                  # tiny preset, every method
    python benchmarks/bench_train.py --config path/to/config.json --method full --seq-len 512

Random weights and random tokens (every position learned), so the figure measures the loop and the
model, not the data. A short warm-up run comes first and is not counted. Tokens/s counts the input
tokens of the optimizer steps (forward, backward, clipping, AdamW), evaluation and saving excluded.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from glmkit.config import ModelConfig
from glmkit.model import ChatGLMForCausalLM
from glmkit.train import TrainConfig, train


def random_examples(n: int, seq_len: int, vocab: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seq_len), generator=g).tolist()
    return [{"input_ids": row, "labels": row} for row in ids]


def measure(config: ModelConfig, method: str, batch_size: int, seq_len: int, steps: int, bf16: bool) -> dict:
    vocab = min(config.padded_vocab_size, 64798)
    data = random_examples(batch_size * steps, seq_len, vocab, seed=0)
    settings = {"method": method, "batch_size": batch_size, "progress": False, "bf16": bf16, "pre_seq_len": 16,
                "seed": 0}
    torch.manual_seed(0)
    train(ChatGLMForCausalLM(config), data[:batch_size * 2], None, TrainConfig(max_steps=2, **settings))  # warm-up
    torch.manual_seed(0)
    model = ChatGLMForCausalLM(config)
    began = time.perf_counter()
    result = train(model, data, None, TrainConfig(max_steps=steps, **settings))
    wall = time.perf_counter() - began
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"method": method, "parameters": config.num_parameters(), "trainable": trainable,
            "batch": batch_size, "seq_len": seq_len, "steps": steps, "bf16": bf16,
            "tokens_per_s": round(result.tokens_per_second, 1),
            "step_s": round(result.seconds / steps, 4), "wall_s": round(wall, 2),
            "first_loss": round(result.train_loss[1], 4), "last_loss": round(result.train_loss[steps], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", help="a ModelConfig preset (default: tiny)")
    parser.add_argument("--config", default=None, help="a config.json instead of a preset (e.g. the demo model's)")
    parser.add_argument("--method", choices=["full", "lora", "ptuning", "all"], default="all")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = ModelConfig.from_json(args.config) if args.config else ModelConfig.preset(args.preset)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; "
          f"model {args.config or args.preset}: {config.num_parameters() / 1e6:.1f}M parameters")
    methods = ["full", "lora", "ptuning"] if args.method == "all" else [args.method]
    for method in methods:
        print(json.dumps(measure(config, method, args.batch_size, args.seq_len, args.steps, args.bf16)), flush=True)


if __name__ == "__main__":
    main()
