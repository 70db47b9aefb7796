"""Each token's text and bytes on its own, for logprobs and for checking candidate tokens.

The tokenizer decodes sequences; logprobs and constraints need single tokens as they add to a text
mid-way: a SentencePiece piece with its leading-space mark as a space, a byte-fallback piece as its
one byte, a special token as its name, and nothing for control pieces (`<s>`, `</s>`, `<unk>`).
Built once per tokenizer (about 0.1 s) by whoever needs it.
"""

from __future__ import annotations


class Vocabulary:
    def __init__(self, tokenizer):
        sp = tokenizer._sp  # the SentencePiece model: single pieces are not exposed otherwise
        self.size = tokenizer.vocab_size
        self.num_pieces = sp.vocab_size()  # ids from here on are the special tokens
        self.eos_id = tokenizer.eos_id
        self.texts: list[str | None] = []  # None: a control or byte piece
        self.byte_values: dict[int, int] = {}
        for i in range(sp.vocab_size()):
            if sp.is_byte(i):
                self.byte_values[i] = int(sp.id_to_piece(i)[3:5], 16)  # "<0xE4>"
                self.texts.append(None)
            elif sp.is_control(i) or sp.is_unknown(i):
                self.texts.append(None)
            else:
                self.texts.append(sp.id_to_piece(i).replace("\u2581", " "))
        for i in range(self.num_pieces, self.size):
            self.texts.append(tokenizer.decode([i]))  # special tokens: their names

    def token_bytes(self, token_id: int) -> bytes:
        if token_id in self.byte_values:
            return bytes([self.byte_values[token_id]])
        return (self.texts[token_id] or "").encode("utf-8")

    def token_string(self, token_id: int) -> str:
        """The token as OpenAI's logprobs show it: its text, or `bytes:\\xNN` for a lone byte."""
        if token_id in self.byte_values:
            value = self.byte_values[token_id]
            return chr(value) if value < 0x80 else f"bytes:\\x{value:02x}"
        return self.texts[token_id] or ""
