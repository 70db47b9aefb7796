"""How results are written for the model: the visible truncation rule and the ```result fence.

Tools and the code interpreter both hand their results to the model as `observation` messages.
A long result is cut by one explicit rule (`truncate`): the first and the last halves of the limit
are kept and a marker in the middle says how much was cut, so neither the model nor a person
reading the trace mistakes a cut result for a whole one.
"""

from __future__ import annotations

import re

RESULT_LANGUAGE = "result"  # the fence of a code-interpreter observation, as ChatGLM3 was trained on


def truncate(text: str, limit: int) -> str:
    """`text` if it has at most `limit` characters; else its first `limit // 2` and last
    `limit - limit // 2` characters around a line that says how many were cut.

    The marker line itself comes on top of `limit`. The tail is kept because that is where errors
    and final values usually are.
    """
    if limit < 1:
        raise ValueError(f"the truncation limit must be at least 1 character, got {limit}")
    if len(text) <= limit:
        return text
    head, tail = limit // 2, limit - limit // 2
    cut = len(text) - head - tail
    marker = (f"[... {cut} characters cut: the output has {len(text)} characters and the limit is {limit}; "
              f"showing the first {head} and the last {tail} ...]")
    return f"{text[:head]}\n{marker}\n{text[len(text) - tail:]}"


def result_block(text: str) -> str:
    """`text` fenced as a ```result block, the observation format of the code interpreter.

    A text that itself holds a line starting with three backticks gets a longer fence, so the
    block still ends where it should (CommonMark's rule).
    """
    runs = [len(m) for m in re.findall(r"^[ \t]*(`{3,})", text, flags=re.MULTILINE)]
    fence = "`" * max([3, *(n + 1 for n in runs)])
    return f"{fence}{RESULT_LANGUAGE}\n{text}\n{fence}"
