"""Chat with a model in the terminal, or over a pipe.

Each line of stdin is a user message; the reply streams to stdout as it is generated, one reply per
message, each ending with a newline. Type `clear` to forget the conversation, `stop` (or end the
input, Ctrl-D) to quit. On a terminal a `User:` prompt is shown; over a pipe only the replies are
written. A conversation that outgrows the context window loses its oldest exchanges (with a note on
stderr). Tool calls the model makes are printed as `[tool call] name(arg=value, ...)`.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Any

from . import add_model_args, add_sampling_args, load_chat_model, sampling_kwargs

USER_PROMPT = "User: "
MODEL_PROMPT = "ChatGLM: "
WELCOME = "Chatting with {model}. Type 'clear' to start over, 'stop' or Ctrl-D to quit."


def add_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    parser.add_argument("--system", default=None, metavar="TEXT",
                        help="a system prompt that starts (and survives) every conversation")
    add_sampling_args(parser)


def main(args: argparse.Namespace) -> int:
    kwargs = sampling_kwargs(args)
    model = load_chat_model(args)
    interactive = sys.stdin.isatty()
    start = [] if args.system is None else [{"role": "system", "content": args.system}]
    history: list[dict[str, Any]] = list(start)
    status = 0
    if interactive:
        print(WELCOME.format(model=args.model))
    while True:
        query = _read(interactive)
        if query is None or query == "stop":
            return status
        if not query:
            continue
        if query == "clear":
            history = list(start)
            if interactive:
                print("(conversation cleared)")
            continue
        try:
            history = _reply(model, query, history, kwargs, interactive)
        except KeyboardInterrupt:
            if not interactive:
                return 130
            print("\n(interrupted; the reply is not kept)")
        except ValueError as e:  # e.g. a single message longer than the context window
            print(f"glmkit: error: {e}", file=sys.stderr)
            status = 1


def _read(interactive: bool) -> str | None:
    """The next user line, stripped; None at the end of the input."""
    try:
        line = input(USER_PROMPT) if interactive else sys.stdin.readline()
    except (EOFError, KeyboardInterrupt):
        if interactive:
            print()
        return None
    if not interactive and not line:
        return None
    return line.strip()


def _reply(model, query: str, history: list[dict[str, Any]], kwargs: dict[str, Any], interactive: bool):
    """Stream the reply to stdout; return the new history."""
    out = sys.stdout
    if interactive:
        out.write(MODEL_PROMPT)
    printed, response, new_history = "", "", history
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for response, new_history in model.stream_chat(query, history, truncate="drop_oldest", **kwargs):
            if not isinstance(response, str):
                continue  # a tool call being written: shown whole at the end
            # The response grows, except when the model starts another turn: then it starts over.
            out.write(response[len(printed):] if response.startswith(printed) else "\n" + response)
            out.flush()
            printed = response
    if not isinstance(response, str):
        out.write(("\n" if printed else "") + format_tool_call(response))
    out.write("\n")
    out.flush()
    for warning in caught:
        print(f"glmkit: note: {warning.message}", file=sys.stderr)
    return new_history


def format_tool_call(response: dict[str, Any]) -> str:
    """A tool call or code the model wrote, for people to read."""
    name = response.get("name", "?")
    if "parameters" in response:
        args = ", ".join(f"{key}={json.dumps(value, ensure_ascii=False, default=repr)}"
                         for key, value in response["parameters"].items())
        return f"[tool call] {name}({args})"
    if name == "interpreter":
        return f"[code interpreter]\n{response.get('content', '')}"
    return f"[{name}]\n{response.get('content', '')}"

