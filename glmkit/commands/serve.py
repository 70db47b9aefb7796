"""Serve a model over an OpenAI-compatible HTTP API, with a chat page at /.

Endpoints: POST /v1/chat/completions (tools, streaming, n, stop, logprobs, json_object),
POST /v1/completions, GET /v1/models, GET /health, GET /metrics (Prometheus). Point any OpenAI
client at http://HOST:PORT/v1. Requests run on the continuous-batching engine when glmkit has it
(--backend auto), else one at a time; at most --max-pending generations are admitted at once, more
get a 503. Needs the `serve` extra: pip install 'glmkit[serve]'.

Server-side tools are off unless asked for: `--tools FILE` (a Python file of @glmkit.agent.tool
functions, or a JSON spec) and `--code-interpreter` (a sandboxed Jupyter kernel per request; needs
the `agent` extra) let a client ask the server to run them, with `{"type": "server_tool", "name": ...}`
or `{"type": "code_interpreter"}` in a chat request's tools; the server then runs the agent loop
and returns the answer with its steps. GET /v1/tools lists what is on offer.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from glmkit.agent.interpreter import SandboxLimits
from glmkit.agent.loop import DEFAULT_MAX_ROUNDS
from glmkit.agent.tools import DEFAULT_TIMEOUT
from glmkit.openmp_threads import release_openmp_threads
from glmkit.server.server_tools import DEFAULT_MAX_SESSIONS, ServerTools

from . import CommandError, add_model_args, load_chat_model

LIMITS = SandboxLimits()  # the interpreter's default limits, shown in --help


def add_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 for all)")
    group.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    group.add_argument("--api-key", action="append", default=[], metavar="KEY",
                       help="accept requests with 'Authorization: Bearer KEY' only; give it several times for "
                            "several keys (default: no key needed)")
    group.add_argument("--api-key-file", type=Path, default=None, metavar="FILE",
                       help="read accepted keys from FILE, one per line (keeps them out of the process list)")
    group.add_argument("--served-model-name", default=None, metavar="NAME",
                       help="the model name clients send (default: the --model folder's name, or the Hub id)")
    group.add_argument("--backend", choices=["auto", "batched", "sequential"], default="auto",
                       help="batched: continuous batching; sequential: one request at a time; "
                            "auto (default): batched when available")
    group.add_argument("--max-num-seqs", type=int, default=64, metavar="N",
                       help="requests the batched engine runs at once (default: 64)")
    group.add_argument("--max-pending", type=int, default=256, metavar="N",
                       help="generations admitted at once, running or queued; more get 503 (default: 256)")
    group.add_argument("--max-body-bytes", type=int, default=4 * 2**20, metavar="BYTES",
                       help="larger request bodies get 413 (default: 4 MiB)")
    group.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    agent = parser.add_argument_group("server-side tools (off unless enabled here)")
    agent.add_argument("--tools", default=None, metavar="FILE",
                       help="tools the server runs for clients that ask: a Python file of @glmkit.agent.tool "
                            "functions, or a JSON spec whose tools have a 'callable'")
    agent.add_argument("--code-interpreter", action="store_true",
                       help="let clients ask the server to run the model's Python in a sandboxed Jupyter kernel, "
                            "one per request (needs: pip install 'glmkit[agent]')")
    agent.add_argument("--tool-timeout", type=float, default=None, metavar="SECONDS",
                       help=f"abandon a tool call after this long (default: {DEFAULT_TIMEOUT:g})")
    agent.add_argument("--code-timeout", type=float, default=None, metavar="SECONDS",
                       help=f"interrupt code that runs longer than this (default: {LIMITS.timeout:g})")
    agent.add_argument("--code-memory-mb", type=int, default=None, metavar="MB",
                       help=f"memory limit of an interpreter kernel (default: {LIMITS.memory_mb})")
    agent.add_argument("--code-cpu-seconds", type=int, default=None, metavar="SECONDS",
                       help=f"CPU-time budget of an interpreter kernel (default: {LIMITS.cpu_seconds})")
    agent.add_argument("--max-interpreter-sessions", type=int, default=None, metavar="N",
                       help=f"interpreter kernels alive at once; more requests get 503 (default: "
                            f"{DEFAULT_MAX_SESSIONS})")
    agent.add_argument("--max-rounds", type=int, default=None, metavar="N",
                       help=f"the most model replies of one request that runs tools or code (default: "
                            f"{DEFAULT_MAX_ROUNDS})")


def main(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from glmkit.server.app import create_app
        from glmkit.server.backend import make_backend
    except ModuleNotFoundError as e:
        raise CommandError(f"glmkit serve needs {e.name}: pip install 'glmkit[serve]'") from None
    for name in ("port", "max_num_seqs", "max_pending", "max_body_bytes"):
        if getattr(args, name) < 1:
            raise CommandError(f"--{name.replace('_', '-')} must be at least 1")
    keys = list(args.api_key) + _read_keys(args.api_key_file)
    server_tools = _server_tools(args)  # bad flags or a bad tools file fail before the model loads
    name = args.served_model_name or (Path(args.model).name if Path(args.model).is_dir() else args.model)
    chat_model = load_chat_model(args)
    try:
        backend = make_backend(args.backend, chat_model.model, chat_model.tokenizer, args.max_num_seqs)
    except ModuleNotFoundError as e:
        raise CommandError(f"--backend {args.backend} needs {e.name}, which this installation lacks") from None
    release_openmp_threads()  # the backend's thread computes from here on (see glmkit.openmp_threads)
    app = create_app(chat_model, api_keys=keys, model_name=name, backend=backend, max_pending=args.max_pending,
                     max_body_bytes=args.max_body_bytes, server_tools=server_tools)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    offered = [f"{len(server_tools.tools)} server tool(s)"] if len(server_tools.tools) else []
    offered += ["the code interpreter"] if server_tools.interpreter is not None else []
    print(f"glmkit: serving {name!r} ({type(backend).__name__}) at http://{shown}:{args.port} — chat page at /, "
          f"OpenAI API at /v1" + (f", {len(keys)} API key(s) required" if keys else "")
          + (f"; runs {' and '.join(offered)} for clients that ask" if offered else ""), file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _server_tools(args: argparse.Namespace):
    """The ServerTools the flags enable (none by default); a CommandError naming the flag for bad ones."""
    code_flags = {"--code-timeout": args.code_timeout, "--code-memory-mb": args.code_memory_mb,
                  "--code-cpu-seconds": args.code_cpu_seconds,
                  "--max-interpreter-sessions": args.max_interpreter_sessions}
    if not args.code_interpreter:
        given = [flag for flag, value in code_flags.items() if value is not None]
        if given:
            raise CommandError(f"{', '.join(given)}: limit(s) of the code interpreter, which is off; "
                               "add --code-interpreter")
    if args.tool_timeout is not None and not args.tools:
        raise CommandError("--tool-timeout: a limit of the server's tools, which are off; add --tools FILE")
    if args.max_rounds is not None and not (args.tools or args.code_interpreter):
        raise CommandError("--max-rounds: a limit of server-side tools, which are off; add --tools FILE or "
                           "--code-interpreter")
    tools = _load_tools(args.tools, args.tool_timeout) if args.tools else None
    limits = None
    if args.code_interpreter:
        missing = [name for name in ("jupyter_client", "ipykernel") if importlib.util.find_spec(name) is None]
        if missing:
            raise CommandError(f"--code-interpreter needs {' and '.join(missing)}: pip install 'glmkit[agent]'")
        chosen = {"timeout": args.code_timeout, "memory_mb": args.code_memory_mb, "cpu_seconds": args.code_cpu_seconds}
        try:
            limits = SandboxLimits(**{key: value for key, value in chosen.items() if value is not None})
        except ValueError as e:
            message = str(e)
            for key, flag in (("timeout", "--code-timeout"), ("memory_mb", "--code-memory-mb"),
                              ("cpu_seconds", "--code-cpu-seconds")):
                message = message.replace(f"SandboxLimits.{key} ", f"{flag} ")
            raise CommandError(message) from None
    try:
        return ServerTools(**{key: value for key, value in {
            "tools": tools, "interpreter": limits, "max_rounds": args.max_rounds,
            "max_sessions": args.max_interpreter_sessions}.items() if value is not None})
    except ValueError as e:
        message = str(e).replace("max_rounds", "--max-rounds").replace("max_sessions", "--max-interpreter-sessions")
        raise CommandError(message) from None


def _load_tools(path: str, timeout: float | None):
    from glmkit.agent.tools import ToolRegistry

    try:
        return ToolRegistry.from_file(path, **({} if timeout is None else {"timeout": timeout}))
    except (ValueError, TypeError) as e:
        message = str(e).replace("timeout must", "--tool-timeout must")
        raise CommandError(f"cannot load --tools {path}: {message}") from None


def _read_keys(path: Path | None) -> list[str]:
    if path is None:
        return []
    try:
        keys = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as e:
        raise CommandError(f"cannot read --api-key-file {path}: {e.strerror}") from None
    if not keys:
        raise CommandError(f"--api-key-file {path} holds no keys")
    return keys
