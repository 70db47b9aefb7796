"""Write a freshly initialised model of any size, ready to pretrain: a checkpoint from a config.

The shape comes from --config (a preset: tiny, chatglm3-6b, ...; or a config.json), changed by
--set FIELD=VALUE (official field names: num_layers, hidden_size, ffn_hidden_size,
num_attention_heads, kv_channels, multi_query_group_num, seq_length, rope_ratio, ...). The
embedding is sized for the tokenizer: padded_vocab_size becomes the tokenizer's ids (pieces and
the nine special tokens) rounded up to a multiple of 64, unless --set gives it. Weights are drawn
for training from scratch (normal, std 0.02; residual outputs scaled by depth) from --seed.

OUT is a checkpoint in the official layout (config.json, model.safetensors, tokenizer.model) that
`glmkit finetune` trains and `glmkit chat` loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from . import CommandError


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="PRESET_OR_JSON",
                        help="a preset name (tiny, chatglm3-6b, ...) or a config.json file")
    parser.add_argument("--tokenizer", required=True, metavar="PATH",
                        help="tokenizer.model (e.g. from `glmkit train-tokenizer`), or a folder holding one")
    parser.add_argument("--out", required=True, metavar="DIR", help="where the checkpoint is written")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="change one config field, e.g. --set num_layers=6 (repeatable; values are JSON)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights (default: 0)")


def main(args: argparse.Namespace) -> int:
    from glmkit.config import ConfigError, ModelConfig
    from glmkit.loader import save_model
    from glmkit.tokenizer import load_tokenizer
    from glmkit.train.scratch import new_model, scratch_config

    try:
        tokenizer = load_tokenizer(args.tokenizer)
        base = ModelConfig.from_json(args.config) if Path(args.config).is_file() else ModelConfig.preset(args.config)
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.name != "padded_vocab_size"}
        fields.update(_assignments(args.set, set(fields) | {"padded_vocab_size"}))
        config = scratch_config(tokenizer.vocab_size, **fields)
        folder = save_model(new_model(config, args.seed), args.out, tokenizer_path=tokenizer.path)
    except (OSError, ValueError, ConfigError) as e:
        raise CommandError(str(e)) from None
    print(f"wrote a new model of {config.num_parameters():,} parameters ({config.num_layers} layers, hidden "
          f"{config.hidden_size}, vocabulary {tokenizer.vocab_size} padded to {config.padded_vocab_size}) to "
          f"{folder}", file=sys.stderr)
    return 0


def _assignments(items: list[str], known: set[str]) -> dict:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in known:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE with a ModelConfig field, e.g. num_layers=6")
        try:
            out[name] = json.loads(value)
        except json.JSONDecodeError:
            out[name] = value  # a bare string
    return out
