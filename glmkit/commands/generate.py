"""Complete a raw text prompt (no chat roles) and print the completion.

The prompt is encoded as `[gMASK] sop` + the text, as the official tokenizer builds model inputs;
base models (ChatGLM3-6B-Base) are used this way. The completion streams to stdout as it comes.
"""

from __future__ import annotations

import argparse
import sys

from . import (
    CommandError,
    add_model_args,
    add_sampling_args,
    load_chat_model,
    sampling_kwargs,
)


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", default="-",
                        help="the text to complete; '-' or nothing reads it from stdin")
    add_model_args(parser)
    add_sampling_args(parser)


def main(args: argparse.Namespace) -> int:
    kwargs = sampling_kwargs(args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model = load_chat_model(args)
    from glmkit.generate import ContextLengthError

    try:
        for text in model.stream_generate(prompt, **kwargs):
            sys.stdout.write(text)
            sys.stdout.flush()
    except ContextLengthError as e:
        raise CommandError(str(e)) from None
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0
