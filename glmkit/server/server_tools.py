"""What the server runs itself for a client that asks: its own tools, and the code interpreter.

Both are off by default. `glmkit serve --tools FILE` offers the tools of FILE (loaded by
`ToolRegistry.from_file`); `--code-interpreter` offers a sandboxed Jupyter kernel. A client asks for
them per request, with glmkit's entries in a chat request's `tools`, beside or instead of its own
function tools:

    {"type": "server_tool", "name": "get_weather"}   one of the server's tools (GET /v1/tools lists them)
    {"type": "code_interpreter"}                      the interpreter, named as in OpenAI's Assistants API

Such a request runs the agent loop on the server (`agent_completions`). Asking for something the
server did not enable is a 400 naming the flag that enables it.

Interpreter sessions: one kernel per request, made when the request starts and closed when it ends,
so no two requests (or clients) ever share one, and the server keeps nothing between requests (it
stays stateless, for replicas behind a load balancer). A later request of the same conversation
starts with a fresh kernel: variables and files of earlier requests are gone. At most
`max_sessions` sessions exist at once; a request beyond that gets a 503 to retry.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glmkit.agent.interpreter import InterpreterError, InterpreterSession, SandboxLimits
from glmkit.agent.loop import DEFAULT_MAX_ROUNDS
from glmkit.agent.tools import Tool, ToolRegistry

from .errors import APIError, bad_request

TOOLS_FLAG = "glmkit serve --tools FILE"
INTERPRETER_FLAG = "glmkit serve --code-interpreter"
DEFAULT_MAX_SESSIONS = 4


@dataclass
class ServerTools:
    """What this server may run for its clients, and the limits it runs them under.

    tools: the server's tools; every one must have a function (a declared-only tool has nothing to
        run here). The registry's timeout and result limit apply to each call.
    interpreter: the sandbox limits of the code interpreter; None = no interpreter.
    max_rounds: the most model replies of one request's agent loop.
    max_sessions: interpreter sessions (kernels) alive at once, over all requests.
    sessions_dir: where the sessions' folders go (None: the interpreter's default).
    """

    tools: ToolRegistry = field(default_factory=ToolRegistry)
    interpreter: SandboxLimits | None = None
    max_rounds: int = DEFAULT_MAX_ROUNDS
    max_sessions: int = DEFAULT_MAX_SESSIONS
    sessions_dir: Path | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_rounds, int) or self.max_rounds < 1:
            raise ValueError(f"max_rounds must be a positive int, got {self.max_rounds!r}")
        if not isinstance(self.max_sessions, int) or self.max_sessions < 1:
            raise ValueError(f"max_sessions must be a positive int, got {self.max_sessions!r}")
        declared_only = [t.name for t in self.tools if t.function is None]
        if declared_only:
            raise ValueError(f"tool(s) {', '.join(declared_only)} have no function (no 'callable' in the spec), "
                             "so the server cannot run them")
        self._open: set[int] = set()  # ids of the sessions alive (a session's place is freed once)
        self._reserved = 0  # places taken by sessions being made
        self._lock = threading.Lock()

    @property
    def sessions(self) -> int:
        """Interpreter sessions alive now."""
        return len(self._open) + self._reserved

    def describe(self) -> dict[str, Any]:
        """GET /v1/tools: what a request may ask the server to run, and the limits."""
        data: list[dict[str, Any]] = [{"type": "server_tool", **t.schema()} for t in self.tools]
        if self.interpreter is not None:
            data.append({"type": "code_interpreter", "limits": dataclasses.asdict(self.interpreter),
                         "max_sessions": self.max_sessions})
        return {"object": "list", "data": data, "max_rounds": self.max_rounds,
                "tool_timeout": self.tools.timeout, "max_result_chars": self.tools.max_result_chars}

    def select(self, entries: Sequence[tuple[int, Any]]) -> tuple[list[Tool], bool]:
        """(the server tools asked for, whether the interpreter is) from a request's glmkit entries,
        given as (index in `tools`, entry); a 400 naming the entry for what this server cannot do."""
        chosen: list[Tool] = []
        interpreter = False
        for i, entry in entries:
            where = f"tools[{i}]"
            if entry.type == "code_interpreter":
                if self.interpreter is None:
                    raise bad_request(f"{where}: this server does not run a code interpreter; it is off unless "
                                      f"the server is started with `{INTERPRETER_FLAG}`", param=where,
                                      code="code_interpreter_disabled")
                if interpreter:
                    raise bad_request(f"{where}: the code interpreter is asked for twice", param=where)
                interpreter = True
                continue
            if not len(self.tools):
                raise bad_request(f"{where}: this server runs no tools of its own; they are off unless the server "
                                  f"is started with `{TOOLS_FLAG}`", param=where, code="server_tools_disabled")
            if entry.name not in self.tools:
                raise bad_request(f"{where}.name: this server has no tool {entry.name!r}; it offers "
                                  f"{', '.join(self.tools.names)} (GET /v1/tools describes them)",
                                  param=f"{where}.name", code="unknown_server_tool")
            if any(t.name == entry.name for t in chosen):
                raise bad_request(f"{where}.name: the server tool {entry.name!r} is asked for twice",
                                  param=f"{where}.name")
            chosen.append(self.tools[entry.name])
        return chosen, interpreter

    def registry(self, tools: Sequence[Tool]) -> ToolRegistry:
        """A registry of `tools` (server tools and the client's declared-only ones) with this server's limits."""
        return ToolRegistry(tools, timeout=self.tools.timeout, max_result_chars=self.tools.max_result_chars)

    # -- interpreter sessions ------------------------------------------------------------------------

    def open_session(self) -> InterpreterSession:
        """A new session (its kernel starts at its first code), or a 503 when `max_sessions` are alive."""
        assert self.interpreter is not None, "open_session() on a server without a code interpreter"
        with self._lock:
            alive = len(self._open) + self._reserved
            if alive >= self.max_sessions:
                raise APIError(503, f"The server's code interpreter is busy: {alive} sessions are running "
                               f"(limit {self.max_sessions}). Retry shortly.", code="server_overloaded",
                               headers={"Retry-After": "1"})
            self._reserved += 1
        try:
            session = InterpreterSession(self.interpreter, sessions_dir=self.sessions_dir)
        except (InterpreterError, OSError) as e:
            with self._lock:
                self._reserved -= 1
            raise APIError(500, f"the code interpreter could not make a session: {e}",
                           code="interpreter_error") from None
        with self._lock:
            self._reserved -= 1
            self._open.add(id(session))
        return session

    def close_session(self, session: InterpreterSession) -> None:
        """Stop the session's kernel, remove its folder, and free its place."""
        try:
            session.close()
        finally:
            with self._lock:
                self._open.discard(id(session))
