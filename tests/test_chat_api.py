"""The Python facade: load(), chat(), stream_chat(), generate(), truncation, tool-call replies."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import make_tiny_checkpoint

import glmkit.chat
import glmkit.loader
from glmkit.chat import ChatModel, drop_oldest_exchange, load, sampling_params
from glmkit.chat_format import render_messages
from glmkit.generate import ContextLengthError, Delta, generate
from glmkit.sampling import SamplingParams

WINDOW = 256  # a small context window, so that over-long conversations are cheap to build


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> ChatModel:
    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seq_length=WINDOW)
    return load(folder, device="cpu")


def test_load_defaults(chat_model):
    assert chat_model.model.dtype == torch.float32  # small model on CPU
    assert chat_model.model.device.type == "cpu"
    assert chat_model.tokenizer.vocab_size == 64798


def test_load_dtype_and_bad_path(tmp_path, chat_model):
    with pytest.raises(ValueError, match="no folder"):
        load(tmp_path / "missing")
    assert glmkit.loader.as_dtype("bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        glmkit.loader.as_dtype("int3")


def test_chat_returns_text_and_history(chat_model):
    response, history = chat_model.chat("你好", max_new_tokens=8, seed=0)
    assert isinstance(response, str)
    assert history[0] == {"role": "user", "content": "你好"}
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert history[1]["content"] == response


def test_stream_chat_ends_with_chats_reply(chat_model):
    past = [{"role": "user", "content": "hi"}, {"role": "assistant", "metadata": "", "content": "Hello!"}]
    want = chat_model.chat("What is 1+1?", past, max_new_tokens=12, seed=3)
    items = list(chat_model.stream_chat("What is 1+1?", past, max_new_tokens=12, seed=3))
    assert items and items[-1] == want
    # Partials grow (a plain reply of one turn) and each carries a full history.
    texts = [r for r, _ in items]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    assert all(h[:3] == past + [{"role": "user", "content": "What is 1+1?"}] for _, h in items)


def test_callers_history_untouched(chat_model):
    history = [{"role": "system", "content": "Be brief."},
               {"role": "user", "content": "hi"}, {"role": "assistant", "metadata": "", "content": "Hello!"}]
    before = copy.deepcopy(history)
    _, new = chat_model.chat("again", history, max_new_tokens=4, seed=0)
    for _, partial in chat_model.stream_chat("again", history, max_new_tokens=4, seed=0):
        assert partial is not history
    assert history == before
    assert new is not history and new[:3] == before and len(new) == 5


def test_greedy_and_official_arguments(chat_model):
    a = chat_model.chat("hello", max_new_tokens=6, do_sample=False)
    b = chat_model.chat("hello", max_new_tokens=6, temperature=0)
    assert a == b
    prompt_len = len(render_messages(chat_model.tokenizer, [{"role": "user", "content": "hello"}]))
    c = chat_model.chat("hello", max_length=prompt_len + 6, do_sample=False)
    assert c == a  # max_length counts the prompt, as the official API does
    with pytest.raises(TypeError, match="num_beams"):
        chat_model.chat("hello", num_beams=2)
    with pytest.raises(ValueError, match="top_p"):
        chat_model.chat("hello", top_p=0)


def test_over_long_conversation_raises_by_default(chat_model):
    with pytest.raises(ContextLengthError, match="too many"):
        chat_model.chat("很长 " * WINDOW, max_new_tokens=4)


def long_history(n: int) -> list[dict]:
    history = [{"role": "system", "content": "You are a helpful assistant."}]
    for i in range(n):
        history += [{"role": "user", "content": f"Question number {i}: tell me about the number {i} please."},
                    {"role": "assistant", "metadata": "", "content": f"The number {i} is a fine number indeed."}]
    return history


def test_drop_oldest_drops_whole_exchanges_until_it_fits(chat_model):
    tok = chat_model.tokenizer
    history = long_history(12)
    query = "And the number 99?"
    assert len(render_messages(tok, history + [{"role": "user", "content": query}])) > WINDOW
    with pytest.raises(ContextLengthError):
        chat_model.chat(query, history, max_new_tokens=16)
    with pytest.warns(UserWarning, match="dropped"):
        response, new = chat_model.chat(query, history, truncate="drop_oldest", max_new_tokens=16, do_sample=False)
    kept = new[:-1]  # without the reply
    assert kept[0] == history[0]  # the system message stays
    assert kept[-1] == {"role": "user", "content": query}
    dropped = len(history) + 1 - len(kept)
    assert dropped > 0 and dropped % 2 == 0  # whole user + assistant exchanges
    assert kept[1:-1] == history[1 + dropped:]  # the newest exchanges, in order
    assert len(render_messages(tok, kept)) + 16 <= WINDOW
    assert len(render_messages(tok, history[:1] + history[dropped - 1:] + kept[-1:])) + 16 > WINDOW  # minimal


def test_drop_oldest_exchange_groups():
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "1"},
            {"role": "assistant", "content": "call"}, {"role": "observation", "content": "r"},
            {"role": "assistant", "content": "a"}, {"role": "user", "content": "2"}]
    assert drop_oldest_exchange(msgs) == [msgs[0], msgs[5]]
    assert drop_oldest_exchange([msgs[0], msgs[5]]) is None


def test_drop_oldest_cannot_shrink_a_single_huge_message(chat_model):
    with pytest.raises(ContextLengthError):
        chat_model.chat("很长 " * WINDOW, long_history(2), truncate="drop_oldest", max_new_tokens=4)


def scripted(text: str):
    """A stand-in for generate_stream that 'generates' `text`, a few characters per token."""
    def fake(model, tokenizer, prompt_ids, params, skip_special_tokens=False):
        for i in range(0, len(text), 3):
            yield Delta(text[i:i + 3], 100 + i)
        yield Delta("", None, "stop")
    return fake


TOOLS = [{"name": "get_weather", "description": "weather of a city",
          "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}}]
TOOL_SYSTEM = [{"role": "system", "content": "Answer the following questions as best as you can. You have access "
                "to the following tools:", "tools": TOOLS}]


def test_tool_call_reply_becomes_a_dict(chat_model, monkeypatch):
    monkeypatch.setattr(glmkit.chat, "generate_stream",
                        scripted("get_weather\n```python\ntool_call(location='北京')\n```"))
    response, history = chat_model.chat("北京天气怎么样", TOOL_SYSTEM)
    assert response == {"name": "get_weather", "parameters": {"location": "北京"}}
    assert history[-1]["role"] == "assistant" and history[-1]["metadata"] == "get_weather"
    items = list(chat_model.stream_chat("北京天气怎么样", TOOL_SYSTEM))
    assert items[-1] == (response, history)
    assert all(isinstance(r, dict) and r["name"] == "get_weather" for r, _ in items)  # no "get_wea" as text
    # Then the tool's result comes back as an observation, and the model answers in text.
    monkeypatch.setattr(glmkit.chat, "generate_stream", scripted("\n北京今天晴。"))
    answer, history = chat_model.chat('{"weather": "sunny"}', history, role="observation")
    assert answer == "北京今天晴。"
    assert [m["role"] for m in history] == ["system", "user", "assistant", "observation", "assistant"]


def test_malformed_tool_call_warns_instead_of_crashing(chat_model, monkeypatch):
    monkeypatch.setattr(glmkit.chat, "generate_stream", scripted("get_weather\n```python\nimport os\n```"))
    with pytest.warns(UserWarning, match="could not be parsed"):
        response, history = chat_model.chat("天气", TOOL_SYSTEM)
    assert response["name"] == "get_weather" and "import os" in response["content"]


def test_stream_chat_partials_of_a_scripted_reply(chat_model, monkeypatch):
    monkeypatch.setattr(glmkit.chat, "generate_stream", scripted("\nHello there, how are you today?"))
    items = list(chat_model.stream_chat("hi"))
    texts = [r for r, _ in items]
    assert len(texts) > 5 and texts[-1] == "Hello there, how are you today?"
    assert all(b.startswith(a) and a for a, b in zip(texts, texts[1:]))


def test_multi_turn_reply_returns_the_last_turn(chat_model, monkeypatch):
    monkeypatch.setattr(glmkit.chat, "generate_stream", scripted("\nLet me think.<|assistant|>\nThe answer is 2."))
    response, history = chat_model.chat("1+1?")
    assert response == "The answer is 2."
    assert [m["content"] for m in history[1:]] == ["Let me think.", "The answer is 2."]


def test_generate_raw_prompt(chat_model):
    tok = chat_model.tokenizer
    text = chat_model.generate("The capital of France is", max_new_tokens=8, do_sample=False)
    ids = [tok.token_id("[gMASK]"), tok.token_id("sop")] + tok.encode("The capital of France is")
    want = generate(chat_model.model, tok, ids, SamplingParams(temperature=0, max_new_tokens=8))
    assert isinstance(text, str) and text == want.text
    assert "".join(chat_model.stream_generate("The capital of France is", max_new_tokens=8, do_sample=False)) == text


def test_sampling_params_from_kwargs():
    p = sampling_params({"temperature": 0.8, "top_p": 0.8}, top_k=5)
    assert (p.temperature, p.top_p, p.top_k) == (0.8, 0.8, 5)
    assert sampling_params(prompt_tokens=10, max_length=15).max_new_tokens == 5
    with pytest.raises(ValueError, match="no room"):
        sampling_params(prompt_tokens=10, max_length=10)
