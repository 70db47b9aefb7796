"""Raw-text corpora: the documents in a list of files, for tokenizer training and pretraining.

This module owns how a file becomes documents, so `glmkit train-tokenizer` and the pretraining
shards read a corpus the same way:

- `*.jsonl`: one JSON object per line, its document in the "text" field. Blank lines are allowed;
  a line that is not such an object is an error naming the file and line.
- any other file: UTF-8 text. The whole file is one document, or, with `separator` (e.g. "\\n\\n"
  or "<|endoftext|>"), the pieces between separators are. A large file of many documents should
  use a separator or JSONL: a document is read whole.

Documents are returned as they are written (no stripping). Empty documents are returned too; the
caller decides what they are worth and reports it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path


class CorpusError(ValueError):
    """A corpus file that cannot be read as documents, with the file (and line) named."""


def iter_documents(paths: Sequence[str | os.PathLike], separator: str | None = None) -> Iterator[tuple[Path, str]]:
    """(file, document) for every document of every file, in order."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise CorpusError("no corpus files given")
    if separator == "":
        raise CorpusError("the document separator must not be empty")
    for path in map(Path, paths):
        if not path.is_file():
            raise CorpusError(f"{path}: no such corpus file")
        documents = _jsonl_documents(path) if path.suffix == ".jsonl" else _text_documents(path, separator)
        for document in documents:
            yield path, document


def _text_documents(path: Path, separator: str | None) -> Iterator[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    yield from (text.split(separator) if separator is not None else [text])


def _jsonl_documents(path: Path) -> Iterator[str]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise CorpusError(f"{path}:{number}: not UTF-8 text ({e.reason})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise CorpusError(f'{path}:{number}: expected an object with a "text" string')
            yield record["text"]
