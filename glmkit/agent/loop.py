"""The agent loop: reply -> tool call or code -> observation -> reply, until the model answers.

    import glmkit
    from glmkit.agent import tool

    @tool
    def get_weather(city: str) -> dict:
        '''The current weather of a city.'''
        return {"city": city, "weather": "sunny"}

    model = glmkit.load("THUDM/chatglm3-6b")
    with glmkit.Agent(model, tools=[get_weather], code_interpreter=True) as agent:
        for event in agent.stream("What's the weather in Beijing?"):
            ...                                  # text, tool_call, tool_result, code, code_output, done
        result = agent.run("Plot y = x^2", history=result.history)   # or all at once

A round is one model reply. A reply that calls a tool runs the call (through the ToolRegistry:
checked, timed, truncated, never raising) and one that writes `interpreter` code runs it in the
session's kernel; the result goes back as an `observation` message and the next round begins.
The run stops when the model answers in text, when `max_rounds` replies were made (a call in the
last one is reported, not run), or when the model calls a declared-only tool, which the caller
runs (the server's client-side tools).

The model is anything with ChatModel's `stream_chat(query, history, role, *, truncate, **sampling)`
yielding (response, history); the loop speaks messages only.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from glmkit.chat_format import INTERPRETER, ToolCallError, parse_tool_call, tools_system_message

from .interpreter import Execution, InterpreterSession, SandboxLimits
from .tools import Tool, ToolRegistry

# The official ChatGLM3 code-interpreter system prompt (its demo's), with the working directory in
# place of the demo's /mnt/data/: the model was trained to read it.
INTERPRETER_PROMPT = ("你是一位智能AI助手，你叫ChatGLM，你连接着一台电脑，但请注意不能联网。在使用Python解决任务时，"
                      "你可以运行代码并得到结果，如果运行结果有错误，你需要尽可能对代码进行改进。"
                      "你可以处理用户上传到电脑上的文件，文件默认存储路径是{workdir}/。")
DEFAULT_MAX_ROUNDS = 8
EVENT_KINDS = ("text", "tool_call", "tool_result", "code", "code_output", "done")
STOP_REASONS = ("answer", "max_rounds", "tool_call")


@dataclass(frozen=True)
class AgentEvent:
    """One step of a run. Which fields are set depends on `kind`:

    text         text: new characters of the reply (streamed); in a trace, one turn's whole text
    tool_call    name, arguments (None when the call could not be read), text: the call as written
    tool_result  name, text: the observation sent to the model, error: None or ToolOutcome.error
                 ("invalid_call" for an unreadable call), value: the function's return value
    code         text: the code
    code_output  execution (outputs, images, status), text: the observation sent to the model,
                 error: None or the execution's status when not "ok"
    done         result (AgentResult), text: the answer when it is text
    """

    kind: str
    round: int
    text: str = ""
    name: str | None = None
    arguments: dict[str, Any] | None = None
    error: str | None = None
    value: Any = field(default=None, repr=False)
    execution: Execution | None = field(default=None, repr=False)
    result: AgentResult | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form, e.g. for a server's event stream (images as base64)."""
        out: dict[str, Any] = {"type": self.kind, "round": self.round, "text": self.text}
        if self.name is not None:
            out["name"] = self.name
        if self.kind == "tool_call":
            out["arguments"] = self.arguments
        if self.error is not None:
            out["error"] = self.error
        if self.execution is not None:
            out["status"] = self.execution.status
            out["restarted"] = self.execution.restarted
            out["images"] = [{"mime": image.mime, "data": base64.b64encode(image.data or b"").decode("ascii")}
                             for image in self.execution.images]
        if self.result is not None:
            out["stop_reason"] = self.result.stop_reason
            out["answer"] = self.result.answer
        return out


@dataclass(frozen=True)
class AgentResult:
    """The whole run.

    answer: the model's last response: its text answer, or (stop_reason "max_rounds" / "tool_call")
        the call it made, {"name", "parameters"} or {"name": "interpreter", "content": code}.
    history: the conversation, to pass to the next run. trace: every event but `done`, with each
        turn's text whole. rounds: replies made. stop_reason: "answer", "max_rounds" or
        "tool_call" (a declared-only tool was called: run it and continue with its result as an
        observation).
    """

    answer: str | dict[str, Any]
    history: list[dict[str, Any]]
    trace: list[AgentEvent]
    rounds: int
    stop_reason: str


class Agent:
    """A model with tools and, optionally, a code interpreter, run in a loop.

    tools: a ToolRegistry, or Tools / typed functions to put in one. code_interpreter: False; True
    (a session of its own, started at its first code, closed by `close()`); or an
    InterpreterSession the caller owns (e.g. one kept per conversation by a server).
    limits: the sandbox limits of the session made for True. system: the caller's system prompt,
    after the tool and interpreter announcements. sampling: default sampling arguments of replies.
    interpreter_prompt: the system message that announces the interpreter, "{workdir}" standing for
    the session's folder; by default ChatGLM3's own (INTERPRETER_PROMPT). A model fine-tuned on
    another prompt, like glmkit-demo, works best with that one.
    """

    def __init__(self, model: Any, tools: ToolRegistry | Iterable[Tool | Callable[..., Any]] | None = None,
                 code_interpreter: bool | InterpreterSession = False, *, max_rounds: int = DEFAULT_MAX_ROUNDS,
                 system: str | None = None, limits: SandboxLimits | None = None,
                 sampling: Mapping[str, Any] | None = None, interpreter_prompt: str = INTERPRETER_PROMPT):
        if not callable(getattr(model, "stream_chat", None)):
            raise TypeError(f"model must have ChatModel's stream_chat(), got {type(model).__name__}")
        if not isinstance(max_rounds, int) or max_rounds < 1:
            raise ValueError(f"max_rounds must be a positive int, got {max_rounds!r}")
        self.model = model
        self.tools = tools if isinstance(tools, ToolRegistry) else ToolRegistry(tools or ())
        self._owns_interpreter = code_interpreter is True
        if isinstance(code_interpreter, InterpreterSession):
            self.interpreter: InterpreterSession | None = code_interpreter
        elif code_interpreter is True:
            self.interpreter = InterpreterSession(limits)
        elif code_interpreter is False:
            self.interpreter = None
        else:
            raise TypeError(f"code_interpreter must be True, False or an InterpreterSession, got {code_interpreter!r}")
        self.max_rounds = max_rounds
        self.system = system
        self.sampling = dict(sampling or {})
        self.interpreter_prompt = interpreter_prompt

    # ---- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the interpreter session this agent made (one passed in is the caller's to close)."""
        if self.interpreter is not None and self._owns_interpreter:
            self.interpreter.close()

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def reset(self) -> None:
        """Forget the interpreter's state (a fresh kernel, same folders), e.g. for a new conversation."""
        if self.interpreter is not None:
            self.interpreter.restart()

    def system_messages(self) -> list[dict[str, Any]]:
        """What starts a conversation: the tools' announcement, the interpreter's prompt, `system`."""
        messages = tools_system_message(self.tools.schemas()) if len(self.tools) else []
        if self.interpreter is not None:
            prompt = self.interpreter_prompt.replace("{workdir}", str(self.interpreter.workdir))
            messages.append({"role": "system", "content": prompt})
        if self.system is not None:
            messages.append({"role": "system", "content": self.system})
        return messages

    # ---- running -----------------------------------------------------------------------------
    def run(self, query: str, history: list[dict[str, Any]] | None = None, role: str = "user", *,
            truncate: str = "error", **sampling: Any) -> AgentResult:
        """Run the loop to its end; see `stream` for the arguments."""
        for event in self.stream(query, history, role, truncate=truncate, **sampling):
            if event.kind == "done":
                assert event.result is not None
                return event.result
        raise AssertionError("the agent's stream ended without a done event")

    def stream(self, query: str, history: list[dict[str, Any]] | None = None, role: str = "user", *,
               truncate: str = "error", **sampling: Any) -> Iterator[AgentEvent]:
        """Run the loop, yielding its events as they happen; the last is `done`, holding the result.

        history: a previous run's `result.history` (or any conversation); the agent's system
        messages are put in front where they are missing. role "observation" continues after a
        declared-only tool's call with its result. truncate and sampling: as ChatModel.chat.
        """
        history = list(history or [])
        history = [m for m in self.system_messages() if m not in history] + history
        sampling = {**self.sampling, **sampling}
        trace: list[AgentEvent] = []
        response: str | dict[str, Any] = ""
        for round_ in range(1, self.max_rounds + 1):
            reply = _Reply()
            yield from reply.stream(self.model, query, history, role, round_, truncate, sampling)
            response, history = reply.response, reply.history
            trace += [AgentEvent("text", round_, text) for text in reply.turn_texts()]
            if isinstance(response, str):
                yield self._done(response, history, trace, round_, "answer")
                return
            call_event, runnable = self._call_event(response, round_)
            trace.append(call_event)
            yield call_event
            if not runnable:
                yield self._done(response, history, trace, round_, "tool_call")
                return
            if round_ == self.max_rounds:
                break
            result_event = self._perform(response, round_)
            trace.append(result_event)
            yield result_event
            query, role = result_event.text, "observation"
        yield self._done(response, history, trace, self.max_rounds, "max_rounds")

    def _call_event(self, response: dict[str, Any], round_: int) -> tuple[AgentEvent, bool]:
        """The event that shows what the model asked for, and whether glmkit runs it."""
        name = response.get("name", "")
        if name == INTERPRETER:
            return AgentEvent("code", round_, response.get("content", "")), True
        arguments = response.get("parameters")
        written = "" if arguments is not None else response.get("content", "")
        # A declared-only tool's readable call goes to the caller; an unreadable one back to the model.
        runnable = not (name in self.tools and self.tools[name].function is None and arguments is not None)
        return AgentEvent("tool_call", round_, written, name=name, arguments=arguments), runnable

    def _perform(self, response: dict[str, Any], round_: int) -> AgentEvent:
        """Run a call or code; the event holds the observation for the model."""
        name = response.get("name", "")
        if name == INTERPRETER:
            if self.interpreter is None:
                return AgentEvent("code_output", round_, "Error: there is no code interpreter in this conversation.",
                                  error="not_available")
            execution = self.interpreter.run(response.get("content", ""))
            return AgentEvent("code_output", round_, execution.observation, execution=execution,
                              error=None if execution.status == "ok" else execution.status)
        if "parameters" not in response and name in self.tools:
            try:  # ChatModel returned the text because it could not read the call: say why
                parse_tool_call(response.get("content", ""))
                problem = "it is not a single tool_call(...)"
            except ToolCallError as e:
                problem = str(e)
            return AgentEvent("tool_result", round_, f"Error: the call to {name} could not be read: {problem}. Write it "
                              "as tool_call(name=value, ...) with Python literal values.", name=name,
                              error="invalid_call")
        outcome = self.tools.call(name, response.get("parameters", {}))
        return AgentEvent("tool_result", round_, outcome.observation, name=name, error=outcome.error,
                          value=outcome.value)

    @staticmethod
    def _done(answer: str | dict[str, Any], history: list[dict[str, Any]], trace: list[AgentEvent], rounds: int,
              reason: str) -> AgentEvent:
        result = AgentResult(answer, history, list(trace), rounds, reason)
        return AgentEvent("done", rounds, answer if isinstance(answer, str) else "", result=result)


class _Reply:
    """One model reply, streamed: text events as the text grows, then the parsed response."""

    def __init__(self) -> None:
        self.response: str | dict[str, Any] = ""
        self.history: list[dict[str, Any]] = []

    def stream(self, model: Any, query: str, history: list[dict[str, Any]], role: str, round_: int, truncate: str,
               sampling: dict[str, Any]) -> Iterator[AgentEvent]:
        shown, shown_turn = "", 0
        self.history = history
        for self.response, self.history in model.stream_chat(query, history, role, truncate=truncate, **sampling):
            if not isinstance(self.response, str):
                continue  # a call being written: shown whole once complete
            turn = _trailing_assistant_count(self.history)
            if turn != shown_turn and shown:
                yield AgentEvent("text", round_, "\n\n")  # a new turn of text in the same reply
                shown = ""
            shown_turn = turn
            if self.response.startswith(shown):
                delta = self.response[len(shown):]
            else:  # the text was rewritten (rare): show it again on a new line
                delta = "\n" + self.response
            if delta:
                yield AgentEvent("text", round_, delta)
            shown = self.response

    def turn_texts(self) -> list[str]:
        """The text turns of this reply, whole (a reply may hold text before a call)."""
        count = _trailing_assistant_count(self.history)
        turns = self.history[len(self.history) - count:] if count else []
        return [m["content"] for m in turns if not (m.get("metadata") or "").strip() and m["content"]]


def _trailing_assistant_count(history: list[dict[str, Any]]) -> int:
    count = 0
    for message in reversed(history):
        if message.get("role") != "assistant":
            break
        count += 1
    return count
