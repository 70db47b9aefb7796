"""What both completion endpoints share: the model's facts, admission, sampling, running choices.

`Service` owns the backend (and, made on first need, the exact single-request backend for requests
whose features the main one lacks), the bounded count of pending generations that turns overload
into a 503, the metrics, and the request fields -> `RequestParams` mapping. It speaks token ids and
Deltas; the endpoint modules turn them into OpenAI's JSON.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from glmkit.chat import CHAT_DEFAULTS
from glmkit.generate import Delta

from .backend import SequentialBackend
from .errors import APIError, bad_request
from .metrics import Metrics
from .params import RequestParams, needed_features
from .schemas import MAX_STOP
from .vocab import Vocabulary

SEED_MODULUS = 2**63  # seeds are taken modulo this (torch takes 64-bit seeds; OpenAI's are 64-bit ints)


@dataclass
class Limits:
    max_pending: int = 256  # generations admitted at once (running + waiting); more get a 503
    max_body_bytes: int = 4 * 2**20  # request bodies above this get a 413, before they are parsed


class Service:
    def __init__(self, model, tokenizer, backend, model_name: str, limits: Limits):
        self.model = model
        self.tokenizer = tokenizer
        self.backend = backend
        self.model_name = model_name
        self.limits = limits
        self.metrics = Metrics()
        self.context_window: int = model.config.seq_length
        self.pending = 0
        self.created = int(time.time())
        self._exact: SequentialBackend | None = None
        self._vocabulary: Vocabulary | None = None

    async def start(self) -> None:
        await self.backend.start()

    async def stop(self) -> None:
        await self.backend.stop()
        if self._exact is not None and self._exact is not self.backend:
            await self._exact.stop()

    @property
    def vocabulary(self) -> Vocabulary:
        if self._vocabulary is None:
            self._vocabulary = Vocabulary(self.tokenizer)
        return self._vocabulary

    def stats(self) -> dict[str, int]:
        """The backend's stats; requests and tokens of the exact path added in (its KV cache is not:
        it counts in other units, and it is the main backend's that fills up)."""
        stats = dict(self.backend.stats())
        if self._exact is not None and self._exact is not self.backend:
            for key, value in self._exact.stats().items():
                if key in ("running", "waiting", "prompt_tokens", "generated_tokens"):
                    stats[key] = stats.get(key, 0) + value
        return stats

    # -- checks --------------------------------------------------------------------------------------

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"The model {name!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def check_context(self, prompt_tokens: int, max_tokens: int | None) -> None:
        """A 400 that says by how much, when the prompt (plus max_tokens, if given) overflows the window."""
        window = self.context_window
        if prompt_tokens >= window:
            raise bad_request(f"This model's maximum context length is {window} tokens, and the prompt is "
                              f"{prompt_tokens} tokens: {prompt_tokens - window + 1} too many (a prompt may hold at "
                              f"most {window - 1}, leaving room for one reply token). Shorten the prompt.",
                              param="messages", code="context_length_exceeded")
        if max_tokens is not None and prompt_tokens + max_tokens > window:
            over = prompt_tokens + max_tokens - window
            raise bad_request(f"This model's maximum context length is {window} tokens. However, you requested "
                              f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for "
                              f"the completion): {over} too many. Lower max_tokens or shorten the prompt.",
                              param="max_tokens", code="context_length_exceeded")

    def admit(self, n: int) -> Callable[[], None]:
        """Take `n` places among the pending generations, or a 503 when they are taken; returns the
        function that gives them back (calling it again does nothing)."""
        limit = self.limits.max_pending
        if n > limit:
            raise bad_request(f"n={n} is more than this server runs at once ({limit})", param="n")
        if self.pending + n > limit:
            self.metrics.rejected["saturated"] += 1
            raise APIError(503, f"The server is busy: {self.pending} generations are pending (limit {limit}). "
                           "Retry shortly.", code="server_overloaded", headers={"Retry-After": "1"})
        self.pending += n
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.pending -= n

        return release

    # -- sampling ------------------------------------------------------------------------------------

    def params(self, request: Any, max_tokens: int | None, logprobs: int | None,
               constraint_factory=None) -> list[RequestParams]:
        """One RequestParams per choice from the fields both endpoints share (choice i gets seed + i)."""
        stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        if len(stop) > MAX_STOP:
            raise bad_request(f"stop: at most {MAX_STOP} stop strings are allowed, got {len(stop)}", param="stop")
        if any(not s for s in stop):
            raise bad_request("stop: stop strings must not be empty", param="stop")
        if request.logit_bias:
            raise bad_request("logit_bias is not supported by this server", param="logit_bias")
        temperature = CHAT_DEFAULTS["temperature"] if request.temperature is None else request.temperature
        top_p = CHAT_DEFAULTS["top_p"] if request.top_p is None else request.top_p
        top_k = request.top_k or 0
        if top_p == 0:  # OpenAI allows 0: only the most likely token
            top_p, top_k = 1.0, 1
        fields = dict(temperature=temperature, top_p=top_p, top_k=top_k,
                      repetition_penalty=request.repetition_penalty or 1.0,
                      max_new_tokens=max_tokens, stop=stop,
                      stop_token_ids=[] if request.ignore_eos else None,
                      presence_penalty=request.presence_penalty or 0.0,
                      frequency_penalty=request.frequency_penalty or 0.0, logprobs=logprobs)
        out = []
        for i in range(request.n):
            seed = None if request.seed is None else (request.seed + i) % SEED_MODULUS
            constraint = constraint_factory() if constraint_factory is not None else None
            out.append(RequestParams(**fields, seed=seed, constraint=constraint))
        return out

    # -- running -------------------------------------------------------------------------------------

    def backend_for(self, params: RequestParams):
        """The main backend, or the exact single-request one when `params` need a feature it lacks."""
        needed = needed_features(params)
        if needed <= set(getattr(self.backend, "features", ())):
            return self.backend
        if self._exact is None:  # made on first need; started by `generate`
            self._exact = SequentialBackend(self.model, self.tokenizer)
        return self._exact

    def validate(self, prompts: Sequence[Sequence[int]], params: Sequence[RequestParams]) -> None:
        """A 400 now for what the backend would refuse at its first step (e.g. more KV cache than it has)."""
        for prompt, p in zip(prompts, params):
            check = getattr(self.backend_for(p), "validate", None)
            if check is not None:
                try:
                    check(list(prompt), p)
                except (ValueError, TypeError) as e:
                    raise bad_request(str(e)) from None

    async def generate(self, prompt_ids: Sequence[int], params: RequestParams, arrived: float) -> AsyncIterator[Delta]:
        """The backend's Deltas for one choice, timed into the metrics; closing it aborts the generation."""
        backend = self.backend_for(params)  # a backend starts itself on its first request
        last = None
        finished = False
        try:
            async with aclosing(backend.generate(list(prompt_ids), params)) as deltas:
                async for delta in deltas:
                    now = time.monotonic()
                    if delta.token_id is not None:
                        if last is None:
                            self.metrics.time_to_first_token.observe(now - arrived)
                        else:
                            self.metrics.inter_token_latency.observe(now - last)
                        last = now
                        self.metrics.completion_tokens += 1
                    if delta.finish_reason is not None:
                        finished = True
                        self.metrics.request_duration.observe(now - arrived)
                    yield delta
        finally:
            if not finished:
                self.metrics.aborted += 1

    async def choices(self, prompts: Sequence[Sequence[int]], params: Sequence[RequestParams],
                      arrived: float) -> AsyncIterator[tuple[int, Delta]]:
        """(choice index, Delta) of every choice, interleaved as they come; choice i runs prompts[i]
        with params[i]. Closing it aborts the choices still running."""
        if len(params) == 1:
            async with aclosing(self.generate(prompts[0], params[0], arrived)) as deltas:
                async for delta in deltas:
                    yield 0, delta
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int) -> None:
            try:
                async with aclosing(self.generate(prompts[index], params[index], arrived)) as deltas:
                    async for delta in deltas:
                        queue.put_nowait((index, delta))
            except Exception as e:  # noqa: BLE001 (handed to the consumer, which re-raises it)
                queue.put_nowait((index, e))
            queue.put_nowait((index, None))

        tasks = [asyncio.create_task(pump(i)) for i in range(len(params))]
        try:
            running = len(tasks)
            while running:
                index, item = await queue.get()
                if item is None:
                    running -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
