"""One request at a time: prefill, decode token by token, stop rules, streaming.

This is the naive path, kept simple on purpose: later engines (continuous batching, paged caches,
compiled steps) are tested against it token for token. It speaks token ids and text; it knows
nothing of chat messages (that is `chat_format` and `chat`).

Stop rules, in one place:
- a stop id (by default the tokenizer's `</s>`, `<|user|>`, `<|observation|>`) ends generation and
  is not part of the output;
- a stop string ends the text before it: the stop string is never emitted, and text is held back
  only while it could still be the start of a stop string;
- `max_new_tokens`, or the context window filling up, ends with finish reason "length".
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .sampling import SamplingParams, make_generator, presence_mask, sample

GREEDY = SamplingParams(temperature=0.0)


class ContextLengthError(ValueError):
    """A prompt that leaves no room for a reply in the model's context window."""

    def __init__(self, prompt_tokens: int, context_window: int):
        self.prompt_tokens = prompt_tokens
        self.context_window = context_window
        self.excess = prompt_tokens - context_window + 1  # tokens to remove to leave room for one reply token
        super().__init__(
            f"the prompt is {prompt_tokens} tokens, {self.excess} too many for the model's context window of "
            f"{context_window} tokens (a prompt may hold at most {context_window - 1}, leaving room for the "
            "reply); shorten it — glmkit never cuts a prompt silently")


def check_context(prompt_tokens: int, context_window: int) -> None:
    """Raise ContextLengthError unless the prompt leaves room for at least one new token."""
    if prompt_tokens >= context_window:
        raise ContextLengthError(prompt_tokens, context_window)


@dataclass
class Delta:
    """One step of a stream: the token generated and the text that is now safe to show.

    Every generated token yields one Delta (its text may be "", e.g. half of an emoji). The last
    Delta has `token_id=None`, the rest of the text, and `finish_reason` "stop" or "length".
    """

    text: str
    token_id: int | None
    finish_reason: str | None = None


@dataclass
class Completion:
    text: str
    token_ids: list[int]  # generated ids; a stop id that ended generation is not among them (a stop string's are)
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int


class StopStrings:
    """Text-level stop strings over a stream of text chunks.

    `push` returns (text safe to emit, stopped). Held back is the longest tail of the text that is
    a proper prefix of some stop string, so a stop string split across tokens is still caught and
    never emitted, and nothing is delayed longer than it could matter.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.held = ""

    def push(self, text: str) -> tuple[str, bool]:
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[:min(hits)], True
        keep = max((k for s in self.stops for k in range(1, len(s)) if buf.endswith(s[:k])), default=0)
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        """The held text, once no more text will come (so it can no longer become a stop string)."""
        text, self.held = self.held, ""
        return text


@torch.inference_mode()
def generate_stream(model, tokenizer, prompt_ids: Sequence[int], params: SamplingParams,
                    skip_special_tokens: bool = False) -> Iterator[Delta]:
    """Generate one reply to `prompt_ids`, yielding a Delta per token and a final one.

    The KV cache is sized for the prompt plus max_new_tokens, capped at the context window.
    Special tokens the model writes (e.g. `<|assistant|>` starting a second turn) appear in the
    text by name unless `skip_special_tokens`; the chat format needs them.
    """
    prompt_ids = [int(i) for i in prompt_ids]
    if not prompt_ids:
        raise ValueError("cannot generate from an empty prompt")
    n, window = len(prompt_ids), model.config.seq_length
    check_context(n, window)
    budget = window - n if params.max_new_tokens is None else min(params.max_new_tokens, window - n)
    stop_ids = set(tokenizer.stop_ids if params.stop_token_ids is None else params.stop_token_ids)
    vocab_size, device = tokenizer.vocab_size, model.device

    cache = model.new_kv_cache(1, n + budget)  # the last token generated is never fed back
    generator = make_generator(params.seed, device)
    penalise = params.repetition_penalty != 1
    seen = presence_mask([prompt_ids], model.config.padded_vocab_size, device) if penalise else None  # (1, V)
    detokenizer = tokenizer.detokenizer(skip_special_tokens=skip_special_tokens)
    stops = StopStrings(params.stop)

    inputs = torch.tensor([prompt_ids], device=device)
    for _ in range(budget):
        logits = model(inputs, kv_cache=cache, last_only=True)[:, -1]  # (1, V)
        token = int(sample(logits, [params], generators=[generator], seen=seen, vocab_size=vocab_size)[0])
        if token in stop_ids:
            yield _final(detokenizer, stops, "stop")
            return
        text, stopped = stops.push(detokenizer.push(token))
        yield Delta(text, token)
        if stopped:
            yield Delta("", None, "stop")
            return
        if seen is not None:
            seen[0, token] = True
        inputs = torch.tensor([[token]], device=device)
    yield _final(detokenizer, stops, "length")


def _final(detokenizer, stops: StopStrings, reason: str) -> Delta:
    text, stopped = stops.push(detokenizer.flush())
    return Delta(text if stopped else text + stops.flush(), None, "stop" if stopped else reason)


def generate(model, tokenizer, prompt_ids: Sequence[int], params: SamplingParams,
             skip_special_tokens: bool = False) -> Completion:
    """The whole of `generate_stream`, collected."""
    text, token_ids = [], []
    for delta in generate_stream(model, tokenizer, prompt_ids, params, skip_special_tokens):
        text.append(delta.text)
        if delta.token_id is not None:
            token_ids.append(delta.token_id)
        finish_reason = delta.finish_reason
    return Completion("".join(text), token_ids, finish_reason, len(prompt_ids))


@torch.inference_mode()
def generate_greedy_batch(model, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int | None = None,
                          stop_token_ids: Sequence[int] | None = None) -> list[Completion]:
    """Greedy replies to several prompts at once, left-padded with an attention mask.

    The oracle for batched engines: each row's tokens equal `generate(..., GREEDY)` on that prompt
    alone. No stop strings; text is `tokenizer.decode` of the row's tokens.
    """
    prompts = [[int(i) for i in p] for p in prompts]
    if not prompts or not all(prompts):
        raise ValueError("generate_greedy_batch needs at least one prompt, and no empty prompts")
    window, device = model.config.seq_length, model.device
    for p in prompts:
        check_context(len(p), window)
    B, L = len(prompts), max(map(len, prompts))
    budgets = [window - len(p) if max_new_tokens is None else min(max_new_tokens, window - len(p)) for p in prompts]
    stop_ids = set(tokenizer.stop_ids if stop_token_ids is None else stop_token_ids)
    params = [GREEDY] * B

    inputs = torch.tensor([[tokenizer.pad_id] * (L - len(p)) + p for p in prompts], device=device)  # (B, L)
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts], device=device)
    cache = model.new_kv_cache(B, L + max(budgets))
    outputs: list[list[int]] = [[] for _ in prompts]
    reasons: list[str | None] = [None] * B
    while any(r is None for r in reasons):
        logits = model(inputs, attention_mask=mask, kv_cache=cache, last_only=True)[:, -1]  # (B, V)
        tokens = sample(logits, params, vocab_size=tokenizer.vocab_size).tolist()
        for row, token in enumerate(tokens):
            if reasons[row] is not None:
                continue
            if token in stop_ids:
                reasons[row] = "stop"
                continue
            outputs[row].append(token)
            if len(outputs[row]) == budgets[row]:
                reasons[row] = "length"
        # Finished rows are fed padding, masked out; the others their new token.
        active = [r is None for r in reasons]
        inputs = torch.tensor([[t if a else tokenizer.pad_id] for t, a in zip(tokens, active)], device=device)
        mask = torch.cat((mask, torch.tensor(active, device=device, dtype=mask.dtype)[:, None]), dim=1)
    return [Completion(tokenizer.decode(out), out, reason, len(p))
            for out, reason, p in zip(outputs, reasons, prompts)]
