"""Constraints on the next token: what `tool_choice: "required"` and `response_format: json_object` need.

A constraint sees one request's logits row before sampling and the ids it generated so far, and
sets the logits of the tokens it forbids to -inf. Two kinds:

- `OneOf`: the reply starts with one of a few token sequences (the metadata line `name + "\\n"` of
  one of the declared tools), then is free.
- `JsonObject`: the reply is one JSON object and nothing else. The candidates are checked in order
  of likelihood against a character-level JSON recogniser, best first, until enough survive; once
  the object is closed only `</s>` may follow. Checking the whole 65k vocabulary every step would
  cost seconds, so only the `candidates` most likely tokens can be chosen (more when none of them
  fit), which changes nothing for greedy decoding and little for sampling.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Protocol

import torch

from .vocab import Vocabulary


class Constraint(Protocol):
    def apply(self, logits: torch.Tensor, generated: Sequence[int]) -> None:
        """Set the logits (V,) of forbidden next tokens to -inf, in place."""


class OneOf:
    """The generated ids must start with one of `sequences`; after a whole one, anything goes."""

    def __init__(self, sequences: Sequence[Sequence[int]]):
        if not sequences or not all(sequences):
            raise ValueError("OneOf needs at least one non-empty token sequence")
        self.sequences = [list(s) for s in sequences]

    def apply(self, logits: torch.Tensor, generated: Sequence[int]) -> None:
        n = len(generated)
        live = [s for s in self.sequences if s[:n] == list(generated[:len(s)])]
        if any(len(s) <= n for s in live):
            return  # a whole sequence is written
        allowed = sorted({s[n] for s in live})
        keep = logits[allowed].clone()
        logits.fill_(-math.inf)
        logits[allowed] = keep


class JsonObject:
    """The reply is a single JSON object: `{` first (after optional whitespace), `</s>` right after `}`."""

    NON_ASCII = "\u00e9"  # stands for a byte of a multi-byte character: valid only inside a string

    def __init__(self, vocabulary: Vocabulary, candidates: int = 64):
        # The text each token adds, as checked: a lone byte as its ASCII character or a stand-in.
        self.texts = list(vocabulary.texts)
        for token, value in vocabulary.byte_values.items():
            self.texts[token] = chr(value) if value < 0x80 else self.NON_ASCII
        for token in range(vocabulary.num_pieces, vocabulary.size):
            self.texts[token] = None  # special tokens never appear inside JSON
        self.eos_id = vocabulary.eos_id
        self.candidates = candidates
        self._state = JsonPrefix()
        self._consumed = 0  # how many generated ids `_state` has read

    def apply(self, logits: torch.Tensor, generated: Sequence[int]) -> None:
        for token in generated[self._consumed:]:
            text = self.texts[token] if token < len(self.texts) else None
            self._state = self._state.fed(text or "") or self._state  # a forced token always fits
        self._consumed = len(generated)
        if self._state.complete:
            allowed = [self.eos_id]
        else:
            allowed = self._fitting(logits)
        keep = logits[allowed].clone()
        logits.fill_(-math.inf)
        logits[allowed] = keep

    def _fitting(self, logits: torch.Tensor) -> list[int]:
        k, V = self.candidates, len(self.texts)
        while True:
            ids = logits[:V].topk(min(k, V)).indices.tolist()
            fit = [i for i in ids if self.texts[i] and self._state.fed(self.texts[i]) is not None]
            if fit or k >= V:
                return fit or [self.eos_id]  # nothing can continue: end (the text is not JSON)
            k *= 8


class JsonPrefix:
    """A character-level recogniser of prefixes of one JSON object (RFC 8259 grammar).

    `fed(text)` returns the state after `text`, or None when `text` cannot continue a valid object.
    Runs of whitespace between tokens are capped at MAX_SPACE characters so a reply cannot loop on
    blanks. States are immutable: a failed candidate leaves nothing behind.
    """

    MAX_SPACE = 32
    _ESCAPES = set('"\\/bfnrtu')
    _LITERALS = ("true", "false", "null")

    def __init__(self, stack: tuple[str, ...] = (), expect: str = "start", pending: str = "", space: int = 0):
        self.stack = stack  # open containers, "{" or "["
        self.expect = expect
        self.pending = pending  # what is left of a literal, or the number/escape being read
        self.space = space

    @property
    def complete(self) -> bool:
        return self.expect == "done"

    def fed(self, text: str) -> JsonPrefix | None:
        state = [self.stack, self.expect, self.pending, self.space]
        for ch in text:
            if not self._step(state, ch):
                return None
        return JsonPrefix(*state)

    def _step(self, s: list, ch: str) -> bool:  # noqa: C901 (one branch per grammar state)
        stack, expect, pending, _ = s
        if expect == "string":
            if ch == '"':
                s[1] = "colon" if pending == "key" else self._after_value(stack)
                s[2] = ""
            elif ch == "\\":
                s[1], s[2] = "escape", pending
            elif ord(ch) < 0x20:
                return False
            return True
        if expect == "escape":
            if ch not in self._ESCAPES:
                return False
            s[1], s[2] = ("unicode", pending + ":0") if ch == "u" else ("string", pending)
            return True
        if expect == "unicode":
            role, count = pending.rsplit(":", 1)
            if ch not in "0123456789abcdefABCDEF":
                return False
            count = int(count) + 1
            s[1], s[2] = ("string", role) if count == 4 else ("unicode", f"{role}:{count}")
            return True
        if expect == "literal":
            if not pending.startswith(ch):
                return False
            s[2] = pending[1:]
            if not s[2]:
                s[1] = self._after_value(stack)
            return True
        if expect == "number":
            if _number_prefix(pending + ch):
                s[2] = pending + ch
                return True
            if not _number_complete(pending):
                return False
            s[1], s[2] = self._after_value(stack), ""
            return self._step(s, ch)
        if ch in " \t\n\r":
            if expect == "done" or s[3] >= self.MAX_SPACE:
                return False
            s[3] += 1
            return True
        s[3] = 0
        if expect == "start":
            if ch != "{":
                return False
            s[0], s[1] = ("{",), "key_or_end"
            return True
        if expect in ("key_or_end", "key"):
            if ch == '"':
                s[1], s[2] = "string", "key"
                return True
            if ch == "}" and expect == "key_or_end":
                return self._close(s, "{")
            return False
        if expect == "colon":
            if ch != ":":
                return False
            s[1] = "value"
            return True
        if expect in ("value", "value_or_end"):
            if ch == "]" and expect == "value_or_end":
                return self._close(s, "[")
            return self._start_value(s, ch)
        if expect == "comma_or_end":
            if ch == ",":
                s[1] = "key" if stack[-1] == "{" else "value"
                return True
            if ch in "}]":
                return self._close(s, "{" if ch == "}" else "[")
            return False
        return False  # done: nothing may follow

    def _start_value(self, s: list, ch: str) -> bool:
        if ch == '"':
            s[1], s[2] = "string", "value"
        elif ch == "{":
            s[0], s[1] = s[0] + ("{",), "key_or_end"
        elif ch == "[":
            s[0], s[1] = s[0] + ("[",), "value_or_end"
        elif ch == "-" or ch.isdigit() and ch.isascii():
            s[1], s[2] = "number", ch
        else:
            literal = next((w for w in self._LITERALS if w[0] == ch), None)
            if literal is None:
                return False
            s[1], s[2] = "literal", literal[1:]
        return True

    def _close(self, s: list, opener: str) -> bool:
        if not s[0] or s[0][-1] != opener:
            return False
        s[0] = s[0][:-1]
        s[1] = self._after_value(s[0])
        return True

    @staticmethod
    def _after_value(stack: tuple[str, ...]) -> str:
        return "comma_or_end" if stack else "done"


_NUMBER = re.compile(r"-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?")


def _number_complete(text: str) -> bool:
    return _NUMBER.fullmatch(text) is not None


def _number_prefix(text: str) -> bool:
    """Whether `text` can still grow into a JSON number: every unfinished prefix awaits a digit."""
    return _number_complete(text) or _number_complete(text + "0")
