"""OpenAI messages and tools -> ChatGLM3 messages, and ChatGLM3 replies -> OpenAI deltas (no server)."""

from __future__ import annotations

import json
import random

import pytest

from glmkit.chat_format import TOOLS_PREAMBLE, render_messages
from glmkit.server.errors import APIError
from glmkit.server.openai_tools import ReplyStream, chat_prompt, merge_deltas
from glmkit.server.schemas import ChatCompletionRequest, parse_request

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city", "strict": False,
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def request(messages, **fields) -> ChatCompletionRequest:
    return parse_request(ChatCompletionRequest, {"model": "m", "messages": messages, **fields})


def call(id_, name, arguments) -> dict:
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def test_tools_are_unwrapped_and_the_system_prompt_is_kept_beside_them():
    prompt = chat_prompt(request([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
                                 tools=[WEATHER, TIME]))
    weather = {k: v for k, v in WEATHER["function"].items() if k != "strict"}
    time_ = {"name": "get_time", "parameters": TIME["function"]["parameters"]}
    assert prompt.messages == [
        {"role": "system", "content": TOOLS_PREAMBLE, "tools": [weather, time_]},
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"}]
    assert prompt.tool_names == ["get_weather", "get_time"] and prompt.prefill is None and not prompt.choose_tool


def test_tool_calls_and_results_become_turns_and_observations_each_result_after_its_call(tok):
    messages = [{"role": "user", "content": "weather and time?"},
                {"role": "assistant", "content": "Let me look.", "tool_calls": [
                    call("call_1", "get_weather", {"city": "北京"}), call("call_2", "get_time", {})]},
                {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
                {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "晴"}]},
                {"role": "assistant", "content": "Sunny at noon."},
                {"role": "user", "content": "thanks"}]
    prompt = chat_prompt(request(messages, tools=[WEATHER, TIME]))
    assert prompt.messages[1:] == [
        {"role": "user", "content": "weather and time?"},
        {"role": "assistant", "content": "Let me look."},
        {"role": "assistant", "content": {"name": "get_time", "parameters": {}}},
        {"role": "observation", "content": "12:00"},
        {"role": "assistant", "content": {"name": "get_weather", "parameters": {"city": "北京"}}},
        {"role": "observation", "content": "晴"},
        {"role": "assistant", "content": "Sunny at noon."},
        {"role": "user", "content": "thanks"}]
    text = tok.decode(render_messages(tok, prompt.messages))
    assert ("<|assistant|>get_time\n ```python\ntool_call()\n```<|observation|>\n 12:00"
            "<|assistant|>get_weather\n ```python\ntool_call(city='北京')\n```<|observation|>\n 晴") in text


def test_legacy_functions_and_function_messages():
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None,
                 "function_call": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                {"role": "function", "name": "get_weather", "content": '{"temp": 20}'}]
    prompt = chat_prompt(request(messages, functions=[WEATHER["function"]], function_call={"name": "get_weather"}))
    assert prompt.legacy and prompt.single_call and prompt.prefill == "get_weather"
    assert prompt.messages[-2:] == [{"role": "assistant", "content": {"name": "get_weather",
                                                                      "parameters": {"city": "Paris"}}},
                                    {"role": "observation", "content": '{"temp": 20}'}]


@pytest.mark.parametrize("choice, prefill, choose, announced", [
    ("none", None, False, []),
    ("auto", None, False, ["get_weather", "get_time"]),
    ("required", None, True, ["get_weather", "get_time"]),
    ({"type": "function", "function": {"name": "get_time"}}, "get_time", False, ["get_weather", "get_time"]),
])
def test_tool_choice(choice, prefill, choose, announced):
    prompt = chat_prompt(request([{"role": "user", "content": "hi"}], tools=[WEATHER, TIME], tool_choice=choice))
    assert (prompt.prefill, prompt.choose_tool, prompt.tool_names) == (prefill, choose, announced)
    assert any("tools" in m for m in prompt.messages) == bool(announced)


def test_required_with_one_tool_prefills_its_name():
    prompt = chat_prompt(request([{"role": "user", "content": "hi"}], tools=[WEATHER], tool_choice="required"))
    assert prompt.prefill == "get_weather" and not prompt.choose_tool


@pytest.mark.parametrize("messages, fields, needle", [
    ([{"role": "user", "content": "x"}], {"tool_choice": "auto"}, "tool_choice is only allowed when tools"),
    ([{"role": "user", "content": "x"}], {"tools": [WEATHER], "tool_choice": {"type": "function", "function":
                                                                                {"name": "nope"}}}, "'nope'"),
    ([{"role": "tool", "tool_call_id": "call_9", "content": "x"}], {}, "does not answer a call"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [call("c1", "get_weather", {})]}],
     {}, "has no tool message with its result"),
    ([{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "f", "arguments": "{oops"}}]}, {"role": "tool", "tool_call_id": "c", "content": "r"}], {},
     "not valid JSON"),
    ([{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "f", "arguments": "[1]"}}]}, {"role": "tool", "tool_call_id": "c", "content": "r"}], {},
     "must be a JSON object"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}], {}, "text only"),
    ([{"role": "user"}], {}, "needs content"),
    ([{"role": "user", "content": "x"}], {"tools": [{"type": "function", "function": {"name": "interpreter"}}]},
     "reserved"),
    ([{"role": "user", "content": "x"}], {"tools": [WEATHER, WEATHER]}, "declared twice"),
    ([{"role": "user", "content": "x"}], {"tools": [{"type": "function", "function": {"name": "a b"}}]},
     "letters, digits"),
    ([{"role": "user", "content": "x"}], {"tools": [WEATHER], "functions": [WEATHER["function"]]}, "not both"),
])
def test_requests_that_cannot_be_sent_are_400s_naming_the_problem(messages, fields, needle):
    with pytest.raises(APIError) as e:
        chat_prompt(request(messages, **fields))
    assert e.value.status == 400 and needle in e.value.message


# -- replies -------------------------------------------------------------------------------------


def run(text: str, pieces: int = 1, seed: int = 0, **kwargs) -> list[dict]:
    """ReplyStream's deltas for `text` pushed in `pieces` random chunks."""
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), min(pieces - 1, len(text) - 1))) if pieces > 1 else []
    stream = ReplyStream(**{"tool_names": ["get_weather"], **kwargs})
    deltas = []
    for a, b in zip([0, *cuts], [*cuts, len(text)]):
        deltas += stream.push(text[a:b])
    return deltas + stream.finish()


REPLIES = [
    "\n 你好！Hello there.  \n",
    "\n Training date: [[训练时间]] ok",
    "get_weather\n```python\ntool_call(city='北京', days=3)\n```",
    "\n Let me check.<|assistant|>get_weather\n```python\ntool_call(city=\"Paris\")\n```",
    "\n first<|assistant|>\n second",
    "get_weather\n```python\ntool_call(city=Paris)\n```",  # malformed: a name, not a literal
    "interpreter\n```python\nprint(1)\n```",
    "\n a <|assist",
]


@pytest.mark.parametrize("text", REPLIES)
def test_streamed_deltas_add_up_to_the_whole_reply_however_the_text_is_cut(text):
    whole = merge_deltas(run(text))
    for seed in range(20):
        streamed = merge_deltas(run(text, pieces=random.Random(seed).randint(2, len(text)), seed=seed))
        for message in (whole, streamed):  # call ids are random
            for c in message.get("tool_calls", []):
                c["id"] = "call"
        assert streamed == whole


def test_reply_parsing():
    assert merge_deltas(run(REPLIES[0])) == {"role": "assistant", "content": "你好！Hello there."}
    assert merge_deltas(run(REPLIES[1]))["content"] == "Training date: 2023年 ok"
    message = merge_deltas(run(REPLIES[2]))
    assert message["content"] is None and message["tool_calls"][0]["id"].startswith("call_")
    assert message["tool_calls"][0]["function"] == {"name": "get_weather",
                                                    "arguments": json.dumps({"city": "北京", "days": 3},
                                                                            ensure_ascii=False)}
    message = merge_deltas(run(REPLIES[3]))
    assert message["content"] == "Let me check." and len(message["tool_calls"]) == 1
    assert merge_deltas(run(REPLIES[4]))["content"] == "first\nsecond"
    # Nothing is dropped: a malformed call or an undeclared turn comes back as text.
    assert merge_deltas(run(REPLIES[5])) == {"role": "assistant",
                                             "content": "get_weather\n```python\ntool_call(city=Paris)\n```"}
    assert merge_deltas(run(REPLIES[6]))["content"] == "interpreter\n```python\nprint(1)\n```"


def test_tool_call_deltas_stream_as_openai_sends_them():
    deltas = run(REPLIES[2], pieces=12)
    assert [list(d) for d in deltas] == [["tool_calls"], ["tool_calls"]]
    first, second = deltas[0]["tool_calls"][0], deltas[1]["tool_calls"][0]
    assert first["index"] == 0 and first["type"] == "function" and first["function"] == {"name": "get_weather",
                                                                                         "arguments": ""}
    assert set(second) == {"index", "function"} and json.loads(second["function"]["arguments"]) == {
        "city": "北京", "days": 3}


def test_text_streams_as_it_comes_holding_back_only_what_may_change():
    stream = ReplyStream([])
    assert stream.push("\n") == []
    assert stream.push(" Hello") == [{"content": "Hello"}]
    assert stream.push(" wor") == [{"content": " wor"}]
    assert stream.push("ld  ") == [{"content": "ld"}]  # trailing blanks wait: the end strips them
    assert stream.push("[[训练") == []  # may become the placeholder
    assert stream.push("x") == [{"content": "  [[训练x"}]
    assert stream.finish() == []


def test_prefilled_name_and_single_call():
    stream = ReplyStream(["get_weather"], prefill="get_weather")
    deltas = stream.push("```python\ntool_call(city='Rome')\n```") + stream.finish()
    assert merge_deltas(deltas)["tool_calls"][0]["function"]["name"] == "get_weather"
    call = "get_weather\n```python\ntool_call(city='{}')\n```"
    two = call.format("A") + "<|assistant|>" + call.format("B")
    message = merge_deltas(run(two, single_call=True))
    assert len(message["tool_calls"]) == 1 and "tool_call(city='B')" in message["content"]
