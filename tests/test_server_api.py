"""The HTTP API with the real `openai` client against a live server on loopback.

Two servers: one with a tiny random model (the backend `glmkit serve` would pick), one whose model
is scripted (tests/live_server.py) so it makes the tool calls a random model never would, while
the generator, sampler, backend, server and client are all real.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from live_server import LiveServer, ScriptedModel, text_reply, tool_call_reply
from tiny import make_tiny_checkpoint, tiny_model

from glmkit.chat_format import render_messages, tools_system_message
from glmkit.generate import generate
from glmkit.sampling import SamplingParams
from glmkit.server import create_app
from glmkit.server.backend import SequentialBackend, make_backend
from glmkit.server.openai_tools import ReplyStream, merge_deltas

REPO = Path(__file__).resolve().parents[1]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time now",
                                         "parameters": {"type": "object", "properties": {}}}}
HELLO = [{"role": "user", "content": "你好, who are you?"}]


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=1)


@pytest.fixture(scope="module")
def server(model, tok):
    app = create_app((model, tok), model_name="tiny", backend=make_backend("auto", model, tok))
    with LiveServer(app) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


class Script:
    """What the scripted model answers; tests set `reply_for`."""

    def __init__(self, tok):
        self.reply_for = lambda prompt: text_reply(tok, "OK")

    def __call__(self, prompt):
        return self.reply_for(prompt)


@pytest.fixture(scope="module")
def scripted(tok):
    script = Script(tok)
    fake = ScriptedModel(tok, script)
    app = create_app((fake, tok), model_name="scripted", backend=SequentialBackend(fake, tok))
    with LiveServer(app) as live:
        live.script, live.model = script, fake
        live.client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        yield live


def expected_reply(model, tok, messages, max_tokens):
    """What the naive generator answers, parsed as the server parses it."""
    completion = generate(model, tok, render_messages(tok, messages), SamplingParams(temperature=0,
                                                                                     max_new_tokens=max_tokens))
    stream = ReplyStream([])
    message = merge_deltas(stream.push(completion.text) + stream.finish())
    return message["content"], completion


# -- chat ----------------------------------------------------------------------------------------


def test_chat_equals_the_naive_generator(client, model, tok):
    reply = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, temperature=0)
    content, completion = expected_reply(model, tok, HELLO, 12)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == content
    assert choice.finish_reason == completion.finish_reason
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion" and reply.model == "tiny"
    assert reply.usage.prompt_tokens == len(render_messages(tok, HELLO))
    assert reply.usage.completion_tokens == len(completion.token_ids)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_stream_adds_up_to_the_same_reply_with_usage_last(client):
    whole = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    finishes = [c.choices[0].finish_reason for c in chunks[:-1] if c.choices[0].finish_reason]
    assert text == whole.choices[0].message.content and finishes == [whole.choices[0].finish_reason]


def test_stream_without_usage_has_no_usage_chunk(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=3, stream=True))
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)


def test_n_gives_independent_seeded_choices(client):
    def ask(**kw):
        return client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=1.0, n=2,
                                              seed=7, **kw)
    first, again = ask(), ask()
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert first.choices[0].message.content != first.choices[1].message.content  # seeds 7 and 8
    assert first.usage.completion_tokens == 16  # both hit max_tokens: the random model never stops this soon
    streamed = list(ask(stream=True))
    texts = ["".join(c.choices[0].delta.content or "" for c in streamed if c.choices[0].index == i) for i in (0, 1)]
    assert texts == [c.message.content for c in first.choices]


def test_max_tokens_cut_gives_length(client):
    for field in ("max_tokens", "max_completion_tokens"):
        reply = client.chat.completions.create(model="tiny", messages=HELLO, temperature=0, **{field: 4})
        assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 4


def test_stop_strings_end_the_reply_before_them(scripted, tok):
    scripted.script.reply_for = lambda prompt: text_reply(tok, "Hello world. Goodbye.")
    ask = scripted.client.chat.completions.create
    reply = ask(model="scripted", messages=HELLO, stop=["world", "xyz"])
    assert reply.choices[0].message.content == "Hello" and reply.choices[0].finish_reason == "stop"
    chunks = list(ask(model="scripted", messages=HELLO, stop="Good", stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello world."
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_chinese_and_english_text_round_trip(scripted, tok):
    scripted.script.reply_for = lambda prompt: text_reply(tok, "你好！I am ChatGLM，很高兴见到你 😀")
    reply = scripted.client.chat.completions.create(model="scripted", messages=HELLO)
    assert reply.choices[0].message.content == "你好！I am ChatGLM，很高兴见到你 😀"


# -- tools ---------------------------------------------------------------------------------------


def test_a_full_tool_round_trip(scripted, tok):
    observation = tok.token_id("<|observation|>")

    def reply_for(prompt):  # call the tool first; answer once its result is in the prompt
        if observation in prompt:
            return text_reply(tok, "It is sunny in 北京, 25 °C.")
        return tool_call_reply(tok, "get_weather", "city='北京'")

    scripted.script.reply_for = reply_for
    messages = [{"role": "system", "content": "You are a weather bot."},
                {"role": "user", "content": "What's the weather in Beijing?"}]
    first = scripted.client.chat.completions.create(model="scripted", messages=messages, tools=[WEATHER])
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "北京"}
    # The tools were announced in ChatGLM3's own form, with the user's system prompt kept.
    glm_tools = [WEATHER["function"]]
    assert scripted.model.prompts[-1] == render_messages(tok, tools_system_message(glm_tools, "You are a weather bot.")
                                                         + messages[1:])

    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": '{"weather": "sunny", "temperature": 25}'}]
    final = scripted.client.chat.completions.create(model="scripted", messages=messages, tools=[WEATHER])
    assert final.choices[0].message.content == "It is sunny in 北京, 25 °C."
    assert final.choices[0].finish_reason == "stop" and not final.choices[0].message.tool_calls
    system = tools_system_message(glm_tools, "You are a weather bot.")
    assert scripted.model.prompts[-1] == render_messages(tok, system + [
        messages[1], {"role": "assistant", "content": {"name": "get_weather", "parameters": {"city": "北京"}}},
        {"role": "observation", "content": '{"weather": "sunny", "temperature": 25}'}])


def test_tool_calls_stream_as_deltas(scripted, tok):
    scripted.script.reply_for = lambda prompt: tool_call_reply(tok, "get_weather", "city='Paris'")
    chunks = list(scripted.client.chat.completions.create(model="scripted", messages=HELLO, tools=[WEATHER, TIME],
                                                          stream=True))
    pieces = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert pieces[0].id.startswith("call_") and pieces[0].function.name == "get_weather"
    assert json.loads("".join(p.function.arguments or "" for p in pieces)) == {"city": "Paris"}
    assert all(p.index == 0 for p in pieces) and chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_names_the_function_the_reply_must_call(scripted, tok):
    scripted.script.reply_for = lambda prompt: tool_call_reply(tok, "get_time", "", metadata=False)
    reply = scripted.client.chat.completions.create(
        model="scripted", messages=HELLO, tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert reply.choices[0].message.tool_calls[0].function.name == "get_time"
    assert reply.choices[0].finish_reason == "tool_calls"
    prompt = scripted.model.prompts[-1]  # the metadata line is written for the model: it must call get_time
    assert prompt[-len(tok.encode("get_time\n")) - 1:] == [tok.token_id("<|assistant|>")] + tok.encode("get_time\n")


def test_tool_choice_none_announces_no_tools(scripted, tok):
    scripted.script.reply_for = lambda prompt: text_reply(tok, "No tools.")
    reply = scripted.client.chat.completions.create(model="scripted", messages=HELLO, tools=[WEATHER],
                                                    tool_choice="none")
    assert reply.choices[0].message.content == "No tools."
    assert scripted.model.prompts[-1] == render_messages(tok, HELLO)


def test_tool_choice_required_makes_a_random_model_name_a_tool(client):
    reply = client.chat.completions.create(model="tiny", messages=HELLO, tools=[WEATHER, TIME],
                                           tool_choice="required", max_tokens=10, temperature=0.9, seed=3)
    message = reply.choices[0].message
    # The random model's call body is garbage, so it comes back as text, but its metadata line is a tool's.
    written = message.content or message.tool_calls[0].function.name
    assert written.startswith(("get_weather", "get_time"))


def test_legacy_functions_get_a_function_call(scripted, tok):
    scripted.script.reply_for = lambda prompt: tool_call_reply(tok, "get_weather", "city='Rome'")
    reply = scripted.client.chat.completions.create(model="scripted", messages=HELLO,
                                                    functions=[WEATHER["function"]])
    choice = reply.choices[0]
    assert choice.finish_reason == "function_call" and not choice.message.tool_calls
    assert choice.message.function_call.name == "get_weather"
    assert json.loads(choice.message.function_call.arguments) == {"city": "Rome"}


# -- other fields ----------------------------------------------------------------------------------


def test_logprobs(client):
    reply = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=5, temperature=0, logprobs=True,
                                           top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 5
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3 and bytes(entry.bytes).decode("utf-8", "replace")
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy takes the top token
    streamed = list(client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=5, temperature=0,
                                                   logprobs=True, stream=True))
    tokens = [e.token for c in streamed if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert tokens == [e.token for e in content]


def test_json_object_replies_are_json(client):
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "JSON please"}],
                                           response_format={"type": "json_object"}, max_tokens=40, temperature=0)
    from glmkit.server.constraints import JsonPrefix

    text = reply.choices[0].message.content
    assert text.startswith("{") and JsonPrefix().fed(text) is not None
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_penalties_seed_user_and_extensions_are_accepted(client):
    reply = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, presence_penalty=1.5,
                                           frequency_penalty=0.5, seed=1, user="u-1", temperature=0.7, top_p=0.9,
                                           extra_body={"top_k": 20, "repetition_penalty": 1.1, "ignore_eos": True})
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 6


def test_completions(client, model, tok):
    reply = client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=6, temperature=0)
    ids = [tok.token_id("[gMASK]"), tok.token_id("sop")] + tok.encode("The capital of France is")
    expected = generate(model, tok, ids, SamplingParams(temperature=0, max_new_tokens=6))
    assert reply.choices[0].text == expected.text and reply.object == "text_completion"
    assert reply.usage.prompt_tokens == len(ids) and reply.choices[0].finish_reason == expected.finish_reason
    echoed = client.completions.create(model="tiny", prompt=["A", "B"], max_tokens=3, temperature=0, echo=True, n=2)
    assert [c.index for c in echoed.choices] == [0, 1, 2, 3]
    assert [c.text[:1] for c in echoed.choices] == ["A", "A", "B", "B"]
    chunks = list(client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage.completion_tokens == len(expected.token_ids)
    scored = client.completions.create(model="tiny", prompt="Hi", max_tokens=3, temperature=0, logprobs=2)
    lp = scored.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 3


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["running"] == 0
    metrics = httpx.get(server.url + "/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    lines = dict(line.rsplit(" ", 1) for line in metrics.text.splitlines() if not line.startswith("#"))
    assert int(lines['glmkit_requests_total{endpoint="/v1/chat/completions",status="200"}']) >= 1
    assert int(lines["glmkit_time_to_first_token_seconds_count"]) >= 1
    assert int(lines["glmkit_generation_tokens_total"]) >= 2
    for name in ("glmkit_requests_waiting", "glmkit_requests_running", "glmkit_kv_cache_usage_ratio",
                 "glmkit_kv_cache_blocks_total", "glmkit_prompt_tokens_total"):
        assert name in lines


def test_a_client_that_disconnects_stops_its_generation(scripted, tok):
    scripted.script.reply_for = lambda prompt: text_reply(tok, "and on " * 300)
    scripted.model.delay = 0.01
    try:
        body = {"model": "scripted", "messages": HELLO, "stream": True}
        with httpx.stream("POST", scripted.url + "/v1/chat/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            assert sum(1 for _, line in zip(range(6), lines) if line.startswith("data: ")) >= 3
        calls = scripted.model.calls
        time.sleep(0.5)
        assert scripted.model.calls - calls <= 3  # it stopped, not 600 tokens later
        # Not streamed: the client gives up waiting; the server notices and stops too.
        calls = scripted.model.calls
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(scripted.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=0.3)
        time.sleep(0.5)
        stopped_at = scripted.model.calls
        time.sleep(0.3)
        assert scripted.model.calls == stopped_at and stopped_at - calls < 150
        assert httpx.get(scripted.url + "/health").json()["running"] == 0
    finally:
        scripted.model.delay = 0.0


def test_a_disconnect_frees_the_default_backends_cache(server):
    body = {"model": "tiny", "prompt": "Once upon a time", "stream": True, "max_tokens": 1500}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        assert [next(lines).startswith("data: ") for _ in range(6)].count(True) == 3  # a chunk per token
        busy = httpx.get(server.url + "/health").json()
        assert busy["running"] + busy["waiting"] == 1 and busy["kv_blocks_used"] > 0
    deadline = time.monotonic() + 5
    while (health := httpx.get(server.url + "/health").json())["running"] or health["kv_blocks_used"]:
        assert time.monotonic() < deadline, health  # 1500 tokens would take far longer
        time.sleep(0.05)


def test_requests_wait_their_turn_and_all_finish(scripted, tok):
    scripted.script.reply_for = lambda prompt: text_reply(tok, "one two three four")
    results = []

    def ask(i):
        reply = scripted.client.chat.completions.create(model="scripted", messages=HELLO, stream=(i % 2 == 0))
        results.append(reply if i % 2 else "".join(c.choices[0].delta.content or "" for c in reply))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    texts = [r if isinstance(r, str) else r.choices[0].message.content for r in results]
    assert texts == ["one two three four"] * 8


# -- the command ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_glmkit_serve_serves_the_openai_client(tmp_path):
    checkpoint = make_tiny_checkpoint(tmp_path / "ckpt")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "glmkit.cli", "serve", "--model", str(checkpoint), "--port",
                                str(port), "--api-key", "k1", "--api-key", "k2", "--log-level", "warning"],
                               env=env, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="k2", max_retries=0)
        reply = client.chat.completions.create(model="ckpt", messages=HELLO, max_tokens=3)
        assert reply.model == "ckpt" and reply.usage.completion_tokens == 3
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="k3", max_retries=0).models.list()
        assert "<title>glmkit chat</title>" in httpx.get(url + "/").text
    finally:
        process.terminate()
        process.wait(30)
    assert "serving 'ckpt'" in process.stderr.read()
