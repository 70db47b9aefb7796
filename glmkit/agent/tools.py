"""Tools the model may call: the `@tool` decorator, the `ToolRegistry`, and running one call.

    from typing import Annotated, Literal
    from glmkit.agent import tool, ToolRegistry

    @tool
    def get_weather(city: Annotated[str, "the city, e.g. Beijing"],
                    unit: Literal["celsius", "fahrenheit"] = "celsius") -> dict:
        '''The current weather of a city.'''
        ...

    registry = ToolRegistry([get_weather])        # or ToolRegistry.from_file("my_tools.py" / "tools.json")
    registry.schemas()                            # the list to announce with chat_format.tools_system_message
    outcome = registry.call("get_weather", {"city": "Beijing"})   # never raises: see ToolOutcome

A tool's JSON schema comes from its type hints and docstring (see `schema` and `docstrings`). A
call runs only after its arguments are checked against the schema; every failure becomes an
observation for the model that says what went wrong: an unknown tool, bad arguments, an exception,
a timeout. A result is made text (a str as is, anything else as JSON) and cut by the visible rule
of `observation.truncate`.

The timeout of a call is a wall-clock limit on waiting: the call runs in its own thread, and a
call that does not finish in time is abandoned, not killed (Python cannot stop a thread). It keeps
running in the background until it returns. Run code you do not trust in the code interpreter,
which is a separate, killable process.
"""

from __future__ import annotations

import enum
import importlib
import importlib.util
import inspect
import json
import sys
import threading
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glmkit.chat_format import INTERPRETER

from .docstrings import parse_docstring
from .observation import truncate
from .schema import annotation_schema, check_schema, object_problems

DEFAULT_TIMEOUT = 30.0  # seconds a call may take before it is abandoned
DEFAULT_MAX_RESULT_CHARS = 4000  # longer results are cut by observation.truncate


@dataclass
class Tool:
    """One tool: its announced name, description and JSON schema, and the function that runs it.

    `function` None means the tool is declared only: the model may call it, but the caller (e.g. an
    API client) runs it; the agent loop stops and returns such a call. `annotations` holds the
    Python type hints of the parameters, used to turn checked JSON values into Enum members.
    """

    name: str
    description: str
    parameters: dict[str, Any]
    function: Callable[..., Any] | None = None
    timeout: float | None = None  # None: the registry's
    annotations: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip() or "\n" in self.name:
            raise ValueError(f"a tool needs a one-line name, got {self.name!r}")
        if self.name == INTERPRETER:
            raise ValueError(f"{INTERPRETER!r} is the code interpreter's name; a tool cannot use it")
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError(f"tool {self.name!r}: timeout must be a positive number of seconds, got {self.timeout!r}")
        check_schema(self.parameters, f"tool {self.name!r} parameters")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the function directly, as if it were not decorated."""
        if self.function is None:
            raise TypeError(f"tool {self.name!r} is declared only; it has no function to call")
        return self.function(*args, **kwargs)

    def schema(self) -> dict[str, Any]:
        """The tool as ChatGLM3 announces it: {"name", "description", "parameters"}."""
        return {"name": self.name, "description": self.description, "parameters": self.parameters}

    def problems(self, arguments: Any) -> list[str]:
        """What is wrong with a call's arguments, one sentence each; [] when they are fine."""
        if not isinstance(arguments, Mapping):
            return [f"the arguments must be keyword arguments (a dict), got {type(arguments).__name__}"]
        schema = dict(self.parameters)
        # A call may not pass names the tool does not declare, whatever the schema says about extras.
        if not isinstance(schema.get("additionalProperties"), Mapping) and schema.get("additionalProperties") is not True:
            schema["additionalProperties"] = False
        return object_problems(arguments, schema, lambda key: f"argument {key!r}")

    def convert(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """Checked JSON values turned into what the function's hints ask for (Enum members, tuples)."""
        return {key: _convert(value, self.annotations.get(key, Any)) for key, value in arguments.items()}


def tool(function: Callable[..., Any] | None = None, *, name: str | None = None, description: str | None = None,
         timeout: float | None = None) -> Any:
    """Make a typed function a Tool: `@tool` or `@tool(name=..., description=..., timeout=...)`.

    Every parameter needs a type hint (see `schema.annotation_schema`); parameters without a
    default are required. The description is the docstring's text before its sections; parameter
    descriptions come from `Annotated[T, "text"]` or else from the docstring's Args section.
    """
    def make(f: Callable[..., Any]) -> Tool:
        return tool_from_function(f, name=name, description=description, timeout=timeout)

    return make(function) if function is not None else make


def tool_from_function(function: Callable[..., Any], name: str | None = None, description: str | None = None,
                       timeout: float | None = None) -> Tool:
    if isinstance(function, Tool):
        return function
    if not callable(function):
        raise TypeError(f"a tool must be a function, got {type(function).__name__}")
    tool_name = name or getattr(function, "__name__", None)
    doc_description, doc_params = parse_docstring(inspect.getdoc(function))
    try:
        hints = typing.get_type_hints(function, include_extras=True)
    except Exception as e:  # a hint naming something undefined
        raise TypeError(f"tool {tool_name!r}: cannot read its type hints ({type(e).__name__}: {e})") from None
    properties: dict[str, Any] = {}
    required: list[str] = []
    annotations: dict[str, Any] = {}
    for param in inspect.signature(function).parameters.values():
        where = f"tool {tool_name!r}, parameter {param.name!r}"
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD, param.POSITIONAL_ONLY):
            raise TypeError(f"{where}: a tool's parameters must be plain keyword parameters (no *args, **kwargs "
                            "or positional-only)")
        if param.name not in hints:
            raise TypeError(f"{where}: needs a type hint, which becomes its JSON schema")
        try:
            schema = annotation_schema(hints[param.name])
        except TypeError as e:
            raise TypeError(f"{where}: {e}") from None
        if "description" not in schema and doc_params.get(param.name):
            schema["description"] = doc_params[param.name]
        if param.default is param.empty:
            required.append(param.name)
        elif _json_value(param.default):
            schema["default"] = param.default
        properties[param.name] = schema
        annotations[param.name] = hints[param.name]
    parameters: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        parameters["required"] = required
    return Tool(tool_name, description if description is not None else doc_description, parameters, function,
                timeout, annotations)


@dataclass(frozen=True)
class ToolOutcome:
    """What one call did. `observation` is the text the model reads next (already truncated).

    error: None when the call returned; else "unknown_tool", "invalid_arguments", "exception",
    "timeout" or "not_runnable" (a declared-only tool).
    """

    name: str
    arguments: Any
    observation: str
    value: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class ToolRegistry:
    """A named set of tools, with the limits their calls run under."""

    def __init__(self, tools: Iterable[Tool | Callable[..., Any]] = (), *, timeout: float = DEFAULT_TIMEOUT,
                 max_result_chars: int = DEFAULT_MAX_RESULT_CHARS):
        if not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if max_result_chars < 1:
            raise ValueError(f"max_result_chars must be at least 1, got {max_result_chars!r}")
        self.timeout = timeout
        self.max_result_chars = max_result_chars
        self._tools: dict[str, Tool] = {}
        for item in tools:
            self.add(item)

    # ---- building ----------------------------------------------------------------------------
    def add(self, item: Tool | Callable[..., Any]) -> Tool:
        """Register a Tool, or a typed function (made a Tool as `@tool` would)."""
        new = tool_from_function(item)
        if new.name in self._tools:
            raise ValueError(f"two tools are named {new.name!r}")
        self._tools[new.name] = new
        return new

    def tool(self, function: Callable[..., Any] | None = None, **options: Any) -> Any:
        """`@registry.tool` / `@registry.tool(name=...)`: make a tool and register it."""
        def register(f: Callable[..., Any]) -> Tool:
            return self.add(tool(f, **options))

        return register(function) if function is not None else register

    @classmethod
    def from_file(cls, path: str | Path, **limits: Any) -> ToolRegistry:
        """Tools from a Python file or an importable module (their module-level `@tool` functions,
        e.g. "glmkit.demo.tools"), or a JSON spec.

        A JSON spec is a list of tools (or {"tools": [...]}), each in ChatGLM3's form
        {"name", "description", "parameters"} or OpenAI's {"type": "function", "function": {...}},
        with an optional "callable": "package.module:function" or "file.py:function" (relative to
        the spec) that runs it, and an optional "timeout". A tool without "callable" is declared
        only. Raises ValueError naming the problem.
        """
        if not Path(path).exists() and _is_module_name(str(path)):
            try:
                module = importlib.import_module(str(path))
            except ImportError as e:
                raise ValueError(f"no tools file at {path}, and no module of that name: {e}") from None
            return cls(_tools_of_module(module), **limits)
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"no tools file at {path}")
        if path.suffix == ".py":
            return cls(_tools_of_module(_import_file(path)), **limits)
        if path.suffix == ".json":
            return cls(_tools_of_spec(path), **limits)
        raise ValueError(f"{path}: a tools file is a Python file (.py) or a JSON spec (.json)")

    # ---- reading -----------------------------------------------------------------------------
    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self) -> Iterator[Tool]:
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)

    def __getitem__(self, name: str) -> Tool:
        return self._tools[name]

    @property
    def names(self) -> list[str]:
        return list(self._tools)

    def schemas(self) -> list[dict[str, Any]]:
        """The tools as ChatGLM3 announces them, for `chat_format.tools_system_message`."""
        return [t.schema() for t in self]

    def openai_schemas(self) -> list[dict[str, Any]]:
        """The tools in the OpenAI `tools` form: [{"type": "function", "function": {...}}]."""
        return [{"type": "function", "function": t.schema()} for t in self]

    # ---- calling -----------------------------------------------------------------------------
    def call(self, name: str, arguments: Any) -> ToolOutcome:
        """Check and run one call; never raises for anything the call or the tool does."""
        if name not in self._tools:
            available = ", ".join(self._tools) or "none"
            return ToolOutcome(name, arguments, f"Error: there is no tool named {name!r}. The tools are: {available}.",
                               error="unknown_tool")
        target = self._tools[name]
        problems = target.problems(arguments)
        if problems:
            return ToolOutcome(name, arguments, f"Error: the call to {name} was not run: " + "; ".join(problems) + ".",
                               error="invalid_arguments")
        if target.function is None:
            return ToolOutcome(name, arguments, f"Error: {name} is declared only and cannot run here.",
                               error="not_runnable")
        timeout = target.timeout or self.timeout
        finished, value, exception = _run_with_timeout(target.function, target.convert(arguments), timeout, name)
        if not finished:
            return ToolOutcome(name, arguments, f"Error: {name} did not finish within {timeout:g} seconds; "
                               "the call was abandoned.", error="timeout")
        if exception is not None:
            message = f"{type(exception).__name__}: {exception}".rstrip(": ")
            return ToolOutcome(name, arguments, truncate(f"Error: {name} raised {message}", self.max_result_chars),
                               error="exception")
        return ToolOutcome(name, arguments, truncate(result_text(value), self.max_result_chars), value=value)


def result_text(value: Any) -> str:
    """A tool's return value as text for the model: a str as is, anything else as JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def _run_with_timeout(function: Callable[..., Any], arguments: dict[str, Any], timeout: float,
                      name: str) -> tuple[bool, Any, BaseException | None]:
    """(finished, value, exception) of function(**arguments), waiting at most `timeout` seconds."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = function(**arguments)
        except BaseException as e:  # noqa: BLE001 - a tool's SystemExit or KeyboardInterrupt is its failure too
            box["exception"] = e

    thread = threading.Thread(target=target, name=f"glmkit-tool-{name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return False, None, None
    return True, box.get("value"), box.get("exception")


def _convert(value: Any, annotation: Any) -> Any:
    """A checked JSON value as the hint wants it: Enum members, tuples; everything else as is."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _convert(value, args[0])
    if value is None:
        return None
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return annotation(value)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        return _convert(value, members[0]) if len(members) == 1 else value
    if isinstance(value, (list, tuple)):
        item = args[0] if args else Any
        items = [_convert(v, item) for v in value]
        return tuple(items) if origin is tuple or annotation is tuple else items
    if isinstance(value, dict) and origin is dict and len(args) == 2:
        return {k: _convert(v, args[1]) for k, v in value.items()}
    return value


def _json_value(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


# -- loading tools from files ------------------------------------------------------------------


def _import_file(path: Path):
    """Import a Python file as a module of its own (it runs the file, as `python file.py` would)."""
    module_name = f"glmkit_tools_{path.stem}_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"{path}: cannot be imported as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # type hints and dataclasses in the file resolve through sys.modules
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[module_name]
        raise ValueError(f"{path}: importing it failed: {type(e).__name__}: {e}") from e
    return module


def _is_module_name(text: str) -> bool:
    return all(part.isidentifier() for part in text.split(".")) and not text.endswith((".py", ".json"))


def _tools_of_module(module) -> list[Tool]:
    tools = [value for value in vars(module).values() if isinstance(value, Tool)]
    if not tools:
        raise ValueError(f"{module.__file__}: defines no tools; decorate its functions with @glmkit.agent.tool")
    return tools


_SPEC_KEYS = {"name", "description", "parameters", "callable", "timeout"}


def _tools_of_spec(path: Path) -> list[Tool]:
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    items = spec.get("tools") if isinstance(spec, dict) else spec
    if not isinstance(items, list) or not items:
        raise ValueError(f"{path}: expected a non-empty list of tools (or {{\"tools\": [...]}})")
    tools = []
    for i, item in enumerate(items):
        where = f"{path}: tool {i}"
        if isinstance(item, dict) and item.get("type") == "function" and isinstance(item.get("function"), dict):
            item = {**item["function"], **{k: v for k, v in item.items() if k not in ("type", "function")}}
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected an object, got {type(item).__name__}")
        unknown = sorted(set(item) - _SPEC_KEYS)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; a tool has {', '.join(sorted(_SPEC_KEYS))}")
        function = _resolve_callable(item["callable"], path.parent, where) if "callable" in item else None
        try:
            tools.append(Tool(item.get("name"), item.get("description", ""),
                              item.get("parameters", {"type": "object", "properties": {}}), function, item.get("timeout")))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    return tools


def _resolve_callable(reference: Any, folder: Path, where: str) -> Callable[..., Any]:
    if not isinstance(reference, str) or reference.count(":") != 1:
        raise ValueError(f"{where}: 'callable' must be 'package.module:function' or 'file.py:function', got {reference!r}")
    location, attribute = reference.split(":")
    if location.endswith(".py"):
        module = _import_file(folder / location)
    else:
        try:
            module = importlib.import_module(location)
        except ImportError as e:
            raise ValueError(f"{where}: cannot import {location!r} ({e})") from None
    function = getattr(module, attribute, None)
    if function is None or not callable(function):
        raise ValueError(f"{where}: {location!r} has no function {attribute!r}")
    return function.function if isinstance(function, Tool) else function
