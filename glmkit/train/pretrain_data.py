"""Pretraining data: a raw-text corpus tokenized once into packed token shards, read back as windows.

`pack_corpus` turns every document (see `glmkit.train.corpus`) into `[gMASK] sop` + its pieces +
`</s>` — a raw-text prompt as `ChatModel.generate` writes it, then end of text — and appends them
all to one token stream, written in shards of little-endian uint16 (uint32 for vocabularies over
65536 ids) beside a small JSON index:

    out/index.json           format, dtype, vocabulary, tokenizer checksum, counts, shards
    out/tokens-00000.bin     the stream's first `shard_tokens` tokens, and so on

`PackedTokens` maps the shards back as one stream; `PretrainWindows` cuts it into contiguous,
non-overlapping windows of `seq_length` tokens, the training examples of pretraining. Nothing is
lost without a word: empty documents are counted in the index, and the tokens after the last
full window are reported by `PretrainWindows.unused_tokens`.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import mmap
import os
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmkit.tokenizer import ChatGLMTokenizer

from .corpus import iter_documents

INDEX = "index.json"
FORMAT = "glmkit-packed-tokens"
VERSION = 1
SHARD_NAME = "tokens-{:05d}.bin"
DEFAULT_SHARD_TOKENS = 1 << 28  # 512 MiB of uint16 per shard
_TYPECODES = {"uint16": "H", "uint32": "I"}  # array typecodes of 2 and 4 bytes on every platform torch runs on


class PackedDataError(ValueError):
    """Token shards that are missing, damaged or made with another tokenizer, with the reason."""


def tokenizer_checksum(tokenizer: ChatGLMTokenizer) -> str:
    """sha256 of the tokenizer.model file: shards are only valid with the tokenizer that made them."""
    return hashlib.sha256(Path(tokenizer.path).read_bytes()).hexdigest()


def pack_corpus(inputs: Sequence[str | os.PathLike], tokenizer: ChatGLMTokenizer, out_dir: str | os.PathLike, *,
                separator: str | None = None, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                overwrite: bool = False) -> dict[str, Any]:
    """Tokenize the documents of `inputs` into shards in `out_dir`; return the index written.

    Refuses an `out_dir` that already holds shards unless `overwrite`. The index is written last,
    so a folder whose packing was interrupted has none and is never read as complete.
    """
    if shard_tokens <= 0:
        raise ValueError(f"shard_tokens={shard_tokens} must be positive")
    out = Path(out_dir)
    if (out / INDEX).exists() or any(out.glob("tokens-*.bin")):
        if not overwrite:
            raise FileExistsError(f"{out} already holds token shards; choose another folder, or overwrite them")
        (out / INDEX).unlink(missing_ok=True)
        for stale in out.glob("tokens-*.bin"):
            stale.unlink()
    out.mkdir(parents=True, exist_ok=True)

    dtype = "uint16" if tokenizer.vocab_size <= 1 << 16 else "uint32"
    start = [tokenizer.token_id("[gMASK]"), tokenizer.token_id("sop")]
    writer = _ShardWriter(out, dtype, shard_tokens)
    sources: dict[str, dict[str, int]] = {}
    try:
        for path, document in iter_documents(inputs, separator):
            counts = sources.setdefault(str(path), {"documents": 0, "empty_documents": 0, "tokens": 0})
            if not document.strip():
                counts["empty_documents"] += 1
                continue
            ids = start + tokenizer.encode(document) + [tokenizer.eos_id]
            writer.write(ids)
            counts["documents"] += 1
            counts["tokens"] += len(ids)
    except BaseException:
        for shard in writer.close():  # a corpus error (or ^C) leaves no partial shards behind
            (out / shard["file"]).unlink(missing_ok=True)
        raise
    shards = writer.close()
    index = {
        "format": FORMAT, "version": VERSION, "dtype": dtype,
        "vocab_size": tokenizer.vocab_size, "tokenizer_sha256": tokenizer_checksum(tokenizer),
        "tokens": sum(s["tokens"] for s in shards),
        "documents": sum(c["documents"] for c in sources.values()),
        "empty_documents": sum(c["empty_documents"] for c in sources.values()),
        "shards": shards, "sources": [{"path": p, **c} for p, c in sources.items()],
    }
    if index["tokens"] == 0:
        raise ValueError(f"the corpus has no text to tokenize ({index['empty_documents']} empty documents)")
    (out / INDEX).write_text(json.dumps(index, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return index


class _ShardWriter:
    """Appends tokens to the stream, starting a new shard file every `shard_tokens` tokens."""

    def __init__(self, out: Path, dtype: str, shard_tokens: int):
        self.out, self.typecode, self.shard_tokens = out, _TYPECODES[dtype], shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.file = None
        self.room = 0  # tokens the current shard can still take

    def write(self, ids: list[int]) -> None:
        while ids:
            if self.room == 0:
                self._next_shard()
            part, ids = ids[:self.room], ids[self.room:]
            self.file.write(_to_bytes(array(self.typecode, part)))
            self.shards[-1]["tokens"] += len(part)
            self.room -= len(part)

    def _next_shard(self) -> None:
        if self.file is not None:
            self.file.close()
        name = SHARD_NAME.format(len(self.shards))
        self.file = (self.out / name).open("wb")
        self.shards.append({"file": name, "tokens": 0})
        self.room = self.shard_tokens

    def close(self) -> list[dict[str, Any]]:
        if self.file is not None:
            self.file.close()
            self.file = None
        return self.shards


def _to_bytes(values: array) -> bytes:
    if sys.byteorder != "little":
        values.byteswap()
    return values.tobytes()


class PackedTokens:
    """The token stream of a folder written by `pack_corpus`, memory-mapped shard by shard."""

    def __init__(self, folder: str | os.PathLike, tokenizer: ChatGLMTokenizer | None = None):
        self.folder = Path(folder)
        self.index = _read_index(self.folder)
        if tokenizer is not None and self.index["tokenizer_sha256"] != tokenizer_checksum(tokenizer):
            raise PackedDataError(f"{self.folder} was tokenized with another tokenizer than {tokenizer.path}")
        self.typecode = _TYPECODES[self.index["dtype"]]
        self.itemsize = array(self.typecode).itemsize
        if self.itemsize != int(self.index["dtype"].removeprefix("uint")) // 8:
            raise PackedDataError(f"this platform has no {self.index['dtype']} array type")
        self._maps: list[mmap.mmap] = []
        self._starts = [0]  # stream position of each shard's first token, then the total
        for shard in self.index["shards"]:
            self._maps.append(self._map(shard))
            self._starts.append(self._starts[-1] + shard["tokens"])
        if self._starts[-1] != self.index["tokens"]:
            raise PackedDataError(f"{self.folder}/{INDEX}: the shards hold {self._starts[-1]} tokens, "
                                  f"the index says {self.index['tokens']}")

    def _map(self, shard: dict[str, Any]) -> mmap.mmap:
        path = self.folder / shard["file"]
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise PackedDataError(f"{path}: shard is missing") from None
        if size != shard["tokens"] * self.itemsize or size == 0:
            raise PackedDataError(f"{path}: {size} bytes, expected {shard['tokens']} tokens of "
                                  f"{self.itemsize} bytes")
        with path.open("rb") as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def __len__(self) -> int:
        return self._starts[-1]

    def tokens(self, start: int, stop: int) -> list[int]:
        """The stream's tokens [start, stop), across shard boundaries."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"tokens [{start}, {stop}) are outside the stream of {len(self)} tokens")
        out: list[int] = []
        shard = bisect.bisect_right(self._starts, start) - 1
        while start < stop:
            begin = start - self._starts[shard]
            end = min(stop, self._starts[shard + 1]) - self._starts[shard]
            values = array(self.typecode, self._maps[shard][begin * self.itemsize:end * self.itemsize])
            if sys.byteorder != "little":
                values.byteswap()
            out += values.tolist()
            start += end - begin
            shard += 1
        return out

    def __getstate__(self) -> dict[str, Any]:  # memory maps do not pickle: data loader workers reopen them
        return {"folder": self.folder}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["folder"])


def is_packed_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder of token shards (it has an index.json), not a conversation file."""
    return (Path(path) / INDEX).is_file()


def _read_index(folder: Path) -> dict[str, Any]:
    path = folder / INDEX
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PackedDataError(f"no {INDEX} in {folder}: not a finished `glmkit tokenize-corpus` folder") from None
    except json.JSONDecodeError as e:
        raise PackedDataError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise PackedDataError(f"{path} is not a {FORMAT} index")
    if index.get("version") != VERSION:
        raise PackedDataError(f"{path}: format version {index.get('version')!r}; this glmkit reads {VERSION}")
    if index.get("dtype") not in _TYPECODES:
        raise PackedDataError(f"{path}: unknown dtype {index.get('dtype')!r}")
    return index


@dataclass(frozen=True)
class PretrainWindows:
    """Window i is the stream's tokens [i * seq_length, (i + 1) * seq_length), as a training example.

    Every token of a window is a label (the loop shifts labels by one position to predict the
    next token). Windows run across document boundaries; each document begins with `[gMASK] sop`
    and ends with `</s>`, so the model sees where one text stops and the next starts.
    """

    tokens: PackedTokens
    seq_length: int

    def __post_init__(self) -> None:
        if self.seq_length <= 1:
            raise ValueError(f"seq_length={self.seq_length} must be at least 2")
        if len(self) == 0:
            raise PackedDataError(f"{self.tokens.folder} holds {len(self.tokens)} tokens, fewer than one "
                                  f"window of {self.seq_length}")

    def __len__(self) -> int:
        return len(self.tokens) // self.seq_length

    @property
    def unused_tokens(self) -> int:
        """Tokens at the end of the stream that do not fill a window."""
        return len(self.tokens) - len(self) * self.seq_length

    def summary(self) -> str:
        """One line for people: the windows, and the tokens left over."""
        index = self.tokens.index
        unused = f"; the last {self.unused_tokens} tokens fill no window and are not used" if self.unused_tokens else ""
        return (f"{self.tokens.folder}: {len(self)} windows of {self.seq_length} tokens from {index['tokens']} tokens "
                f"of {index['documents']} documents{unused}")

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"window {i} of {len(self)}")
        i %= len(self)
        ids = self.tokens.tokens(i * self.seq_length, (i + 1) * self.seq_length)
        return {"input_ids": ids, "labels": list(ids)}
