"""POST /v1/chat/completions: OpenAI chat requests answered by ChatGLM3, streamed or whole.

The request becomes a ChatGLM3 prompt (`openai_tools.chat_prompt`), plus a forced start when the
request demands one: a tool's name for a named `tool_choice` (or "required" with one tool), an empty
metadata line (a text turn) for `response_format: json_object`. Each of the `n` choices is its own
generation; its text goes through a `ReplyStream`, whose deltas are the stream's chunks, or, merged,
the whole message. A request that asks the server to run tools or code itself (glmkit's entries in
`tools`) is handed to `agent_completions`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from glmkit.chat_format import render_messages

from .agent_completions import agent_chat_completions, wants_server_side
from .constraints import JsonObject, OneOf
from .errors import bad_request
from .openai_tools import ChatPrompt, ReplyStream, as_legacy, chat_prompt, merge_deltas
from .responses import DONE, collect_choices, event_stream, logprob_entry, new_id, sse, unless_disconnected, usage
from .schemas import ChatCompletionRequest, parse_request
from .server_tools import ServerTools
from .service import Service

ENDPOINT = "/v1/chat/completions"


class _Choice:
    """One choice's progress: its reply parser, deltas, logprobs and token count."""

    def __init__(self, prompt: ChatPrompt, logprobs: bool):
        self.reply = ReplyStream(prompt.tool_names, prompt.prefill, prompt.single_call)
        self.legacy = prompt.legacy
        self.deltas: list[dict[str, Any]] = []
        self.logprobs: list[dict[str, Any]] | None = [] if logprobs else None
        self.tokens = 0
        self.finish_reason: str | None = None

    def take(self, service: Service, delta) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(new message deltas, new logprob entries) for one backend Delta."""
        entries = []
        if delta.token_id is not None:
            self.tokens += 1
            if self.logprobs is not None:
                entries.append(logprob_entry(service.vocabulary, delta.token_id, delta.logprob, delta.top_logprobs))
                self.logprobs += entries
        deltas = self.reply.push(delta.text)
        if delta.finish_reason is not None:
            deltas += self.reply.finish()
            called = self.reply.calls > 0 and delta.finish_reason == "stop"
            self.finish_reason = ("function_call" if self.legacy else "tool_calls") if called else delta.finish_reason
        if self.legacy:
            deltas = [as_legacy(d) for d in deltas]
        self.deltas += deltas
        return deltas, entries

    def message(self) -> dict[str, Any]:
        message = merge_deltas([d for d in self.deltas if "function_call" not in d])
        calls = [d["function_call"] for d in self.deltas if "function_call" in d]
        if calls:
            message["function_call"] = {"name": calls[0]["name"], "arguments": "".join(c["arguments"] for c in calls)}
            message["content"] = message["content"] or None
        return message


async def chat_completions(service: Service, body: Any, http: Request, arrived: float,
                           server_tools: ServerTools | None = None) -> Response:
    request: ChatCompletionRequest = parse_request(ChatCompletionRequest, body)
    service.check_model(request.model)
    if request.stream_options is not None and not request.stream:
        raise bad_request("stream_options is only allowed when stream is true", param="stream_options")
    if request.top_logprobs is not None and not request.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", param="top_logprobs")
    if (request.max_tokens is not None and request.max_completion_tokens is not None
            and request.max_tokens != request.max_completion_tokens):
        raise bad_request("max_tokens and max_completion_tokens differ; give one", param="max_completion_tokens")
    max_tokens = request.max_completion_tokens or request.max_tokens
    if wants_server_side(request):
        return await agent_chat_completions(service, server_tools or ServerTools(), request, http, arrived,
                                            max_tokens)

    prompt = chat_prompt(request)
    json_mode = request.response_format is not None and request.response_format.type != "text"
    if json_mode:
        _check_json_mode(request, prompt)
        prompt.prefill = ""  # a text turn: no tool call, no metadata
    tok = service.tokenizer
    try:
        prompt_ids = render_messages(tok, prompt.messages)
    except ValueError as e:
        raise bad_request(f"messages: {e}", param="messages") from None
    except RecursionError:  # e.g. a tool's parameters nested too deeply to write out
        raise bad_request("messages or tools are nested too deeply", param="messages") from None
    if prompt.prefill is not None:
        prompt_ids += tok.encode(prompt.prefill + "\n")
    service.check_context(len(prompt_ids), max_tokens)

    if json_mode:
        factory = lambda: JsonObject(service.vocabulary)  # noqa: E731
    elif prompt.choose_tool:
        sequences = [tok.encode(name + "\n") for name in prompt.tool_names]
        factory = lambda: OneOf(sequences)  # noqa: E731
    else:
        factory = None
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    params = service.params(request, max_tokens, logprobs, factory)
    service.validate([prompt_ids] * len(params), params)
    service.metrics.prompt_tokens += len(prompt_ids)
    choices = [_Choice(prompt, request.logprobs) for _ in params]
    head = {"id": new_id("chatcmpl"), "created": int(time.time()), "model": service.model_name}

    def run() -> AsyncIterator[tuple[int, Any]]:
        return service.choices([prompt_ids] * len(params), params, arrived)

    release = service.admit(len(params))  # before the 200: a saturated server answers 503
    if request.stream:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return event_stream(_stream(service, run, choices, head, len(prompt_ids), include_usage), release)
    try:
        finished = await unless_disconnected(http, collect_choices(service, run, choices))
    finally:
        release()
    if finished is None:
        return Response(status_code=499)  # the client is gone; nobody reads this
    return JSONResponse({
        **head, "object": "chat.completion",
        "choices": [{"index": i, "message": c.message(), "logprobs": None if c.logprobs is None else
                     {"content": c.logprobs}, "finish_reason": c.finish_reason} for i, c in enumerate(choices)],
        "usage": usage(len(prompt_ids), sum(c.tokens for c in choices)),
    })


def _check_json_mode(request: ChatCompletionRequest, prompt: ChatPrompt) -> None:
    if request.response_format.type == "json_schema":
        raise bad_request("response_format json_schema is not supported; use json_object", param="response_format")
    if prompt.prefill is not None or prompt.choose_tool:
        raise bad_request("response_format json_object asks for a JSON text reply; it cannot be combined with a "
                          "tool_choice that forces a tool call", param="response_format")
    if request.ignore_eos:
        raise bad_request("response_format json_object ends the reply after the object; it cannot be combined "
                          "with ignore_eos", param="ignore_eos")


async def _stream(service: Service, run, choices: list[_Choice], head: dict[str, Any], prompt_tokens: int,
                  include_usage: bool) -> AsyncIterator[str]:
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, delta: dict[str, Any], finish_reason: str | None = None, logprobs=None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": None if logprobs is None else {"content": logprobs},
                  "finish_reason": finish_reason}
        return sse({**head, "object": "chat.completion.chunk", "choices": [choice], **extra})

    for i in range(len(choices)):
        yield chunk(i, {"role": "assistant", "content": ""})
    async with aclosing(run()) as deltas:
        async for index, delta in deltas:
            choice = choices[index]
            new, entries = choice.take(service, delta)
            logprobs = entries or None
            for k, piece in enumerate(new):
                yield chunk(index, piece, logprobs=logprobs if k == 0 else None)
            if not new and entries:
                yield chunk(index, {}, logprobs=logprobs)
            if choice.finish_reason is not None:
                yield chunk(index, {}, choice.finish_reason)
    if include_usage:
        yield sse({**head, "object": "chat.completion.chunk", "choices": [],
                   "usage": usage(prompt_tokens, sum(c.tokens for c in choices))})
    yield DONE
