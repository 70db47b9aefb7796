"""Every refusal of the HTTP API: OpenAI's error shape, the right status, a message naming the problem,
and never a 500 for bad input."""

from __future__ import annotations

import json
import random
import socket
import threading
import time

import httpx
import openai
import pytest
from live_server import LiveServer, ScriptedModel, text_reply
from tiny import tiny_model

from glmkit.chat_format import render_messages
from glmkit.server import create_app
from glmkit.server.backend import SequentialBackend

CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "hi"}]
OK = {"model": "tiny", "messages": HELLO, "max_tokens": 2}
LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def server(tok):
    model = tiny_model(seed=2, seq_length=256)
    app = create_app((model, tok), model_name="tiny", api_keys=["key-one", "key-two"], max_body_bytes=LIMIT,
                     backend=SequentialBackend(model, tok))
    with LiveServer(app) as live:
        live.http = httpx.Client(base_url=live.url, headers={"Authorization": "Bearer key-one"}, timeout=60)
        yield live


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.mark.parametrize("body, param, needle", [
    ({"model": "tiny"}, "messages", "required"),
    ({**OK, "messages": []}, "messages", "at least 1"),
    ({**OK, "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "'robot'"),
    ({**OK, "messages": [{"role": "user", "content": 5}]}, "messages[0].content", "string"),
    ({**OK, "temperature": 2.5}, "temperature", "less than or equal to 2"),
    ({**OK, "temperature": "0.5"}, "temperature", "number"),
    ({**OK, "top_p": 1.5}, "top_p", "less than or equal to 1"),
    ({**OK, "n": 0}, "n", "greater than or equal to 1"),
    ({**OK, "n": 500}, "n", "less than or equal to 128"),
    ({**OK, "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({**OK, "presence_penalty": 3}, "presence_penalty", "less than or equal to 2"),
    ({**OK, "top_logprobs": 2}, "top_logprobs", "needs logprobs"),
    ({**OK, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "20"),
    ({**OK, "stream_options": {"include_usage": True}}, "stream_options", "only allowed when stream"),
    ({**OK, "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({**OK, "stop": [""]}, "stop", "must not be empty"),
    ({**OK, "logit_bias": {"5": 10}}, "logit_bias", "not supported"),
    ({**OK, "frobnicate": True}, "frobnicate", "Unrecognized request argument"),
    ({**OK, "tool_choice": "auto"}, "tool_choice", "only allowed when tools"),
    ({**OK, "tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice", "'g'"),
    ({**OK, "tools": [{"type": "retrieval"}]}, "tools[0].type", "'function'"),
    ({**OK, "messages": [{"role": "tool", "tool_call_id": "call_x", "content": "r"}]}, "messages[0]",
     "does not answer"),
    ({**OK, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0].type", "text only"),
    ({**OK, "response_format": {"type": "json_schema", "json_schema": {}}}, "response_format", "json_object"),
    ({**OK, "response_format": {"type": "yaml"}}, "response_format.type", "'json_object'"),
    ({**OK, "max_tokens": 3, "max_completion_tokens": 4}, "max_completion_tokens", "differ"),
])
def test_malformed_and_out_of_range_fields_are_400_naming_the_field(server, body, param, needle):
    error = error_of(server.http.post(CHAT, json=body), 400)
    assert error["param"] == param and needle in error["message"] and error["type"] == "invalid_request_error"


@pytest.mark.parametrize("body, needle", [
    ({"model": "tiny", "prompt": "x", "suffix": "y"}, "suffix"),
    ({"model": "tiny", "prompt": []}, "empty"),
    ({"model": "tiny", "prompt": [[]]}, "empty"),
    ({"model": "tiny", "prompt": [1, 99999999]}, "outside the vocabulary"),
    ({"model": "tiny", "prompt": "x", "best_of": 3}, "best_of"),
    ({"model": "tiny", "prompt": "x", "echo": True, "logprobs": 1}, "echo"),
    ({"model": "tiny", "prompt": "x", "logprobs": 6}, "less than or equal to 5"),
])
def test_completions_refusals(server, body, needle):
    assert needle in error_of(server.http.post("/v1/completions", json=body), 400)["message"]


def test_bodies_that_are_not_json_objects_are_400(server):
    for content in (b"{not json", b"[1, 2]", b"", b"\xff\xfe", b"[" * 100000 + b"]" * 100000):
        response = server.http.post(CHAT, content=content[:LIMIT], headers={"Content-Type": "application/json"})
        error_of(response, 400)


def test_deep_nesting_anywhere_is_400(server):
    deep = '{"a":' * 2000 + "{}" + "}" * 2000
    arguments = json.dumps(deep)  # a JSON string holding the deep object, as OpenAI sends arguments
    call = '{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", ' \
           f'"arguments": {arguments}}}}}]}}, {{"role": "tool", "tool_call_id": "c", "content": "r"}}'
    bodies = [f'{{"model": "tiny", "messages": [{{"role": "user", "content": "x"}}, {call}]}}',
              f'{{"model": "tiny", "messages": [{{"role": "user", "content": "x"}}], "tools": [{{"type": "function", '
              f'"function": {{"name": "f", "parameters": {deep}}}}}]}}']
    for body in bodies:
        json.loads(body.replace(deep, "{}"))  # the test's own JSON is well formed
        response = server.http.post(CHAT, content=body, headers={"Content-Type": "application/json"})
        assert "nested too deeply" in error_of(response, 400)["message"]


def test_a_prompt_longer_than_the_context_says_by_how_much(server, tok):
    messages = [{"role": "user", "content": "x " * 300}]
    error = error_of(server.http.post(CHAT, json={**OK, "messages": messages}), 400)
    assert error["code"] == "context_length_exceeded" and "256 tokens" in error["message"]
    prompt_tokens = len(render_messages(tok, messages))
    assert f"the prompt is {prompt_tokens} tokens: {prompt_tokens - 255} too many" in error["message"]
    # Room for the prompt but not for max_tokens: a 400 too, with the sum.
    error = error_of(server.http.post(CHAT, json={**OK, "max_tokens": 250}), 400)
    assert error["param"] == "max_tokens" and "too many" in error["message"]
    error = error_of(server.http.post("/v1/completions", json={"model": "tiny", "prompt": "x " * 300}), 400)
    assert error["code"] == "context_length_exceeded"


def test_api_keys(server):
    url = server.url + CHAT
    error = error_of(httpx.post(url, json=OK), 401)
    assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
    error_of(httpx.post(url, json=OK, headers={"Authorization": "Bearer nope"}), 401)
    error_of(httpx.post(url, json=OK, headers={"Authorization": "Basic key-one"}), 401)
    error_of(httpx.get(server.url + "/v1/models"), 401)
    assert httpx.post(url, json=OK, headers={"Authorization": "Bearer key-two"}, timeout=60).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    for open_path in ("/health", "/metrics", "/"):  # the page asks for the key itself
        assert httpx.get(server.url + open_path).status_code == 200


def test_unknown_model_and_url_are_404(server):
    error = error_of(server.http.post(CHAT, json={**OK, "model": "gpt-9"}), 404)
    assert error["code"] == "model_not_found" and "'gpt-9'" in error["message"]
    error_of(server.http.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"}), 404)
    error_of(server.http.get("/v1/models/gpt-9"), 404)
    error_of(server.http.get("/v1/nothing-here"), 404)
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="key-one", max_retries=0).chat.completions.create(
            model="gpt-9", messages=HELLO)


def test_wrong_method_is_405(server):
    error_of(server.http.get(CHAT), 405)


def test_oversized_bodies_are_413_before_parsing(server):
    big = {**OK, "messages": [{"role": "user", "content": "x" * LIMIT}]}
    error = error_of(server.http.post(CHAT, json=big), 413)
    assert str(LIMIT) in error["message"] and error["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit is counted as the body arrives
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(LIMIT // 1024 + 2):
            yield b"x" * 1024
        yield b'"}]}'
    error_of(server.http.post(CHAT, content=chunks(), headers={"Content-Type": "application/json"}), 413)
    # A declared length past the limit is refused at once: the server does not wait for the body.
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer key-one\r\nContent-Type: "
                     f"application/json\r\nContent-Length: {100 * LIMIT}\r\n\r\n{{".encode())
        answer = b""
        while b"request_too_large" not in answer and (data := sock.recv(65536)):
            answer += data
    assert answer.startswith(b"HTTP/1.1 413") and b"request_too_large" in answer


def test_bad_input_is_never_a_500(server):
    rng = random.Random(0)
    values = [None, True, -1, 0, 3.5, 1e308, "", "x", [], [1], {}, {"a": 1}, [{"role": "user"}], "\u0000", 2**70]
    fields = ["model", "messages", "temperature", "top_p", "n", "stop", "seed", "stream", "tools", "tool_choice",
              "logprobs", "top_logprobs", "response_format", "presence_penalty", "stream_options", "functions",
              "function_call", "user", "top_k"]  # max_tokens stays 2 (its range has its own tests): quick replies
    for _ in range(100):
        body = dict(OK)
        for field in rng.sample(fields, rng.randint(1, 3)):
            body[field] = rng.choice(values)
        response = server.http.post(CHAT, json=body)
        assert response.status_code < 500, (body, response.text)
        if response.status_code != 200:
            error_of(response, response.status_code)
        elif body.get("stream") is True:
            assert "[DONE]" in response.text


def test_a_saturated_server_answers_503_and_recovers(tok):
    model = ScriptedModel(tok, lambda prompt: text_reply(tok, "slow " * 30), delay=0.01)
    app = create_app((model, tok), model_name="m", backend=SequentialBackend(model, tok), max_pending=2)
    with LiveServer(app) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0, timeout=60)
        holders = [threading.Thread(target=client.chat.completions.create,
                                    kwargs={"model": "m", "messages": HELLO}) for _ in range(2)]
        for t in holders:
            t.start()
        deadline = time.monotonic() + 10
        while httpx.get(live.url + "/metrics").text.count("glmkit_requests_pending 2") == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        response = httpx.post(live.url + CHAT, json={"model": "m", "messages": HELLO})
        error = error_of(response, 503)
        assert response.headers["retry-after"] == "1" and "busy" in error["message"]
        with pytest.raises(openai.InternalServerError) as e:
            client.chat.completions.create(model="m", messages=HELLO, stream=True)
        assert e.value.status_code == 503
        error_of(httpx.post(live.url + CHAT, json={"model": "m", "messages": HELLO, "n": 3}), 400)  # never fits
        for t in holders:
            t.join(30)
        assert client.chat.completions.create(model="m", messages=HELLO).choices[0].message.content.startswith("slow")
        assert 'glmkit_requests_rejected_total{reason="saturated"} 2' in httpx.get(live.url + "/metrics").text


def test_errors_after_the_stream_started_are_sent_in_it(tok):
    class Broken(ScriptedModel):
        broken = True

        def __call__(self, input_ids, kv_cache, **kwargs):
            if self.broken and kv_cache.position == 3:
                raise RuntimeError("the device fell over")
            return super().__call__(input_ids, kv_cache, **kwargs)

    model = Broken(tok, lambda prompt: text_reply(tok, "a b c d e f"))
    with LiveServer(create_app((model, tok), model_name="m", backend=SequentialBackend(model, tok))) as live:
        response = httpx.post(live.url + CHAT, json={"model": "m", "messages": HELLO, "stream": True})
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert "the device fell over" in error["message"] and error["type"] == "server_error"
        response = httpx.post(live.url + CHAT, json={"model": "m", "messages": HELLO})
        assert error_of(response, 500)["type"] == "server_error"  # a fault of the server, said as one
        model.broken = False  # and it still serves
        assert httpx.post(live.url + CHAT, json={"model": "m", "messages": HELLO}).json()["choices"][0][
            "message"]["content"] == "a b c d e f"
