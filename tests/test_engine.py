"""The continuous-batching engine against the single-request generator, on a tiny random model.

The oracle is `glmkit.generate`: greedy output of the engine, batched, paged, prefix-shared or
preempted, equals one-request-at-a-time generation token for token and delta for delta.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch
from tiny import real_tokenizer, tiny_model

from glmkit import cpu_kernels
from glmkit.engine import AsyncEngine, EngineStoppedError, LLMEngine
from glmkit.engine import runner as runner_module
from glmkit.generate import GREEDY, ContextLengthError, generate, generate_stream
from glmkit.sampling import SamplingParams

TEXTS = ["Hello, how are you?", "你好", "Tell me a story about a dragon and a knight", "1 2 3 4 5 6 7 8 9 10 11 12",
         "x", "The quick brown fox jumps over the lazy dog. " * 3, "写一首关于春天的诗", "What is 2+2?"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # A tiny model's ops are too small for two threads to pay off; on a shared machine they cost.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    return real_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def prompt_ids(tok, text: str) -> list[int]:
    return [tok.token_id("[gMASK]"), tok.token_id("sop")] + tok.encode(text)


@pytest.fixture(scope="module")
def prompts(tok):
    return [prompt_ids(tok, t) for t in TEXTS]


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_new_tokens=n, **kw)


def run_streams(engine: LLMEngine, requests: list[tuple[list[int], SamplingParams]]) -> list[list]:
    """Every request's deltas, all added at once."""
    ids = [engine.add_request(p, sp) for p, sp in requests]
    deltas = {i: [] for i in ids}
    while engine.has_unfinished():
        for request_id, delta in engine.step():
            deltas[request_id].append(delta)
    return [deltas[i] for i in ids]


def test_model_runs_packed_sequences_with_an_explicit_mask(model):
    """What the engine's packed prefill asks of the model: two sequences in one row, each token seeing
    only its own sequence's keys, logits at each one's last token."""
    a, b = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[9, 10, 11]])
    which = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2]])
    visible = (which[:, None] == which[None, :]) & (torch.arange(7)[None, :] <= torch.arange(7)[:, None])
    with torch.no_grad():
        got = model(torch.cat((a, b), dim=1), position_ids=positions, attention_mask=visible[None, None],
                    logits_at=torch.tensor([3, 6]))
        torch.testing.assert_close(got[0], torch.stack((model(a)[0, -1], model(b)[0, -1])), rtol=1e-4, atol=1e-4)
        with pytest.raises(ValueError, match="needs position_ids"):
            model(torch.cat((a, b), dim=1), attention_mask=visible[None, None])
        with pytest.raises(ValueError, match="attention_mask has shape"):
            model(torch.cat((a, b), dim=1), position_ids=positions, attention_mask=visible[None, None, :, :6])


def test_16_concurrent_greedy_requests_equal_16_single_runs(model, tok, prompts):
    third = generate(model, tok, prompts[2], greedy(8)).token_ids[2]
    free = generate(model, tok, prompts[0], greedy(30))
    stop = free.text[10:12]  # a stop string somewhere in the reply
    requests = [(prompts[i % len(prompts)], greedy(3 + 5 * i % 29)) for i in range(16)]
    requests[3] = (prompts[2], greedy(8, stop_token_ids=[third]))
    requests[5] = (prompts[0], greedy(30, stop=[stop]))
    requests[6] = (prompts[1][:3], greedy(12))
    engine = LLMEngine(model, tok)
    got = run_streams(engine, requests)
    for (p, params), deltas in zip(requests, got):
        assert deltas == list(generate_stream(model, tok, p, params))
    assert got[3][-1].finish_reason == "stop" and got[5][-1].finish_reason == "stop"
    assert engine.stats()["kv_blocks_used"] == 0 and engine.stats()["running"] == 0


def test_requests_arriving_while_others_run(model, tok, prompts):
    engine = LLMEngine(model, tok, block_size=4)
    late = {2: prompts[3], 5: prompts[4], 6: prompts[5]}
    ids = {engine.add_request(prompts[0], greedy(20)): prompts[0], engine.add_request(prompts[1], greedy(9)): prompts[1]}
    tokens: dict[str, list[int]] = {}
    step = 0
    while engine.has_unfinished() or step <= max(late):
        if step in late:
            ids[engine.add_request(late[step], greedy(11))] = late[step]
        step += 1
        for request_id, delta in engine.step():
            if delta.token_id is not None:
                tokens.setdefault(request_id, []).append(delta.token_id)
    for request_id, p in ids.items():
        n = 20 if p is prompts[0] else 9 if p is prompts[1] else 11
        assert tokens[request_id] == generate(model, tok, p, greedy(n)).token_ids


def test_prefix_reuse_is_hit_and_changes_nothing(model, tok):
    system = prompt_ids(tok, "You are a helpful assistant who answers in one short sentence. " * 4)
    requests = [(system + tok.encode(q), greedy(10)) for q in ("Why is the sky blue?", "Name a fruit.", "Hi")]
    engine = LLMEngine(model, tok, block_size=8)
    got = engine.generate([p for p, _ in requests], [sp for _, sp in requests])
    shared = len(system) // 8 * 8
    assert engine.block_manager.hit_tokens >= 2 * shared  # the 2nd and 3rd reuse the 1st one's blocks
    for (p, sp), completion in zip(requests, got):
        assert completion == generate(model, tok, p, sp)
    # Later, the blocks are free but still hold the prefix: a new request reuses them.
    hits = engine.block_manager.hit_tokens
    again = system + tok.encode("And the sea?")
    assert engine.generate([again], greedy(10))[0] == generate(model, tok, again, greedy(10))
    assert engine.block_manager.hit_tokens - hits >= shared
    assert engine.stats()["prefix_cache_hit_tokens"] == engine.block_manager.hit_tokens


def test_prompts_with_equal_new_token_counts_share_rows(model, tok):
    """Prompts of one length run as plain rows (no mask); equal new counts over different cached
    lengths run as left-padded rows with a mask. Both equal single runs."""
    start = [tok.token_id("[gMASK]"), tok.token_id("sop")]
    texts = ("apples and pears are sweet fruit", "the sky is very blue today", "一二三四五六七八九十")
    same = [start + tok.encode(t)[:6] for t in texts]
    assert {len(p) for p in same} == {8}
    engine = LLMEngine(model, tok, block_size=4)
    for p, got in zip(same, engine.generate(same, greedy(9))):
        assert got == generate(model, tok, p, greedy(9))
    # same[0]'s first 8 tokens are cached now: 4 new tokens after 8 cached, beside 4 new of a new prompt.
    pair = [same[0][:8] + [30910, 31123, 54622, 55268], start + [30910, 31123]]
    hits = engine.block_manager.hit_tokens
    for p, got in zip(pair, engine.generate(pair, greedy(9))):
        assert got == generate(model, tok, p, greedy(9))
    assert engine.block_manager.hit_tokens - hits == 8


@pytest.mark.parametrize("budget, call_tokens", [(5, 256), (12, 4)])
def test_chunked_prompts_and_mixed_steps_equal_single_runs(model, tok, prompts, monkeypatch, budget, call_tokens):
    """A few prompt tokens per step: prompts run in chunks beside the others' decoding, packed into
    several model calls when PACKED_CALL_TOKENS is small; a shared prefix is reused across chunks."""
    monkeypatch.setattr(runner_module, "PACKED_CALL_TOKENS", call_tokens)
    system = prompt_ids(tok, "You are a helpful assistant. " * 3)
    late = {1: system + tok.encode("Why?"), 3: prompts[5], 4: system + tok.encode("Name a fruit.")}
    engine = LLMEngine(model, tok, block_size=4, max_num_batched_tokens=budget)
    steps = []  # per step, per model call, the tokens each sequence fed
    runner = engine.runner
    real_forward, real_call = runner.forward, runner._forward_call
    monkeypatch.setattr(runner, "forward", lambda seqs: steps.append([]) or real_forward(seqs))
    monkeypatch.setattr(runner, "_forward_call", lambda seqs: steps[-1].append(
        [s.num_scheduled_tokens for s in seqs]) or real_call(seqs))
    ids = {engine.add_request(prompts[0], greedy(25)): prompts[0], engine.add_request(prompts[2], greedy(14)): prompts[2]}
    tokens: dict[str, list[int]] = {}
    step = 0
    while engine.has_unfinished() or step <= max(late):
        if step in late:
            ids[engine.add_request(late[step], greedy(6))] = late[step]
        step += 1
        for request_id, delta in engine.step():
            if delta.token_id is not None:
                tokens.setdefault(request_id, []).append(delta.token_id)
    for request_id, p in ids.items():
        n = 25 if p is prompts[0] else 14 if p is prompts[2] else 6
        assert tokens[request_id] == generate(model, tok, p, greedy(n)).token_ids
    assert engine.block_manager.hit_tokens >= len(system) // 4 * 4
    # Decoding went on beside prompt chunks, in its own call first; no step went past the budget.
    assert any(calls[0] == [1] * len(calls[0]) and len(calls) > 1 for calls in steps)
    assert max(sum(n for call in calls for n in call if n > 1) for calls in steps) <= budget
    prompt_calls = [call for calls in steps for call in calls if max(call) > 1]
    assert all(len(call) == 1 or sum(call) <= call_tokens for call in prompt_calls)
    if call_tokens < budget:  # prompts of one step were split over several calls
        assert any(sum(max(call) > 1 for call in calls) > 1 for calls in steps)


def test_prompts_attend_only_their_own_keys_and_decoding_reads_the_pool_in_place(model, tok, prompts, monkeypatch):
    """A packed call's attention runs per sequence over that sequence's keys alone (a prompt after a cached
    prefix included), not over every key of the call; decode steps read the paged pool through the slots
    (the compiled kernel) instead of a gathered copy."""
    gathered = []  # the (rows, keys) of every gather of keys from the pool
    real_gather = runner_module._StepCache._gather
    monkeypatch.setattr(runner_module._StepCache, "_gather", staticmethod(
        lambda k, v, slots: gathered.append(tuple(slots.shape)) or real_gather(k, v, slots)))
    system = prompt_ids(tok, "You are a helpful assistant. " * 3)
    first = [system + tok.encode("Hi")]
    later = [prompts[0], system + tok.encode("Name a fruit."), prompts[2], prompts[3]]
    assert len({len(p) for p in later}) > 1  # lengths differ: one packed call
    engine = LLMEngine(model, tok, block_size=4)
    got = run_streams(engine, [(p, greedy(5)) for p in first])
    gathered.clear()
    got += run_streams(engine, [(p, greedy(5)) for p in later])
    for p, deltas in zip(first + later, got):
        assert deltas == list(generate_stream(model, tok, p, greedy(5)))
    hit = len(system) // 4 * 4  # the second system prompt's cached blocks: its keys, not fed again
    keys = sorted(len(p) for p in later)
    prompt_gathers = sorted([(1, n) for n in keys] * model.config.num_layers)
    if cpu_kernels.available():
        assert sorted(gathered) == prompt_gathers
        assert engine.block_manager.hit_tokens >= hit
    else:  # torch's attention: decode steps gather their keys too
        assert set(prompt_gathers) <= set(gathered)


def test_a_step_where_one_of_equal_rows_ends_its_prompt_and_the_other_does_not(model, tok):
    """Prompts of 6 and 12 tokens with 12 prompt tokens per step: both feed 6 in the first step (one
    row call), which ends the first prompt (it samples) but not the second (it waits a step)."""
    start = [tok.token_id("[gMASK]"), tok.token_id("sop")]
    text = tok.encode("The quick brown fox jumps over the lazy dog. " * 2)
    short, long = start + text[:4], start + text[4:14]
    assert (len(short), len(long)) == (6, 12)
    engine = LLMEngine(model, tok, block_size=4, max_num_batched_tokens=12)
    a, b = engine.add_request(short, greedy(5)), engine.add_request(long, greedy(5))
    first = engine.step()
    assert [request_id for request_id, _ in first] == [a]
    got = {a: [first[0][1].token_id], b: []}
    while engine.has_unfinished():
        for request_id, delta in engine.step():
            if delta.token_id is not None:
                got[request_id].append(delta.token_id)
    assert got == {a: generate(model, tok, short, greedy(5)).token_ids, b: generate(model, tok, long, greedy(5)).token_ids}


def test_preemption_under_a_tiny_cache_gives_equal_outputs(model, tok, prompts):
    requests = [(prompts[i % len(prompts)], greedy(12 + i)) for i in range(10)]
    need = max(len(p) + sp.max_new_tokens for p, sp in requests)
    engine = LLMEngine(model, tok, num_blocks=-(-need // 4) + 2, block_size=4)
    got = engine.generate([p for p, _ in requests], [sp for _, sp in requests])
    assert engine.stats()["preemptions"] > 0
    for (p, sp), completion in zip(requests, got):
        assert completion == generate(model, tok, p, sp)
    assert engine.stats()["kv_blocks_used"] == 0


def test_abort_frees_the_blocks_at_once(model, tok, prompts):
    engine = LLMEngine(model, tok, block_size=4)
    a = engine.add_request(prompts[2], greedy(50))
    b = engine.add_request(prompts[5], greedy(50))
    for _ in range(3):
        engine.step()
    held_by_a = engine.block_manager.blocks_for(len(prompts[2]) + 2)  # its prompt and 2 tokens fed back
    used = engine.stats()["kv_blocks_used"]
    assert engine.abort(a) and not engine.abort(a)
    assert engine.stats()["kv_blocks_used"] == used - held_by_a
    assert engine.stats()["running"] == 1
    waiting = engine.add_request(prompts[0], greedy(5))
    assert engine.abort(waiting)
    tokens = [d.token_id for _ in range(60) for rid, d in engine.step() if rid == b and d.token_id is not None]
    assert len(tokens) == 50 - 3 and engine.stats()["kv_blocks_used"] == 0


def test_seeded_sampling_is_reproducible_whatever_the_batch(model, tok, prompts):
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_new_tokens=16)
    alone = LLMEngine(model, tok).generate([prompts[0]], params)[0]
    assert alone == generate(model, tok, prompts[0], params)
    mates = [SamplingParams(temperature=0.7, seed=i, max_new_tokens=5 + i) for i in range(5)] + [greedy(9)]
    mates.append(SamplingParams(temperature=1.3, repetition_penalty=1.2, max_new_tokens=7))  # unseeded
    crowd = LLMEngine(model, tok, block_size=4).generate(prompts[1:] + [prompts[0]], mates + [params])
    assert crowd[-1] == alone
    other_seed = LLMEngine(model, tok).generate([prompts[0]], dataclasses.replace(params, seed=4321))[0]
    assert other_seed.token_ids != alone.token_ids


def test_repetition_penalty_rows_equal_single_runs(model, tok, prompts):
    params = [greedy(20, repetition_penalty=1000.0), greedy(20), greedy(15, repetition_penalty=0.5)]
    got = LLMEngine(model, tok).generate(prompts[:3], params)
    for p, sp, completion in zip(prompts, params, got):
        assert completion == generate(model, tok, p, sp)


@pytest.mark.parametrize("budget", [512, 5])
def test_p_tuning_prefix_model(tok, prompts, budget):
    m = tiny_model(pre_seq_len=3)
    with torch.no_grad():
        m.transformer.prefix_encoder.embedding.weight.normal_()
    got = LLMEngine(m, tok, block_size=4, max_num_batched_tokens=budget).generate(prompts[:4], greedy(10))
    for p, completion in zip(prompts, got):
        assert completion == generate(m, tok, p, greedy(10))


def test_bad_requests_are_refused_with_the_reason(model, tok, prompts):
    engine = LLMEngine(model, tok, num_blocks=8, block_size=4)
    with pytest.raises(ValueError, match="empty prompt"):
        engine.add_request([], GREEDY)
    with pytest.raises(ValueError, match="out of range"):
        engine.add_request([1, 10**6], GREEDY)
    with pytest.raises(ContextLengthError, match="too many"):
        engine.add_request([5] * model.config.seq_length, GREEDY)
    with pytest.raises(ValueError, match="more than the whole KV cache holds"):
        engine.add_request(prompts[0], greedy(40))  # 32 tokens of cache, and no max: the whole window
    with pytest.raises(TypeError, match="SamplingParams"):
        engine.add_request(prompts[0], {"temperature": 0})
    engine.add_request(prompts[0], greedy(4), request_id="x")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request(prompts[1], greedy(4), request_id="x")
    assert engine.stats()["waiting"] == 1  # refused requests left nothing behind


# ---- AsyncEngine ---------------------------------------------------------------------------------

def test_async_engine_streams_concurrent_requests(model, tok, prompts):
    requests = [(prompts[i % len(prompts)], greedy(4 + 3 * i)) for i in range(6)]

    async def main():
        engine = AsyncEngine(model, tok, max_num_seqs=4, block_size=8)
        await engine.start()

        async def collect(p, sp):
            return [d async for d in engine.generate(p, sp)]

        results = await asyncio.gather(*(collect(p, sp) for p, sp in requests))
        stats = engine.stats()
        await engine.stop()
        return results, stats

    results, stats = asyncio.run(main())
    for (p, sp), deltas in zip(requests, results):
        assert deltas == list(generate_stream(model, tok, p, sp))
    assert stats["running"] == stats["waiting"] == stats["kv_blocks_used"] == 0
    assert stats["prompt_tokens"] == sum(len(p) for p, _ in requests)
    assert stats["generated_tokens"] == sum(len(d) - 1 for d in results)
    assert set(stats) >= {"running", "waiting", "kv_blocks_total", "kv_blocks_used", "prompt_tokens",
                          "generated_tokens"}


def test_async_consumer_that_leaves_frees_its_blocks(model, tok, prompts):
    async def main():
        engine = AsyncEngine(model, tok, block_size=4)
        stream = engine.generate(prompts[2], greedy(400))
        other = asyncio.create_task(_collect(engine.generate(prompts[0], greedy(30))))
        async for delta in stream:
            if delta.token_id is not None:
                break
        assert engine.stats()["kv_blocks_used"] > 0
        await stream.aclose()  # what a disconnected client does
        # A task cancelled mid-stream aborts its request too.
        cancelled = asyncio.create_task(_collect(engine.generate(prompts[3], greedy(400))))
        await asyncio.sleep(0.05)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        rest = await other
        for _ in range(200):
            if engine.stats()["kv_blocks_used"] == 0 and engine.stats()["running"] == 0:
                break
            await asyncio.sleep(0.01)
        stats = engine.stats()
        await engine.stop()
        return rest, stats

    rest, stats = asyncio.run(main())
    assert stats["kv_blocks_used"] == 0 and stats["running"] == stats["waiting"] == 0
    assert [d.token_id for d in rest[:-1]] == generate(model, tok, prompts[0], greedy(30)).token_ids


def test_async_engine_survives_a_failing_step(model, tok, prompts):
    """A step that raises fails the requests in flight (they hear why) and nothing else: the engine
    serves the next request, and blocks registered for the failed step are not reused unfilled."""
    prompt = prompts[5]  # several full blocks of 4: a prefix the failed prefill registered

    async def main():
        engine = AsyncEngine(model, tok, block_size=4)
        runner, calls = engine.engine.runner, []
        real_forward = runner.forward

        def failing_once(seqs):
            calls.append(len(seqs))
            if len(calls) == 1:
                raise RuntimeError("out of memory, say")
            return real_forward(seqs)

        runner.forward = failing_once
        with pytest.raises(EngineStoppedError, match="out of memory, say"):
            await _collect(engine.generate(prompt, greedy(10)))
        after = await _collect(engine.generate(prompt, greedy(10)))
        stats = engine.stats()
        await engine.stop()
        return after, stats

    after, stats = asyncio.run(main())
    assert [d.token_id for d in after[:-1]] == generate(model, tok, prompt, greedy(10)).token_ids
    assert stats["kv_blocks_used"] == 0 and stats["prefix_cache_hit_tokens"] == 0


async def _collect(stream):
    return [d async for d in stream]


def test_async_bad_request_raises_at_first_iteration(model, tok):
    async def main():
        engine = AsyncEngine(model, tok)
        with pytest.raises(ContextLengthError):
            engine.validate([5] * model.config.seq_length, GREEDY)
        with pytest.raises(ContextLengthError):
            await _collect(engine.generate([5] * model.config.seq_length, GREEDY))
        await engine.stop()

    asyncio.run(main())


def test_server_wishes_equal_the_servers_exact_path(model, tok, prompts):
    """OpenAI penalties, a constraint and logprobs, batched, against the server's one-request backend."""
    from glmkit.server.backend import SequentialBackend
    from glmkit.server.constraints import OneOf
    from glmkit.server.params import RequestParams

    def cases():  # fresh constraint objects for each run
        return [RequestParams(temperature=0, max_new_tokens=12, frequency_penalty=-2.0),
                RequestParams(temperature=0, max_new_tokens=12, presence_penalty=-1.5, logprobs=3),
                RequestParams(temperature=0, max_new_tokens=10, constraint=OneOf([[5, 6, 7], [8, 9]])),
                RequestParams(temperature=0.8, seed=3, max_new_tokens=10, logprobs=0, frequency_penalty=0.5),
                greedy(10)]

    async def run(backend):
        await backend.start()
        results = await asyncio.gather(*(_collect(backend.generate(p, sp)) for p, sp in zip(prompts, cases())))
        await backend.stop()
        return results

    engine = AsyncEngine(model, tok, block_size=4)
    assert {"penalties", "logprobs", "constraints"} <= engine.features
    got = asyncio.run(run(engine))
    want = asyncio.run(run(SequentialBackend(model, tok)))
    for g, w in zip(got, want):
        assert [(d.text, d.token_id, d.finish_reason) for d in g] == [(d.text, d.token_id, d.finish_reason) for d in w]
        for a, b in zip(g[:-1], w[:-1]):
            assert (getattr(a, "logprob", None) is None) == (getattr(b, "logprob", None) is None)
            if getattr(b, "logprob", None) is not None:
                assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
                assert [i for i, _ in a.top_logprobs] == [i for i, _ in b.top_logprobs]
    for i in (0, 1):  # the penalties made a difference
        assert [d.token_id for d in got[i][:-1]] != generate(model, tok, prompts[i], greedy(12)).token_ids
    assert [d.token_id for d in got[2][:2]] in ([8, 9], [5, 6])  # the constraint held
    assert len(got[1][0].top_logprobs) == 3 and got[3][0].top_logprobs == []
