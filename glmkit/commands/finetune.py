"""Fine-tune a model on conversations: full, LoRA or P-Tuning v2, on one process or many.

The data is JSONL, one conversation per line, in the ChatGLM3 format:
  {"conversations": [{"role": "user", "content": ...}, {"role": "assistant", ...}], "tools": [...]}
(roles system, user, assistant, observation or tool; assistant turns are learned unless "loss":
false; tool calls and code-interpreter turns train like any assistant turn). Bad lines are an error
naming them; over-long conversations are truncated or dropped (--overlong), and counted.

--out receives the result: a whole checkpoint (full), adapter_config.json + adapter_model.safetensors
(lora: chat with `glmkit chat --model BASE --adapter OUT`, or merge with `glmkit merge-lora`), or the
prefix in the official P-Tuning v2 layout (ptuning: `glmkit chat --model BASE --prefix OUT`); also
train_log.jsonl, train_config.json and, with --save-every, resumable checkpoints.

On many processes or GPUs, launch the same command with torchrun; --batch-size counts the examples
of one step over all processes, so the result does not depend on their number:
  torchrun --nproc-per-node 8 -m glmkit.cli finetune --model BASE --train data.jsonl --method lora --out OUT
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from typing import Any

from . import CommandError


def add_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and data")
    group.add_argument("--model", "-m", required=True, metavar="PATH_OR_ID",
                       help="the base checkpoint: a folder (config.json, weights, tokenizer.model) or Hub id")
    group.add_argument("--train", required=True, metavar="JSONL", help="training conversations")
    group.add_argument("--eval", default=None, metavar="JSONL", help="held-out conversations for the eval loss")
    group.add_argument("--max-length", type=int, default=None, metavar="N",
                       help="longest example in tokens (default: the model's seq_length)")
    group.add_argument("--overlong", choices=["truncate", "drop"], default="truncate",
                       help="longer conversations: keep their first N tokens, or leave them out (default: truncate)")
    group.add_argument("--skip-bad-lines", action="store_true",
                       help="leave out lines that cannot be read (they are still listed) instead of stopping")
    group.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                       help="the base weights' dtype (default: float32; bfloat16 for the frozen base of lora and "
                            "ptuning on CUDA). Trained weights are always float32")
    add_device_arg(group)

    group = parser.add_argument_group("method")
    group.add_argument("--method", choices=["full", "lora", "ptuning"], required=True,
                       help="what trains: every weight, LoRA adapters, or a P-Tuning v2 prefix")
    group.add_argument("--lora-r", type=int, default=8, metavar="R", help="LoRA rank (default: 8)")
    group.add_argument("--lora-alpha", type=float, default=16.0, metavar="A", help="LoRA alpha (default: 16)")
    group.add_argument("--lora-dropout", type=float, default=0.0, metavar="P", help="LoRA dropout (default: 0)")
    group.add_argument("--lora-targets", default=None, metavar="NAMES",
                       help="comma-separated names of the linears to adapt (default: all of attention and MLP: "
                            "query_key_value,dense,dense_h_to_4h,dense_4h_to_h)")
    group.add_argument("--pre-seq-len", type=int, default=128, metavar="N",
                       help="P-Tuning v2 prefix length (default: 128)")
    group.add_argument("--prefix-projection", action="store_true", help="P-Tuning v2 with the prefix MLP")

    add_loop_args(parser, lr_help="peak learning rate (default: 2e-5 full, 2e-4 lora, 2e-2 ptuning)")


def main(args: argparse.Namespace) -> int:
    from glmkit.config import ModelConfig
    from glmkit.loader import as_dtype, load_model, resolve_model_dir
    from glmkit.tokenizer import load_tokenizer
    from glmkit.train import distributed, train

    config = train_config(args, method=args.method, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                          lora_dropout=args.lora_dropout, **_targets(args.lora_targets), pre_seq_len=args.pre_seq_len,
                          prefix_projection=args.prefix_projection, overlong=args.overlong)
    try:
        ctx = distributed.setup(args.device)
        say = print if ctx.is_main else (lambda *a, **k: None)
        model_dir = resolve_model_dir(args.model)
        tokenizer = load_tokenizer(model_dir)
        config.max_length = args.max_length or ModelConfig.from_json(model_dir / "config.json").seq_length
        # The data first: a bad line should not wait for gigabytes of weights to load.
        train_examples = _read(args.train, tokenizer, config, args.skip_bad_lines, say)
        eval_examples = _read(args.eval, tokenizer, config, args.skip_bad_lines, say) if args.eval else None
        dtype = args.dtype or ("bfloat16" if ctx.device.type == "cuda" and config.method != "full"
                               and not config.fsdp else "float32")
        model = load_model(model_dir, dtype=as_dtype(dtype), device=ctx.device)
        result = train(model, train_examples, eval_examples, config, tokenizer, base_model=str(args.model))
    except (OSError, ValueError) as e:
        raise CommandError(str(e).strip() or type(e).__name__) from None
    finally:
        distributed.teardown()
    return report_result(result, config, say)


def _targets(names: str | None) -> dict:
    return {} if names is None else {"lora_targets": tuple(t.strip() for t in names.split(",") if t.strip())}


def _read(path: str, tokenizer, config, skip_bad_lines: bool, say) -> list[dict]:
    from glmkit.train import load_conversations

    examples, report = load_conversations(path, tokenizer, config.max_length, config.overlong,
                                          skip_bad_lines=skip_bad_lines)
    say(report.summary(), file=sys.stderr)
    for number, reason in report.bad_lines:
        say(f"  skipped line {number}: {reason}", file=sys.stderr)
    return examples


# -- what `glmkit pretrain` shares: the loop's flags, the TrainConfig made of them, the closing lines --------


def add_device_arg(group) -> None:
    group.add_argument("--device", default=None, metavar="DEVICE",
                       help="cpu or cuda (default: cuda:LOCAL_RANK when available, else cpu)")


def add_loop_args(parser: argparse.ArgumentParser, lr_help: str, lr_default: float | None = None) -> None:
    """The flags of the training loop (glmkit.train.TrainConfig): the optimization group, then output."""
    group = parser.add_argument_group("optimization")
    group.add_argument("--lr", type=float, default=lr_default, help=lr_help)
    group.add_argument("--max-steps", type=int, default=None, metavar="N", help="optimizer steps (default: --epochs)")
    group.add_argument("--epochs", type=float, default=1.0, metavar="E",
                       help="passes over the data, when --max-steps is not given (default: 1)")
    group.add_argument("--batch-size", type=int, default=8, metavar="B",
                       help="examples per optimizer step, over all processes (default: 8)")
    group.add_argument("--grad-accum", type=int, default=1, metavar="K",
                       help="micro-batches each process splits its share of a step into (default: 1)")
    group.add_argument("--warmup-steps", type=int, default=0, metavar="N", help="linear warm-up (default: 0)")
    group.add_argument("--min-lr-ratio", type=float, default=0.0, metavar="F",
                       help="the cosine decay ends at F x lr (default: 0)")
    group.add_argument("--max-grad-norm", type=float, default=1.0, metavar="X",
                       help="clip the gradient norm to X; 0 = no clipping (default: 1)")
    group.add_argument("--weight-decay", type=float, default=0.0, metavar="W", help="AdamW weight decay (default: 0)")
    group.add_argument("--seed", type=int, default=0, help="seed of the data order and new weights (default: 0)")
    group.add_argument("--no-shuffle", action="store_true", help="read the examples in file order")
    group.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                       help="bfloat16 autocast (default: on for CUDA, off on CPU)")
    group.add_argument("--fsdp", action="store_true",
                       help="shard weights, gradients and optimizer state over the processes (FSDP2) instead "
                            "of replicating them (DDP)")

    group = parser.add_argument_group("output")
    group.add_argument("--out", required=True, metavar="DIR", help="where the result and checkpoints go")
    group.add_argument("--eval-every", type=int, default=None, metavar="N",
                       help="evaluate every N steps (default: only at the end)")
    group.add_argument("--save-every", type=int, default=None, metavar="N",
                       help="write a resumable checkpoint every N steps")
    group.add_argument("--keep-checkpoints", type=int, default=2, metavar="N",
                       help="keep the newest N checkpoints; 0 = all (default: 2)")
    group.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                       help="continue from a checkpoint folder, or (no value) the newest one in --out")
    group.add_argument("--stop-after", type=int, default=None, metavar="N",
                       help="stop after step N with a checkpoint, to resume later")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")


def train_config(args: argparse.Namespace, **method_fields: Any):
    """The TrainConfig of the `add_loop_args` flags and `method_fields`; a setting that cannot work is a
    CommandError naming its flag."""
    from glmkit.train import TrainConfig, TrainConfigError

    try:
        return TrainConfig(
            lr=args.lr, warmup_steps=args.warmup_steps, min_lr_ratio=args.min_lr_ratio, max_steps=args.max_steps,
            epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum,
            max_grad_norm=args.max_grad_norm or None, weight_decay=args.weight_decay, shuffle=not args.no_shuffle,
            eval_every=args.eval_every, save_every=args.save_every, keep_checkpoints=args.keep_checkpoints,
            seed=args.seed, out_dir=args.out, bf16=args.bf16, fsdp=args.fsdp, device=args.device,
            resume=args.resume, stop_after=args.stop_after, progress=not args.no_progress, **method_fields)
    except TrainConfigError as e:  # "max_steps=0 must ..." -> "--max-steps=0 must ..."
        message = re.sub(r"^([a-z_]+)=", lambda m: "--" + m.group(1).replace("_", "-") + "=", str(e))
        raise CommandError(message) from None


def report_result(result, config, say: Callable[..., None]) -> int:
    """The closing lines of a run on stderr: the last losses and speed, and where the result is."""
    if not result.train_loss:
        say(f"nothing to do: the checkpoint is at step {result.steps} of {result.total_steps}", file=sys.stderr)
        return 0
    last = max(result.train_loss)
    line = (f"step {result.steps}/{result.total_steps}: loss {result.train_loss[last]:.4f}"
            + (f", eval loss {result.eval_loss[max(result.eval_loss)]:.4f}" if result.eval_loss else "")
            + f"; {result.tokens_per_second:,.0f} tokens/s")
    say(line, file=sys.stderr)
    if result.output is not None:
        say(f"wrote {config.method} result to {result.output}", file=sys.stderr)
    elif result.checkpoint is not None:
        say(f"stopped; resume with --resume (checkpoint {result.checkpoint})", file=sys.stderr)
    return 0
