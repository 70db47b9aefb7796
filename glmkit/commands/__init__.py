"""The subcommands of the `glmkit` command, one module each with `add_args(parser)` and `main(args)`.

This package also holds what several commands share: the model and sampling flags, and loading a
model with a one-line error instead of a traceback. Heavy imports (torch, the model) happen inside
the commands' `main`, so `glmkit --help` stays quick.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any


class CommandError(Exception):
    """A problem to report in one line (`glmkit: error: ...`), exit status 2."""


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", "-m", default=None, metavar="PATH_OR_ID",
                       help="checkpoint folder (config.json, weights, tokenizer.model) or Hugging Face Hub id, "
                            "e.g. THUDM/chatglm3-6b (default: the small demo model bundled with glmkit)")
    group.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                       help="weights' dtype (default: float32 on CPU for models under 1e9 parameters, "
                            "else bfloat16)")
    group.add_argument("--device", default=None, metavar="DEVICE",
                       help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    group.add_argument("--prefix", default=None, metavar="DIR",
                       help="a P-Tuning v2 checkpoint folder to apply to the model")
    group.add_argument("--adapter", default=None, metavar="DIR",
                       help="a LoRA adapter folder (adapter_config.json, adapter_model.safetensors) to merge "
                            "into the model")
    add_runtime_args(group)


def add_runtime_args(group) -> None:
    """--quantize and --threads: how the weights are held and how many CPU cores multiply them."""
    group.add_argument("--quantize", choices=["int8", "int4"], default=None,
                       help="quantize a float checkpoint while loading it, layer by layer (int4: groups of 128 "
                            "inputs per scale; `glmkit quantize` writes a checkpoint that loads faster). A "
                            "quantized checkpoint needs no flag")
    group.add_argument("--threads", type=int, default=None, metavar="N",
                       help="CPU threads for the matrix products (default: one per core)")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--temperature", "-t", type=float, default=None, metavar="T",
                       help="0 = greedy; higher = more varied (default: 0.8, as the official chat)")
    group.add_argument("--top-p", type=float, default=None, metavar="P",
                       help="sample from the smallest set of tokens whose probability reaches P "
                            "(default: 0.8, as the official chat; 1 = off)")
    group.add_argument("--top-k", type=int, default=None, metavar="K",
                       help="sample from the K most likely tokens (default: 0 = off)")
    group.add_argument("--repetition-penalty", type=float, default=None, metavar="R",
                       help="penalise tokens already seen; 1 = off (default), 1.1 is a mild penalty")
    group.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                       help="stop a reply after N tokens (default: up to the context window)")
    group.add_argument("--seed", type=int, default=None, metavar="S",
                       help="random seed: the same seed and input give the same reply")


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling flags that were given, as keyword arguments of ChatModel.chat / generate."""
    names = ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens", "seed")
    kwargs = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    from glmkit.chat import sampling_params

    try:  # check them before loading a model for minutes
        sampling_params(**kwargs)
    except (TypeError, ValueError) as e:
        message = re.sub(r"SamplingParams\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), str(e))
        raise CommandError(message) from None
    return kwargs


def load_chat_model(args: argparse.Namespace):
    """glmkit.chat.load with the model flags; a model that cannot be loaded is a CommandError."""
    from glmkit.chat import load

    if args.model is None:
        from glmkit.demo import NAME, model_dir

        try:
            args.model = str(model_dir())
        except FileNotFoundError as e:
            raise CommandError(f"no --model given, and {e}") from None
        print(f"glmkit: no --model given: using {NAME}, the small demo model bundled with glmkit "
              "(it knows greetings, weather, arithmetic and unit conversion; pass --model THUDM/chatglm3-6b "
              "for the real one)", file=sys.stderr)
    try:
        return load(args.model, dtype=args.dtype, device=args.device, prefix=args.prefix,
                    adapter=getattr(args, "adapter", None), quantize=getattr(args, "quantize", None),
                    threads=getattr(args, "threads", None))
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CommandError(f"cannot load model {args.model!r}: {message}") from None
