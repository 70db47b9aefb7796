"""Train a SentencePiece tokenizer in the ChatGLM3 scheme, for small models trained from scratch.

The model is built like ChatGLM3's own `tokenizer.model`: `<unk>` 0, `<s>` 1, `</s>` 2, the 256
byte-fallback pieces next (so no text is ever unknown), then the learned pieces; identity
normalisation (text is kept as written, spaces included), a leading-space piece, digits split
one per piece. `vocab_size` counts all those pieces; `glmkit.tokenizer` appends the nine special
tokens after them (ids vocab_size .. vocab_size + 8), exactly as the official tokenizer does after
its 64789 pieces. The special tokens are not pieces, so no text can ever encode to one.

SentencePiece learns from lines: each document is split at newlines (newlines themselves become
the byte piece `<0x0A>`, as in ChatGLM3). A line longer than MAX_LINE_BYTES is cut into parts of
at most that size, and the report counts them.

`symbols` are whole words that always stay one piece wherever they appear (SentencePiece's
user-defined symbols; a space inside one is written as a space and stored as "▁"). A small model
copies a name from the question into a tool call far more easily when the name is the same single
token in both places: "▁London" in a sentence and "London" after a quote would otherwise be two
unrelated pieces.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from glmkit.tokenizer import SPECIAL_TOKEN_NAMES, ChatGLMTokenizer

from .corpus import iter_documents

MODEL_TYPES = ("bpe", "unigram")
MAX_LINE_BYTES = 16384  # SentencePiece skips longer sentences; we cut them instead
MIN_VOCAB_SIZE = 3 + 256 + 1  # control pieces, byte pieces, and room for one learned piece


@dataclass(frozen=True)
class TokenizerReport:
    """What `train_tokenizer` wrote and read."""

    path: Path  # the tokenizer.model file
    num_pieces: int  # SentencePiece pieces; the special tokens follow at num_pieces + 0..8
    documents: int
    lines: int  # non-empty lines SentencePiece learned from
    cut_lines: int  # lines longer than MAX_LINE_BYTES, cut into several


def train_tokenizer(inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, vocab_size: int, *,
                    model_type: str = "bpe", character_coverage: float = 0.9995, separator: str | None = None,
                    max_sentences: int | None = None, symbols: Sequence[str] = (), seed: int = 0,
                    num_threads: int | None = None) -> TokenizerReport:
    """Train on the documents of `inputs` (see `glmkit.train.corpus`); write `out_dir/tokenizer.model`.

    vocab_size: SentencePiece pieces, control and byte pieces included (ChatGLM3 has 64789).
    character_coverage: the share of characters (0.98 to 1) that get their own piece; rarer ones
    are spelled in bytes. max_sentences: learn from a random sample of this many lines (default: all).
    symbols: words kept as one piece each wherever they appear (see the module's docstring).
    The result is the same for the same inputs, settings and seed.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r}; use one of {', '.join(MODEL_TYPES)}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size={vocab_size!r}: it must be an integer of at least {MIN_VOCAB_SIZE} "
                         "(3 control pieces and 256 byte pieces come first)")
    if not 0.98 <= character_coverage <= 1:  # SentencePiece's own bounds
        raise ValueError(f"character_coverage={character_coverage} must be in [0.98, 1]")
    if max_sentences is not None and max_sentences <= 0:
        raise ValueError(f"max_sentences={max_sentences} must be positive")
    user_symbols = _user_symbols(symbols)

    counts = {"documents": 0, "lines": 0, "cut_lines": 0}
    lines = _lines(inputs, separator, counts)
    model = io.BytesIO()
    options = {
        "model_type": model_type, "vocab_size": vocab_size, "character_coverage": character_coverage,
        # ChatGLM3's choices: bytes for unknown characters, text kept as written, digits one by one.
        "byte_fallback": True, "normalization_rule_name": "identity", "remove_extra_whitespaces": False,
        "add_dummy_prefix": True, "split_digits": True, "allow_whitespace_only_pieces": True,
        "unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1,
        "required_chars": "a",  # glmkit's streaming decoder uses the piece "a" as a sentinel
        "max_sentence_length": MAX_LINE_BYTES, "input_sentence_size": max_sentences or 0,
        "shuffle_input_sentence": max_sentences is not None,
        "num_threads": num_threads or os.cpu_count() or 1, "minloglevel": 2,
    }
    if user_symbols:
        options["user_defined_symbols"] = user_symbols
    import sentencepiece as spm

    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=lines, model_writer=model, **options)
    except RuntimeError as e:
        if counts["lines"] == 0:
            raise ValueError(f"the corpus ({counts['documents']} documents) has no text to learn from") from None
        message = str(e).split("] ")[-1].strip() or str(e)  # without SentencePiece's source location
        raise ValueError(f"SentencePiece could not train a {vocab_size}-piece {model_type} model: {message}") from None

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "tokenizer.model"
    path.write_bytes(model.getvalue())
    tokenizer = ChatGLMTokenizer(path)  # checks the file is a tokenizer glmkit can use
    if tokenizer.num_pieces != vocab_size:
        raise ValueError(f"SentencePiece wrote {tokenizer.num_pieces} pieces instead of {vocab_size}")
    return TokenizerReport(path, tokenizer.num_pieces, **counts)


def _user_symbols(symbols: Sequence[str]) -> list[str]:
    """`symbols` as SentencePiece stores them (spaces as "▁"), checked and without repeats."""
    if isinstance(symbols, str):
        raise ValueError("symbols must be a list of words, not one string")
    out: list[str] = []
    for symbol in symbols:
        if not isinstance(symbol, str) or not symbol.strip():
            raise ValueError(f"symbol {symbol!r}: a symbol must be a non-empty word")
        if symbol != symbol.strip() or any(c in symbol for c in "\n\t\r"):
            raise ValueError(f"symbol {symbol!r}: no leading or trailing spaces and no line breaks")
        stored = symbol.replace(" ", "\u2581")
        if stored not in out:
            out.append(stored)
    return out


def _lines(inputs: Sequence[str | os.PathLike], separator: str | None, counts: dict[str, int]) -> Iterator[str]:
    for _, document in iter_documents(inputs, separator):
        counts["documents"] += 1
        for line in document.split("\n"):
            if not line:
                continue
            counts["lines"] += 1
            parts = _cut(line)
            counts["cut_lines"] += len(parts) > 1
            yield from parts


def _cut(line: str) -> list[str]:
    """`line` in parts of at most MAX_LINE_BYTES UTF-8 bytes, cut between characters."""
    data = line.encode("utf-8")
    if len(data) <= MAX_LINE_BYTES:
        return [line]
    parts = []
    while data:
        end = min(MAX_LINE_BYTES, len(data))
        while end < len(data) and (data[end] & 0xC0) == 0x80:  # not inside a character
            end -= 1
        parts.append(data[:end].decode("utf-8"))
        data = data[end:]
    return parts


def describe(report: TokenizerReport) -> str:
    """One line for people: what was written and where the special tokens are."""
    n = report.num_pieces
    cut = f", {report.cut_lines} over-long lines cut" if report.cut_lines else ""
    return (f"wrote {report.path}: {n} pieces + {len(SPECIAL_TOKEN_NAMES)} special tokens "
            f"(ids {n}..{n + len(SPECIAL_TOKEN_NAMES) - 1}), learned from {report.lines} lines of "
            f"{report.documents} documents{cut}")
