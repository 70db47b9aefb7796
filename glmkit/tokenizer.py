"""The ChatGLM3 tokenizer: SentencePiece pieces plus nine special tokens, and streaming decode.

This module owns text <-> ids for single strings. It knows nothing of roles or messages (that is
`chat_format`), and nothing of the model.

Facts it keeps exactly (ChatGLM2/ChatGLM3 `tokenizer.model`):
- N SentencePiece pieces (ids 0..N-1), then the nine special tokens at ids N..N+8, as the official
  SPTokenizer numbers them: 64789 pieces and specials 64789..64797 in the official model; any
  other SentencePiece model (e.g. one made by `glmkit train-tokenizer`) gets its specials after
  its own pieces.
- `</s>` (2) ends a reply; `<unk>` (0) doubles as padding.
- Text never becomes a special token: `encode` is plain SentencePiece, whose vocabulary has no
  special ids, so a user who types `<|user|>` gets ordinary pieces. This is the format's defence
  against prompt injection.
- `decode` follows the official `SPTokenizer.decode`: each run of ordinary ids is decoded by
  SentencePiece on its own, special ids are written as their names between runs.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Iterable
from pathlib import Path

from sentencepiece import SentencePieceProcessor

from glmkit import chat_format

SPECIAL_TOKEN_NAMES = (
    "[MASK]", "[gMASK]", "[sMASK]", "sop", "eop",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
)
NUM_PIECES = 64789  # the official ChatGLM2/3 model's pieces; a model's own count is `num_pieces`
REPLACEMENT_CHAR = "\ufffd"  # what SentencePiece writes for bytes that are not (yet) valid UTF-8


class ChatGLMTokenizer:
    """SentencePiece + the nine ChatGLM3 special tokens. Build it with `load_tokenizer`."""

    def __init__(self, model_file: str | os.PathLike):
        path = Path(model_file)
        try:
            self._sp = SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path}: not a SentencePiece model ({e})") from e
        if self._sp.eos_id() < 0:
            raise ValueError(f"{path}: the SentencePiece model has no end-of-text piece `</s>`")
        if self._sp.piece_to_id("a") == self._sp.unk_id():
            raise ValueError(f"{path}: the SentencePiece model has no piece 'a' (streaming decode needs it)")
        self.path = path
        self.num_pieces: int = self._sp.vocab_size()  # 64789 in the official model
        self._special_ids = {name: self.num_pieces + i for i, name in enumerate(SPECIAL_TOKEN_NAMES)}
        self._special_names = {i: name for name, i in self._special_ids.items()}
        self.eos_id: int = self._sp.eos_id()  # 2, `</s>`
        self.pad_id: int = self._sp.unk_id()  # 0, `<unk>`: ChatGLM pads with it
        # Generation ends when the model hands the turn back: end of text, the user, or a tool.
        self.stop_ids: tuple[int, ...] = (
            self.eos_id, self._special_ids["<|user|>"], self._special_ids["<|observation|>"],
        )

    # -- vocabulary ------------------------------------------------------------------------------

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special token name -> id (a copy)."""
        return dict(self._special_ids)

    @property
    def vocab_size(self) -> int:
        """Pieces plus special tokens (64798 officially); the model pads its embedding rows further."""
        return self.num_pieces + len(SPECIAL_TOKEN_NAMES)

    def token_id(self, name: str) -> int:
        """The id of a special token, e.g. `token_id("<|user|>") == 64795` in the official model."""
        try:
            return self._special_ids[name]
        except KeyError:
            known = ", ".join(SPECIAL_TOKEN_NAMES)
            raise ValueError(f"unknown special token {name!r}; known: {known}") from None

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_names

    # -- text <-> ids ----------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Plain SentencePiece ids for `text`; never special ids, whatever the text says."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        return self._sp.encode(text)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text for `ids`, as the official SPTokenizer.decode writes it.

        Runs of ordinary ids are decoded by SentencePiece one run at a time (so each run drops the
        leading space of its first piece, as a fresh decode does); special ids are written as
        their names, or left out when `skip_special_tokens`.
        """
        parts: list[str] = []
        run: list[int] = []
        for token_id in self._checked(ids):
            if token_id in self._special_names:
                if run:
                    parts.append(self._sp.decode(run))
                    run = []
                if not skip_special_tokens:
                    parts.append(self._special_names[token_id])
            else:
                run.append(token_id)
        if run:
            parts.append(self._sp.decode(run))
        return "".join(parts)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Prompt ids for a conversation; see `glmkit.chat_format.render_messages`."""
        return chat_format.render_messages(self, messages, add_generation_prompt)

    def detokenizer(self, skip_special_tokens: bool = False) -> IncrementalDetokenizer:
        """A fresh streaming decoder for one sequence of generated ids."""
        return IncrementalDetokenizer(self, skip_special_tokens)

    def check_id(self, token_id: int) -> int:
        """`token_id` as an int, or a ValueError naming it when it is not in the vocabulary."""
        try:
            value = operator.index(token_id)
        except TypeError:
            raise ValueError(f"token id {token_id!r} is not an integer") from None
        if not 0 <= value < self.vocab_size:
            raise ValueError(f"token id {value} is out of range [0, {self.vocab_size})")
        return value

    def _checked(self, ids: Iterable[int]) -> list[int]:
        return [self.check_id(i) for i in ids]


class IncrementalDetokenizer:
    """Turns generated ids into text one id at a time, for streaming.

    Invariant: the concatenation of everything `push` and `flush` return equals
    `tokenizer.decode(all ids pushed)`, and no chunk ends with a character still missing bytes
    (so U+FFFD shows only where the full decode has it too).

    How: a special id ends the current SentencePiece run (as in `decode`). Within a run, ids are
    held until their text is safe to emit, i.e. not empty and not ending in U+FFFD (a byte-fallback
    character still missing bytes, like `<0xF0>` waiting for the rest of an emoji). Only the held
    ids are decoded, so each push costs O(held), not O(all text). Two SentencePiece details:
    - At the start of a run, decode drops the leading space of the first visible piece. So the
      first chunk of a run is `decode(held)` and is emitted only once it has text.
    - Mid-run, a piece keeps its space. Decoding the held ids alone would drop it, so we decode
      them behind a sentinel piece ("a") and cut the sentinel's text off again.
    """

    # A UTF-8 character is at most 4 bytes, so once more ids than this are held, everything but the
    # last 4 is final: no future byte can change it. Only garbage bytes hold this many.
    MAX_HELD = 16

    def __init__(self, tokenizer: ChatGLMTokenizer, skip_special_tokens: bool = False):
        self._tok = tokenizer
        self._sp = tokenizer._sp
        self._skip_special = skip_special_tokens
        self._sentinel = [self._sp.piece_to_id("a")]
        self._held: list[int] = []  # ordinary ids of the current run not yet emitted
        self._run_started = False  # True once this run emitted text (its leading space is spent)
        self._finished = False

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text that is now safe to show (maybe "")."""
        if self._finished:
            raise RuntimeError("push() after flush(): start a new detokenizer for a new sequence")
        token_id = self._tok.check_id(token_id)
        if self._tok.is_special(token_id):
            text = self._end_run()
            if not self._skip_special:
                text += self._tok.decode([token_id])
            return text
        if self._sp.is_control(token_id) and not (self._held and self._sp.is_byte(self._held[-1])):
            # `<s>`, `</s>` have no text; they matter only between two byte pieces, where they
            # split a UTF-8 sequence. Dropping the others keeps runs of them from being held.
            return ""
        self._held.append(token_id)
        text = self._decode_held(self._held)
        if text and not text.endswith(REPLACEMENT_CHAR):
            return self._emit(len(self._held), text)
        if len(self._held) > self.MAX_HELD:
            return self._emit_final_part()
        return ""

    def flush(self) -> str:
        """The rest of the text; call once at the end of the sequence."""
        self._finished = True
        return self._end_run()

    def _decode_held(self, ids: list[int]) -> str:
        if not self._run_started:
            return self._sp.decode(ids)
        return self._sp.decode(self._sentinel + ids)[1:]

    def _emit(self, count: int, text: str) -> str:
        del self._held[:count]
        self._run_started = True
        return text

    def _emit_final_part(self) -> str:
        # Cut the held ids a little before the end and emit the head, at a cut where the two halves
        # decode to exactly the whole (no byte sequence straddles it). A decoded character spans
        # at most 4 bytes, so one of 4 neighbouring cuts always qualifies.
        whole = self._decode_held(self._held)
        for cut in range(len(self._held) - 4, len(self._held) - 8, -1):
            head = self._decode_held(self._held[:cut])
            tail = self._sp.decode(self._sentinel + self._held[cut:])[1:]
            if head and whole == head + tail:  # an empty head would not spend the leading space
                return self._emit(cut, head)
        return ""

    def _end_run(self) -> str:
        text = self._decode_held(self._held) if self._held else ""
        self._held = []
        self._run_started = False
        return text


def load_tokenizer(path: str | os.PathLike) -> ChatGLMTokenizer:
    """Load the tokenizer from a `tokenizer.model` file or a folder that holds one."""
    path = Path(path)
    model_file = path / "tokenizer.model" if path.is_dir() else path
    if not model_file.is_file():
        raise FileNotFoundError(f"no tokenizer.model at {path}")
    return ChatGLMTokenizer(model_file)
