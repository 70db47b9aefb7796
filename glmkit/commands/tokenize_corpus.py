"""Tokenize a raw-text corpus once into packed token shards, for pretraining.

Each document becomes [gMASK] sop + its pieces + </s>, appended to one token stream written as
OUT/tokens-NNNNN.bin (little-endian uint16, or uint32 for vocabularies over 65536 ids) with
OUT/index.json (counts, shards, and the tokenizer's checksum: the shards are only read with the
tokenizer that made them). Training reads the stream in contiguous windows of --max-length tokens.
Empty documents are counted and left out.

Input files: *.jsonl holds one {"text": ...} document per line; any other file is UTF-8 text, one
document per file (or split at --separator).
"""

from __future__ import annotations

import argparse
import sys

from . import CommandError


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", "-i", nargs="+", required=True, metavar="FILE", help="corpus files")
    parser.add_argument("--tokenizer", required=True, metavar="PATH",
                        help="tokenizer.model, or a folder holding one (e.g. a checkpoint)")
    parser.add_argument("--out", required=True, metavar="DIR", help="where the shards and index.json go")
    parser.add_argument("--separator", default=None, metavar="TEXT",
                        help="split text files into documents at this string, e.g. '<|endoftext|>'")
    parser.add_argument("--shard-tokens", type=int, default=None, metavar="N",
                        help="tokens per shard file (default: 2^28)")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in --out")


def main(args: argparse.Namespace) -> int:
    from glmkit.tokenizer import load_tokenizer
    from glmkit.train.pretrain_data import DEFAULT_SHARD_TOKENS, pack_corpus

    try:
        tokenizer = load_tokenizer(args.tokenizer)
        index = pack_corpus(args.input, tokenizer, args.out, separator=args.separator,
                            shard_tokens=args.shard_tokens or DEFAULT_SHARD_TOKENS, overwrite=args.overwrite)
    except (OSError, ValueError) as e:
        raise CommandError(str(e)) from None
    empty = f" ({index['empty_documents']} empty documents left out)" if index["empty_documents"] else ""
    print(f"wrote {index['tokens']:,} tokens of {index['documents']:,} documents{empty} to {args.out} "
          f"in {len(index['shards'])} shard(s) of {index['dtype']}", file=sys.stderr)
    return 0
