"""Tools: JSON schemas from type hints and docstrings, checked calls, timeouts, truncation, files."""

from __future__ import annotations

import enum
import json
import threading
import time
from typing import Annotated, Any, Literal, Optional, Union

import pytest

from glmkit.agent.docstrings import parse_docstring
from glmkit.agent.observation import result_block, truncate
from glmkit.agent.schema import annotation_schema, value_problems
from glmkit.agent.tools import Tool, ToolRegistry, tool


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


@tool
def everything(
    text: str,
    count: int,
    ratio: float,
    flag: bool,
    unit: Literal["celsius", "fahrenheit"],
    color: Color,
    tags: list[str],
    matrix: list[list[int]],
    maybe: Optional[int] = None,
    either: Union[int, str] = 0,
    newer: str | None = None,
    scores: dict[str, float] | None = None,
    city: Annotated[str, "the city to look up, e.g. Beijing"] = "Beijing",
    days: Annotated[Optional[int], "how many days ahead"] = None,
) -> dict:
    """Echo every argument back.

    A second paragraph of the description.

    Args:
        text: some text
        count: how many
            times, at most
    Returns:
        the arguments
    """
    return dict(locals())


def test_schema_of_every_kind_of_hint():
    params = everything.parameters
    props = params["properties"]
    assert params["type"] == "object"
    assert params["required"] == ["text", "count", "ratio", "flag", "unit", "color", "tags", "matrix"]
    assert props["text"] == {"type": "string", "description": "some text"}
    assert props["count"] == {"type": "integer", "description": "how many times, at most"}
    assert props["ratio"] == {"type": "number"}
    assert props["flag"] == {"type": "boolean"}
    assert props["unit"] == {"type": "string", "enum": ["celsius", "fahrenheit"]}
    assert props["color"] == {"type": "string", "enum": ["red", "green"]}
    assert props["tags"] == {"type": "array", "items": {"type": "string"}}
    assert props["matrix"] == {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}}
    assert props["maybe"] == {"type": ["integer", "null"], "default": None}
    assert props["either"] == {"anyOf": [{"type": "integer"}, {"type": "string"}], "default": 0}
    assert props["newer"] == {"type": ["string", "null"], "default": None}
    assert props["scores"] == {"type": ["object", "null"], "additionalProperties": {"type": "number"},
                               "default": None}
    assert props["city"] == {"type": "string", "description": "the city to look up, e.g. Beijing",
                             "default": "Beijing"}
    assert props["days"] == {"type": ["integer", "null"], "description": "how many days ahead", "default": None}
    assert everything.description == "Echo every argument back.\n\nA second paragraph of the description."
    assert everything.schema() == {"name": "everything", "description": everything.description, "parameters": params}


def test_annotation_schema_details():
    assert annotation_schema(Any) == {}
    assert annotation_schema(tuple[int, ...]) == {"type": "array", "items": {"type": "integer"}}
    assert annotation_schema(Literal[1, 2, 3]) == {"type": "integer", "enum": [1, 2, 3]}
    assert annotation_schema(Literal["a", 1]) == {"enum": ["a", 1]}  # mixed kinds: no single type
    assert annotation_schema(Optional[Literal["a", "b"]]) == {"type": ["string", "null"], "enum": ["a", "b", None]}
    assert annotation_schema(Annotated[list[str], "names", "of people"]) == {
        "type": "array", "items": {"type": "string"}, "description": "names of people"}
    for bad in (set[int], tuple[int, str], dict[int, str], object, bytes):
        with pytest.raises(TypeError, match="unsupported type hint"):
            annotation_schema(bad)


def test_tools_need_hints_and_keyword_parameters():
    def untyped(city):
        return city

    def star(*cities: str):
        return cities

    with pytest.raises(TypeError, match="parameter 'city': needs a type hint"):
        tool(untyped)
    with pytest.raises(TypeError, match="plain keyword parameters"):
        tool(star)
    with pytest.raises(TypeError, match=r"parameter 'x': unsupported type hint"):
        tool(_with_hint(set[int]))
    with pytest.raises(ValueError, match="code interpreter's name"):
        tool(name="interpreter")(_with_hint(int))


def _with_hint(hint):
    def f(x):
        return x
    f.__annotations__ = {"x": hint}
    return f


def test_decorated_function_still_works_and_options_apply():
    @tool(name="weather", description="Weather now.", timeout=2.5)
    def get_weather(city: str) -> str:
        """Ignored: the description is given."""
        return f"sunny in {city}"

    assert isinstance(get_weather, Tool)
    assert get_weather("Paris") == "sunny in Paris"
    assert (get_weather.name, get_weather.description, get_weather.timeout) == ("weather", "Weather now.", 2.5)


def test_docstring_styles():
    google = parse_docstring("""Sum two numbers.

        Args:
            a (int): the first
            b: the second,
                continued
        Raises:
            ValueError: never
        """)
    assert google == ("Sum two numbers.", {"a": "the first", "b": "the second, continued"})
    rest = parse_docstring("""Sum two numbers.

        :param a: the first
        :param int b: the second
        :returns: the sum
        """)
    assert rest == ("Sum two numbers.", {"a": "the first", "b": "the second"})
    numpy = parse_docstring("""Sum two numbers.

        Parameters
        ----------
        a : int
            the first
        b : int
            the second

        Returns
        -------
        int
        """)
    assert numpy == ("Sum two numbers.", {"a": "the first", "b": "the second"})
    assert parse_docstring(None) == ("", {})


# -- checking calls ----------------------------------------------------------------------------

GOOD = {"text": "t", "count": 2, "ratio": 1, "flag": True, "unit": "celsius", "color": "red", "tags": ["a"],
        "matrix": [[1, 2], [3]]}


def test_a_good_call_runs_with_converted_values():
    registry = ToolRegistry([everything])
    outcome = registry.call("everything", {**GOOD, "days": 3, "either": "x"})
    assert outcome.ok and outcome.error is None
    assert outcome.value["color"] is Color.RED  # the Enum member, not the JSON string
    assert outcome.value["days"] == 3 and outcome.value["either"] == "x"
    assert json.loads(outcome.observation)["color"] == "Color.RED"  # non-JSON values are written with str()


@pytest.mark.parametrize("arguments, expected", [
    ({k: v for k, v in GOOD.items() if k != "count"}, "argument 'count' is required but missing"),
    ({**GOOD, "count": "three"}, "argument 'count' must be an integer, got string 'three'"),
    ({**GOOD, "count": True}, "argument 'count' must be an integer, got boolean True"),
    ({**GOOD, "count": 2.5}, "argument 'count' must be an integer, got number 2.5"),
    ({**GOOD, "ratio": "1.5"}, "argument 'ratio' must be a number, got string '1.5'"),
    ({**GOOD, "flag": 1}, "argument 'flag' must be true or false, got integer 1"),
    ({**GOOD, "unit": "kelvin"}, "argument 'unit' must be one of \"celsius\", \"fahrenheit\", got string 'kelvin'"),
    ({**GOOD, "color": "blue"}, "argument 'color' must be one of \"red\", \"green\", got string 'blue'"),
    ({**GOOD, "tags": "a"}, "argument 'tags' must be a list, got string 'a'"),
    ({**GOOD, "tags": ["a", 2]}, "argument 'tags'[1] must be a string, got integer 2"),
    ({**GOOD, "matrix": [[1], ["x"]]}, "argument 'matrix'[1][0] must be an integer, got string 'x'"),
    ({**GOOD, "scores": {"a": "high"}}, "argument 'scores'['a'] must be a number, got string 'high'"),
    ({**GOOD, "either": 1.5}, "argument 'either' must be an integer or a string, got number 1.5"),
    ({**GOOD, "maybe": "1"}, "argument 'maybe' must be an integer or null (None), got string '1'"),
    ({**GOOD, "town": "x"}, "argument 'town' is not a known parameter (the parameters are: text, count"),
])
def test_a_bad_call_becomes_an_observation_saying_what_is_wrong(arguments, expected):
    calls = []
    registry = ToolRegistry([Tool("everything", "", everything.parameters, lambda **kw: calls.append(kw))])
    outcome = registry.call("everything", arguments)  # the function would record a call that ran
    assert not outcome.ok and outcome.error == "invalid_arguments"
    assert outcome.observation.startswith("Error: the call to everything was not run: ")
    assert expected in outcome.observation
    assert calls == []  # nothing ran


def test_every_problem_is_reported_at_once():
    outcome = ToolRegistry([everything]).call("everything", {"count": "x"})
    for name in ("text", "ratio", "flag", "unit", "color", "tags", "matrix"):
        assert f"argument {name!r} is required but missing" in outcome.observation
    assert "argument 'count' must be an integer" in outcome.observation


def test_unknown_tool_and_non_dict_arguments():
    registry = ToolRegistry([everything])
    outcome = registry.call("nope", {})
    assert outcome.error == "unknown_tool"
    assert outcome.observation == "Error: there is no tool named 'nope'. The tools are: everything."
    assert "must be keyword arguments (a dict), got list" in registry.call("everything", [1]).observation


def test_value_problems_bounds_and_nested_objects():
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 3},
                                               "s": {"type": "string", "maxLength": 2}},
              "required": ["n"], "additionalProperties": False}
    assert value_problems({"n": 2, "s": "ab"}, schema, "x") == []
    assert value_problems({"n": 5, "s": "abc", "z": 1}, schema, "x") == [
        "x['n'] must be at most 3, got 5", "x['s'] must have at most 2 characters, got 3",
        "x['z'] is not a known parameter (the parameters are: n, s)"]


# -- running calls -----------------------------------------------------------------------------


def test_an_exception_becomes_an_observation():
    @tool
    def divide(a: float, b: float) -> float:
        """a / b"""
        return a / b

    registry = ToolRegistry([divide])
    assert registry.call("divide", {"a": 1, "b": 4}).observation == "0.25"
    outcome = registry.call("divide", {"a": 1, "b": 0})
    assert outcome.error == "exception"
    assert outcome.observation == "Error: divide raised ZeroDivisionError: division by zero"


def test_a_slow_call_is_abandoned_at_its_timeout():
    release = threading.Event()

    @tool(timeout=0.2)
    def slow() -> str:
        """Waits."""
        release.wait(5)
        return "late"

    registry = ToolRegistry([slow], timeout=30)
    started = time.monotonic()
    outcome = registry.call("slow", {})
    assert time.monotonic() - started < 2
    assert outcome.error == "timeout"
    assert outcome.observation == "Error: slow did not finish within 0.2 seconds; the call was abandoned."
    release.set()


def test_a_long_result_is_cut_by_the_visible_rule():
    @tool
    def big(n: int) -> str:
        """n characters."""
        return "".join(str(i % 10) for i in range(n))

    registry = ToolRegistry([big], max_result_chars=100)
    assert registry.call("big", {"n": 100}).observation == big(100)
    cut = registry.call("big", {"n": 1000}).observation
    assert cut.startswith(big(50) + "\n[... 900 characters cut: the output has 1000 characters and the limit is "
                          "100; showing the first 50 and the last 50 ...]\n")
    assert cut.endswith(big(1000)[-50:])


def test_truncate_and_result_block():
    assert truncate("abc", 3) == "abc"
    assert truncate("abcdef", 3).splitlines()[0] == "a" and truncate("abcdef", 3).endswith("\nef")
    with pytest.raises(ValueError):
        truncate("x", 0)
    assert result_block("42") == "```result\n42\n```"
    assert result_block("a\n```python\nx\n```") == "````result\na\n```python\nx\n```\n````"


def test_registry_rejects_duplicates_and_has_openai_form():
    registry = ToolRegistry([everything])
    with pytest.raises(ValueError, match="two tools are named 'everything'"):
        registry.add(everything)

    @registry.tool
    def ping() -> str:
        """Answers pong."""
        return "pong"

    assert registry.names == ["everything", "ping"] and "ping" in registry and len(registry) == 2
    assert registry.openai_schemas()[1] == {"type": "function", "function": {
        "name": "ping", "description": "Answers pong.", "parameters": {"type": "object", "properties": {}}}}


# -- tools from files --------------------------------------------------------------------------

TOOLS_PY = '''
from __future__ import annotations
from typing import Annotated
from glmkit.agent import tool

@tool
def get_weather(city: Annotated[str, "the city"]) -> dict:
    """The weather of a city."""
    return {"city": city, "weather": "sunny"}

def helper():  # not a tool
    return 1
'''


def test_tools_from_a_python_file(tmp_path):
    path = tmp_path / "my_tools.py"
    path.write_text(TOOLS_PY)
    registry = ToolRegistry.from_file(path, timeout=5)
    assert registry.names == ["get_weather"] and registry.timeout == 5
    assert registry["get_weather"].parameters["properties"]["city"] == {"type": "string", "description": "the city"}
    assert registry.call("get_weather", {"city": "Paris"}).observation == '{"city": "Paris", "weather": "sunny"}'


def test_tools_from_a_json_spec(tmp_path):
    (tmp_path / "impl.py").write_text("def add(a, b):\n    return a + b\n")
    spec = [
        {"name": "add", "description": "a + b", "callable": "impl.py:add",
         "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                        "required": ["a", "b"]}},
        {"type": "function", "function": {"name": "search", "description": "client side",
                                          "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}},
        {"name": "dumps", "callable": "json:dumps", "timeout": 3},
    ]
    path = tmp_path / "tools.json"
    path.write_text(json.dumps(spec))
    registry = ToolRegistry.from_file(path)
    assert registry.names == ["add", "search", "dumps"]
    assert registry.call("add", {"a": 2, "b": 3}).observation == "5"
    assert "argument 'b' must be an integer" in registry.call("add", {"a": 2, "b": "3"}).observation
    assert registry["search"].function is None
    assert registry.call("search", {"q": "x"}).error == "not_runnable"
    assert registry["dumps"].timeout == 3


@pytest.mark.parametrize("content, message", [
    ("not json", "not valid JSON"),
    ("[]", "expected a non-empty list of tools"),
    ('[{"name": "x", "colour": 1}]', "unknown key(s) colour"),
    ('[{"name": "x", "parameters": {"type": "objekt"}}]', "unknown type 'objekt'"),
    ('[{"name": "x", "callable": "nowhere_at_all:f"}]', "cannot import 'nowhere_at_all'"),
    ('[{"name": "x", "callable": "json:nope"}]', "'json' has no function 'nope'"),
    ('[{"name": "interpreter"}]', "code interpreter's name"),
])
def test_bad_json_specs_are_refused_clearly(tmp_path, content, message):
    path = tmp_path / "tools.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ToolRegistry.from_file(path)


def test_bad_tool_files_are_refused_clearly(tmp_path):
    with pytest.raises(ValueError, match="no tools file at"):
        ToolRegistry.from_file(tmp_path / "missing.py")
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="defines no tools"):
        ToolRegistry.from_file(tmp_path / "empty.py")
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ValueError, match="importing it failed: RuntimeError: boom"):
        ToolRegistry.from_file(tmp_path / "broken.py")
    (tmp_path / "tools.yaml").write_text("")
    with pytest.raises(ValueError, match="a Python file"):
        ToolRegistry.from_file(tmp_path / "tools.yaml")
