"""Which sequences run in the next step, and how many tokens each feeds: admission, continuous
batching, chunked prompts, preemption.

Plain Python, no torch. Every step runs each running sequence that is generating (one token each),
the next chunk of prompts still being computed, and newly admitted prompts, so sequences join and
leave the batch at every step, and a long prompt never stalls the others' generation for longer than
one chunk takes.

Policy, in order:
- Running sequences, oldest first. One that is generating gets the block its next token needs; when
  the pool is empty, the newest running sequence is preempted: its blocks are freed and it goes back
  to the front of the queue, to be recomputed from its tokens later (the prefix cache often still
  holds them). So the oldest sequence always makes progress, and nothing is lost or crashes —
  provided any single request fits the cache alone, which the engine checks when a request is added.
  One whose prompt is still being computed (it holds blocks for all of it) gets its next chunk.
- Admission: waiting sequences are admitted oldest first while the step has room (`max_num_seqs`
  sequences, `max_num_batched_tokens` prompt tokens, running chunks included) and the cache has the
  blocks for all their tokens, keeping a small watermark free for the running ones to grow; the first
  that does not fit stops admission, so nobody overtakes an older request. A prompt longer than the
  room left is computed in chunks, one per step.
A step lists the generating sequences first, then the prompt chunks, then the admitted sequences:
the order the runner computes them in, which is what lets an admitted sequence share blocks that an
earlier one computes in the same step (see `block_manager`).
"""

from __future__ import annotations

from collections import deque

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus

# Prompt tokens per step: chunks big enough for the linears' best speed per token on a CPU, small
# enough that the generating sequences' next token waits for one chunk only.
DEFAULT_MAX_NUM_BATCHED_TOKENS = 512


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS,
                 watermark: float = 0.01):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError(f"need max_num_seqs >= 1 and max_num_batched_tokens >= 1, got {max_num_seqs} "
                             f"and {max_num_batched_tokens}")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.watermark_blocks = int(watermark * block_manager.num_blocks)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the newest is preempted first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Sequence]:
        """The sequences of the next step in the order to compute them, each with its
        `num_scheduled_tokens` set; [] when idle."""
        generating, chunks, budget = self._schedule_running()
        return generating + chunks + self._admit(budget)

    def _schedule_running(self) -> tuple[list[Sequence], list[Sequence], int]:
        """(generating sequences, prompt chunks, prompt tokens left for admission) of the running ones."""
        manager, budget = self.block_manager, self.max_num_batched_tokens
        generating, chunks, kept = [], [], []
        pending = deque(self.running)  # oldest first
        while pending:
            seq = pending.popleft()
            uncached = seq.num_tokens - seq.num_cached_tokens
            if uncached > 1:  # a prompt still being computed: its blocks were all allocated at admission
                kept.append(seq)
                seq.num_scheduled_tokens = min(uncached, budget)
                if seq.num_scheduled_tokens:
                    manager.will_compute(seq, seq.num_cached_tokens + seq.num_scheduled_tokens)
                    budget -= seq.num_scheduled_tokens
                    chunks.append(seq)
                continue
            while not manager.can_append(seq):
                victim = pending.pop() if pending else seq
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                manager.append(seq)
                seq.num_scheduled_tokens = 1
                kept.append(seq)
                generating.append(seq)
        self.running = kept
        return generating, chunks, budget

    def _admit(self, budget: int) -> list[Sequence]:
        manager, admitted = self.block_manager, []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            # Alone, a request may take every block (the engine checked that it fits the pool).
            if not manager.can_allocate(seq, reserve=self.watermark_blocks if self.running else 0):
                break
            self.waiting.popleft()
            manager.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            seq.num_scheduled_tokens = min(seq.num_tokens - seq.num_cached_tokens, budget)
            manager.will_compute(seq, seq.num_cached_tokens + seq.num_scheduled_tokens)
            budget -= seq.num_scheduled_tokens
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free_blocks(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_scheduled_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def step_done(self, seqs: list[Sequence]) -> None:
        """The step computed every scheduled token of `seqs`: they are cached now."""
        for seq in seqs:
            seq.num_cached_tokens += seq.num_scheduled_tokens
            seq.num_scheduled_tokens = 0

    def finish(self, seq: Sequence, reason: str | None) -> None:
        """End `seq` (reason None: aborted) wherever it is, and give its blocks back at once."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.block_manager.free_blocks(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
