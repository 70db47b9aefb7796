"""One request as the engine sees it: its token ids, its sampling parameters, its place in the cache.

A Sequence is plain data shared by the block manager (which fills `block_table`), the scheduler
(which moves it between waiting, running and finished) and the runner (which reads its tokens).
It knows no torch, tokenizer or text; turning tokens into text is the engine's job.

Invariant between steps: `token_ids` = prompt + output; the keys/values of the first
`num_cached_tokens` of them are in the cache, and the block table covers at least those. A step
feeds the `num_scheduled_tokens` after them (the prompt, whole or a chunk of it, then one token at a
time); when that reaches the last token, the step samples one more token.
"""

from __future__ import annotations

import enum

from glmkit.sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, holding no cache blocks (new, or preempted to be recomputed)
    RUNNING = "running"  # holding cache blocks, stepped every step
    FINISHED = "finished"  # done or aborted; its blocks are back in the pool


class Sequence:
    """A request's ids and state. `max_tokens` is its budget: at most that many tokens are generated."""

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, max_tokens: int):
        if not prompt_ids:
            raise ValueError("a sequence needs at least one prompt token")
        self.request_id = request_id  # unique among an engine's unfinished requests
        self.params = params
        self.max_tokens = max_tokens
        self.token_ids: list[int] = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []  # cache block ids, in token order
        self.block_hashes: list[bytes] = []  # content hash of each full block of token_ids, in order
        self.num_cached_tokens = 0
        self.num_scheduled_tokens = 0  # tokens the step being run feeds, from num_cached_tokens on
        self.num_preemptions = 0
        self.finish_reason: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def scheduled_ids(self) -> list[int]:
        """The ids the step being run feeds."""
        return self.token_ids[self.num_cached_tokens:self.num_cached_tokens + self.num_scheduled_tokens]

    @property
    def feeds_last_token(self) -> bool:
        """Whether the step being run reaches the last token, and so yields the next one (the earlier
        chunks of a long prompt yield nothing)."""
        return self.num_cached_tokens + self.num_scheduled_tokens == len(self.token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, status={self.status.value}, tokens={self.num_tokens}, "
                f"cached={self.num_cached_tokens}, scheduled={self.num_scheduled_tokens}, blocks={self.block_table})")
