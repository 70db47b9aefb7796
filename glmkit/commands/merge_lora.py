"""Merge a LoRA adapter into its base model and write a plain checkpoint in the official layout.

The result (config.json, safetensors shards, tokenizer.model) loads anywhere the base model does,
with no adapter code: `glmkit chat --model OUT`. The weights keep the base checkpoint's dtype
unless --dtype says otherwise; the update is added in float32 before rounding to it.
"""

from __future__ import annotations

import argparse
import sys

from . import CommandError


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", required=True, metavar="PATH_OR_ID",
                        help="the base checkpoint the adapter was trained on (folder or Hub id)")
    parser.add_argument("--adapter", required=True, metavar="DIR",
                        help="the adapter folder (adapter_config.json, adapter_model.safetensors)")
    parser.add_argument("--out", required=True, metavar="DIR", help="where to write the merged checkpoint")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="the merged weights' dtype (default: the base checkpoint's torch_dtype, else float32)")


def main(args: argparse.Namespace) -> int:
    from glmkit.config import ModelConfig
    from glmkit.loader import TOKENIZER, load_model, resolve_model_dir, save_model
    from glmkit.lora import load_adapter, merge_lora

    try:
        model_dir = resolve_model_dir(args.model)
        dtype = args.dtype or ModelConfig.from_json(model_dir / "config.json").extra.get("torch_dtype", "float32")
        model = merge_lora(load_adapter(load_model(model_dir, dtype=dtype), args.adapter))
        tokenizer = model_dir / TOKENIZER
        out = save_model(model, args.out, tokenizer_path=tokenizer if tokenizer.is_file() else None)
    except (OSError, ValueError) as e:
        raise CommandError(str(e).strip() or type(e).__name__) from None
    print(f"wrote the merged model to {out}", file=sys.stderr)
    return 0
