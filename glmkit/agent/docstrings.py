"""Read a function's docstring into a description and per-parameter descriptions.

Understands the three common styles:

    Google             reST                        numpy
    Args:              :param city: the city       Parameters
        city: the city                             ----------
                                                   city : str
                                                       the city

The description is the text before the first section (Args, Returns, Raises, ...); sections other
than the parameters are left out of the tool's description.
"""

from __future__ import annotations

import inspect
import re

_PARAMETER_SECTIONS = {"args", "arguments", "parameters", "params", "keyword args", "keyword arguments"}
_SECTION = re.compile(r"^(args|arguments|parameters|params|keyword args|keyword arguments|returns?|yields?|"
                      r"raises|examples?|notes?|see also|attributes|warnings?|references)\s*(:?)\s*$", re.IGNORECASE)
_REST_PARAM = re.compile(r"^:param\s+(?:[^:]+\s+)?(\*{0,2}\w+)\s*:\s*(.*)$")
_ENTRY = re.compile(r"^\*{0,2}(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """(description, {parameter name: description}) from a docstring; ("", {}) for None."""
    if not doc:
        return "", {}
    lines = inspect.cleandoc(doc).splitlines()
    description: list[str] = []
    params: dict[str, list[str]] = {}
    section: str | None = None
    numpy_style = False
    entry_indent: int | None = None
    current: str | None = None
    for i, line in enumerate(lines):
        stripped, indent = line.strip(), len(line) - len(line.lstrip())
        rest = _REST_PARAM.match(stripped)
        if rest:
            section, current = "rest", rest[1].lstrip("*")
            params[current] = [rest[2]]
            continue
        if stripped.startswith(":") and indent == 0:  # :returns:, :raises ...: other reST fields
            section, current = "other", None
            continue
        header = _SECTION.match(stripped) if indent == 0 else None
        underlined = i + 1 < len(lines) and re.fullmatch(r"-{3,}", lines[i + 1].strip() or "x")
        if header and (header[2] or underlined):
            section, current, entry_indent = header[1].lower(), None, None
            numpy_style = bool(underlined)
            continue
        if re.fullmatch(r"-{3,}", stripped) and section:
            continue  # a numpy section's underline
        if section is None:
            description.append(line)
        elif section in _PARAMETER_SECTIONS:
            current, entry_indent = _parameter_line(line, stripped, indent, numpy_style, entry_indent, current, params)
        elif section == "rest" and current and stripped and indent > 0:
            params[current].append(stripped)  # a continued :param line
    text = "\n".join(description).strip()
    return text, {name: " ".join(p for p in parts if p).strip() for name, parts in params.items()}


def _parameter_line(line: str, stripped: str, indent: int, numpy_style: bool, entry_indent: int | None,
                    current: str | None, params: dict[str, list[str]]) -> tuple[str | None, int | None]:
    """Add one line of an Args / Parameters section; returns (current parameter, entry indent)."""
    if not stripped:
        return current, entry_indent
    entry = _ENTRY.match(stripped)
    if entry and (entry_indent is None or indent <= entry_indent):
        name = entry[1]
        # numpy: "name : type" (the description follows, indented); Google: "name (type): description".
        params[name] = [] if numpy_style else [entry[2]]
        return name, indent
    if current is not None:
        params[current].append(stripped)
    return current, entry_indent
