"""Server-side tools and the code interpreter over the HTTP API: `glmkit serve --tools/--code-interpreter`.

The model is scripted (tests/live_server.py) so it calls tools and writes code when told; the agent
loop, the tools, the Jupyter kernel, the backend, the server and the `openai` client are the real
ones. One test runs the tiny random model on the batched engine, to show the rounds go through it.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import threading
import time

import httpx
import openai
import pytest
from live_server import (
    LiveServer,
    ScriptedModel,
    code_reply,
    text_reply,
    tool_call_reply,
)
from tiny import tiny_model

from glmkit.agent import ToolRegistry, tool
from glmkit.agent.interpreter import SandboxLimits
from glmkit.commands import CommandError
from glmkit.commands import serve as serve_command
from glmkit.server import create_app
from glmkit.server.backend import SequentialBackend, make_backend
from glmkit.server.server_tools import ServerTools

CHAT = "/v1/chat/completions"
WEATHER = {"type": "server_tool", "name": "get_weather"}
EXPLODE = {"type": "server_tool", "name": "explode"}
INTERPRETER = {"type": "code_interpreter"}
GET_TIME = {"type": "function", "function": {"name": "get_time", "description": "The time now in a city",
                                             "parameters": {"type": "object", "properties": {
                                                 "city": {"type": "string"}}, "required": ["city"]}}}
PLOT = ("print('before')\n"
        "import matplotlib.pyplot as plt\n"
        "plt.plot([1, 2, 3], [1, 4, 9]); plt.show()\n"
        "print('after')")
weather_calls: list[str] = []


@tool
def get_weather(city: str) -> dict:
    """The current weather of a city."""
    weather_calls.append(city)
    return {"city": city, "weather": "sunny", "temperature": 25}


@tool
def explode(reason: str) -> str:
    """A tool that always fails."""
    raise ValueError(f"boom: {reason}")


def ask(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


class Script:
    """What the scripted model answers: `replies[k]` in round k+1 of a run, i.e. after k tool results
    following the last user message."""

    def __init__(self, tok):
        self.tok = tok
        self.replies: list[list[int]] = [text_reply(tok, "OK")]

    def __call__(self, prompt: list[int]) -> list[int]:
        after_user = prompt[len(prompt) - prompt[::-1].index(self.tok.token_id("<|user|>")):]
        observations = after_user.count(self.tok.token_id("<|observation|>"))
        return self.replies[min(observations, len(self.replies) - 1)]


@pytest.fixture(scope="module")
def sessions_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("sessions")


@pytest.fixture(scope="module")
def server(tok, sessions_dir):
    """A server that runs get_weather, explode and the interpreter, with a round limit of 3."""
    script = Script(tok)
    model = ScriptedModel(tok, script)
    tools = ServerTools(ToolRegistry([get_weather, explode], timeout=10), SandboxLimits(timeout=60),
                        max_rounds=3, sessions_dir=sessions_dir)
    app = create_app((model, tok), model_name="scripted", backend=SequentialBackend(model, tok), server_tools=tools)
    with LiveServer(app) as live:
        live.script, live.model, live.tools = script, model, tools
        live.client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        live.http = httpx.Client(base_url=live.url, timeout=120)
        yield live
        live.http.close()


@pytest.fixture(scope="module")
def plain_server(tok):
    """A server started without --tools or --code-interpreter."""
    model = ScriptedModel(tok, lambda prompt: text_reply(tok, "OK"))
    app = create_app((model, tok), model_name="scripted", backend=SequentialBackend(model, tok))
    with LiveServer(app) as live:
        live.http = httpx.Client(base_url=live.url, timeout=60)
        yield live
        live.http.close()


def steps_of(completion) -> list[dict]:
    return completion.model_extra["agent"]["steps"]


def new_prompts(server, since: int) -> list[str]:
    return [server.script.tok.decode(p) for p in server.model.prompts[since:]]


def observation(prompt: str) -> str:
    """What the last observation of a decoded prompt told the model."""
    assert prompt.endswith("<|assistant|>") and "<|observation|>" in prompt
    return prompt.rsplit("<|observation|>", 1)[1].removesuffix("<|assistant|>").strip()


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


# -- what the server offers ----------------------------------------------------------------------


def test_the_tools_endpoint_says_what_the_server_runs(server, plain_server):
    offered = server.http.get("/v1/tools").json()
    assert [(d["type"], d.get("name")) for d in offered["data"]] == [
        ("server_tool", "get_weather"), ("server_tool", "explode"), ("code_interpreter", None)]
    assert offered["data"][0]["parameters"]["required"] == ["city"]
    assert offered["data"][2]["limits"]["timeout"] == 60 and offered["max_rounds"] == 3
    assert plain_server.http.get("/v1/tools").json()["data"] == []


@pytest.mark.parametrize("entry, code, flag", [
    (INTERPRETER, "code_interpreter_disabled", "glmkit serve --code-interpreter"),
    (WEATHER, "server_tools_disabled", "glmkit serve --tools FILE"),
])
def test_asking_for_what_the_server_did_not_enable_is_400_naming_the_flag(plain_server, entry, code, flag):
    body = {"model": "scripted", "messages": ask("hi"), "tools": [GET_TIME, entry]}
    error = error_of(plain_server.http.post(CHAT, json=body), 400)
    assert error["code"] == code and error["param"] == "tools[1]" and flag in error["message"]
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("extra, param, needle", [
    ({"tools": [{"type": "server_tool", "name": "get_forecast"}]}, "tools[0].name", "offers get_weather, explode"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].name", "asked for twice"),
    ({"tools": [WEATHER, {"type": "function", "function": {"name": "get_weather"}}]}, "tools[1].function.name",
     "also a server tool"),
    ({"tools": [{"type": "code_interpreter", "container": "x"}]}, "tools[0].container", "Unrecognized"),
    ({"tools": [WEATHER], "n": 2}, "n", "n must be 1"),
    ({"tools": [WEATHER], "tool_choice": "required"}, "tool_choice", "'auto'"),
    ({"tools": [WEATHER], "logprobs": True}, "logprobs", "not supported"),
    ({"tools": [WEATHER, GET_TIME, {"type": "function", "function": {"name": "a b"}}]}, "tools[2].function.name",
     "letters, digits"),
    ({"tools": [WEATHER, {"type": "function", "function": {"name": "a b"}}, GET_TIME]}, "tools[1].function.name",
     "tools[1].function.name 'a b' must be"),
    ({"tools": [WEATHER], "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
     "messages", "must end with a user message or tool results"),
])
def test_bad_server_side_requests_are_400_naming_the_field(server, extra, param, needle):
    body = {"model": "scripted", "messages": ask("hi"), **extra}
    error = error_of(server.http.post(CHAT, json=body), 400)
    assert error["param"] == param and needle in error["message"]


# -- tools ---------------------------------------------------------------------------------------


def test_server_tool_round_trip_returns_the_answer_and_the_steps(server, tok):
    server.script.replies = [tool_call_reply(tok, "get_weather", "city='北京'"), text_reply(tok, "北京晴，25 °C。")]
    before, calls = len(server.model.prompts), len(weather_calls)
    reply = server.client.chat.completions.create(model="scripted", messages=ask("北京天气怎么样?"), tools=[WEATHER],
                                                  temperature=0)
    choice = reply.choices[0]
    assert choice.message.content == "北京晴，25 °C。" and choice.finish_reason == "stop"
    assert not choice.message.tool_calls
    agent = reply.model_extra["agent"]
    assert (agent["rounds"], agent["stop_reason"]) == (2, "answer")
    assert agent["steps"] == [
        {"type": "tool_call", "round": 1, "text": "", "name": "get_weather", "arguments": {"city": "北京"}},
        {"type": "tool_result", "round": 1, "name": "get_weather",
         "text": '{"city": "北京", "weather": "sunny", "temperature": 25}'}]
    assert weather_calls[calls:] == ["北京"]
    # One generation per round, on the server's backend; the tool was announced and its result sent back.
    first, second = new_prompts(server, before)
    assert "get_weather" in first and "Answer the following questions" in first
    assert observation(second) == '{"city": "北京", "weather": "sunny", "temperature": 25}'
    prompts = server.model.prompts[before:]
    assert reply.usage.prompt_tokens == sum(len(p) for p in prompts)
    assert reply.usage.completion_tokens == (len(server.script.replies[0]) - 1) + len(server.script.replies[1])


def test_server_tool_round_trip_streams_the_same_answer_and_steps(server, tok):
    server.script.replies = [tool_call_reply(tok, "get_weather", "city='Paris'"), text_reply(tok, "Sunny in Paris.")]
    whole = server.client.chat.completions.create(model="scripted", messages=ask("Weather in Paris?"), tools=[WEATHER])
    chunks = list(server.client.chat.completions.create(model="scripted", messages=ask("Weather in Paris?"),
                                                        tools=[WEATHER], stream=True,
                                                        stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    steps = [c.model_extra["agent_step"] for c in chunks if "agent_step" in c.model_extra]
    assert text == whole.choices[0].message.content == "Sunny in Paris."
    assert steps == steps_of(whole) and [s["type"] for s in steps] == ["tool_call", "tool_result"]
    # The steps come in order, before the answer's text; the last choice chunk finishes with the run's summary.
    kinds = ["step" if "agent_step" in c.model_extra else "text" if c.choices and c.choices[0].delta.content
             else "other" for c in chunks]
    assert kinds.index("text") > max(i for i, k in enumerate(kinds) if k == "step")
    last = [c for c in chunks if c.choices][-1]
    assert last.choices[0].finish_reason == "stop" and last.model_extra["agent"] == {"rounds": 2,
                                                                                     "stop_reason": "answer"}
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_a_tool_that_raises_becomes_an_observation(server, tok):
    server.script.replies = [tool_call_reply(tok, "explode", "reason='test'"), text_reply(tok, "The tool failed.")]
    before = len(server.model.prompts)
    reply = server.client.chat.completions.create(model="scripted", messages=ask("explode"), tools=[EXPLODE])
    assert reply.choices[0].message.content == "The tool failed." and reply.choices[0].finish_reason == "stop"
    result = steps_of(reply)[1]
    assert result["type"] == "tool_result" and result["error"] == "exception"
    assert result["text"] == "Error: explode raised ValueError: boom: test"
    assert observation(new_prompts(server, before)[1]) == "Error: explode raised ValueError: boom: test"


def test_the_round_limit_stops_the_run_without_running_the_last_call(server, tok):
    server.script.replies = [tool_call_reply(tok, "get_weather", "city='Oslo'")]  # it never stops calling
    before, calls = len(server.model.prompts), len(weather_calls)
    reply = server.client.chat.completions.create(model="scripted", messages=ask("Weather, forever"), tools=[WEATHER])
    agent = reply.model_extra["agent"]
    assert (agent["rounds"], agent["stop_reason"]) == (3, "max_rounds")
    assert reply.choices[0].finish_reason == "length" and reply.choices[0].message.content == ""
    assert [s["type"] for s in agent["steps"]] == ["tool_call", "tool_result"] * 2 + ["tool_call"]
    assert weather_calls[calls:] == ["Oslo", "Oslo"] and len(server.model.prompts) - before == 3


def test_client_side_tool_calls_work_beside_server_tools(server, tok):
    # Only the client's tools: the usual answer, tool_calls for the client, no run on the server.
    server.script.replies = [tool_call_reply(tok, "get_time", "city='Tokyo'")]
    reply = server.client.chat.completions.create(model="scripted", messages=ask("time?"), tools=[GET_TIME])
    assert reply.choices[0].finish_reason == "tool_calls" and "agent" not in reply.model_extra
    assert reply.choices[0].message.tool_calls[0].function.arguments == '{"city": "Tokyo"}'

    # Both: the server runs its tool, then returns the call to the client's tool, with the steps so far.
    server.script.replies = [tool_call_reply(tok, "get_weather", "city='Tokyo'"),
                             tool_call_reply(tok, "get_time", "city='Tokyo'"),
                             text_reply(tok, "Sunny at noon in Tokyo.")]
    messages = ask("Weather and time in Tokyo?")
    reply = server.client.chat.completions.create(model="scripted", messages=messages, tools=[WEATHER, GET_TIME])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_time" and json.loads(call.function.arguments) == {"city": "Tokyo"}
    assert [s["type"] for s in steps_of(reply)] == ["tool_call", "tool_result"]
    assert reply.model_extra["agent"]["stop_reason"] == "tool_call"

    # The client runs it and sends the result back: the run goes on from there.
    server.script.replies = [text_reply(tok, "Sunny at noon in Tokyo.")]
    before = len(server.model.prompts)
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "12:00"}]
    reply = server.client.chat.completions.create(model="scripted", messages=messages, tools=[WEATHER, GET_TIME])
    assert reply.choices[0].message.content == "Sunny at noon in Tokyo." and steps_of(reply) == []
    assert observation(new_prompts(server, before)[0]) == "12:00"


def test_a_client_that_leaves_mid_run_stops_it(server, tok):
    server.script.replies = [tool_call_reply(tok, "get_weather", "city='Rome'"), text_reply(tok, "Sunny. " * 200)]
    server.model.delay = 0.02
    try:
        with server.http.stream("POST", CHAT, json={"model": "scripted", "messages": ask("Rome?"), "tools": [WEATHER],
                                                    "stream": True}) as response:
            for line in response.iter_lines():
                if '"delta": {"content": ' in line:
                    break  # the answer has started: leave
        calls = server.model.calls
        time.sleep(1.0)
        assert server.model.calls - calls <= 3  # the generation stopped (not 200+ more tokens)
        health = server.http.get("/health").json()
        assert health["running"] == 0 and health["waiting"] == 0
    finally:
        server.model.delay = 0.0


# -- the code interpreter ------------------------------------------------------------------------


def wait_for_no_sessions(server, sessions_dir) -> None:
    deadline = time.monotonic() + 30
    while server.tools.sessions or any(sessions_dir.iterdir()):
        assert time.monotonic() < deadline, "the request's interpreter session was not closed"
        time.sleep(0.1)


@pytest.mark.slow
def test_interpreter_round_trip_returns_output_and_a_png(server, tok, sessions_dir):
    server.script.replies = [code_reply(tok, PLOT), text_reply(tok, "画好了。Here is the plot.")]
    before = len(server.model.prompts)
    chunks = list(server.client.chat.completions.create(model="scripted", messages=ask("Plot y = x^2"),
                                                        tools=[INTERPRETER], stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    steps = [c.model_extra["agent_step"] for c in chunks if "agent_step" in c.model_extra]
    assert text == "画好了。Here is the plot."
    code, output = steps
    assert code == {"type": "code", "round": 1, "text": PLOT}
    assert output["type"] == "code_output" and output["status"] == "ok" and output["notes"] == []
    assert [(o["type"], o["text"]) for o in output["outputs"] if o["type"] != "image"] == [
        ("stdout", "before\n"), ("stdout", "after\n")]
    assert [o["type"] for o in output["outputs"]] == ["stdout", "image", "stdout"]
    assert output["outputs"][1]["image"] == 0 and "PNG, shown to the user" in output["outputs"][1]["text"]
    (image,) = output["images"]
    assert image["mime"] == "image/png" and base64.b64decode(image["data"]).startswith(b"\x89PNG\r\n\x1a\n")
    # The model read the output as a ```result observation; the session was closed after the request.
    first, second = new_prompts(server, before)
    assert "你可以处理用户上传到电脑上的文件" in first
    assert observation(second).startswith("```result\nbefore\n[image 1:")
    wait_for_no_sessions(server, sessions_dir)


@pytest.mark.slow
def test_two_requests_do_not_share_an_interpreter(server, tok, sessions_dir):
    server.script.replies = [code_reply(tok, "secret = 42\nprint(secret)"), text_reply(tok, "Remembered.")]
    remembered = server.client.chat.completions.create(model="scripted", messages=ask("remember 42"),
                                                       tools=[INTERPRETER])
    assert steps_of(remembered)[1]["outputs"] == [{"type": "stdout", "text": "42\n"}]
    server.script.replies = [code_reply(tok, "print(secret)"), text_reply(tok, "I do not know it.")]
    before = len(server.model.prompts)
    recalled = server.client.chat.completions.create(model="scripted", messages=ask("what was it?"),
                                                     tools=[INTERPRETER])
    output = steps_of(recalled)[1]
    assert output["status"] == "error" and "NameError: name 'secret' is not defined" in output["outputs"][0]["text"]
    # Each had a working directory of its own, named in its system prompt.
    first_dir = re.findall(r"session-\w+", new_prompts(server, before - 2)[0])
    second_dir = re.findall(r"session-\w+", new_prompts(server, before)[0])
    assert len(first_dir) == len(second_dir) == 1 and first_dir != second_dir
    wait_for_no_sessions(server, sessions_dir)


def test_interpreter_sessions_beyond_the_limit_are_503(tok, tmp_path):
    tools = ServerTools(interpreter=SandboxLimits(), max_sessions=1, sessions_dir=tmp_path)
    held = tools.open_session()  # made, not started: no kernel runs
    try:
        model = ScriptedModel(tok, lambda prompt: text_reply(tok, "OK"))
        app = create_app((model, tok), model_name="scripted", backend=SequentialBackend(model, tok),
                         server_tools=tools)
        with LiveServer(app) as live:
            body = {"model": "scripted", "messages": ask("hi"), "tools": [INTERPRETER]}
            response = httpx.post(live.url + CHAT, json=body, timeout=30)
            error = error_of(response, 503)
            assert error["code"] == "server_overloaded" and response.headers["retry-after"] == "1"
            tools.close_session(held)
            held = None
            reply = httpx.post(live.url + CHAT, json=body, timeout=30).json()  # a free place: it runs
            assert reply["choices"][0]["message"]["content"] == "OK" and reply["agent"]["steps"] == []
    finally:
        if held is not None:
            tools.close_session(held)
    deadline = time.monotonic() + 10
    while tools.sessions and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tools.sessions == 0 and not any(tmp_path.iterdir())


# -- the real backend ----------------------------------------------------------------------------


def test_the_rounds_run_on_the_batched_engine(tok):
    model = tiny_model(seed=3)
    backend = make_backend("auto", model, tok)
    assert type(backend).__name__ == "AsyncEngine"
    app = create_app((model, tok), model_name="tiny", backend=backend,
                     server_tools=ServerTools(ToolRegistry([get_weather]), max_rounds=2))
    with LiveServer(app) as live:
        http = httpx.Client(base_url=live.url, timeout=60)
        generated = http.get("/health").json()["generated_tokens"]
        body = {"model": "tiny", "messages": ask("你好"), "tools": [WEATHER], "temperature": 0, "max_tokens": 6}
        replies = [http.post(CHAT, json=body).json() for _ in range(2)]
        assert replies[0]["choices"] == replies[1]["choices"]  # greedy: the same run twice
        reply = replies[0]
        assert 1 <= reply["agent"]["rounds"] <= 2 and reply["usage"]["completion_tokens"] > 0
        used = http.get("/health").json()["generated_tokens"] - generated
        assert used == 2 * reply["usage"]["completion_tokens"]
        http.close()


# -- glmkit serve's flags ------------------------------------------------------------------------


def serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve_command.add_args(parser)
    return parser.parse_args(list(argv))


def test_serve_runs_nothing_server_side_unless_asked():
    tools = serve_command._server_tools(serve_args())
    assert len(tools.tools) == 0 and tools.interpreter is None


def test_serve_flags_set_the_limits(tmp_path):
    path = tmp_path / "my_tools.py"
    path.write_text("from glmkit.agent import tool\n\n@tool\ndef add(a: int, b: int) -> int:\n"
                    "    '''Add two numbers.'''\n    return a + b\n")
    tools = serve_command._server_tools(serve_args(
        "--tools", str(path), "--tool-timeout", "2", "--code-interpreter", "--code-timeout", "5",
        "--code-memory-mb", "512", "--code-cpu-seconds", "20", "--max-rounds", "4", "--max-interpreter-sessions", "2"))
    assert tools.tools.names == ["add"] and tools.tools.timeout == 2
    assert tools.tools.call("add", {"a": 1, "b": 2}).value == 3
    assert (tools.interpreter.timeout, tools.interpreter.memory_mb, tools.interpreter.cpu_seconds) == (5, 512, 20)
    assert (tools.max_rounds, tools.max_sessions) == (4, 2)


@pytest.mark.parametrize("argv, needle", [
    (["--code-timeout", "5"], "add --code-interpreter"),
    (["--tool-timeout", "5"], "add --tools FILE"),
    (["--max-rounds", "5"], "add --tools FILE or --code-interpreter"),
    (["--code-interpreter", "--code-memory-mb", "0"], "--code-memory-mb must be a positive int"),
    (["--code-interpreter", "--max-rounds", "0"], "--max-rounds must be a positive int"),
    (["--tools", "missing.py"], "no tools file at missing.py"),
])
def test_serve_refuses_bad_agent_flags(argv, needle):
    with pytest.raises(CommandError, match=needle):
        serve_command._server_tools(serve_args(*argv))


def test_serve_refuses_a_tool_it_cannot_run(tmp_path):
    spec = tmp_path / "tools.json"
    spec.write_text(json.dumps([{"name": "search", "description": "Search.", "parameters": {"type": "object"}}]))
    with pytest.raises(CommandError, match="search have no function"):
        serve_command._server_tools(serve_args("--tools", str(spec)))


def test_threads_of_finished_runs_do_not_pile_up(server, tok):
    server.script.replies = [text_reply(tok, "OK")]
    for _ in range(3):
        server.client.chat.completions.create(model="scripted", messages=ask("hi"), tools=[WEATHER])
    deadline = time.monotonic() + 10
    while any(t.name == "glmkit-agent" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "an agent thread outlived its request"
        time.sleep(0.05)
