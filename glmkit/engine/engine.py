"""LLMEngine: many requests at once — continuous batching over a paged, prefix-sharing KV cache.

The engine ties the parts together and owns what a request means to its caller: checking it,
turning its tokens into streamed text, and the stop rules of `glmkit.generate` (stop ids, stop
strings, max_new_tokens, the context window), applied per request exactly as the single-request
generator applies them, so greedy output is the same token for token and text for text.

Params may carry more than `SamplingParams` (the server's `RequestParams`): OpenAI's presence and
frequency penalties and a constraint on the next token are applied before sampling (see
`runner.apply_request_rules`), and `logprobs` makes each token's Delta a `ScoredDelta`.

    engine = LLMEngine(model, tokenizer)
    engine.add_request(prompt_ids, SamplingParams(temperature=0, max_new_tokens=64), "a")
    while engine.has_unfinished():
        for request_id, delta in engine.step():
            ...

It is synchronous and single-threaded: `AsyncEngine` runs it in a worker thread for a server.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from glmkit.generate import Completion, Delta, StopStrings, _final, check_context
from glmkit.sampling import SamplingParams

from .block_manager import BlockManager
from .runner import ModelRunner, Scores
from .scheduler import DEFAULT_MAX_NUM_BATCHED_TOKENS, Scheduler
from .sequence import Sequence

# Without `num_blocks`, the pool holds `max_num_seqs` full context windows, capped at this many bytes,
# but always at least one window (so any request that fits the context fits the cache).
DEFAULT_KV_CACHE_BYTES = 1 << 30


@dataclass
class ScoredDelta(Delta):
    """A Delta with the chosen token's logprob (under the model, before penalties and temperature)
    and the `logprobs` most likely tokens as (id, logprob), for requests whose params ask for them."""

    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


class _Request:
    """The text side of one request: its sequence, streaming decoder, stop strings and stop ids."""

    def __init__(self, seq: Sequence, tokenizer):
        self.seq = seq
        self.detokenizer = tokenizer.detokenizer()
        self.stops = StopStrings(seq.params.stop)
        ids = seq.params.stop_token_ids
        self.stop_ids = frozenset(tokenizer.stop_ids if ids is None else ids)

    def on_token(self, token: int, scores: Scores | None = None) -> tuple[list[Delta], str | None]:
        """The deltas for a newly sampled token, and the finish reason if it ended the request.

        The same rules, in the same order, as `glmkit.generate.generate_stream`.
        """
        seq = self.seq
        if token in self.stop_ids:
            delta = _final(self.detokenizer, self.stops, "stop")
            return [delta], delta.finish_reason
        seq.append_token(token)
        text, stopped = self.stops.push(self.detokenizer.push(token))
        deltas = [Delta(text, token) if scores is None else ScoredDelta(text, token, None, *scores)]
        if stopped:
            deltas.append(Delta("", None, "stop"))
        elif seq.num_output_tokens >= seq.max_tokens:
            deltas.append(_final(self.detokenizer, self.stops, "length"))
        return deltas, deltas[-1].finish_reason


class LLMEngine:
    """Continuous batching for `model` (a `ChatGLMForCausalLM`) and its tokenizer.

    max_num_seqs: most sequences in one step. num_blocks: KV cache blocks of `block_size` tokens
    (None: see DEFAULT_KV_CACHE_BYTES). max_num_batched_tokens: most prompt tokens computed in one
    step, beside one token of each generating sequence; a longer prompt is computed in chunks over
    several steps, so that it delays the others' next tokens by at most one chunk's time.
    """

    def __init__(self, model, tokenizer, max_num_seqs: int = 64, num_blocks: int | None = None,
                 block_size: int = 16, *, max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS,
                 kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES):
        self.model = model
        self.tokenizer = tokenizer
        self.window = model.config.seq_length
        if num_blocks is None:
            num_blocks = default_num_blocks(model, block_size, max_num_seqs, kv_cache_bytes)
        self.block_manager = BlockManager(num_blocks, block_size)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens)
        self.runner = ModelRunner(model, num_blocks, block_size, tokenizer.pad_id, tokenizer.vocab_size)
        self.requests: dict[str, _Request] = {}
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self._ids = itertools.count()

    # ---- requests --------------------------------------------------------------------------------
    def check_request(self, prompt_ids: Seq[int], params: SamplingParams) -> tuple[list[int], int]:
        """The prompt as a list of checked ids and the request's token budget; raises ValueError (or
        `ContextLengthError`) naming the problem. Nothing is queued."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a glmkit.sampling.SamplingParams, got {type(params).__name__}")
        params.validate()
        prompt = [self.tokenizer.check_id(i) for i in prompt_ids]
        if not prompt:
            raise ValueError("cannot generate from an empty prompt")
        n = len(prompt)
        check_context(n, self.window)
        budget = self.window - n if params.max_new_tokens is None else min(params.max_new_tokens, self.window - n)
        # The last token generated is never fed back, so the cache holds at most n + budget - 1.
        manager = self.block_manager
        most = n + budget - 1
        if manager.blocks_for(most) > manager.num_blocks:
            raise ValueError(
                f"this request may need the keys/values of {most} tokens (a {n}-token prompt and up to {budget} "
                f"new tokens), more than the whole KV cache holds ({manager.num_blocks} blocks of "
                f"{manager.block_size} tokens = {manager.num_blocks * manager.block_size}); lower max_new_tokens "
                "or give the engine more blocks")
        return prompt, budget

    def add_request(self, prompt_ids: Seq[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Queue a request; returns its id (a new one when `request_id` is None)."""
        prompt, budget = self.check_request(prompt_ids, params)
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
            while request_id in self.requests:
                request_id = f"req-{next(self._ids)}"
        elif request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use by an unfinished request")
        seq = Sequence(request_id, prompt, params, budget)
        self.requests[request_id] = _Request(seq, self.tokenizer)
        self.scheduler.add(seq)
        self.prompt_tokens += len(prompt)
        return request_id

    def abort(self, request_id: str) -> bool:
        """Drop a request at once, freeing its cache blocks; False when it is unknown or finished."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        self.scheduler.finish(request.seq, None)
        self.runner.release(request.seq)
        return True

    def abort_all(self) -> list[str]:
        ids = list(self.requests)
        for request_id in ids:
            self.abort(request_id)
        return ids

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- steps -----------------------------------------------------------------------------------
    def step(self) -> list[tuple[str, Delta]]:
        """Run one step; return (request id, delta) for each request that got a token, in batch order.
        A request's last delta has its finish_reason set; the request is then gone from the engine."""
        seqs = self.scheduler.schedule()
        if not seqs:
            return []
        sampled = [seq for seq in seqs if seq.feeds_last_token]  # the others computed a chunk of their prompt
        try:
            tokens, scores = self.runner.run(seqs)
        except BaseException:
            self.block_manager.forget_cached()  # blocks registered for this step were never filled
            raise
        self.scheduler.step_done(seqs)
        outputs: list[tuple[str, Delta]] = []
        for seq, token, score in zip(sampled, tokens, scores):
            deltas, reason = self.requests[seq.request_id].on_token(token, score)
            outputs.extend((seq.request_id, delta) for delta in deltas)
            if deltas[0].token_id is not None:
                self.generated_tokens += 1
            if reason is not None:
                del self.requests[seq.request_id]
                self.scheduler.finish(seq, reason)
                self.runner.release(seq)
        return outputs

    def generate(self, prompts: Seq[Seq[int]], params: SamplingParams | Seq[SamplingParams]) -> list[Completion]:
        """Run `prompts` to completion together (one SamplingParams for all, or one each), on an
        engine with no other requests (their deltas would have nobody to go to)."""
        if self.requests:
            raise RuntimeError(f"generate() needs an idle engine; {len(self.requests)} requests are unfinished")
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} SamplingParams")
        for p, sp in zip(prompts, params):  # all checked before any is queued
            self.check_request(p, sp)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        texts: dict[str, list[str]] = {i: [] for i in ids}
        tokens: dict[str, list[int]] = {i: [] for i in ids}
        reasons: dict[str, str] = {}
        while len(reasons) < len(ids):
            for request_id, delta in self.step():
                texts[request_id].append(delta.text)
                if delta.token_id is not None:
                    tokens[request_id].append(delta.token_id)
                if delta.finish_reason is not None:
                    reasons[request_id] = delta.finish_reason
        return [Completion("".join(texts[i]), tokens[i], reasons[i], len(p)) for i, p in zip(ids, prompts)]

    def stats(self) -> dict[str, int]:
        manager = self.block_manager
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_blocks_total": manager.num_blocks,
            "kv_blocks_used": manager.num_used_blocks,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "prefix_cache_hit_tokens": manager.hit_tokens,
            "preemptions": self.scheduler.num_preemptions,
        }


def default_num_blocks(model, block_size: int, max_num_seqs: int, kv_cache_bytes: int) -> int:
    """Blocks for `max_num_seqs` context windows within `kv_cache_bytes`, and at least one window."""
    config = model.config
    itemsize = model.transformer.embedding.word_embeddings.weight.element_size()
    per_token = 2 * config.num_layers * config.num_kv_groups * config.kv_channels * itemsize
    window = config.seq_length
    tokens = max(window, min(max_num_seqs * window, kv_cache_bytes // per_token))
    return -(-tokens // block_size)
