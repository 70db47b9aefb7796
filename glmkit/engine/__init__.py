"""Many requests at once: continuous batching over a paged, prefix-sharing KV cache.

One noun per file, each with one job: `Sequence` (a request's ids and state), `BlockManager`
(cache blocks, reference counts, prefix hashes), `Scheduler` (who runs next and how many tokens
each feeds: admission, chunked prompts, preemption), `ModelRunner` (the paged KV pool and the
model calls; the only torch here), `LLMEngine` (requests in, streamed deltas out), `AsyncEngine`
(the engine in a worker thread, for asyncio servers).
"""

from .async_engine import AsyncEngine, EngineStoppedError
from .block_manager import BlockManager
from .engine import LLMEngine, ScoredDelta
from .runner import ModelRunner
from .scheduler import Scheduler
from .sequence import Sequence, SequenceStatus

__all__ = ["AsyncEngine", "BlockManager", "EngineStoppedError", "LLMEngine", "ModelRunner", "Scheduler",
           "ScoredDelta", "Sequence", "SequenceStatus"]
