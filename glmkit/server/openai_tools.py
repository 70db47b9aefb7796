"""OpenAI chat messages and tools <-> ChatGLM3 messages and replies.

Requests: OpenAI's `{"type": "function", "function": {...}}` tools are unwrapped to the
`{"name", "description", "parameters"}` dicts ChatGLM3 was trained on and announced with
`chat_format.tools_system_message`, which keeps the caller's own system prompt beside the tool list.
An assistant's `tool_calls` become ChatGLM3 assistant turns (metadata = the tool's name, content =
`tool_call(...)`), and `tool` / legacy `function` messages become observations, each placed right
after the call it answers, as the model was trained (one call, then its result).

Replies: `ReplyStream` turns the model's text into OpenAI message deltas as it streams: text turns
become `content`, a turn whose metadata names a declared tool becomes a `tool_calls` entry with JSON
arguments (parsed with `ast` by `chat_format.parse_tool_call`, never evaluated). A non-streamed
message is the merge of the same deltas, so streamed and whole replies cannot differ.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from glmkit.chat_format import ASSISTANT_TOKEN, INTERPRETER, ToolCallError, parse_tool_call, tools_system_message

from .errors import bad_request
from .schemas import ChatCompletionRequest, ContentPart, FunctionDefinition, Message

TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for function names
TRAINING_DATE_PLACEHOLDER = ("[[训练时间]]", "2023年")  # filled in by the official process_response too


@dataclass
class ChatPrompt:
    """What a chat request asks of the model, in ChatGLM3's terms.

    messages: for `chat_format.render_messages`.
    tool_names: the tools announced to the model (none when tool_choice is "none").
    prefill: a metadata line the reply is forced to start with (a tool's name forces that call;
        "" forces a text turn), or None.
    choose_tool: the reply's metadata line must be one of `tool_names` ("required" with several tools).
    single_call: at most one tool call per reply (legacy functions, or parallel_tool_calls=false).
    legacy: the request used `functions`, so the reply uses `function_call`.
    """

    messages: list[dict[str, Any]]
    tool_names: list[str] = field(default_factory=list)
    prefill: str | None = None
    choose_tool: bool = False
    single_call: bool = False
    legacy: bool = False


def chat_prompt(request: ChatCompletionRequest) -> ChatPrompt:
    """The ChatGLM3 conversation for an OpenAI chat request; APIError (400) on what cannot be sent."""
    legacy = request.functions is not None or request.function_call is not None
    if legacy and (request.tools is not None or request.tool_choice is not None):
        raise bad_request("use tools/tool_choice or the legacy functions/function_call, not both", param="functions")
    if legacy:
        functions, choice, param = request.functions or [], request.function_call, "function_call"
    else:
        functions = [tool.function for tool in request.tools or []]
        choice, param = request.tool_choice, "tool_choice"
    named = None if isinstance(choice, str) or choice is None else (choice.name if legacy else choice.function.name)
    tools = _glm_tools(functions, "functions" if legacy else "tools")
    names = [tool["name"] for tool in tools]
    if choice is not None and not tools:
        raise bad_request(f"{param} is only allowed when {'functions' if legacy else 'tools'} are given", param=param)
    if named is not None and named not in names:
        raise bad_request(f"{param} names the function {named!r}, which is not among the declared ones "
                          f"({', '.join(names)})", param=param)

    announced = [] if choice == "none" else tools
    messages = _glm_messages(request.messages, announced)
    prompt = ChatPrompt(messages, tool_names=[t["name"] for t in announced], legacy=legacy,
                        single_call=legacy or request.parallel_tool_calls is False)
    if named is not None:
        prompt.prefill = named
    elif choice == "required":
        if len(names) == 1:
            prompt.prefill = names[0]
        else:
            prompt.choose_tool = True
    return prompt


def _glm_tools(functions: Sequence[FunctionDefinition], param: str) -> list[dict[str, Any]]:
    tools, seen = [], set()
    for i, function in enumerate(functions):
        where = f"{param}[{i}]" + (".function" if param == "tools" else "")
        name = function.name
        if not TOOL_NAME.match(name):
            raise bad_request(f"{where}.name {name!r} must be 1-64 letters, digits, '_' or '-'", param=f"{where}.name")
        if name == INTERPRETER:
            raise bad_request(f"{where}.name: {INTERPRETER!r} is reserved for ChatGLM3's code interpreter",
                              param=f"{where}.name")
        if name in seen:
            raise bad_request(f"{where}.name: the function {name!r} is declared twice", param=f"{where}.name")
        seen.add(name)
        tool: dict[str, Any] = {"name": name}
        if function.description is not None:
            tool["description"] = function.description
        if function.parameters is not None:
            tool["parameters"] = function.parameters
        tools.append(tool)
    return tools


@dataclass
class _PendingCall:
    id: str | None  # None for a legacy function_call
    name: str
    parameters: dict[str, Any]
    message: int  # index of the assistant message that made it


def _glm_messages(messages: Sequence[Message], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    lead = 0  # the leading system prompt goes beside the tool list
    if tools:
        system = None
        if messages[0].role in ("system", "developer"):
            system, lead = _text(messages[0], 0), 1
        out += tools_system_message(tools, system)
    pending: list[_PendingCall] = []
    for i, message in enumerate(messages[lead:], start=lead):
        role = message.role
        if role in ("tool", "function"):
            call = _answered_call(i, message, pending)
            out.append({"role": "assistant", "content": {"name": call.name, "parameters": call.parameters}})
            out.append({"role": "observation", "content": _text(message, i)})
            continue
        _check_answered(pending)
        if role in ("system", "developer", "user"):
            out.append({"role": "system" if role == "developer" else role, "content": _text(message, i)})
        else:
            pending = _assistant(i, message, out)
    _check_answered(pending)
    return out


def _assistant(i: int, message: Message, out: list[dict[str, Any]]) -> list[_PendingCall]:
    """Append the assistant's text turn; return its calls, rendered once their results come."""
    calls = [(c.id, c.function) for c in message.tool_calls or []]
    if message.function_call is not None:
        calls.append((None, message.function_call))
    text = _text(message, i, optional=bool(calls))
    if text or not calls:
        out.append({"role": "assistant", "content": text})
    pending = []
    for j, (call_id, function) in enumerate(calls):
        where = f"messages[{i}]." + (f"tool_calls[{j}].function" if call_id is not None else "function_call")
        try:
            arguments = json.loads(function.arguments) if function.arguments.strip() else {}
        except json.JSONDecodeError as e:
            raise bad_request(f"{where}.arguments is not valid JSON ({e})", param=f"{where}.arguments") from None
        except RecursionError:
            raise bad_request(f"{where}.arguments is nested too deeply", param=f"{where}.arguments") from None
        if not isinstance(arguments, dict):
            raise bad_request(f"{where}.arguments must be a JSON object, got {type(arguments).__name__}",
                              param=f"{where}.arguments")
        pending.append(_PendingCall(call_id, function.name, arguments, i))
    return pending


def _answered_call(i: int, message: Message, pending: list[_PendingCall]) -> _PendingCall:
    if message.role == "tool":
        if message.tool_call_id is None:
            raise bad_request(f"messages[{i}]: a tool message needs tool_call_id", param=f"messages[{i}].tool_call_id")
        match = [c for c in pending if c.id == message.tool_call_id]
        what = f"tool_call_id {message.tool_call_id!r}"
    else:
        match = [c for c in pending if c.id is None and c.name == message.name]
        what = f"a function_call to {message.name!r}"
    if not match:
        raise bad_request(f"messages[{i}]: {what} does not answer a call of the assistant message before it",
                          param=f"messages[{i}]")
    pending.remove(match[0])
    return match[0]


def _check_answered(pending: list[_PendingCall]) -> None:
    if pending:
        call = pending[0]
        ref = f"tool call {call.id!r}" if call.id is not None else "function_call"
        raise bad_request(f"messages[{call.message}]: {ref} to {call.name!r} has no tool message with its result "
                          "after it", param=f"messages[{call.message}]")


def _text(message: Message, i: int, optional: bool = False) -> str:
    content = message.content
    if content is None:
        if optional:
            return ""
        raise bad_request(f"messages[{i}]: a {message.role} message needs content", param=f"messages[{i}].content")
    if isinstance(content, str):
        return content
    return "\n".join(_part_text(part, i, j) for j, part in enumerate(content))


def _part_text(part: ContentPart, i: int, j: int) -> str:
    text = getattr(part, part.type, None) if part.type in ("text", "refusal") else None
    if isinstance(text, str):
        return text
    if part.type in ("text", "refusal"):
        raise bad_request(f"messages[{i}].content[{j}] of type {part.type!r} needs a {part.type!r} string",
                          param=f"messages[{i}].content[{j}].{part.type}")
    raise bad_request(f"messages[{i}].content[{j}]: content parts of type {part.type!r} are not supported; "
                      "this model reads text only", param=f"messages[{i}].content[{j}].type")


# -- replies -------------------------------------------------------------------------------------


def new_call_id() -> str:
    return "call_" + secrets.token_urlsafe(18).replace("-", "a").replace("_", "b")


class ReplyStream:
    """The model's reply text -> OpenAI message deltas, chunk by chunk.

    `push(text)` takes the next generated text (special tokens written out, as the generator gives
    it) and returns the deltas now safe to send; `finish()` returns the rest. A text turn streams as
    it comes, stripped as the official parser strips it (leading and trailing whitespace held back);
    a tool call is sent once its turn is complete, as a call delta then an arguments delta. A turn
    that is neither text nor a well-formed call of a declared tool (a malformed call, code for the
    interpreter, an unknown name) is sent as text, its metadata line included: nothing is dropped.
    """

    def __init__(self, tool_names: Collection[str], prefill: str | None = None, single_call: bool = False):
        self.tool_names = set(tool_names)
        self.single_call = single_call
        self.calls = 0
        self._turn = "" if prefill is None else prefill + "\n"  # raw text of the turn being written
        self._shown = ""  # text of the current turn already sent
        self._any_text = False  # whether a text turn has sent anything (turns are joined by "\n")

    def push(self, text: str) -> list[dict[str, Any]]:
        self._turn += text
        deltas = []
        while ASSISTANT_TOKEN in self._turn:
            turn, self._turn = self._turn.split(ASSISTANT_TOKEN, 1)
            deltas += self._end_turn(turn)
        metadata, body = self._split(self._turn)
        if body is not None and not metadata.strip():
            deltas += self._show(_visible(body, final=False))
        return deltas

    def finish(self) -> list[dict[str, Any]]:
        turn, self._turn = self._turn, ""
        return self._end_turn(turn)

    @staticmethod
    def _split(turn: str) -> tuple[str, str | None]:
        """(metadata, body), body None while the metadata line is still being written."""
        return tuple(turn.split("\n", 1)) if "\n" in turn else (turn, None)  # type: ignore[return-value]

    def _end_turn(self, turn: str) -> list[dict[str, Any]]:
        metadata, body = self._split(turn)
        body = body or ""
        name = metadata.strip()
        deltas = []
        if not name:
            deltas = self._show(_visible(body, final=True))
        elif name in self.tool_names and not (self.single_call and self.calls):
            deltas = self._call(name, body)
        if not deltas and name:
            deltas = self._show(f"{name}\n{body.strip()}".strip())
        self._shown = ""
        return deltas

    def _call(self, name: str, body: str) -> list[dict[str, Any]]:
        try:
            arguments = json.dumps(parse_tool_call(body), ensure_ascii=False, allow_nan=False)
        except (ToolCallError, TypeError, ValueError):  # malformed, or values JSON cannot hold (sets, nan)
            return []
        index, self.calls = self.calls, self.calls + 1
        return [{"tool_calls": [{"index": index, "id": new_call_id(), "type": "function",
                                 "function": {"name": name, "arguments": ""}}]},
                {"tool_calls": [{"index": index, "function": {"arguments": arguments}}]}]

    def _show(self, visible: str) -> list[dict[str, Any]]:
        if not visible.startswith(self._shown) or visible == self._shown:
            return []
        new = visible[len(self._shown):]
        if not self._shown and self._any_text:
            new = "\n" + new  # a later text turn
        self._shown = visible
        self._any_text = True
        return [{"content": new}]


def _visible(body: str, final: bool) -> str:
    """The text of a text turn as the official parser shows it; while not `final`, without what may
    still change (trailing whitespace, a half-written placeholder or turn separator)."""
    text = body.lstrip().replace(*TRAINING_DATE_PLACEHOLDER)
    if final:
        return text.rstrip()
    while True:
        held = text.rstrip()
        for marker in (TRAINING_DATE_PLACEHOLDER[0], ASSISTANT_TOKEN):
            cut = max((k for k in range(1, len(marker)) if held.endswith(marker[:k])), default=0)
            held = held[:len(held) - cut]
        if held == text:
            return text
        text = held


def merge_deltas(deltas: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The assistant message that the deltas of one reply add up to."""
    content, calls = "", []
    for delta in deltas:
        content += delta.get("content", "")
        for piece in delta.get("tool_calls", []):
            if "id" in piece:
                calls.append({"id": piece["id"], "type": "function", "function": dict(piece["function"])})
            else:
                calls[piece["index"]]["function"]["arguments"] += piece["function"]["arguments"]
    message: dict[str, Any] = {"role": "assistant", "content": content or (None if calls else "")}
    if calls:
        message["tool_calls"] = calls
    return message


def as_legacy(delta: dict[str, Any]) -> dict[str, Any]:
    """A delta in the legacy `function_call` form (the reply makes at most one call there)."""
    if "tool_calls" not in delta:
        return delta
    function = delta["tool_calls"][0]["function"]
    return {**{k: v for k, v in delta.items() if k != "tool_calls"}, "function_call": dict(function)}
