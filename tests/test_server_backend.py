"""The sequential backend, the per-step hooks (penalties, logprobs, constraints) and the constraints."""

from __future__ import annotations

import asyncio
import json
import math
import time

import pytest
import torch
from live_server import ScriptedModel, text_reply
from tiny import tiny_model

from glmkit.generate import generate
from glmkit.sampling import SamplingParams, apply_presence_frequency_penalty, token_logprobs
from glmkit.server.backend import SequentialBackend
from glmkit.server.constraints import JsonObject, JsonPrefix, OneOf
from glmkit.server.params import RequestParams, needed_features
from glmkit.server.vocab import Vocabulary


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


@pytest.fixture(scope="module")
def vocabulary(tok):
    return Vocabulary(tok)


def collect(backend, prompt, params):
    async def main():
        await backend.start()
        try:
            return [d async for d in backend.generate(prompt, params)]
        finally:
            await backend.stop()
    return asyncio.run(main())


def test_penalty_and_logprob_functions():
    logits = torch.tensor([[1.0, 2.0, 3.0, -1.0]])
    counts = torch.tensor([[0, 2, 1, 0]])
    out = apply_presence_frequency_penalty(logits, counts, torch.tensor([0.5]), torch.tensor([0.25]))
    assert torch.allclose(out, torch.tensor([[1.0, 2.0 - 0.5 - 0.5, 3.0 - 0.25 - 0.5, -1.0]]))
    chosen, ids, values = token_logprobs(logits, torch.tensor([1]), top_n=2, vocab_size=3)
    expected = logits[0, :3].log_softmax(-1)
    assert math.isclose(float(chosen[0]), float(expected[1]), rel_tol=1e-6)
    assert ids.tolist() == [[2, 1]] and torch.allclose(values[0], expected[[2, 1]])


def test_the_backend_gives_what_the_naive_generator_gives(model, tok):
    prompt = tok.apply_chat_template([{"role": "user", "content": "你好"}])
    params = SamplingParams(temperature=0, max_new_tokens=12)
    deltas = collect(SequentialBackend(model, tok), prompt, params)
    expected = generate(model, tok, prompt, params)
    assert [d.token_id for d in deltas if d.token_id is not None] == expected.token_ids
    assert "".join(d.text for d in deltas) == expected.text and deltas[-1].finish_reason == expected.finish_reason


def test_logprobs_are_the_models_and_greedy_picks_the_top_one(model, tok):
    prompt = tok.apply_chat_template([{"role": "user", "content": "hello"}])
    params = RequestParams(temperature=0, max_new_tokens=6, logprobs=3)
    deltas = [d for d in collect(SequentialBackend(model, tok), prompt, params) if d.token_id is not None]
    assert len(deltas) == 6
    with torch.inference_mode():  # the first token's logprob, computed directly
        logits = model(torch.tensor([prompt]))[0, -1, :tok.vocab_size]
    first = deltas[0]
    assert math.isclose(first.logprob, float(logits.log_softmax(-1)[first.token_id]), abs_tol=1e-4)
    for d in deltas:
        assert len(d.top_logprobs) == 3 and d.top_logprobs[0][0] == d.token_id
        assert math.isclose(d.top_logprobs[0][1], d.logprob, abs_tol=1e-6)


class FlatModel:
    """Logits that prefer token 100 slightly over 101 over 102, whatever came before."""

    def __init__(self, vocab=65024):
        self.config = type("C", (), {"seq_length": 64, "padded_vocab_size": vocab})()
        self.device = torch.device("cpu")

    def new_kv_cache(self, batch_size, capacity):
        return None

    def __call__(self, input_ids, **kwargs):
        logits = torch.zeros(1, 1, self.config.padded_vocab_size)
        logits[0, 0, 100:103] = torch.tensor([10.0, 9.5, 9.0])
        return logits


def test_presence_and_frequency_penalties_change_the_choice(tok):
    def tokens(**penalties):
        params = RequestParams(temperature=0, max_new_tokens=6, stop_token_ids=[], **penalties)
        return [d.token_id for d in collect(SequentialBackend(FlatModel(), tok), [1, 2], params) if d.token_id]

    assert tokens() == [100] * 6
    # presence 1.2, once per used token: 100 -> 8.8, 101 -> 8.3, 102 -> 7.8; then 100 stays best
    assert tokens(presence_penalty=1.2) == [100, 101, 102, 100, 100, 100]
    # frequency 0.3 per use: 100 10 -> 9.7 -> 9.4; 101 9.5 -> 9.2; 100 9.4 -> 9.1; 101 9.2 -> 8.9; 100 9.1
    assert tokens(frequency_penalty=0.3) == [100, 100, 101, 100, 101, 100]


def test_needed_features():
    assert needed_features(SamplingParams()) == set()
    assert needed_features(RequestParams(presence_penalty=1, logprobs=0, constraint=OneOf([[1]]))) == {
        "penalties", "logprobs", "constraints"}


def test_one_of_forces_a_sequence_then_frees_the_reply():
    constraint = OneOf([[5, 6, 7], [5, 9]])
    logits = torch.zeros(20)
    constraint.apply(logits, [])
    assert torch.isfinite(logits).nonzero().flatten().tolist() == [5]
    logits = torch.zeros(20)
    constraint.apply(logits, [5])
    assert torch.isfinite(logits).nonzero().flatten().tolist() == [6, 9]
    logits = torch.zeros(20)
    constraint.apply(logits, [5, 9])
    assert torch.isfinite(logits).all()


def test_a_named_tool_line_is_forced_through_the_backend(model, tok):
    names = [tok.encode("get_weather\n"), tok.encode("get_time\n")]
    params = RequestParams(temperature=1.0, seed=4, max_new_tokens=8, constraint=OneOf(names))
    deltas = collect(SequentialBackend(model, tok), tok.apply_chat_template([{"role": "user", "content": "x"}]), params)
    ids = [d.token_id for d in deltas if d.token_id is not None]
    assert any(ids[:len(n)] == n for n in names)


def test_json_prefix_recogniser():
    for text in ['{}', '{"a": [1, -2.5e3, true, null, {"b": "x\\u00e9\\n"}]}', ' {"k" : "v" }']:
        state = JsonPrefix().fed(text)
        assert state is not None and state.complete and json.loads(text) is not None
        assert all(JsonPrefix().fed(text[:k]) is not None for k in range(len(text)))
    for text in ['[]', '"x"', '{a: 1}', '{"a": 01}', '{"a": 1,}', '{"a": "x\ny"}', '{} x', '{"a": 1.}', '{"a" 1}']:
        state = JsonPrefix().fed(text)
        assert state is None or not state.complete, text
    assert JsonPrefix().fed("{" + " " * 33) is None  # runs of blanks are capped


def test_json_object_constraint_keeps_every_prefix_valid_and_ends_after_the_object(tok, vocabulary):
    torch.manual_seed(0)
    constraint = JsonObject(vocabulary)
    generated, text = [], ""
    for _ in range(300):
        logits = torch.randn(65024)
        # Nudge towards closing so the object ends within the test: favour '}' and '"' pieces a little.
        for piece in ('}', '"', ':', '1', ','):
            logits[tok.encode(piece)[-1]] += 3.0
        constraint.apply(logits, generated)
        token = int(logits.argmax())
        if token == tok.eos_id:
            break
        generated.append(token)
        text = tok.decode(generated)
        assert JsonPrefix().fed(text) is not None, text
    assert token == tok.eos_id, f"no end after 300 steps: {text!r}"
    assert isinstance(json.loads(text), dict)


def test_cancelling_frees_the_worker_and_the_queue(tok):
    model = ScriptedModel(tok, lambda prompt: text_reply(tok, "long " * 400), delay=0.005)
    backend = SequentialBackend(model, tok)
    params = SamplingParams(temperature=0, max_new_tokens=400)

    async def main():
        await backend.start()
        first = backend.generate([1, 2, 3], params)
        second = backend.generate([4, 5, 6], params)
        assert (await first.__anext__()).token_id is not None
        task = asyncio.ensure_future(second.__anext__())  # queued behind the first
        await asyncio.sleep(0.05)
        assert backend.stats()["running"] == 1 and backend.stats()["waiting"] == 1
        await first.aclose()  # the first client leaves: its generation stops, the second starts
        assert (await asyncio.wait_for(task, 10)).token_id is not None
        await second.aclose()
        calls = model.calls
        await asyncio.sleep(0.1)
        stats = backend.stats()
        await backend.stop()
        return calls, model.calls, stats

    started = time.monotonic()
    calls_at_close, calls_later, stats = asyncio.run(main())
    assert time.monotonic() - started < 5  # not 800 tokens at 5 ms each
    assert calls_later - calls_at_close <= 1 and stats["running"] == 0 and stats["kv_blocks_used"] == 0
