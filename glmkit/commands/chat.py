"""Chat with a model in the terminal, or over a pipe.

Each line of stdin is a user message; the reply streams to stdout as it is generated, one reply per
message, each ending with a newline. Type `clear` to forget the conversation, `stop` (or end the
input, Ctrl-D) to quit. On a terminal a `User:` prompt is shown; over a pipe only the replies are
written. A conversation that outgrows the context window loses its oldest exchanges (with a note on
stderr). Tool calls the model makes are printed as `[tool call] name(arg=value, ...)`.

With `--tools FILE` (a Python file of `@glmkit.agent.tool` functions, or a JSON spec) or
`--code-interpreter` (Python run in a sandboxed Jupyter kernel, one per conversation), each message
runs the agent loop: the calls and code the model writes are run, their results are printed as
`[tool result]` / `[result]` and sent back to the model, until it answers (at most --max-rounds
replies). `clear` also restarts the interpreter. With no `--model` the chat is with the bundled demo
model, and its own tools (`glmkit.demo.tools`: made-up weather, a calculator, unit conversion) are
on unless `--tools` or `--code-interpreter` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Any

from . import CommandError, add_model_args, add_sampling_args, load_chat_model, sampling_kwargs

USER_PROMPT = "User: "
MODEL_PROMPT = "ChatGLM: "
WELCOME = "Chatting with {model}. Type 'clear' to start over, 'stop' or Ctrl-D to quit."
DEMO_TOOLS = "glmkit.demo.tools"


def add_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    parser.add_argument("--system", default=None, metavar="TEXT",
                        help="a system prompt that starts (and survives) every conversation")
    add_sampling_args(parser)
    group = parser.add_argument_group("agent")
    group.add_argument("--tools", default=None, metavar="FILE",
                       help="tools the model may call: a Python file or module of @glmkit.agent.tool functions, or a "
                            "JSON spec (default with no --model: glmkit.demo.tools)")
    group.add_argument("--code-interpreter", action="store_true",
                       help="let the model run Python in a sandboxed Jupyter kernel (needs: pip install 'glmkit[agent]')")
    group.add_argument("--workdir", default=None, metavar="DIR",
                       help="the interpreter's working directory, where your files are (default: a temporary one)")
    group.add_argument("--code-timeout", type=float, default=30.0, metavar="SECONDS",
                       help="interrupt code that runs longer than this (default: 30)")
    group.add_argument("--max-rounds", type=int, default=8, metavar="N",
                       help="the most model replies per message when tools or code run (default: 8)")


def main(args: argparse.Namespace) -> int:
    kwargs = sampling_kwargs(args)
    demo = args.model is None
    if demo and args.tools is None and not args.code_interpreter:
        args.tools = DEMO_TOOLS  # the bundled demo model comes with the tools it was trained to call
    tools, session = _agent_parts(args)  # bad agent flags or a bad tools file fail before the model loads
    model = load_chat_model(args)
    agent = None
    if tools is not None or session is not None:
        from glmkit.agent.loop import Agent

        prompt = {}
        if demo:  # the demo model was trained on its own announcement of the interpreter
            from glmkit.demo.tools import INTERPRETER_PROMPT

            prompt["interpreter_prompt"] = INTERPRETER_PROMPT
        agent = Agent(model, tools=tools, code_interpreter=session or False, max_rounds=args.max_rounds, **prompt)
    try:
        return _converse(model, agent, args, kwargs)
    finally:
        if agent is not None and agent.interpreter is not None:
            agent.interpreter.close()  # made for this chat (a --workdir of the user's is kept)


def _converse(model, agent, args: argparse.Namespace, kwargs: dict[str, Any]) -> int:
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
            if agent is not None:
                agent.reset()
            if interactive:
                print("(conversation cleared)")
            continue
        try:
            if agent is None:
                history = _reply(model, query, history, kwargs, interactive)
            else:
                history = _agent_reply(agent, query, history, kwargs, interactive)
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


# -- the agent loop in the terminal ------------------------------------------------------------


def _agent_parts(args: argparse.Namespace):
    """(tool registry or None, interpreter session or None) from the agent flags."""
    if args.max_rounds < 1:
        raise CommandError(f"--max-rounds must be at least 1, got {args.max_rounds}")
    tools = session = None
    if args.tools:
        from glmkit.agent.tools import ToolRegistry

        try:
            tools = ToolRegistry.from_file(args.tools)
        except (ValueError, TypeError) as e:
            raise CommandError(f"cannot load tools: {e}") from None
        declared_only = [t.name for t in tools if t.function is None]
        if declared_only:
            raise CommandError(f"{args.tools}: tool(s) {', '.join(declared_only)} have no 'callable', so they "
                               "cannot run here")
    if args.code_interpreter:
        from glmkit.agent.interpreter import InterpreterSession, SandboxLimits

        try:
            session = InterpreterSession(SandboxLimits(timeout=args.code_timeout), workdir=args.workdir)
        except ValueError as e:
            raise CommandError(str(e).replace("SandboxLimits.timeout", "--code-timeout")) from None
    elif args.workdir:
        raise CommandError("--workdir is the code interpreter's folder: add --code-interpreter")
    return tools, session


def _agent_reply(agent, query: str, history: list[dict[str, Any]], kwargs: dict[str, Any], interactive: bool):
    """Run the agent loop, streaming its text and showing its calls and results; return the new history."""
    from glmkit.agent.interpreter import InterpreterError

    out = sys.stdout
    if interactive:
        out.write(MODEL_PROMPT)
    line_start, result = not interactive, None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            for event in agent.stream(query, history, truncate="drop_oldest", **kwargs):
                if event.kind == "done":
                    result = event.result
                    continue
                # Calls and results are blocks of their own lines; the model's text streams as it comes.
                text = event.text if event.kind == "text" else \
                    ("" if line_start else "\n") + format_agent_event(event) + "\n"
                if text:
                    out.write(text)
                    out.flush()
                    line_start = text.endswith("\n")
        except InterpreterError as e:
            raise CommandError(str(e)) from None
    if not line_start:
        out.write("\n")
    out.flush()
    for warning in caught:
        print(f"glmkit: note: {warning.message}", file=sys.stderr)
    if result.stop_reason == "max_rounds":
        print(f"glmkit: note: stopped after {result.rounds} model replies without a final answer (--max-rounds)",
              file=sys.stderr)
    return result.history


def format_agent_event(event) -> str:
    """A tool call, a tool's result, code or its output, for people to read."""
    if event.kind == "tool_call":
        if event.arguments is None:
            return f"[tool call] {event.name} (unreadable):\n{event.text}"
        return format_tool_call({"name": event.name, "parameters": event.arguments})
    if event.kind == "tool_result":
        return f"[tool result] {event.text}"
    if event.kind == "code":
        return format_tool_call({"name": "interpreter", "content": event.text})
    if event.kind == "code_output":
        text = event.execution.text if event.execution is not None else event.text
        saved = [f"[image saved as {image.path}]" for image in (event.execution.images if event.execution else [])]
        return "\n".join(["[result]", text, *saved])
    return f"[{event.kind}] {event.text}"
