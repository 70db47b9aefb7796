"""What the server generates with, and the simplest one: one request at a time.

A backend is any object with this interface (`glmkit.engine.AsyncEngine` has it too):

    await backend.start(); ...; await backend.stop()
    async for delta in backend.generate(prompt_ids, params, request_id=None): ...
        # glmkit.generate.Delta(text, token_id, finish_reason); the last has finish_reason
        # "stop" or "length". Closing the iterator early aborts the request and frees its memory.
    backend.stats() -> {"running", "waiting", "kv_blocks_total", "kv_blocks_used",
                        "prompt_tokens", "generated_tokens"}
    backend.features  # optional: which of params.FEATURES it carries out

`SequentialBackend` runs `glmkit.generate.generate_stream` for one request after another in a worker
thread, the others waiting in a queue. It is the baseline the batched engine is measured against,
and the exact path for requests that need a feature the batched engine lacks: it has them all,
through `step_hooks.HookedModel`.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from glmkit.generate import Delta, generate_stream
from glmkit.openmp_threads import release_openmp_threads
from glmkit.sampling import SamplingParams

from .params import FEATURES, RequestParams
from .step_hooks import HookedModel


class BackendStoppedError(RuntimeError):
    """The backend stopped before the request finished."""


@dataclass
class ScoredDelta(Delta):
    """A Delta with the chosen token's logprob and the most likely alternatives (see params)."""

    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class _Job:
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)


class SequentialBackend:
    """One request at a time over `generate_stream`, in a worker thread; the rest wait their turn.

    Its KV cache is the single request's own, sized for its prompt plus its reply; `stats()` counts
    it in blocks of one token, out of the model's context window.
    """

    features = frozenset(FEATURES)

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._running: _Job | None = None
        self._kv_tokens = 0
        self._prompt_tokens = 0
        self._generated_tokens = 0

    async def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="glmkit-sequential", daemon=True)
            self._thread.start()

    async def stop(self) -> None:
        """Stop the worker after its current token; unfinished requests end with BackendStoppedError."""
        if self._thread is None:
            return
        unfinished = [job for job in [*list(self._jobs.queue), self._running] if job is not None]
        for job in unfinished:
            job.cancelled.set()
            self._post(job, BackendStoppedError("the server stopped before this request finished"))
        self._jobs.put(None)
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[Delta]:
        """Deltas of one request, as `generate_stream` gives them; it waits its turn in the queue."""
        await self.start()  # idempotent
        job = _Job(list(prompt_ids), params, asyncio.get_running_loop(), asyncio.Queue())
        self._jobs.put(job)
        try:
            while True:
                item = await job.out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            job.cancelled.set()  # a consumer that leaves early stops the generation at the next token

    def stats(self) -> dict[str, int]:
        waiting = sum(1 for job in list(self._jobs.queue) if job is not None and not job.cancelled.is_set())
        return {"running": int(self._running is not None), "waiting": waiting,
                "kv_blocks_total": self.model.config.seq_length, "kv_blocks_used": self._kv_tokens,
                "prompt_tokens": self._prompt_tokens, "generated_tokens": self._generated_tokens}

    # -- the worker thread ---------------------------------------------------------------------------

    def _work(self) -> None:
        while (job := self._next_job()) is not None:
            if job.cancelled.is_set():
                continue
            self._running = job
            try:
                self._run(job)
            except BaseException as e:  # handed to the request; the worker goes on with the next
                self._post(job, e)
            finally:
                self._running, self._kv_tokens = None, 0

    def _next_job(self) -> _Job | None:
        if self._jobs.empty():
            release_openmp_threads()  # idle: no team of ours to slow another thread's parallel ops
        return self._jobs.get()

    def _run(self, job: _Job) -> None:
        params = job.params
        model = self.model
        hooked = None
        if isinstance(params, RequestParams) and (params.presence_penalty or params.frequency_penalty
                                                  or params.logprobs is not None or params.constraint is not None):
            model = hooked = HookedModel(self.model, params, self.tokenizer.vocab_size)
        window = self.model.config.seq_length
        n = len(job.prompt_ids)
        self._kv_tokens = min(window, n + (params.max_new_tokens or window))
        self._prompt_tokens += n
        stream = generate_stream(model, self.tokenizer, job.prompt_ids, params)
        try:
            for delta in stream:
                if job.cancelled.is_set():
                    return
                if delta.token_id is not None:
                    self._generated_tokens += 1
                    if hooked is not None and params.logprobs is not None:
                        logprob, top = hooked.logprobs(delta.token_id)
                        delta = ScoredDelta(delta.text, delta.token_id, delta.finish_reason, logprob, top)
                if not self._post(job, delta):
                    return
        finally:
            stream.close()

    @staticmethod
    def _post(job: _Job, item: Delta | BaseException) -> bool:
        """Hand `item` to the request's event loop; False when that loop is gone."""
        try:
            job.loop.call_soon_threadsafe(job.out.put_nowait, item)
            return True
        except RuntimeError:  # the loop is closed: nobody is listening any more
            job.cancelled.set()
            return False


BACKENDS = ("auto", "batched", "sequential")


def make_backend(kind: str, model, tokenizer, max_num_seqs: int = 64):
    """A backend by name: "batched" (`glmkit.engine.AsyncEngine`, continuous batching), "sequential",
    or "auto" (batched when glmkit has the engine, else sequential)."""
    if kind not in BACKENDS:
        raise ValueError(f"unknown backend {kind!r}; known: {', '.join(BACKENDS)}")
    if kind == "sequential":
        return SequentialBackend(model, tokenizer)
    try:
        from glmkit.engine import AsyncEngine
    except ModuleNotFoundError as e:
        if e.name != "glmkit.engine" or kind == "batched":
            raise
        return SequentialBackend(model, tokenizer)
    return AsyncEngine(model, tokenizer, max_num_seqs=max_num_seqs)
