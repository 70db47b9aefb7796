"""Messages <-> token ids for ChatGLM3: the one place that knows the chat format.

The CLI, the server, the agent and training all render conversations here, and parse the model's
replies here. The format is the official one (`build_chat_input` / `build_single_message` in
ChatGLM3's tokenizer, `process_response` in its model code):

    [gMASK] sop  <|role|> encode(metadata + "\n") encode(content)  ...  <|assistant|>

- Role tokens are inserted as ids; text is only ever encoded as text, so nothing a user, a tool or
  a document writes can become a role token.
- metadata and content are encoded separately, so each gets SentencePiece's leading-space piece.
- A system message with a `tools` list gets `content + "\n" + json.dumps(tools, indent=4,
  ensure_ascii=False)`.
- The model calls a tool with metadata = the tool's name and content = a fenced python block
  holding `tool_call(name=value, ...)`; the code interpreter with metadata `interpreter` and a
  fenced block of code. Tool calls are parsed with `ast` and never evaluated.

A message is a dict: `role` (system, user, assistant, observation; `tool` means observation),
`content` (a str; an assistant's may be a tool-call dict, see `_call_text`), optional `metadata`
(one line), optional `tools` (system only), optional `loss` (bool, for training). Other keys are
ignored.
"""

from __future__ import annotations

import ast
import json
import keyword
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from glmkit.tokenizer import ChatGLMTokenizer

ROLES = ("system", "user", "assistant", "observation")
ROLE_ALIASES = {"tool": "observation"}  # the OpenAI name for a tool's result
TOOLS_PREAMBLE = (
    "Answer the following questions as best as you can. You have access to the following tools:"
)
INTERPRETER = "interpreter"  # metadata of a code-interpreter turn; no tool may use this name
ASSISTANT_TOKEN = "<|assistant|>"


class ToolCallError(ValueError):
    """The model's tool call is not a single `tool_call(name=literal, ...)`."""


@dataclass(frozen=True)
class Reply:
    """A parsed model reply.

    response: the last turn, as the official `chat()` returns it: a str for plain text,
        `{"name", "parameters"}` for a tool call, `{"name": "interpreter", "content": code}` for
        code (and `{"name", "content"}` for other metadata when no tools were declared).
    messages: one assistant message per turn (`metadata` kept; plain text stripped, tool calls and
        code kept raw), to append to the history as the official chat() does.
    """

    response: str | dict[str, Any]
    messages: list[dict[str, Any]]


# -- rendering ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Turn:
    role: str
    metadata: str
    content: str
    learn: bool  # whether a trainer learns this turn's tokens


def render_messages(
    tokenizer: ChatGLMTokenizer, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
) -> list[int]:
    """Prompt ids for `messages`, ending in `<|assistant|>` when `add_generation_prompt`."""
    ids, _, _ = _render(tokenizer, messages)
    if add_generation_prompt:
        ids.append(tokenizer.token_id(ASSISTANT_TOKEN))
    return ids


def render_with_loss_mask(
    tokenizer: ChatGLMTokenizer, messages: Sequence[Mapping[str, Any]]
) -> tuple[list[int], list[bool]]:
    """Training ids for a whole conversation, and a mask of the tokens to learn.

    The sequence ends with `</s>`. A learned turn (by default: assistant turns; a message's
    `loss` overrides) contributes its metadata and content tokens and the token that ends it,
    i.e. the next message's role token or the final `</s>`: the model must learn when to stop.
    Its own role token is not learned; the previous turn's author chose it.
    """
    ids, mask, last_learned = _render(tokenizer, messages)
    ids.append(tokenizer.eos_id)
    mask.append(last_learned)
    return ids, mask


def tools_system_message(tools: list[dict[str, Any]], system: str | None = None) -> list[dict[str, Any]]:
    """The system message(s) that announce `tools`, as the official API server builds them.

    Returns a list to put at the front of the conversation: the official system message
    (TOOLS_PREAMBLE with the tools attached), then the caller's own `system` prompt as a second
    system message. The official server drops the caller's system prompt when tools are given;
    we keep it, after the tool message, so the model still sees the announcement in the exact
    words it was trained on. With no tools, only the caller's prompt (if any) is returned.
    """
    messages: list[dict[str, Any]] = []
    if tools:
        if not isinstance(tools, list):
            raise ValueError(f"tools must be a list of tool descriptions, got {type(tools).__name__}")
        messages.append({"role": "system", "content": TOOLS_PREAMBLE, "tools": tools})
    if system is not None:
        messages.append({"role": "system", "content": system})
    return messages


def _render(
    tokenizer: ChatGLMTokenizer, messages: Sequence[Mapping[str, Any]]
) -> tuple[list[int], list[bool], bool]:
    """(ids, loss mask, whether the last turn is learned): the one copy of the format."""
    ids = [tokenizer.token_id("[gMASK]"), tokenizer.token_id("sop")]
    mask = [False, False]
    learned = False
    for turn in _turns(messages):
        ids.append(tokenizer.token_id(f"<|{turn.role}|>"))
        mask.append(learned)  # the role token ends the previous turn
        body = tokenizer.encode(turn.metadata + "\n") + tokenizer.encode(turn.content)
        ids += body
        mask += [turn.learn] * len(body)
        learned = turn.learn
    return ids, mask, learned


def _turns(messages: Sequence[Mapping[str, Any]]) -> list[_Turn]:
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    return [_turn(i, m) for i, m in enumerate(messages)]


def _turn(i: int, message: Mapping[str, Any]) -> _Turn:
    """Validate message `i` and resolve aliases, tools and tool-call dicts into plain text."""
    if not isinstance(message, Mapping):
        got = type(message).__name__
        raise ValueError(f"message {i}: expected a dict with 'role' and 'content', got {got}")
    if "role" not in message:
        raise ValueError(f"message {i}: missing 'role'")
    role = message["role"]
    role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
    if role not in ROLES:
        raise ValueError(f"message {i}: unknown role {role!r}; expected one of {', '.join(ROLES)} (or tool)")
    if "content" not in message:
        raise ValueError(f"message {i}: missing 'content'")
    content = message["content"]
    metadata = message.get("metadata")
    metadata = "" if metadata is None else metadata
    if not isinstance(metadata, str) or "\n" in metadata:
        raise ValueError(f"message {i}: metadata must be a one-line str, got {metadata!r}")

    if isinstance(content, Mapping):
        if role != "assistant":
            raise ValueError(f"message {i}: only an assistant message may hold a tool call dict")
        name, content = _call_text(i, content)
        if metadata and metadata != name:
            raise ValueError(f"message {i}: metadata {metadata!r} differs from the tool call's name {name!r}")
        metadata = name
    elif not isinstance(content, str):
        raise ValueError(f"message {i}: content must be a str, got {type(content).__name__}")

    if "tools" in message:
        if role != "system":
            raise ValueError(f"message {i}: 'tools' belongs on a system message, not {role}")
        content = content + "\n" + _tools_json(i, message["tools"])

    learn = message.get("loss", role == "assistant")
    if not isinstance(learn, bool):
        raise ValueError(f"message {i}: 'loss' must be True or False, got {learn!r}")
    return _Turn(role, metadata, content, learn)


def _tools_json(i: int, tools: Any) -> str:
    if not isinstance(tools, list):
        raise ValueError(f"message {i}: 'tools' must be a list, got {type(tools).__name__}")
    try:
        return json.dumps(tools, indent=4, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"message {i}: 'tools' is not JSON-serializable ({e})") from None


def _call_text(i: int, call: Mapping[str, Any]) -> tuple[str, str]:
    """(metadata, content) for an assistant's tool-call dict, written as the model writes it.

    `{"name": tool, "parameters": {...}}` -> "```python\\ntool_call(k=repr(v), ...)\\n```";
    `{"name": "interpreter", "content": code}` -> "```python\\n" + code + "\\n```";
    `{"name": other, "content": text}` -> text as is (what `parse_reply` returns without tools).
    """
    name = call.get("name")
    if not isinstance(name, str) or not name.strip() or "\n" in name:
        raise ValueError(f"message {i}: a tool call needs a one-line 'name', got {name!r}")
    if "parameters" in call:
        params = call["parameters"]
        if not isinstance(params, Mapping):
            got = type(params).__name__
            raise ValueError(f"message {i}: tool call 'parameters' must be a dict, got {got}")
        args = ", ".join(f"{key}={_literal_repr(i, key, value)}" for key, value in params.items())
        return name, f"```python\ntool_call({args})\n```"
    if isinstance(call.get("content"), str):
        code = call["content"]
        return name, f"```python\n{code}\n```" if name == INTERPRETER else code
    raise ValueError(f"message {i}: a tool call dict needs 'parameters' (a dict) or 'content' (a str)")


def _literal_repr(i: int, key: Any, value: Any) -> str:
    if not isinstance(key, str) or not key.isidentifier() or keyword.iskeyword(key):
        raise ValueError(f"message {i}: tool call argument name {key!r} is not a Python identifier")
    text = repr(value)
    try:  # the model reads these back as Python literals; refuse what would not parse (nan, objects)
        ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        problem = f"tool call argument {key!r} is not a Python literal: {text[:80]}"
        raise ValueError(f"message {i}: {problem}") from None
    return text


# -- parsing replies ---------------------------------------------------------------------------


def parse_reply(text: str, tools_declared: bool) -> Reply:
    """Parse the model's text after the prompt's `<|assistant|>`, like the official process_response.

    `text` is the decoded reply with special tokens written out (`skip_special_tokens=False`) and
    without the stop token. It may hold several turns separated by `<|assistant|>`; each turn's
    first line is its metadata. Empty metadata: plain text (stripped). `interpreter`: code, taken
    out of its fence. Other metadata: a tool call when `tools_declared` (raises ToolCallError when
    malformed), else `{"name", "content"}` as the official code returns.
    """
    response: str | dict[str, Any] = ""
    messages: list[dict[str, Any]] = []
    for turn in text.split(ASSISTANT_TOKEN):
        metadata, content = turn.split("\n", 1) if "\n" in turn else ("", turn)
        name = metadata.strip()
        if not name:
            content = content.strip()
            # The official code fills this placeholder from its training data in the response only.
            response = content.replace("[[训练时间]]", "2023年")
        elif name == INTERPRETER:
            response = {"name": name, "content": extract_code(content)}
        elif tools_declared:
            try:
                response = {"name": name, "parameters": parse_tool_call(content)}
            except ToolCallError as e:
                raise ToolCallError(f"tool call to {name!r}: {e}") from None
        else:
            response = {"name": name, "content": content}
        messages.append({"role": "assistant", "metadata": metadata, "content": content})
    return Reply(response, messages)


# A fenced block; one still being written (no closing fence yet, while streaming) runs to the end.
_FENCED_BLOCK = re.compile(r"```[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(content: str) -> str:
    """The code of the last fenced block in `content` (as the official demo does), else `content`
    stripped."""
    blocks = _FENCED_BLOCK.findall(content)
    return blocks[-1].removesuffix("\n") if blocks else content.strip()


def parse_tool_call(code: str) -> dict[str, Any]:
    """The keyword arguments of a single `tool_call(name=literal, ...)`, read with `ast` only.

    Surrounding ``` fence lines are allowed. Values must be Python literals (strings, numbers,
    True/False/None, and lists/tuples/dicts/sets of them; `-1` and `1+2j` count as literals).
    Nothing is ever evaluated: anything else raises ToolCallError naming the problem.
    """
    tree = _parse(_strip_fence_lines(code))
    if len(tree.body) != 1:
        raise ToolCallError(f"expected exactly one tool_call(...), got {len(tree.body)} statements")
    statement = tree.body[0]
    if not (isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Call)):
        raise ToolCallError(f"expected a call tool_call(...), got: {_snippet(statement)}")
    call = statement.value
    if not (isinstance(call.func, ast.Name) and call.func.id == "tool_call"):
        raise ToolCallError(f"expected a call to tool_call, got a call to {_snippet(call.func)}")
    if call.args:
        raise ToolCallError("positional arguments are not allowed; write tool_call(name=value, ...)")
    params: dict[str, Any] = {}
    for kw in call.keywords:
        if kw.arg is None:
            raise ToolCallError(f"**{_snippet(kw.value)} is not allowed; write tool_call(name=value, ...)")
        if kw.arg in params:
            raise ToolCallError(f"argument {kw.arg!r} is given twice")
        params[kw.arg] = _literal_value(kw.arg, kw.value)
    return params


def _strip_fence_lines(code: str) -> str:
    lines = code.strip().split("\n")
    if lines[0].lstrip().startswith("```"):
        lines = lines[1:]
    if lines and lines[-1].strip() == "```":
        lines = lines[:-1]
    return "\n".join(lines).strip()


def _parse(source: str) -> ast.Module:
    try:
        return ast.parse(source, mode="exec")
    except (SyntaxError, ValueError) as e:  # ValueError: e.g. null bytes, over-long int literals
        raise ToolCallError(f"tool call is not valid Python: {e}") from None
    except (RecursionError, MemoryError):
        raise ToolCallError("tool call is nested too deeply to parse") from None


def _literal_value(name: str, node: ast.expr) -> Any:
    # literal_eval walks the tree and accepts only literal nodes: no names, calls, attributes,
    # operators (except a sign on a number and complex a+bj), comprehensions or f-strings.
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise ToolCallError(f"argument {name!r} is not a Python literal: {_snippet(node)}") from None


def _snippet(node: ast.AST, limit: int = 80) -> str:
    try:
        text = ast.unparse(node)  # rebuilds source text from the tree; runs nothing
    except (ValueError, RecursionError):
        text = type(node).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
