"""POST /v1/completions: raw prompts, no chat roles.

A text prompt is encoded as `[gMASK] sop` + the text, as the official tokenizer builds model inputs
(as `glmkit generate` does); a prompt of token ids is used exactly as given. Several prompts give
`len(prompts) * n` choices, choice `p * n + j` being prompt p's j-th. The text is the generator's,
special tokens written by name. Streamed, each generated token gets its own chunk (its text may be
"", half of a character), and the end one more with the finish_reason.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .errors import bad_request
from .responses import DONE, collect_choices, event_stream, new_id, sse, unless_disconnected, usage
from .schemas import CompletionRequest, parse_request
from .service import Service

ENDPOINT = "/v1/completions"


class _Choice:
    def __init__(self, echo: str, logprobs: bool):
        self.text = echo
        self.tokens = 0
        self.finish_reason: str | None = None
        self.logprobs: dict[str, list] | None = (
            {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []} if logprobs else None)

    def take(self, service: Service, delta) -> dict[str, list] | None:
        """Add one Delta; return its logprobs in OpenAI's completion form (or None)."""
        entry = None
        if delta.token_id is not None:
            self.tokens += 1
            if self.logprobs is not None:
                vocab = service.vocabulary
                entry = {"tokens": [vocab.token_string(delta.token_id)], "token_logprobs": [delta.logprob],
                         "top_logprobs": [{vocab.token_string(t): v for t, v in delta.top_logprobs}],
                         "text_offset": [len(self.text)]}
                for key, values in entry.items():
                    self.logprobs[key] += values
        self.text += delta.text
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
        return entry


async def completions(service: Service, body: Any, http: Request, arrived: float) -> Response:
    request: CompletionRequest = parse_request(CompletionRequest, body)
    service.check_model(request.model)
    if request.stream_options is not None and not request.stream:
        raise bad_request("stream_options is only allowed when stream is true", param="stream_options")
    if request.suffix:
        raise bad_request("suffix is not supported: ChatGLM3 does not fill in the middle", param="suffix")
    if request.best_of is not None and request.best_of != request.n:
        raise bad_request(f"best_of={request.best_of} is not supported (only best_of equal to n, {request.n})",
                          param="best_of")
    if request.echo and request.logprobs is not None:
        raise bad_request("echo with logprobs is not supported (it needs the prompt's logprobs)", param="echo")

    prompts = _prompts(service, request.prompt)
    for ids, _ in prompts:
        service.check_context(len(ids), request.max_tokens)
    per_prompt = service.params(request, request.max_tokens, request.logprobs)
    params = [p for _ in prompts for p in per_prompt]
    inputs = [ids for ids, _ in prompts for _ in per_prompt]
    service.validate(inputs, params)
    choices = [_Choice(text if request.echo else "", request.logprobs is not None)
               for _, text in prompts for _ in per_prompt]
    prompt_tokens = sum(len(ids) for ids, _ in prompts)
    service.metrics.prompt_tokens += prompt_tokens
    head = {"id": new_id("cmpl"), "created": int(time.time()), "model": service.model_name}

    def run() -> AsyncIterator[tuple[int, Any]]:
        return service.choices(inputs, params, arrived)

    release = service.admit(len(params))
    if request.stream:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return event_stream(_stream(service, run, choices, head, prompt_tokens, include_usage), release)
    try:
        finished = await unless_disconnected(http, collect_choices(service, run, choices))
    finally:
        release()
    if finished is None:
        return Response(status_code=499)
    return JSONResponse({
        **head, "object": "text_completion",
        "choices": [{"index": i, "text": c.text, "logprobs": c.logprobs, "finish_reason": c.finish_reason}
                    for i, c in enumerate(choices)],
        "usage": usage(prompt_tokens, sum(c.tokens for c in choices)),
    })


def _prompts(service: Service, prompt: Any) -> list[tuple[list[int], str]]:
    """(ids, text) of each prompt; the text is what `echo` repeats."""
    tok = service.tokenizer
    start = [tok.token_id("[gMASK]"), tok.token_id("sop")]
    texts = [prompt] if isinstance(prompt, str) else prompt
    if not texts:
        raise bad_request("prompt must not be an empty list", param="prompt")
    if isinstance(texts[0], str):
        return [(start + tok.encode(text), text) for text in texts]
    batches = [prompt] if isinstance(prompt[0], int) else prompt
    for i, ids in enumerate(batches):
        if not ids:
            raise bad_request(f"prompt[{i}] is an empty list of token ids", param="prompt")
        bad = [t for t in ids if not 0 <= t < tok.vocab_size]
        if bad:
            raise bad_request(f"prompt holds token id {bad[0]}, outside the vocabulary [0, {tok.vocab_size})",
                              param="prompt")
    return [(list(ids), tok.decode(ids)) for ids in batches]


async def _stream(service: Service, run, choices: list[_Choice], head: dict[str, Any], prompt_tokens: int,
                  include_usage: bool) -> AsyncIterator[str]:
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, text: str, logprobs=None, finish_reason: str | None = None) -> str:
        return sse({**head, "object": "text_completion", **extra, "choices": [
            {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]})

    for i, choice in enumerate(choices):
        if choice.text:  # echo
            yield chunk(i, choice.text)
    async with aclosing(run()) as deltas:
        async for index, delta in deltas:
            entry = choices[index].take(service, delta)
            if delta.text or delta.token_id is not None or delta.finish_reason is not None:
                yield chunk(index, delta.text, entry, delta.finish_reason)  # one chunk per token, text or not
    if include_usage:
        yield sse({**head, "object": "text_completion", "choices": [],
                   "usage": usage(prompt_tokens, sum(c.tokens for c in choices))})
    yield DONE
