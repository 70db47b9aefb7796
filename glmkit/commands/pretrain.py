"""Pretrain a model on packed token shards: every weight learns to predict the next token of raw text.

--shards is a folder written by `glmkit tokenize-corpus` with the model's own tokenizer (the shards
record its checksum). Its token stream is cut into contiguous, non-overlapping windows of --window
tokens (default: the model's seq_length), each one training example; windows run across document
boundaries, and the tokens after the last full window are reported and not used. --eval names a
second shard folder (a held-out corpus, tokenized the same way) whose windows give the eval loss.

The model is usually a fresh one from `glmkit init-model`. Every weight trains (the full method of
`glmkit finetune`), in float32, with bf16 autocast on CUDA; --out receives the same layout as a full
fine-tune: a checkpoint in the official layout (config.json, safetensors, tokenizer.model), with
train_log.jsonl, train_config.json and, with --save-every, resumable checkpoints.

  glmkit pretrain --model ./init --shards ./shards --window 512 --lr 2e-3 --max-steps 1000 --out ./pretrained

On many processes or GPUs, launch the same command with torchrun; --batch-size counts the windows of
one step over all processes, so the result does not depend on their number:
  torchrun --nproc-per-node 8 -m glmkit.cli pretrain --model ./init --shards ./shards --out ./pretrained
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import CommandError
from .finetune import add_device_arg, add_loop_args, report_result, train_config

DEFAULT_LR = 3e-4  # a usual peak for AdamW from scratch; the fine-tuning default (2e-5) barely moves a new model


def add_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and data")
    group.add_argument("--model", "-m", required=True, metavar="PATH_OR_ID",
                       help="the checkpoint to train (config.json, weights, tokenizer.model), e.g. from "
                            "`glmkit init-model`")
    group.add_argument("--shards", required=True, metavar="DIR",
                       help="token shards from `glmkit tokenize-corpus`, made with the model's tokenizer")
    group.add_argument("--window", type=int, default=None, metavar="N",
                       help="tokens per training example, at most the model's seq_length (default: seq_length)")
    group.add_argument("--eval", default=None, metavar="DIR",
                       help="held-out token shards: the eval loss is the mean over all their windows")
    add_device_arg(group)
    add_loop_args(parser, lr_help=f"peak learning rate (default: {DEFAULT_LR:g})", lr_default=DEFAULT_LR)


def main(args: argparse.Namespace) -> int:
    from glmkit.config import ModelConfig
    from glmkit.loader import load_model, resolve_model_dir
    from glmkit.tokenizer import load_tokenizer
    from glmkit.train import distributed, train

    config = train_config(args, method="full")
    try:
        ctx = distributed.setup(args.device)
        say = print if ctx.is_main else (lambda *a, **k: None)
        model_dir = resolve_model_dir(args.model)
        model_config = ModelConfig.from_json(model_dir / "config.json")
        tokenizer = load_tokenizer(model_dir)
        config.max_length = _window(args.window, model_config.seq_length)
        # The data first: shards of another tokenizer should not wait for gigabytes of weights to load.
        train_windows = _windows(args.shards, "--shards", tokenizer, model_config, config.max_length)
        say(train_windows.summary(), file=sys.stderr)
        eval_windows = None
        if args.eval:
            eval_windows = _windows(args.eval, "--eval", tokenizer, model_config, config.max_length)
            say(eval_windows.summary(), file=sys.stderr)
        # Full training holds every weight in float32 (glmkit.train.methods), so the model is read in it.
        model = load_model(model_dir, dtype="float32", device=ctx.device)
        result = train(model, train_windows, eval_windows, config, tokenizer)
    except (OSError, ValueError) as e:
        raise CommandError(str(e).strip() or type(e).__name__) from None
    finally:
        distributed.teardown()
    return report_result(result, config, say)


def _window(window: int | None, seq_length: int) -> int:
    """--window, checked against the model: no example may be longer than the context its config declares."""
    if window is None:
        return seq_length
    if window < 2:
        raise CommandError(f"--window {window}: a window needs at least 2 tokens (one to read, one to predict)")
    if window > seq_length:
        raise CommandError(f"--window {window} is longer than the model's seq_length of {seq_length}; use at most "
                           f"{seq_length}")
    return window


def _windows(folder: str, flag: str, tokenizer, model_config, window: int):
    """The windows of a shard folder, refused with the reason if the model cannot train on them."""
    from glmkit.train import (
        PackedDataError,
        PackedTokens,
        PretrainWindows,
        tokenizer_checksum,
    )

    path = Path(folder)
    if not path.is_dir():
        raise CommandError(f"{flag} {folder}: no such folder")
    if not any(path.iterdir()):
        raise CommandError(f"{flag} {folder} is empty: write token shards into it with `glmkit tokenize-corpus "
                           f"--tokenizer {tokenizer.path} --out {folder}`")
    try:
        tokens = PackedTokens(path)
    except PackedDataError as e:
        raise CommandError(f"{flag}: {e}") from None
    vocab = tokens.index["vocab_size"]
    if tokens.index["tokenizer_sha256"] != tokenizer_checksum(tokenizer):
        raise CommandError(f"{flag} {folder} was tokenized with another tokenizer ({vocab} ids) than the model's "
                           f"({tokenizer.vocab_size} ids): tokenize the corpus again with `glmkit tokenize-corpus "
                           f"--tokenizer {tokenizer.path}`")
    if vocab > model_config.padded_vocab_size:
        raise CommandError(f"{flag} {folder} holds ids of a {vocab}-id vocabulary; the model's embedding has "
                           f"{model_config.padded_vocab_size} rows (padded_vocab_size)")
    return PretrainWindows(tokens, window)
