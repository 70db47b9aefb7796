"""JSON schemas from Python type hints, and the check of a tool call's values against a schema.

Owns the mapping from an annotation to the JSON Schema subset that tool descriptions use, and the
validator of that subset, which reports every problem in words the model can act on.

    str -> string    int -> integer    float -> number (an int is accepted)    bool -> boolean
    Literal["a", "b"] / an Enum -> enum      list[T] / tuple[T, ...] -> array of T
    dict[str, T] -> object of T              Optional[T] / T | None -> T or null
    Union[A, B] -> anyOf                     Any -> any value
    Annotated[T, "text"] -> T with description "text" (other Annotated metadata is ignored)

The validator checks: type, enum, anyOf / oneOf (as "any of"), items, properties, required,
additionalProperties, minimum / maximum, minLength / maxLength, minItems / maxItems. A schema
written by hand (a JSON tool spec) may hold other keywords; they are shown to the model and not
checked. `check_schema` refuses unknown type names when a spec is loaded.
"""

from __future__ import annotations

import enum
import json
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal, Union

JSON_TYPES = ("string", "integer", "number", "boolean", "array", "object", "null")
_SCALARS: dict[type, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}
_NULL = {"type": "null"}


# -- annotation -> schema ----------------------------------------------------------------------


def annotation_schema(annotation: Any) -> dict[str, Any]:
    """The JSON schema of values of `annotation`; TypeError for hints that have none."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        schema = annotation_schema(args[0])
        descriptions = [m.strip() for m in args[1:] if isinstance(m, str) and m.strip()]
        if descriptions:
            schema["description"] = " ".join(descriptions)
        return schema
    if annotation is Any:
        return {}
    if annotation is None or annotation is type(None):
        return dict(_NULL)
    if annotation in _SCALARS:
        return {"type": _SCALARS[annotation]}
    if origin is Literal:
        return _enum_schema(list(args), f"Literal{list(args)!r}")
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return _enum_schema([member.value for member in annotation], annotation.__name__)
    if origin is Union or origin is types.UnionType:
        members = [a for a in args if a is not type(None)]
        schema = annotation_schema(members[0]) if len(members) == 1 else {
            "anyOf": [annotation_schema(a) for a in members]}
        return nullable(schema) if len(members) < len(args) else schema
    if annotation in (list, tuple) or origin in (list, Sequence, typing.Sequence):
        return _array(args[0] if args else Any)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return _array(args[0])
        raise TypeError(f"unsupported type hint {_name(annotation)}: a fixed-length tuple; use tuple[T, ...] or "
                        "list[T]")
    if annotation is dict or origin in (dict, Mapping, typing.Mapping):
        if args and args[0] is not str:
            raise TypeError(f"unsupported type hint {_name(annotation)}: JSON object keys are strings")
        return {"type": "object", **({"additionalProperties": annotation_schema(args[1])} if args else {})}
    raise TypeError(f"unsupported type hint {_name(annotation)}; use str, int, float, bool, Literal[...], an Enum, "
                    "list[...], dict[str, ...], Optional[...], Union[...] or Annotated[..., 'description']")


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` that also accepts null."""
    schema = dict(schema)
    if not schema or _accepts_null(schema):
        return schema
    if "enum" in schema:
        schema["enum"] = [*schema["enum"], None]
        if isinstance(schema.get("type"), str):
            schema["type"] = [schema["type"], "null"]
        return schema
    if isinstance(schema.get("type"), str):
        schema["type"] = [schema["type"], "null"]
        return schema
    if "anyOf" in schema:
        schema["anyOf"] = [*schema["anyOf"], dict(_NULL)]
        return schema
    description = schema.pop("description", None)
    return {"anyOf": [schema, dict(_NULL)], **({"description": description} if description else {})}


def _accepts_null(schema: dict[str, Any]) -> bool:
    kind = schema.get("type")
    return kind == "null" or (isinstance(kind, list) and "null" in kind) or _NULL in schema.get("anyOf", [])


def _enum_schema(values: list[Any], hint: str) -> dict[str, Any]:
    kinds = []
    for value in values:
        kind = json_type(value)
        if kind not in ("string", "integer", "number", "boolean", "null"):
            raise TypeError(f"unsupported type hint {hint}: its values must be JSON scalars, got {value!r}")
        kinds.append(kind)
    schema: dict[str, Any] = {"enum": values}
    if len(set(kinds)) == 1:
        schema = {"type": kinds[0], **schema}
    return schema


def _array(item: Any) -> dict[str, Any]:
    items = annotation_schema(item)
    return {"type": "array", **({"items": items} if items else {})}


def _name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) if isinstance(annotation, type) else repr(annotation)


# -- checking values ---------------------------------------------------------------------------


def json_type(value: Any) -> str:
    """The JSON type name of a Python value ("object" for anything not JSON)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    return "object"


def _is_type(value: Any, kind: str) -> bool:
    actual = json_type(value)
    if kind == "number":
        return actual in ("integer", "number")
    if kind == "object":
        return isinstance(value, Mapping)
    return actual == kind if kind in JSON_TYPES else True  # unknown names are refused by check_schema


def value_problems(value: Any, schema: Mapping[str, Any], where: str) -> list[str]:
    """What is wrong with `value` under `schema`, one sentence each; [] when it conforms.

    `where` names the value in the sentences, e.g. "argument 'city'".
    """
    if not schema:
        return []
    options = schema.get("anyOf", schema.get("oneOf"))
    if options is not None and not any(not value_problems(value, option, where) for option in options):
        return [f"{where} must be {_describe(schema)}, got {_show(value)}"]
    if "enum" in schema and not any(_same(value, choice) for choice in schema["enum"]):
        choices = ", ".join(json.dumps(c, ensure_ascii=False) for c in schema["enum"])
        return [f"{where} must be one of {choices}, got {_show(value)}"]
    if "type" in schema:
        kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(value, kind) for kind in kinds):
            return [f"{where} must be {_describe(schema)}, got {_show(value)}"]
    return _bounds_problems(value, schema, where) + _member_problems(value, schema, where)


def _bounds_problems(value: Any, schema: Mapping[str, Any], where: str) -> list[str]:
    problems = []
    if json_type(value) in ("integer", "number"):
        if "minimum" in schema and value < schema["minimum"]:
            problems.append(f"{where} must be at least {schema['minimum']}, got {value}")
        if "maximum" in schema and value > schema["maximum"]:
            problems.append(f"{where} must be at most {schema['maximum']}, got {value}")
    for kind, low, high, unit in (("string", "minLength", "maxLength", "characters"),
                                  ("array", "minItems", "maxItems", "items")):
        if json_type(value) == kind:
            if low in schema and len(value) < schema[low]:
                problems.append(f"{where} must have at least {schema[low]} {unit}, got {len(value)}")
            if high in schema and len(value) > schema[high]:
                problems.append(f"{where} must have at most {schema[high]} {unit}, got {len(value)}")
    return problems


def _member_problems(value: Any, schema: Mapping[str, Any], where: str) -> list[str]:
    problems: list[str] = []
    if isinstance(value, (list, tuple)) and schema.get("items"):
        for i, item in enumerate(value):
            problems += value_problems(item, schema["items"], f"{where}[{i}]")
    if isinstance(value, Mapping) and any(k in schema for k in ("properties", "required", "additionalProperties")):
        problems += object_problems(value, schema, lambda key: f"{where}[{key!r}]")
    return problems


def object_problems(value: Mapping[str, Any], schema: Mapping[str, Any], name_of) -> list[str]:
    """Missing, unknown and wrong members of an object; `name_of(key)` names a member."""
    properties = schema.get("properties", {})
    problems = [f"{name_of(key)} is required but missing" for key in schema.get("required", []) if key not in value]
    extra = schema.get("additionalProperties", True)
    for key, member in value.items():
        if key in properties:
            problems += value_problems(member, properties[key], name_of(key))
        elif extra is False:
            known = ", ".join(properties) or "none"
            problems.append(f"{name_of(key)} is not a known parameter (the parameters are: {known})")
        elif isinstance(extra, Mapping):
            problems += value_problems(member, extra, name_of(key))
    return problems


def _same(value: Any, choice: Any) -> bool:
    # 1 == True and 1 == 1.0 in Python; an enum of JSON values compares kinds too (numbers match numbers).
    numbers = ("integer", "number")
    kinds = json_type(value), json_type(choice)
    return (kinds[0] == kinds[1] or (kinds[0] in numbers and kinds[1] in numbers)) and value == choice


def _describe(schema: Mapping[str, Any]) -> str:
    options = schema.get("anyOf", schema.get("oneOf"))
    if options is not None:
        return " or ".join(_describe(option) for option in options) or "any value"
    if "enum" in schema:
        return "one of " + ", ".join(json.dumps(c, ensure_ascii=False) for c in schema["enum"])
    kinds = schema.get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds] if kinds else []
    words = {"string": "a string", "integer": "an integer", "number": "a number", "boolean": "true or false",
             "array": "a list", "object": "an object (dict)", "null": "null (None)"}
    return " or ".join(words.get(k, k) for k in kinds) or "any value"


def _show(value: Any) -> str:
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{json_type(value) if json_type(value) != 'object' else type(value).__name__} {text}"


def check_schema(schema: Any, where: str) -> None:
    """Raise ValueError when a hand-written schema is not a dict or names an unknown type."""
    if not isinstance(schema, Mapping):
        raise ValueError(f"{where}: a schema must be an object, got {type(schema).__name__}")
    kinds = schema.get("type", [])
    for kind in kinds if isinstance(kinds, list) else [kinds]:
        if kind not in JSON_TYPES:
            raise ValueError(f"{where}: unknown type {kind!r}; JSON Schema types are {', '.join(JSON_TYPES)}")
    for key, sub in schema.get("properties", {}).items():
        check_schema(sub, f"{where}.{key}")
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), Mapping):
            check_schema(schema[key], f"{where}.{key}")
    for option in schema.get("anyOf", schema.get("oneOf", [])):
        check_schema(option, where)
