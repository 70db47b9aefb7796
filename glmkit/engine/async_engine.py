"""AsyncEngine: the LLMEngine behind an asyncio front, for the HTTP server.

The engine runs in one worker thread (torch releases the GIL while it computes, so the event loop
stays responsive); it is the only thread that touches the LLMEngine. The loop talks to it through a
command list under a condition variable (add, abort), and the worker hands each step's deltas back
with one `call_soon_threadsafe` per step, into one asyncio.Queue per request.

    engine = AsyncEngine(model, tokenizer)
    await engine.start()
    async for delta in engine.generate(prompt_ids, params):
        print(delta.text, end="")
    await engine.stop()

A consumer that stops iterating (`aclose()`, or its task cancelled when a client disconnects)
aborts its request: the worker frees the request's blocks before its next step.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import AsyncIterator

from glmkit.generate import Delta
from glmkit.openmp_threads import release_openmp_threads
from glmkit.sampling import SamplingParams

from .engine import LLMEngine


class EngineStoppedError(RuntimeError):
    """The engine stopped (or failed) before the request finished."""


class AsyncEngine:
    """An `LLMEngine` stepped by a worker thread while it has work, with an async generator per request."""

    # What the engine carries out beyond SamplingParams when a request's params carry it (the
    # server's RequestParams): OpenAI penalties, logprobs, constraints (see runner.apply_request_rules).
    features = frozenset({"penalties", "logprobs", "constraints"})

    def __init__(self, model, tokenizer, max_num_seqs: int = 64, num_blocks: int | None = None,
                 block_size: int = 16, **engine_options):
        """engine_options: keyword options of `LLMEngine` (max_num_batched_tokens, kv_cache_bytes)."""
        self.engine = LLMEngine(model, tokenizer, max_num_seqs, num_blocks, block_size, **engine_options)
        self._cond = threading.Condition()
        self._commands: list[tuple] = []  # ("add", id, prompt, params) / ("abort", id): the worker's, between steps
        self._streams: dict[str, asyncio.Queue] = {}  # request id -> its deltas; loop thread only
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stats = self.engine.stats()

    # ---- life --------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the worker thread (idempotent); `generate` starts it too when needed."""
        self._start()

    def _start(self) -> None:
        self._loop = asyncio.get_running_loop()  # deltas go to the loop of the latest caller
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="glmkit-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Stop the worker after its current step; unfinished requests end with EngineStoppedError."""
        thread = self._thread
        if thread is None:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify()
        await asyncio.to_thread(thread.join)
        self._thread = None
        self._commands.clear()
        self.engine.abort_all()
        self._stats = self.engine.stats()
        for queue in self._streams.values():
            queue.put_nowait(EngineStoppedError("the engine stopped before this request finished"))

    # ---- requests ----------------------------------------------------------------------------------
    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise what `generate` would raise for a bad request (ValueError, ContextLengthError,
        TypeError), before anything is queued — for a server to answer 400 up front."""
        self.engine.check_request(prompt_ids, params)

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[Delta]:
        """Deltas of one request as they come, like `glmkit.generate.generate_stream`; the last one has
        its finish_reason. Bad requests raise at the first iteration (see `validate`)."""
        prompt, _ = self.engine.check_request(prompt_ids, params)  # reads only fixed sizes: thread-safe
        if request_id is None:
            request_id = f"async-{next(self._ids)}"
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use by an unfinished request")
        self._start()
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = queue
        self._submit(("add", request_id, prompt, params))
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finish_reason is not None
                yield item
                if finished:
                    return
        finally:
            del self._streams[request_id]
            if not finished:  # the consumer went away: free the request's blocks
                self._submit(("abort", request_id))

    def stats(self) -> dict[str, int]:
        """{"running", "waiting", "kv_blocks_total", "kv_blocks_used", "prompt_tokens",
        "generated_tokens", "prefix_cache_hit_tokens", "preemptions"}, as of the last step."""
        return dict(self._stats)

    # ---- worker --------------------------------------------------------------------------------------
    def _submit(self, command: tuple) -> None:
        with self._cond:
            self._commands.append(command)
            self._cond.notify()

    def _work(self) -> None:
        engine = self.engine
        while True:
            if not (self._commands or self._stopping or engine.has_unfinished()):
                release_openmp_threads()  # idle: no team of ours to slow another thread's parallel ops
            with self._cond:
                while not (self._commands or self._stopping or engine.has_unfinished()):
                    self._cond.wait()
                if self._stopping:
                    return
                commands, self._commands = self._commands, []
            outputs: list = []
            for kind, request_id, *args in commands:
                try:
                    if kind == "add":
                        engine.add_request(*args, request_id=request_id)
                    else:
                        engine.abort(request_id)
                except Exception as error:  # noqa: BLE001 (checked when queued; a failure ends only this request)
                    outputs.append((request_id, error))
            try:
                outputs += engine.step()
            except Exception as error:  # noqa: BLE001 (never leave callers waiting: fail what ran, go on)
                failed = EngineStoppedError(f"the engine failed during a step: {error!r}")
                failed.__cause__ = error
                outputs += [(request_id, failed) for request_id in engine.abort_all()]
            self._stats = engine.stats()
            if outputs:
                try:
                    self._loop.call_soon_threadsafe(self._deliver, outputs)
                except RuntimeError:  # the loop is closed: nobody is listening any more
                    engine.abort_all()

    def _deliver(self, outputs: list) -> None:
        for request_id, item in outputs:
            queue = self._streams.get(request_id)
            if queue is not None:  # None: the consumer left; its abort is on its way
                queue.put_nowait(item)
