"""Which sequences run in the next step: admission, continuous batching, preemption.

Plain Python, no torch. Each step is either a prefill step (sequences just admitted: their whole
uncached prompt) or a decode step (every running sequence, one token each), so sequences join and
leave the running batch at every step.

Policy, in order:
- Admission (prefill first): waiting sequences are admitted oldest first while the step has room
  (`max_num_seqs` sequences, `max_num_batched_tokens` prompt tokens) and the cache has the blocks
  for their tokens, keeping a small watermark free for the running ones to grow; the first that
  does not fit stops admission, so nobody overtakes an older request.
- Decode: every running sequence gets the block its next token needs. When the pool is empty, the
  newest running sequence is preempted: its blocks are freed and it goes back to the front of the
  queue, to be recomputed from its tokens later (the prefix cache often still holds them). So the
  oldest sequence always makes progress, and nothing is lost or crashes — provided any single
  request fits the cache alone, which the engine checks when a request is added.
"""

from __future__ import annotations

from collections import deque

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
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

    def schedule(self) -> tuple[list[Sequence], bool]:
        """The sequences of the next step and whether it is a prefill step; ([], False) when idle."""
        admitted = self._admit()
        if admitted:
            return admitted, True
        return self._grow_running(), False

    def _admit(self) -> list[Sequence]:
        manager, admitted, tokens = self.block_manager, [], 0
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            # Counted before prefix reuse (an upper bound); the first prompt goes in whatever its length.
            if admitted and tokens + seq.num_tokens > self.max_num_batched_tokens:
                break
            # Alone, a request may take every block (the engine checked that it fits the pool).
            if not manager.can_allocate(seq, reserve=self.watermark_blocks if self.running else 0):
                break
            self.waiting.popleft()
            manager.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            admitted.append(seq)
            tokens += seq.num_tokens
        return admitted

    def _grow_running(self) -> list[Sequence]:
        manager, scheduled = self.block_manager, []
        pending = deque(self.running)  # oldest first
        while pending:
            seq = pending.popleft()
            while not manager.can_append(seq):
                victim = pending.pop() if pending else seq
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                manager.append(seq)
                scheduled.append(seq)
        self.running = scheduled
        return list(scheduled)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free_blocks(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def step_done(self, seqs: list[Sequence]) -> None:
        """The step computed every fed token of `seqs`: they are all cached now."""
        for seq in seqs:
            seq.num_cached_tokens = seq.num_tokens

    def finish(self, seq: Sequence, reason: str | None) -> None:
        """End `seq` (reason None: aborted) wherever it is, and give its blocks back at once."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.block_manager.free_blocks(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
