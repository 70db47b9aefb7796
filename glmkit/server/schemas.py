"""The request bodies of the OpenAI API, as pydantic models, and their validation errors.

Strict on purpose, as OpenAI is: wrong types are not coerced ("0.5" is not a number), out-of-range
values and unknown arguments are refused with a 400 that names the field. Checks that need more than
one field, the model or the tokenizer (tool_choice against tools, roles, context length) live where
that knowledge is: `openai_tools` and `requests`.

Extensions beyond OpenAI's fields, named as vLLM names them so clients that know one know the other:
`top_k`, `repetition_penalty`, `ignore_eos`. And glmkit's own: `tools` entries that ask the server to
run tools itself, `{"type": "code_interpreter"}` and `{"type": "server_tool", "name": ...}`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

from .errors import APIError, bad_request

Temperature = Annotated[float, Field(ge=0, le=2)]
TopP = Annotated[float, Field(ge=0, le=1)]
Penalty = Annotated[float, Field(ge=-2, le=2)]
PositiveInt = Annotated[int, Field(ge=1)]
MAX_N = 128  # OpenAI's limit on `n`
MAX_STOP = 4  # OpenAI's limit on the number of stop strings


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class _Open(BaseModel):
    """Objects whose extra keys are the client's business (message `name`, tool `strict`, ...)."""

    model_config = ConfigDict(strict=True, extra="allow")


# -- messages ------------------------------------------------------------------------------------


class ContentPart(_Open):
    type: str
    text: str | None = None


# Inside messages, objects a client got from a server and sends back: extra keys are tolerated.
class FunctionCall(_Open):
    name: str
    arguments: str  # JSON, as OpenAI sends it


class ToolCall(_Open):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    function_call: FunctionCall | None = None


# -- tools ---------------------------------------------------------------------------------------


class FunctionDefinition(_Open):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # accepted; the arguments are parsed from the model's call, not schema-checked


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class CodeInterpreterTool(_Strict):
    """glmkit extension: run the model's code in the server's sandbox (`glmkit serve --code-interpreter`)."""

    type: Literal["code_interpreter"]


class ServerTool(_Strict):
    """glmkit extension: let the model call one of the server's own tools (`glmkit serve --tools FILE`)."""

    type: Literal["server_tool"]
    name: str


def _tool_kind(value: Any) -> str:
    """The branch an entry of `tools` is checked against; anything unknown as a function tool, whose
    error then names the expected type. Tags are capitalised so error paths skip them (`_NOT_FIELDS`)."""
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return {"code_interpreter": "CodeInterpreter", "server_tool": "ServerTool"}.get(kind, "Function")


AnyTool = Annotated[Annotated[Tool, Tag("Function")] | Annotated[CodeInterpreterTool, Tag("CodeInterpreter")]
                    | Annotated[ServerTool, Tag("ServerTool")], Discriminator(_tool_kind)]


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Strict):
    include_usage: bool = False


class ResponseFormat(_Open):
    type: Literal["text", "json_object", "json_schema"]


# -- requests ------------------------------------------------------------------------------------


class _SamplingFields(_Strict):
    """Fields both endpoints share."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    max_tokens: PositiveInt | None = None
    stop: str | list[str] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    seed: int | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, float] | None = None  # only an empty one is accepted (see requests.py)
    user: str | None = None  # accepted for compatibility; not used
    # Extensions (vLLM's names).
    top_k: Annotated[int, Field(ge=0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    ignore_eos: bool = False


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[Message], Field(min_length=1)]
    tools: list[AnyTool] | None = None  # server-side entries: see `server_tools`
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # accepted: ChatGLM3 calls one tool per turn anyway
    functions: list[FunctionDefinition] | None = None  # legacy form of tools
    function_call: Literal["none", "auto"] | NamedFunction | None = None  # legacy form of tool_choice
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: PositiveInt | None = 16  # OpenAI's default for this endpoint
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool = False
    best_of: PositiveInt | None = None
    suffix: str | None = None


def parse_request(model: type[BaseModel], data: Any) -> Any:
    """`model` validated from the decoded JSON body, or an APIError (400) naming the bad field."""
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _as_api_error(e) from None


# Pydantic names union branches and validators in an error's location; they are not request fields.
# Field names are lower case; branch names are types ("str", "list[int]", "NamedToolChoice").
_NOT_FIELDS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _as_api_error(error: ValidationError) -> APIError:
    problems: dict[str, list[str]] = {}
    for item in error.errors(include_url=False):
        path = ""
        for part in item["loc"]:
            if isinstance(part, int):
                path += f"[{part}]"
            elif any(c in part for c in "[]()-, '") or part in _NOT_FIELDS or part[:1].isupper():
                continue  # a union branch or validator name
            else:
                path += f".{part}" if path else part
        if item["type"] == "extra_forbidden":
            return bad_request(f"Unrecognized request argument supplied: {path}", param=path,
                               code="unrecognized_argument")
        problems.setdefault(path, []).append(_describe(item))
    # Of a union's branches, the one that got furthest names the real problem.
    path = max(problems, key=lambda p: p.count(".") + p.count("["))
    messages = problems[path]
    return bad_request(f"{path}: {' or '.join(dict.fromkeys(messages))}", param=path)


def _describe(item: dict[str, Any]) -> str:
    got = item.get("input")
    shown = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
    if item["type"] == "missing":
        return "a required field is missing"
    return f"{item['msg'][0].lower()}{item['msg'][1:]} (got {shown[:60]})"
