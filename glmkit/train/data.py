"""Conversation data for fine-tuning: ChatGLM3's JSONL format to examples of ids and labels.

One line, one conversation:

    {"conversations": [{"role": ..., "content": ..., "metadata"?: ..., "loss"?: ...}, ...],
     "tools"?: [...]}

Roles are system, user, assistant, observation (`tool` is an alias of observation). Rendering is
`glmkit.chat_format.render_with_loss_mask`, the one copy of the format that inference uses too, so
training ids equal prompt ids: assistant turns are learned (their metadata, content and the token that
ends them), other turns are not, and a message's `loss` overrides that. Declared `tools` become the
system message that `tools_system_message` builds for inference, placed first. Tool calls (assistant
turns whose metadata is the tool's name) and code-interpreter turns train like any assistant turn.

The official fine-tuning demo's combined tool message, `{"role": "tool", "name", "parameters",
"observation"}`, is read as what it stands for: the assistant's tool call (learned) followed by the
tool's observation (not learned).

Nothing is dropped in silence. A line that cannot be read is an error naming its line number (or,
with `skip_bad_lines`, is left out and listed in the report). An example longer than `max_length`
is cut to its first `max_length` tokens (`overlong="truncate"`, as the official code does) or left
out (`"drop"`); an example with no token left to learn is left out. The report counts each case.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glmkit.chat_format import render_with_loss_mask, tools_system_message

IGNORE_INDEX = -100  # a label the loss skips (cross_entropy's ignore_index)
OVERLONG_RULES = ("truncate", "drop")
SHOWN_BAD_LINES = 20  # in an error message; the report keeps them all


class DataError(ValueError):
    """Training data glmkit cannot use, with the lines at fault."""


@dataclass
class DataReport:
    """What became of each line of a conversation file."""

    path: str
    max_length: int
    overlong: str
    lines: int = 0  # non-blank lines read
    examples: int = 0  # examples kept
    truncated: int = 0  # kept, cut to max_length
    dropped_overlong: int = 0  # left out: longer than max_length with overlong="drop"
    dropped_no_loss: int = 0  # left out: no token to learn (within max_length)
    bad_lines: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason), skipped
    tokens: int = 0  # in the kept examples
    learned_tokens: int = 0  # of those, the ones with a label

    def summary(self) -> str:
        parts = [f"{self.path}: {self.examples} examples from {self.lines} lines, "
                 + f"{self.tokens} tokens ({self.learned_tokens} learned)"]
        if self.truncated:
            parts.append(f"{self.truncated} truncated to {self.max_length} tokens")
        if self.dropped_overlong:
            parts.append(f"{self.dropped_overlong} dropped as longer than {self.max_length} tokens")
        if self.dropped_no_loss:
            parts.append(f"{self.dropped_no_loss} dropped with no token to learn"
                         + (f" within {self.max_length} tokens" if self.overlong == "truncate" else ""))
        if self.bad_lines:
            parts.append(f"{len(self.bad_lines)} bad lines skipped")
        return "; ".join(parts)


def load_conversations(path_jsonl: str | os.PathLike, tokenizer, max_length: int, overlong: str = "truncate", *,
                       skip_bad_lines: bool = False) -> tuple[list[dict[str, list[int]]], DataReport]:
    """Examples `{"input_ids", "labels"}` (labels IGNORE_INDEX where nothing is learned) and the report.

    Raises DataError listing the bad lines (unless `skip_bad_lines`), or when no example is left.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length={max_length!r} must be an integer of at least 2")
    if overlong not in OVERLONG_RULES:
        raise ValueError(f"overlong={overlong!r}; use one of {', '.join(OVERLONG_RULES)}")
    path = Path(path_jsonl)
    if not path.is_file():
        raise FileNotFoundError(f"no conversation file at {path}")
    report = DataReport(str(path), max_length, overlong)
    examples: list[dict[str, list[int]]] = []
    with path.open("rb") as f:
        for number, line in _numbered_lines(f, report):
            if not line.strip():
                continue
            report.lines += 1
            origins: list[str] = []
            try:
                messages, origins = conversation_messages(json.loads(line))
                ids, mask = render_with_loss_mask(tokenizer, messages)
            except json.JSONDecodeError as e:
                report.bad_lines.append((number, f"not valid JSON ({e.msg} at column {e.colno})"))
                continue
            except (ValueError, TypeError) as e:
                report.bad_lines.append((number, _in_record_terms(str(e), origins)))
                continue
            example = _fit(ids, mask, report)
            if example is not None:
                examples.append(example)
    if report.bad_lines and not skip_bad_lines:
        raise DataError(_bad_lines_message(report))
    if not examples:
        raise DataError(f"no example to train on: {report.summary()}")
    return examples, report


def conversation_messages(record: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """The chat_format messages of one JSONL record (tools first, combined tool messages expanded), and
    for each the place in the record it comes from, for error messages."""
    if not isinstance(record, Mapping):
        raise ValueError(f"expected a JSON object with 'conversations', got {type(record).__name__}")
    if "conversations" not in record:
        raise ValueError(f"no 'conversations' key (keys: {', '.join(map(str, record)) or 'none'})")
    conversation = record["conversations"]
    if not isinstance(conversation, list) or not conversation:
        raise ValueError("'conversations' must be a non-empty list of messages")
    tools = record.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise ValueError(f"'tools' must be a list of tool descriptions, got {type(tools).__name__}")
    messages = tools_system_message(tools) if tools else []
    origins = ["tools"] * len(messages)
    for i, message in enumerate(conversation):
        if isinstance(message, Mapping) and message.get("role") == "tool" and "content" not in message:
            expanded = _expand_tool_message(i, message)
        else:
            expanded = [message]
        messages += expanded
        origins += [f"conversations[{i}]"] * len(expanded)
    return messages, origins


def _expand_tool_message(i: int, message: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The official demo's `{"role": "tool", "name", "parameters", "observation"}`: call, then result."""
    missing = [k for k in ("name", "parameters", "observation") if k not in message]
    if missing:
        raise ValueError(f"conversations[{i}]: a 'tool' message needs 'content' (the tool's result), or 'name', "
                         f"'parameters' and 'observation' (a call and its result); missing {', '.join(missing)}")
    observation = message["observation"]
    if not isinstance(observation, str):
        observation = json.dumps(observation, ensure_ascii=False)
    call = {"role": "assistant", "content": {"name": message["name"], "parameters": message["parameters"]}}
    if "loss" in message:
        call["loss"] = message["loss"]
    return [call, {"role": "observation", "content": observation}]


def _fit(ids: list[int], mask: list[bool], report: DataReport) -> dict[str, list[int]] | None:
    """Apply the over-long rule and build the labels; None (counted) when the example is left out."""
    if len(ids) > report.max_length:
        if report.overlong == "drop":
            report.dropped_overlong += 1
            return None
        ids, mask = ids[:report.max_length], mask[:report.max_length]
        truncated = True
    else:
        truncated = False
    # Position 0 is never predicted (nothing comes before it): a label there teaches nothing.
    learned = sum(mask[1:])
    if learned == 0:
        report.dropped_no_loss += 1
        return None
    report.truncated += truncated
    report.examples += 1
    report.tokens += len(ids)
    report.learned_tokens += learned
    return {"input_ids": ids, "labels": [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]}


def _numbered_lines(f, report: DataReport):
    """(1-based line number, text); a line that is not UTF-8 is a bad line, not the end of the file."""
    for number, raw in enumerate(f, start=1):
        try:
            yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as e:
            report.lines += 1
            report.bad_lines.append((number, f"not UTF-8 text ({e.reason} at byte {e.start})"))


def _in_record_terms(message: str, origins: list[str]) -> str:
    """chat_format counts the rendered messages ("message 3: ..."); say where that is in the record."""
    match = re.match(r"message (\d+): ", message)
    if match and int(match.group(1)) < len(origins):
        return f"{origins[int(match.group(1))]}: {message[match.end():]}"
    return message


def _bad_lines_message(report: DataReport) -> str:
    shown = "\n".join(f"  line {n}: {reason}" for n, reason in report.bad_lines[:SHOWN_BAD_LINES])
    more = len(report.bad_lines) - SHOWN_BAD_LINES
    return (f"{report.path}: {len(report.bad_lines)} bad line(s) out of {report.lines}:\n{shown}"
            + (f"\n  ... and {more} more" if more > 0 else "")
            + "\nfix them, or skip them with --skip-bad-lines (skip_bad_lines=True); they are still reported")
