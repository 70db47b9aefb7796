"""Chat completions that run tools or code on the server: the agent loop behind one request.

A chat request whose `tools` hold glmkit's server-side entries (see `server_tools`) is answered by
`glmkit.Agent`: reply -> tool call or code -> observation -> reply, until the model answers in text
or the server's round limit is reached; each reply is one generation on the server's backend. The
client's own function tools may sit beside the server's: when the model calls one, the run stops
and the call is returned to the client as usual (`tool_calls`, finish_reason "tool_calls"); the
client sends the result back in the next request, which continues with a new run.

The response is OpenAI's, with what happened on the way in an extension field. Whole:

    {"id", "object": "chat.completion", "choices": [{"message": {...}, "finish_reason"}], "usage",
     "agent": {"rounds": 2, "stop_reason": "answer", "steps": [STEP, ...]}}

Streamed: the answer's text as usual `delta.content` chunks; each step as a chunk with an empty
delta and the step in `agent_step`; the last chunk (with the finish_reason) carries
`"agent": {"rounds", "stop_reason"}`; then `[DONE]`. OpenAI clients read both forms (the fields
are extra; the step chunks have an empty delta).

A STEP is `AgentEvent.to_dict()`: `{"type", "round", "text", ...}` of type "tool_call" (name,
arguments), "tool_result" (name, text: what the model read, error), "code" (text: the code) or
"code_output" (text: the observation the model read, status, restarted, images:
[{"mime", "data": base64}], and here also outputs: [{"type": stdout|stderr|result|display|error|
image, "text", "image": index into images}] in the kernel's order, and notes: what the sandbox did).

finish_reason: "stop" (an answer), "length" (the answer hit max_tokens, or the round limit was
reached: then stop_reason is "max_rounds" and the last step is a call that was not run),
"tool_calls" (a client tool was called). usage counts every reply of the run.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from glmkit.agent.loop import Agent, AgentEvent, AgentResult
from glmkit.agent.tools import Tool
from glmkit.chat_format import render_messages

from .agent_thread import AgentRun, BackendChatModel
from .errors import APIError, bad_request
from .openai_tools import chat_prompt, new_call_id
from .responses import DONE, event_stream, new_id, sse, unless_disconnected, usage
from .schemas import ChatCompletionRequest
from .server_tools import ServerTools
from .service import Service


def wants_server_side(request: ChatCompletionRequest) -> bool:
    """Whether the request asks the server to run tools or code (a glmkit entry in `tools`)."""
    return any(entry.type != "function" for entry in request.tools or [])


async def agent_chat_completions(service: Service, server_tools: ServerTools, request: ChatCompletionRequest,
                                 http: Request, arrived: float, max_tokens: int | None) -> Response:
    _check_supported(request)
    entries = list(enumerate(request.tools or []))
    functions = [(i, t) for i, t in entries if t.type == "function"]
    chosen, interpreter = server_tools.select([(i, t) for i, t in entries if t.type != "function"])
    history, declared = _conversation(request, functions)
    names = {t.name for t in chosen}
    for i, tool in functions:
        if tool.function.name in names:
            raise bad_request(f"tools[{i}].function.name: {tool.function.name!r} is also a server tool in this "
                              "request; rename one", param=f"tools[{i}].function.name")
    registry = server_tools.registry([*chosen, *declared])
    query, role, history = _last_message(history)
    params = service.params(request, max_tokens, None)[0]
    model = BackendChatModel(service, params, asyncio.get_running_loop(), arrived)

    session = server_tools.open_session() if interpreter else None
    try:
        agent = Agent(model, tools=registry, code_interpreter=session or False, max_rounds=server_tools.max_rounds)
        first = [*agent.system_messages(), *history, {"role": role, "content": query}]
        try:
            prompt_ids = render_messages(service.tokenizer, first)
        except ValueError as e:
            raise bad_request(f"messages: {e}", param="messages") from None
        service.check_context(len(prompt_ids), max_tokens)  # before the 200; later replies are checked as they come
        service.validate([prompt_ids], [params])
        release = service.admit(1)
    except BaseException:
        if session is not None:
            server_tools.close_session(session)
        raise
    run = AgentRun(agent, model, query, history, role,
                   cleanup=(lambda: server_tools.close_session(session)) if session is not None else lambda: None)
    reply = _AgentReply({t.name for t in declared})
    head = {"id": new_id("chatcmpl"), "created": int(time.time()), "model": service.model_name}

    def close() -> None:
        run.cancel()  # a no-op once the run has finished
        release()

    if request.stream:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return event_stream(_stream(run, reply, model, head, include_usage), close)
    try:
        finished = await unless_disconnected(http, _collect(run, reply))
    finally:
        close()
    if finished is None:
        return Response(status_code=499)  # the client is gone; nobody reads this
    return JSONResponse({
        **head, "object": "chat.completion",
        "choices": [{"index": 0, "message": reply.message(), "logprobs": None,
                     "finish_reason": reply.finish_reason(model)}],
        "usage": usage(model.prompt_tokens, model.completion_tokens),
        "agent": {**reply.summary(), "steps": reply.steps},
    })


def _check_supported(request: ChatCompletionRequest) -> None:
    """400 for what a server-side run does not combine with."""
    why = "server-side tools run one conversation"
    if request.n != 1:
        raise bad_request(f"{why}: n must be 1, got {request.n}", param="n")
    if request.logprobs:
        raise bad_request(f"{why}: logprobs are not supported with them", param="logprobs")
    if request.response_format is not None and request.response_format.type != "text":
        raise bad_request(f"{why}: response_format {request.response_format.type} is not supported with them",
                          param="response_format")
    if request.tool_choice not in (None, "auto"):
        raise bad_request(f"{why}: the model chooses its tools; tool_choice must be 'auto' (or left out)",
                          param="tool_choice")
    if request.functions is not None or request.function_call is not None:
        raise bad_request("server-side tools go with tools, not the legacy functions", param="functions")


def _conversation(request: ChatCompletionRequest, functions: list[tuple[int, Any]]
                  ) -> tuple[list[dict[str, Any]], list[Tool]]:
    """(the ChatGLM3 conversation without a tool announcement, the client's tools as declared-only
    Tools): the request's messages converted as for any chat request; the agent announces the tools."""
    client_only = request.model_copy(update={"tools": [t for _, t in functions] or None, "tool_choice": None})
    try:
        prompt = chat_prompt(client_only)
    except APIError as e:  # its tools[k] is the k-th function tool; name the entry as the client numbered it
        def renumber(text: str | None) -> str | None:
            return None if text is None else re.sub(r"tools\[(\d+)\]",
                                                    lambda m: f"tools[{functions[int(m.group(1))][0]}]", text)
        e.message, e.param = renumber(e.message), renumber(e.param)
        raise
    declared = []
    for i, tool in functions:
        f = tool.function
        try:
            declared.append(Tool(f.name, f.description or "", f.parameters or {"type": "object", "properties": {}}))
        except ValueError as e:
            raise bad_request(f"tools[{i}].function: {e}", param=f"tools[{i}].function.parameters") from None
    return [m for m in prompt.messages if "tools" not in m], declared


def _last_message(history: list[dict[str, Any]]) -> tuple[str, str, list[dict[str, Any]]]:
    """(query, role, the conversation before it): the agent replies to a user message or a tool result."""
    last = history[-1] if history else {}
    if last.get("role") not in ("user", "observation"):
        raise bad_request("messages: with server-side tools the conversation must end with a user message or "
                          f"tool results, not a {last.get('role', 'missing')} message", param="messages")
    return last["content"], last["role"], history[:-1]


class _AgentReply:
    """The answer's text, the steps and the result of one run, as the events come."""

    def __init__(self, client_tools: set[str]):
        self.client_tools = client_tools
        self.content = ""
        self.steps: list[dict[str, Any]] = []
        self.result: AgentResult | None = None
        self._text_round: int | None = None

    def take(self, event: AgentEvent) -> tuple[str, dict[str, Any] | None]:
        """(new text of the answer, new step) for one event."""
        if event.kind == "done":
            self.result = event.result
            return "", None
        if event.kind == "text":
            text = event.text
            if self.content and self._text_round != event.round:
                text = "\n\n" + text  # a later reply's text
            self._text_round = event.round
            self.content += text
            return text, None
        if event.kind == "tool_call" and event.name in self.client_tools and event.arguments is not None:
            return "", None  # the client runs it: it is the message's tool_calls
        step = agent_step(event)
        self.steps.append(step)
        return "", step

    def message(self) -> dict[str, Any]:
        assert self.result is not None, "the run has not finished"
        if self.result.stop_reason == "tool_call":
            answer = self.result.answer
            call = {"id": new_call_id(), "type": "function", "function": {
                "name": answer["name"], "arguments": json.dumps(answer["parameters"], ensure_ascii=False, default=str)}}
            return {"role": "assistant", "content": self.content or None, "tool_calls": [call]}
        return {"role": "assistant", "content": self.content}

    def finish_reason(self, model: BackendChatModel) -> str:
        assert self.result is not None, "the run has not finished"
        reason = self.result.stop_reason
        if reason == "tool_call":
            return "tool_calls"
        if reason == "max_rounds":
            return "length"
        return model.finish_reason or "stop"

    def summary(self) -> dict[str, Any]:
        assert self.result is not None, "the run has not finished"
        return {"rounds": self.result.rounds, "stop_reason": self.result.stop_reason}


def agent_step(event: AgentEvent) -> dict[str, Any]:
    """One step for the client: the event's JSON form, with a cell's outputs in order."""
    step = event.to_dict()
    execution = event.execution
    if execution is not None:
        outputs, image = [], 0
        for output in execution.outputs:
            item: dict[str, Any] = {"type": output.kind, "text": output.text}
            if output.kind == "image":
                item["image"], image = image, image + 1
            outputs.append(item)
        step["outputs"] = outputs
        step["notes"] = list(execution.notes)
    return step


async def _collect(run: AgentRun, reply: _AgentReply) -> bool:
    async with aclosing(run.events()) as events:
        async for event in events:
            reply.take(event)
    return True


async def _stream(run: AgentRun, reply: _AgentReply, model: BackendChatModel, head: dict[str, Any],
                  include_usage: bool) -> AsyncIterator[str]:
    extra = {"usage": None} if include_usage else {}

    def chunk(delta: dict[str, Any], finish_reason: str | None = None, **fields: Any) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return sse({**head, "object": "chat.completion.chunk", "choices": [choice], **extra, **fields})

    yield chunk({"role": "assistant", "content": ""})
    async with aclosing(run.events()) as events:
        async for event in events:
            text, step = reply.take(event)
            if text:
                yield chunk({"content": text})
            if step is not None:
                yield chunk({}, agent_step=step)
    message = reply.message()
    for index, call in enumerate(message.get("tool_calls", [])):
        yield chunk({"tool_calls": [{"index": index, **call}]})
    yield chunk({}, reply.finish_reason(model), agent=reply.summary())
    if include_usage:
        yield sse({**head, "object": "chat.completion.chunk", "choices": [],
                   "usage": usage(model.prompt_tokens, model.completion_tokens)})
    yield DONE
