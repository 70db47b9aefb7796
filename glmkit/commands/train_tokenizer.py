"""Train a SentencePiece tokenizer in the ChatGLM3 scheme on a raw-text corpus.

The result, OUT/tokenizer.model, is built like ChatGLM3's: <unk> <s> </s>, 256 byte pieces (no text
is ever unknown), then the learned pieces, with text kept as written and digits split. --vocab-size
counts all those pieces; glmkit appends the nine special tokens ([MASK] [gMASK] [sMASK] sop eop
<|system|> <|user|> <|assistant|> <|observation|>) after them, at ids N..N+8, as the official
tokenizer does after its 64789 pieces.

Input files: *.jsonl holds one {"text": ...} document per line; any other file is UTF-8 text, one
document per file (or split at --separator).
"""

from __future__ import annotations

import argparse
import sys

from . import CommandError


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", "-i", nargs="+", required=True, metavar="FILE", help="corpus files")
    parser.add_argument("--vocab-size", type=int, required=True, metavar="N",
                        help="SentencePiece pieces, control and byte pieces included (at least 260)")
    parser.add_argument("--out", required=True, metavar="DIR", help="where tokenizer.model is written")
    parser.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe",
                        help="SentencePiece algorithm (default: bpe, as ChatGLM3)")
    parser.add_argument("--character-coverage", type=float, default=0.9995, metavar="F",
                        help="share of characters (0.98 to 1) that get their own piece; rarer ones are spelled "
                             "in bytes (default: 0.9995)")
    parser.add_argument("--separator", default=None, metavar="TEXT",
                        help="split text files into documents at this string, e.g. '<|endoftext|>'")
    parser.add_argument("--max-sentences", type=int, default=None, metavar="N",
                        help="learn from a random sample of N lines (default: all)")
    parser.add_argument("--symbols", default=None, metavar="FILE",
                        help="a UTF-8 file of words, one per line, each kept as one piece wherever it appears "
                             "(names a small model must copy, e.g. cities)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling (default: 0)")


def main(args: argparse.Namespace) -> int:
    from glmkit.train.tokenizer_training import describe, train_tokenizer

    try:
        symbols = read_symbols(args.symbols) if args.symbols else []
        report = train_tokenizer(args.input, args.out, args.vocab_size, model_type=args.model_type,
                                 character_coverage=args.character_coverage, separator=args.separator,
                                 max_sentences=args.max_sentences, symbols=symbols, seed=args.seed)
    except (OSError, ValueError) as e:
        raise CommandError(str(e)) from None
    print(describe(report), file=sys.stderr)
    return 0


def read_symbols(path: str) -> list[str]:
    """The non-empty lines of the UTF-8 file at `path`."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]
