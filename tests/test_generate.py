"""The naive generator: cache == no cache, stop ids, stop strings, length, context errors, batch oracle.

Also home of `make_tiny_checkpoint`, the tiny random checkpoint that the chat API and CLI tests load.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny import make_tiny_checkpoint, real_tokenizer, tiny_model  # noqa: F401 (re-exported for old imports)

from glmkit.generate import (
    GREEDY,
    ContextLengthError,
    StopStrings,
    generate,
    generate_greedy_batch,
    generate_stream,
)
from glmkit.sampling import SamplingParams


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def prompt(tok):
    return [tok.token_id("[gMASK]"), tok.token_id("sop")] + tok.encode("Hello, how are you? 你好")


def no_cache_greedy(model, tok, prompt_ids, n):
    """Greedy decoding recomputing the whole forward each step, no cache."""
    ids = list(prompt_ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids], device=model.device))[0, -1, :tok.vocab_size]
            token = int(logits.argmax())
            if token in tok.stop_ids:
                break
            out.append(token)
            ids.append(token)
    return out


@pytest.mark.parametrize("prefix", [None, 3], ids=["plain", "p-tuning-prefix"])
def test_greedy_with_cache_equals_full_recompute(tok, prompt, prefix):
    m = tiny_model(pre_seq_len=prefix) if prefix else tiny_model()
    if prefix:  # give the prefix non-trivial keys/values
        with torch.no_grad():
            m.transformer.prefix_encoder.embedding.weight.normal_()
    result = generate(m, tok, prompt, SamplingParams(temperature=0, max_new_tokens=16))
    assert result.token_ids == no_cache_greedy(m, tok, prompt, 16)
    assert len(result.token_ids) == 16 and result.finish_reason == "length"
    assert result.text == tok.decode(result.token_ids)
    assert result.prompt_tokens == len(prompt)


def test_stream_deltas_add_up(model, tok, prompt):
    deltas = list(generate_stream(model, tok, prompt, SamplingParams(temperature=0, max_new_tokens=12)))
    assert [d.finish_reason for d in deltas] == [None] * 12 + ["length"]
    assert deltas[-1].token_id is None
    ids = [d.token_id for d in deltas[:-1]]
    assert "".join(d.text for d in deltas) == tok.decode(ids)


def test_max_new_tokens_means_length(model, tok, prompt):
    result = generate(model, tok, prompt, SamplingParams(temperature=0, max_new_tokens=5))
    assert len(result.token_ids) == 5 and result.finish_reason == "length"


def test_stops_on_stop_ids(model, tok, prompt):
    free = generate(model, tok, prompt, SamplingParams(temperature=0, max_new_tokens=10)).token_ids
    third = free[2]
    result = generate(model, tok, prompt, SamplingParams(temperature=0, max_new_tokens=10, stop_token_ids=[third]))
    assert result.finish_reason == "stop"
    assert result.token_ids == free[:free.index(third)]  # the stop id itself is not part of the output
    assert third not in result.token_ids


class ForceTokenAt:
    """The model, except that at decode step `step` the logits force `token`."""

    def __init__(self, model, token: int, step: int):
        self.model, self.token, self.step, self.calls = model, token, step, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs):
        logits = self.model(*args, **kwargs)
        if self.calls == self.step:
            logits[..., self.token] = 1e4
        self.calls += 1
        return logits


@pytest.mark.parametrize("name", ["</s>", "<|user|>", "<|observation|>"])
def test_default_stop_ids_are_the_tokenizers(model, tok, prompt, name):
    token = tok.eos_id if name == "</s>" else tok.token_id(name)
    free = generate(model, tok, prompt, SamplingParams(temperature=0, max_new_tokens=10))
    result = generate(ForceTokenAt(model, token, step=3), tok, prompt, SamplingParams(temperature=0, max_new_tokens=10))
    assert result.token_ids == free.token_ids[:3] and result.finish_reason == "stop"
    assert result.text == tok.decode(free.token_ids[:3])


def test_stop_string_split_across_tokens_is_not_emitted(model, tok, prompt):
    free = generate(model, tok, prompt, SamplingParams(temperature=0, max_new_tokens=30))
    pieces = [tok.decode(free.token_ids[:i]) for i in range(len(free.token_ids) + 1)]
    # A stop string made of the end of one token's text and the start of the next one's.
    i = next(i for i in range(5, 29) if len(pieces[i]) > len(pieces[i - 1]) and len(pieces[i + 1]) > len(pieces[i]))
    stop = pieces[i][-1] + pieces[i + 1][len(pieces[i])]
    expected = free.text[:free.text.find(stop)]

    deltas = list(generate_stream(model, tok, prompt, SamplingParams(temperature=0, max_new_tokens=30, stop=[stop])))
    text = "".join(d.text for d in deltas)
    assert text == expected
    assert deltas[-1].finish_reason == "stop"
    assert not any(stop in d.text for d in deltas)
    assert len(deltas) - 1 <= i + 1  # generation ended at the token that completed the stop string


def test_stop_strings_hold_back_only_possible_starts():
    s = StopStrings(["Hello", "xyz"])
    assert s.push("abc") == ("abc", False)  # nothing here can start a stop string
    assert s.push("He") == ("", False)  # could become "Hello"
    assert s.push("lp") == ("Help", False)  # it did not
    assert s.push("x") == ("", False)
    assert s.push("y!") == ("xy!", False)
    assert s.push("say Hel") == ("say ", False)
    assert s.push("lo there") == ("", True)
    s = StopStrings(["end"])
    assert s.push("the en") == ("the ", False)
    assert s.flush() == "en"  # at the end of the text, held text is released


def test_no_stop_string_in_text_means_length(model, tok, prompt):
    result = generate(model, tok, prompt, SamplingParams(temperature=0, max_new_tokens=8, stop=["\x00never"]))
    free = generate(model, tok, prompt, SamplingParams(temperature=0, max_new_tokens=8))
    assert result == free


def test_over_long_prompt_says_by_how_much(model, tok):
    window = model.config.seq_length
    too_long = [tok.token_id("[gMASK]"), tok.token_id("sop")] + [30910] * (window + 40)
    with pytest.raises(ContextLengthError) as info:
        generate(model, tok, too_long, GREEDY)
    assert info.value.excess == len(too_long) - window + 1 == 43
    assert "43 too many" in str(info.value) and str(window) in str(info.value)
    # A prompt that leaves room for one token is fine, and stops at the window.
    just_fits = too_long[:window - 1]
    result = generate(model, tok, just_fits, SamplingParams(temperature=0, max_new_tokens=100, stop_token_ids=[]))
    assert len(result.token_ids) == 1 and result.finish_reason == "length"


def test_seed_reproducible_sampling(model, tok, prompt):
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=100, seed=1234, max_new_tokens=16)
    a = generate(model, tok, prompt, params)
    b = generate(model, tok, prompt, params)
    c = generate(model, tok, prompt, dataclasses.replace(params, seed=4321))
    assert a == b
    assert a.token_ids != c.token_ids


def test_repetition_penalty_avoids_seen_tokens(model, tok, prompt):
    params = SamplingParams(temperature=0, repetition_penalty=1000.0, max_new_tokens=30)
    ids = generate(model, tok, prompt, params).token_ids
    assert len(set(ids)) == len(ids) and not set(ids) & set(prompt)


def test_padded_vocab_never_generated(tok, prompt):
    m = tiny_model()
    with torch.no_grad():
        m.transformer.output_layer.weight[tok.vocab_size:] += 10.0  # padding rows would win otherwise
    for params in (GREEDY, SamplingParams(temperature=2.0, seed=0)):
        ids = generate(m, tok, prompt, dataclasses.replace(params, max_new_tokens=10)).token_ids
        assert ids and max(ids) < tok.vocab_size


def test_batched_greedy_equals_one_at_a_time(model, tok, prompt):
    numbers = [tok.token_id("[gMASK]"), tok.token_id("sop")] + tok.encode("一二三四五六七八九十")
    prompts = [prompt, prompt[:4], numbers]
    batch = generate_greedy_batch(model, tok, prompts, max_new_tokens=12)
    for p, got in zip(prompts, batch):
        want = generate(model, tok, p, SamplingParams(temperature=0, max_new_tokens=12))
        assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason
    # Rows that stop early are padded while the others go on.
    third = batch[0].token_ids[2]
    stopped = generate_greedy_batch(model, tok, prompts, max_new_tokens=12, stop_token_ids=[third])
    assert stopped[0].token_ids == batch[0].token_ids[:2] and stopped[0].finish_reason == "stop"
    for p, got in zip(prompts[1:], stopped[1:]):
        want = generate(model, tok, p, SamplingParams(temperature=0, max_new_tokens=12, stop_token_ids=[third]))
        assert got.token_ids == want.token_ids


def test_empty_prompt_rejected(model, tok):
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, tok, [], GREEDY)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_cache_equals_recompute_and_seeds_reproduce(tok, prompt):
    m = tiny_model().cuda()
    result = generate(m, tok, prompt, SamplingParams(temperature=0, max_new_tokens=16))
    assert result.token_ids == no_cache_greedy(m, tok, prompt, 16)
    params = SamplingParams(temperature=1.0, top_p=0.9, repetition_penalty=1.2, seed=7, max_new_tokens=16)
    assert generate(m, tok, prompt, params) == generate(m, tok, prompt, params)
    batch = generate_greedy_batch(m, tok, [prompt, prompt[:5]], max_new_tokens=8)
    assert batch[1].token_ids == generate(m, tok, prompt[:5], SamplingParams(temperature=0, max_new_tokens=8)).token_ids
