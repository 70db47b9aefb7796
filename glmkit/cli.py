"""The `glmkit` command: a table of subcommands.

Each subcommand is a module in `glmkit.commands` with `add_args(parser)` and `main(args) -> int`;
its docstring is its help. To add one, write the module and add a row to COMMANDS.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from glmkit import __version__
from glmkit.commands import CommandError

# name -> module; the module's first docstring line is the summary in `glmkit --help`.
COMMANDS = {
    "chat": "glmkit.commands.chat",
    "generate": "glmkit.commands.generate",
    "serve": "glmkit.commands.serve",
    "finetune": "glmkit.commands.finetune",
    "merge-lora": "glmkit.commands.merge_lora",
    "train-tokenizer": "glmkit.commands.train_tokenizer",
    "tokenize-corpus": "glmkit.commands.tokenize_corpus",
    "init-model": "glmkit.commands.init_model",
    "pretrain": "glmkit.commands.pretrain",
    "quantize": "glmkit.commands.quantize",
    "bench": "glmkit.commands.bench",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glmkit", description="Run the ChatGLM3 family of language models in plain PyTorch.",
        epilog="Run 'glmkit COMMAND --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"glmkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        doc = (module.__doc__ or "").strip()
        command = sub.add_parser(name, help=doc.splitlines()[0] if doc else None, description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_args(command)
        command.set_defaults(run=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except CommandError as e:
        print(f"glmkit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
