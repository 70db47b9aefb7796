"""The agent loop with a scripted model: a real ChatModel (the real tokenizer renders every prompt,
the real parser reads every reply) whose generator replays a given sequence of replies."""

from __future__ import annotations

import copy
import json
import re
from typing import Annotated, Literal

import pytest
from tiny import tiny_model

import glmkit
import glmkit.chat
from glmkit.agent import Agent, ToolRegistry, tool
from glmkit.agent.interpreter import SandboxLimits
from glmkit.agent.loop import INTERPRETER_PROMPT
from glmkit.chat import ChatModel
from glmkit.chat_format import TOOLS_PREAMBLE
from glmkit.generate import Delta


def scripted_generate(replies: list[str]):
    """A stand-in for glmkit.chat.generate_stream that 'generates' the next reply as the model writes
    it after `<|assistant|>` (metadata line first): a few characters per token, a special token whole."""
    replies = list(replies)

    def generate(model, tokenizer, prompt_ids, params, skip_special_tokens=False):
        assert replies, "the script has no more replies"
        for part in re.split(r"(<\|assistant\|>)", replies.pop(0)):
            pieces = [part] if part == "<|assistant|>" else [part[i:i + 3] for i in range(0, len(part), 3)]
            for piece in pieces:
                yield Delta(piece, 100)
        yield Delta("", None, "stop")

    generate.left = replies
    return generate


class RecordingChatModel(ChatModel):
    """A ChatModel that records what each stream_chat call was asked."""

    def __init__(self, model, tokenizer):
        super().__init__(model, tokenizer)
        self.calls: list[dict] = []

    def stream_chat(self, query, history=None, role="user", **kwargs):
        self.calls.append({"query": query, "history": copy.deepcopy(history), "role": role})
        yield from super().stream_chat(query, history, role, **kwargs)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


@pytest.fixture
def scripted(tiny, tok, monkeypatch):
    def make(*replies: str) -> RecordingChatModel:
        monkeypatch.setattr(glmkit.chat, "generate_stream", scripted_generate(list(replies)))
        return RecordingChatModel(tiny, tok)
    return make


@tool
def get_weather(city: Annotated[str, "the city, e.g. Beijing"],
                unit: Literal["celsius", "fahrenheit"] = "celsius") -> dict:
    """Get the current weather of a city."""
    return {"city": city, "temperature": 22 if unit == "celsius" else 72, "unit": unit, "weather": "sunny"}


@tool
def calculator(a: float, op: Literal["+", "-", "*", "/"], b: float) -> float:
    """Apply an arithmetic operator to two numbers."""
    if op == "/":
        return a / b
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def call(name: str, **arguments) -> str:
    args = ", ".join(f"{key}={value!r}" for key, value in arguments.items())
    return f"{name}\n```python\ntool_call({args})\n```"


def kinds(events) -> list[str]:
    return [e.kind for e in events]


def test_weather_round_trip(scripted):
    model = scripted(call("get_weather", city="北京"), "\n北京今天晴，22°C。")
    agent = Agent(model, tools=[get_weather])
    events = list(agent.stream("北京天气怎么样？"))
    assert kinds(events)[:2] == ["tool_call", "tool_result"] and kinds(events)[-1] == "done"
    assert set(kinds(events)[2:-1]) == {"text"}
    tool_call, tool_result = events[:2]
    assert (tool_call.name, tool_call.arguments, tool_call.round) == ("get_weather", {"city": "北京"}, 1)
    expected = {"city": "北京", "temperature": 22, "unit": "celsius", "weather": "sunny"}
    assert tool_result.error is None and json.loads(tool_result.text) == expected and tool_result.value == expected
    result = events[-1].result
    assert result.answer == "北京今天晴，22°C。" == "".join(e.text for e in events if e.kind == "text")
    assert (result.stop_reason, result.rounds) == ("answer", 2)
    assert kinds(result.trace) == ["tool_call", "tool_result", "text"]
    # What the model was given: the tools announced as trained, then the tool's result as an observation.
    first, second = model.calls
    assert first["history"] == [{"role": "system", "content": TOOLS_PREAMBLE, "tools": [get_weather.schema()]}]
    assert (first["query"], first["role"]) == ("北京天气怎么样？", "user")
    assert (second["query"], second["role"]) == (tool_result.text, "observation")
    assert second["history"][-1]["metadata"] == "get_weather"
    assert [m["role"] for m in result.history] == ["system", "user", "assistant", "observation", "assistant"]


def test_calculator_round_trip_with_a_bad_call_corrected(scripted):
    model = scripted(call("calculator", a=2, op="^", b=10), call("calculator", a=2, op="*", b=10), "\n2 × 10 = 20")
    result = Agent(model, tools=ToolRegistry([calculator])).run("2 times 10?")
    assert kinds(result.trace) == ["tool_call", "tool_result", "tool_call", "tool_result", "text"]
    bad, good = result.trace[1], result.trace[3]
    assert bad.error == "invalid_arguments"
    assert bad.text == ("Error: the call to calculator was not run: argument 'op' must be one of \"+\", \"-\", "
                        "\"*\", \"/\", got string '^'.")
    assert (good.error, good.text) == (None, "20")
    assert model.calls[1]["query"] == bad.text and model.calls[1]["role"] == "observation"
    assert (result.answer, result.rounds) == ("2 × 10 = 20", 3)


def test_a_tool_that_raises_becomes_an_observation(scripted):
    model = scripted(call("calculator", a=1, op="/", b=0), "\nDividing by zero is undefined.")
    result = Agent(model, tools=[calculator]).run("1/0?")
    failure = result.trace[1]
    assert failure.kind == "tool_result" and failure.error == "exception"
    assert failure.text == "Error: calculator raised ZeroDivisionError: division by zero"
    assert model.calls[1]["query"] == failure.text
    assert result.answer == "Dividing by zero is undefined." and result.stop_reason == "answer"


def test_interpreter_round_trip_with_text_and_an_image(scripted):
    plot = "import matplotlib.pyplot as plt\nplt.plot([0, 1], [0, 1]); plt.show()\nprint('plotted')"
    model = scripted("interpreter\n```python\nimport math\nmath.factorial(10)\n```",
                     f"interpreter\n```python\n{plot}\n```",
                     "\n10! = 3628800, and here is the line.")
    with Agent(model, code_interpreter=True, limits=SandboxLimits(timeout=20)) as agent:
        events = list(agent.stream("Compute 10! and plot y = x."))
        session = agent.interpreter
        prompt = INTERPRETER_PROMPT.format(workdir=session.workdir)
    assert session.closed  # the agent made the session, so closing the agent closed it
    assert kinds(events)[:4] == ["code", "code_output", "code", "code_output"]
    code, output, _, plotted = events[:4]
    assert code.text == "import math\nmath.factorial(10)"
    assert output.execution.status == "ok" and output.text == "```result\n3628800\n```"
    assert model.calls[0]["history"] == [{"role": "system", "content": prompt}]
    assert (model.calls[1]["query"], model.calls[1]["role"]) == ("```result\n3628800\n```", "observation")
    assert model.calls[1]["history"][-1] == {"role": "assistant", "metadata": "interpreter",
                                             "content": "```python\nimport math\nmath.factorial(10)\n```"}
    assert [o.kind for o in plotted.execution.outputs] == ["image", "stdout"]
    assert "PNG, shown to the user" in plotted.text and plotted.text.endswith("plotted\n```")
    shown = plotted.to_dict()
    assert shown["type"] == "code_output" and shown["status"] == "ok" and shown["images"][0]["mime"] == "image/png"
    assert shown["images"][0]["data"].startswith("iVBORw0KGgo")  # base64 of the PNG signature
    assert events[-1].result.answer == "10! = 3628800, and here is the line."


def test_the_round_limit_stops_the_loop_without_running_the_last_call(scripted):
    runs = []

    @tool
    def ping(n: int) -> str:
        """Ping."""
        runs.append(n)
        return "pong"

    model = scripted(*[call("ping", n=i) for i in range(3)])
    result = Agent(model, tools=[ping], max_rounds=3).run("ping forever")
    assert result.stop_reason == "max_rounds" and result.rounds == 3
    assert runs == [0, 1]  # the third call was made by the model but not run
    assert kinds(result.trace) == ["tool_call", "tool_result"] * 2 + ["tool_call"]
    assert result.answer == {"name": "ping", "parameters": {"n": 2}}
    assert result.history[-1]["metadata"] == "ping"


def test_a_declared_only_tool_is_returned_to_the_caller(scripted):
    registry = ToolRegistry([get_weather])
    registry.add(glmkit.agent.Tool("search", "Search the web.", {"type": "object", "properties": {
        "q": {"type": "string"}}, "required": ["q"]}))
    model = scripted(call("search", q="glmkit"), "\nglmkit runs ChatGLM3.")
    agent = Agent(model, tools=registry)
    result = agent.run("what is glmkit?")
    assert result.stop_reason == "tool_call" and result.answer == {"name": "search", "parameters": {"q": "glmkit"}}
    assert kinds(result.trace) == ["tool_call"]
    # The caller runs it and continues the conversation with its result.
    result = agent.run('{"top": "glmkit runs ChatGLM3"}', history=result.history, role="observation")
    assert result.answer == "glmkit runs ChatGLM3." and result.stop_reason == "answer"
    assert [m["role"] for m in result.history] == ["system", "user", "assistant", "observation", "assistant"]
    assert sum(m["role"] == "system" for m in result.history) == 1  # the announcement is not repeated


def test_unreadable_and_unknown_calls_become_observations(scripted):
    model = scripted("get_weather\n```python\nimport os\n```", call("get_forecast", city="Paris"),
                     "get_weather\n```python\ntool_call(city=open('x'))\n```", "\nSorry.")
    with pytest.warns(UserWarning, match="could not be parsed"):
        result = Agent(model, tools=[get_weather]).run("weather?")
    unreadable, unknown, not_literal = result.trace[1], result.trace[3], result.trace[5]
    assert result.trace[0].arguments is None and result.trace[0].text.startswith("```python\nimport os")
    assert unreadable.error == "invalid_call"
    assert unreadable.text.startswith("Error: the call to get_weather could not be read: expected a call")
    assert unknown.error == "unknown_tool"
    assert unknown.text == "Error: there is no tool named 'get_forecast'. The tools are: get_weather."
    assert not_literal.error == "invalid_call" and "argument 'city' is not a Python literal" in not_literal.text
    assert result.answer == "Sorry."


def test_code_without_an_interpreter_is_refused(scripted):
    model = scripted("interpreter\n```python\nprint(1)\n```", "\nI cannot run code here.")
    result = Agent(model, tools=[get_weather]).run("run this")
    assert kinds(result.trace)[:2] == ["code", "code_output"]
    assert result.trace[1].error == "not_available"
    assert result.trace[1].text == "Error: there is no code interpreter in this conversation."


def test_text_before_a_call_in_the_same_reply_is_streamed_and_traced(scripted):
    model = scripted("\nLet me check.<|assistant|>" + call("get_weather", city="Paris"), "\nSunny in Paris.")
    events = list(Agent(model, tools=[get_weather]).stream("Paris?"))
    first_call = kinds(events).index("tool_call")
    assert set(kinds(events[:first_call])) == {"text"}
    assert "".join(e.text for e in events[:first_call]) == "Let me check."
    assert kinds(events)[first_call:first_call + 2] == ["tool_call", "tool_result"]
    trace = events[-1].result.trace
    assert [(e.kind, e.round, e.text) for e in trace if e.kind == "text"] == [
        ("text", 1, "Let me check."), ("text", 2, "Sunny in Paris.")]
    for event in events:
        json.dumps(event.to_dict())  # every event has a JSON form


def test_system_prompt_and_exports(scripted):
    model = scripted("\nHi.")
    agent = glmkit.Agent(model, tools=[get_weather], system="Be brief.")
    assert agent.system_messages()[-1] == {"role": "system", "content": "Be brief."}
    result = agent.run("hello", temperature=0)
    assert [m["role"] for m in result.history] == ["system", "system", "user", "assistant"]
    with pytest.raises(TypeError, match="stream_chat"):
        Agent(object())
    with pytest.raises(ValueError, match="max_rounds must be a positive int"):
        Agent(model, max_rounds=0)
    with pytest.raises(TypeError, match="code_interpreter must be"):
        Agent(model, code_interpreter="yes")
