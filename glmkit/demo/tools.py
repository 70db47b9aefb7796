"""The demo world's tools, runnable: what glmkit-demo was trained to call, with the very declarations
(names, descriptions, parameters) of its training data.

    glmkit chat --tools glmkit.demo.tools          # the bundled model with its tools

- `get_weather(city)`: made-up weather, the same for a city on every call (the demo has no network
  and must not pretend to know real weather); Chinese city names get Chinese conditions.
- `calculator(expression)`: + - * / on numbers with parentheses, read by `ast`, never `eval`.
- `convert_units(value, from_unit, to_unit)`: the demo's units (km/mi, kg/lb, m/ft, in/cm, gal/L,
  celsius/fahrenheit), computed as the training data computes them.

Each returns the JSON object the training data shows as the observation.
"""

from __future__ import annotations

import ast
import hashlib
import operator
from typing import Any

from glmkit.agent.tools import Tool

from . import content as C

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
MAX_EXPRESSION_CHARS = 200
MAX_MAGNITUDE = 1e15  # bigger intermediate results are refused rather than computed


def tool_schema(name: str, description: str | None = None) -> dict[str, Any]:
    """The declaration of a demo tool, in ChatGLM3's JSON-schema form (first wording by default)."""
    params = C.TOOL_PARAMETERS[name]
    return {
        "name": name,
        "description": description if description is not None else C.TOOL_DESCRIPTIONS[name][0],
        "parameters": {
            "type": "object",
            "properties": {key: {"type": kind, "description": text} for key, (kind, text) in params.items()},
            "required": list(params),
        },
    }


def format_number(x: float) -> str:
    """A result as the tools report it: an integer when whole, else at most 2 decimals."""
    x = round(x, 2)
    return str(int(x)) if x == int(x) else str(x)


def convert_value(value: float, source: str, target: str) -> float:
    """`value` in unit `source` expressed in unit `target` (one of the pairs of `content.UNIT_PAIRS`)."""
    for first, second, factor in C.UNIT_PAIRS:
        if {source, target} == {first, second}:
            if factor is None:  # temperature
                return value * 9 / 5 + 32 if source == "celsius" else (value - 32) * 5 / 9
            return value * factor if source == first else value / factor
    units = ", ".join(C.UNITS)
    raise ValueError(f"cannot convert {source!r} to {target!r}: the units are {units}, converted in the pairs "
                     + ", ".join(f"{a}/{b}" for a, b, _ in C.UNIT_PAIRS))


def weather(city: str) -> dict[str, Any]:
    """The demo's made-up weather for `city`: fixed per city name."""
    if not city.strip():
        raise ValueError("city is empty")
    digest = hashlib.sha256(city.strip().encode("utf-8")).digest()
    chinese = any("\u4e00" <= ch <= "\u9fff" for ch in city)
    condition = C.CONDITIONS[digest[0] % len(C.CONDITIONS)][1 if chinese else 0]
    return {"city": city, "temperature": digest[1] % 56 - 15, "condition": condition, "humidity": 10 + digest[2] % 86}


def calculate(expression: str) -> dict[str, Any]:
    """{"result": the value of `expression`}; ValueError naming what it cannot compute."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"the expression is {len(expression)} characters; at most {MAX_EXPRESSION_CHARS}")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from None
    return {"result": _number(_evaluate(tree.body))}


def convert(value: float, from_unit: str, to_unit: str) -> dict[str, Any]:
    """{"value": `value` converted (at most 2 decimals), "unit": `to_unit`}."""
    return {"value": _number(convert_value(value, from_unit, to_unit)), "unit": to_unit}


def _evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Div) and right == 0:
            raise ValueError("division by zero")
        result = _OPERATORS[type(node.op)](left, right)
        if abs(result) > MAX_MAGNITUDE:
            raise ValueError(f"a result above {MAX_MAGNITUDE:g} in magnitude")
        return result
    raise ValueError(f"only numbers, + - * / and parentheses are allowed, not {ast.unparse(node)!r}")


def _number(x: float) -> int | float:
    shown = format_number(x)
    return int(shown) if "." not in shown else float(shown)


def _declared(name: str, function) -> Tool:
    schema = tool_schema(name)
    return Tool(schema["name"], schema["description"], schema["parameters"], function)


get_weather = _declared("get_weather", weather)
calculator = _declared("calculator", calculate)
convert_units = _declared("convert_units", convert)
TOOLS = (get_weather, calculator, convert_units)
# How the demo's training data announces the code interpreter (its English wording), for
# `glmkit.Agent(..., interpreter_prompt=INTERPRETER_PROMPT)`.
INTERPRETER_PROMPT = C.INTERPRETER_SYSTEM["en"]
