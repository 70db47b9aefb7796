"""Block manager and scheduler, plain Python, driven by a fake runner (no torch, no model).

The fake runner stands in for the KV pool: each slot holds the token prefix whose keys/values it would
hold (a token's keys/values depend on every token up to it). Every step it computes the sequences in
order, as the real runner does, and checks that each one reads exactly its own prefix from its
blocks — so a wrong block table, a bad prefix hit, a block shared before it is computed or a block
reused while still in use shows up as a wrong read — and "predicts" the next token of the sequences
whose step reaches their last token.
"""

from __future__ import annotations

import pytest

from glmkit.engine.block_manager import BlockManager
from glmkit.engine.scheduler import Scheduler
from glmkit.engine.sequence import Sequence, SequenceStatus
from glmkit.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0)


def next_token(tokens: list[int]) -> int:
    return 100 + hash(tuple(tokens)) % 1000  # ints hash the same in every process


class FakeRunner:
    def __init__(self, manager: BlockManager):
        self.bs = manager.block_size
        self.slots: list[tuple | None] = [None] * (manager.num_blocks * manager.block_size)
        self.steps = []  # (is_prefill, [(request_id, tokens fed, tokens generated before)])

    def slot(self, seq: Sequence, i: int) -> int:
        return seq.block_table[i // self.bs] * self.bs + i % self.bs

    def run(self, seqs: list[Sequence]) -> list[int]:
        """Tokens of the sequences that reach their last token. The real runner computes sequences in
        order, several per model call; one at a time is the strictest order that allows."""
        for seq in seqs:
            end = seq.num_cached_tokens + seq.num_scheduled_tokens
            assert seq.num_scheduled_tokens >= 1 and len(seq.block_table) * self.bs >= end, seq
            for i in range(seq.num_cached_tokens, end):
                self.slots[self.slot(seq, i)] = tuple(seq.token_ids[:i + 1])
            for i in range(end):
                assert self.slots[self.slot(seq, i)] == tuple(seq.token_ids[:i + 1]), f"{seq} reads a wrong slot"
        self.steps.append([(s.request_id, s.num_scheduled_tokens, s.num_output_tokens) for s in seqs])
        return [next_token(seq.token_ids) for seq in seqs if seq.feeds_last_token]


def reference(prompt: list[int], max_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens))
    return tokens[len(prompt):]


def check_invariants(manager: BlockManager, scheduler: Scheduler) -> None:
    holders = [0] * manager.num_blocks
    for seq in scheduler.running:
        assert seq.status is SequenceStatus.RUNNING
        for block in seq.block_table:
            holders[block] += 1
    for seq in scheduler.waiting:
        assert seq.status is SequenceStatus.WAITING and not seq.block_table
    assert holders == manager.ref_counts
    assert set(manager.free) == {b for b in range(manager.num_blocks) if holders[b] == 0}


def run(requests, num_blocks: int, block_size: int = 4, max_num_seqs: int = 64, arrivals=None,
        max_num_batched_tokens: int = 2048):
    """Serve (prompt, max_tokens) requests to completion; `arrivals[i]` is the step request i joins at."""
    manager = BlockManager(num_blocks, block_size)
    scheduler = Scheduler(manager, max_num_seqs, max_num_batched_tokens)
    runner = FakeRunner(manager)
    seqs = [Sequence(f"r{i}", prompt, GREEDY, max_tokens) for i, (prompt, max_tokens) in enumerate(requests)]
    arrivals = arrivals or [0] * len(seqs)
    step = 0
    while step <= max(arrivals) or scheduler.has_work():
        for seq, at in zip(seqs, arrivals):
            if at == step:
                scheduler.add(seq)
        step += 1
        batch = scheduler.schedule()
        check_invariants(manager, scheduler)
        if not batch:
            assert not scheduler.has_work()
            continue
        assert len(batch) <= max_num_seqs
        assert sum(s.num_scheduled_tokens for s in batch if s.num_scheduled_tokens > 1) <= max_num_batched_tokens
        sampled = [seq for seq in batch if seq.feeds_last_token]
        tokens = runner.run(batch)
        scheduler.step_done(batch)
        for seq, token in zip(sampled, tokens):
            seq.append_token(token)
            if seq.num_output_tokens == seq.max_tokens:
                scheduler.finish(seq, "length")
        check_invariants(manager, scheduler)
        assert step < 10_000, "no progress"
    assert manager.num_used_blocks == 0 and all(seq.is_finished for seq in seqs)
    return {seq.request_id: seq.output_ids for seq in seqs}, manager, scheduler, runner


REQUESTS = [([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11][:3 + i % 9] + [i], 3 + (7 * i) % 13) for i in range(12)]


def expected(requests):
    return {f"r{i}": reference(p, n) for i, (p, n) in enumerate(requests)}


def test_roomy_cache_runs_everything_together():
    outputs, _, scheduler, runner = run(REQUESTS, num_blocks=200)
    assert outputs == expected(REQUESTS)
    assert scheduler.num_preemptions == 0
    prefill, decode = runner.steps[0], runner.steps[1]
    assert len(prefill) == len(REQUESTS)  # all admitted in one step (fed: their prompts but shared blocks)
    assert all(fed == 1 for _, fed, _ in decode)  # then one token each per step


def test_requests_join_and_leave_the_batch_at_every_step():
    arrivals = [0, 0, 1, 2, 3, 5, 8, 8, 9, 13, 21, 22]
    outputs, *_, runner = run(REQUESTS, num_blocks=200, arrivals=arrivals)
    assert outputs == expected(REQUESTS)
    sizes = [len(rows) for rows in runner.steps]
    assert len(set(sizes)) > 3  # the batch grew and shrank
    # Newcomers' prompts ran in the same steps as the others' next tokens.
    assert any({fed for _, fed, _ in rows} > {1} and 1 in {fed for _, fed, _ in rows} for rows in runner.steps)


@pytest.mark.parametrize("num_blocks", [6, 9, 14])
@pytest.mark.parametrize("budget", [2048, 3])
def test_tiny_cache_preempts_and_recomputes_with_equal_outputs(num_blocks, budget):
    # Only requests that fit the pool alone (the engine rejects the others when they are added).
    # With a budget of 3 prompt tokens per step, sequences are also preempted halfway through their
    # prompts: blocks that were never computed must not be shared (the fake runner checks every read).
    requests = [(p, n) for p, n in REQUESTS if -(-(len(p) + n - 1) // 4) <= num_blocks]
    outputs, _, scheduler, runner = run(requests, num_blocks=num_blocks, max_num_batched_tokens=budget)
    assert outputs == expected(requests)
    assert scheduler.num_preemptions > 0
    # A preempted sequence is recomputed with the tokens it had generated.
    assert any(fed > 1 and generated > 0 for rows in runner.steps for _, fed, generated in rows)


def test_preemption_takes_the_newest_running_sequence():
    manager = BlockManager(num_blocks=4, block_size=2)
    scheduler = Scheduler(manager, watermark=0)
    a, b = Sequence("a", [1, 2, 3], GREEDY, 10), Sequence("b", [4, 5, 6], GREEDY, 10)
    scheduler.add(a)
    scheduler.add(b)
    assert scheduler.schedule() == [a, b]  # 2 blocks each: the pool is full
    scheduler.step_done([a, b])
    a.append_token(7)
    b.append_token(8)  # 4 tokens: still 2 blocks each
    assert scheduler.schedule() == [a, b] and a.num_scheduled_tokens == b.num_scheduled_tokens == 1
    scheduler.step_done([a, b])
    a.append_token(9)
    b.append_token(10)  # 5 tokens: a third block each, and none is free
    assert scheduler.schedule() == [a]
    assert b.status is SequenceStatus.WAITING and list(scheduler.waiting) == [b] and not b.block_table
    assert b.num_preemptions == 1 and len(a.block_table) == 3


def test_admission_waits_for_blocks_and_never_overtakes():
    manager = BlockManager(num_blocks=5, block_size=4)
    scheduler = Scheduler(manager, watermark=0)
    big, small = Sequence("big", list(range(1, 17)), GREEDY, 4), Sequence("small", [1], GREEDY, 4)
    first = Sequence("first", list(range(50, 58)), GREEDY, 4)  # 2 blocks
    for seq in (first, big, small):
        scheduler.add(seq)
    assert scheduler.schedule() == [first]  # big needs 4 blocks, 3 are free: it waits, and small behind it
    assert [s.request_id for s in scheduler.waiting] == ["big", "small"]
    scheduler.finish(first, "stop")
    assert manager.num_used_blocks == 0
    assert scheduler.schedule() == [big, small]


def test_max_num_seqs_and_batched_tokens_bound_a_step():
    requests = [([i, i + 1, i + 2, i + 3], 5) for i in range(0, 40, 4)]
    outputs, *_, runner = run(requests, num_blocks=100, max_num_seqs=3)
    assert outputs == expected(requests)
    assert max(len(rows) for rows in runner.steps) == 3
    outputs, *_, runner = run(requests, num_blocks=100, max_num_batched_tokens=8)
    assert outputs == expected(requests)
    assert max(sum(fed > 1 for _, fed, _ in rows) for rows in runner.steps) == 2  # 2 prompts of 4 tokens


def test_long_prompts_run_in_chunks_beside_the_others_next_tokens():
    long_prompt = list(range(200, 230))  # 30 tokens
    requests = [([1, 2, 3], 12), ([4, 5], 12), (long_prompt, 4), ([6, 7, 8, 9], 3)]
    outputs, _, _, runner = run(requests, num_blocks=100, arrivals=[0, 0, 2, 2], max_num_batched_tokens=8)
    assert outputs == expected(requests)
    chunks = [(fed, rows) for rows in runner.steps for rid, fed, generated in rows if rid == "r2" and generated == 0]
    assert [fed for fed, _ in chunks] == [8, 8, 8, 6]  # 30 prompt tokens, 8 per step
    for _, rows in chunks:  # the running requests got their next token in every one of those steps
        assert {rid for rid, fed, _ in rows if fed == 1} == {"r0", "r1"}
    # The request queued behind the long prompt waited for room in the budget, then took the rest.
    first_r3 = next(i for i, rows in enumerate(runner.steps) if any(rid == "r3" for rid, *_ in rows))
    assert any(rid == "r2" and fed == 6 for rid, fed, _ in runner.steps[first_r3])


def test_chunked_prompts_share_only_blocks_already_computed():
    system = list(range(1, 14))  # 13 tokens: 3 full blocks of 4
    requests = [(system + [100 + i], 5) for i in range(3)]
    # 6 prompt tokens per step: the first prompt's blocks are computed over three steps; the others,
    # admitted in the step of its last chunk, share them; the fake runner checks every read.
    outputs, manager, *_ = run(requests, num_blocks=100, max_num_batched_tokens=6)
    assert outputs == expected(requests)
    assert manager.hit_tokens == 2 * 12


def test_prefix_blocks_are_shared_and_outputs_unchanged():
    system = list(range(1, 14))  # 13 tokens: 3 full blocks of 4
    requests = [(system + [100 + i, 200 + i], 6) for i in range(5)]
    outputs, manager, *_ = run(requests, num_blocks=100)
    assert outputs == expected(requests)
    assert manager.hit_blocks == 4 * 3 and manager.hit_tokens == 4 * 12


def test_freed_blocks_stay_reusable_until_evicted():
    manager = BlockManager(num_blocks=6, block_size=4)
    a = Sequence("a", list(range(1, 10)), GREEDY, 4)  # 9 tokens: 2 full blocks + 1
    manager.allocate(a)
    assert a.num_cached_tokens == 0 and manager.num_used_blocks == 3
    assert not manager.cached  # nothing is shared before a step computes it
    manager.will_compute(a, 9)
    a_blocks = list(a.block_table)
    manager.free_blocks(a)
    assert manager.num_used_blocks == 0
    b = Sequence("b", list(range(1, 9)) + [77, 78], GREEDY, 4)
    assert manager.can_allocate(b)
    manager.allocate(b)
    assert b.num_cached_tokens == 8 and b.block_table[:2] == a_blocks[:2]
    # The exact same 8-token prompt reuses only the first block: its last token must be computed.
    manager.will_compute(b, 10)
    c = Sequence("c", list(range(1, 9)), GREEDY, 4)
    manager.allocate(c)
    assert c.num_cached_tokens == 4 and c.block_table[0] == b.block_table[0]
    assert manager.ref_counts[b.block_table[0]] == 2
    # Filling the pool with new content evicts what no one holds.
    manager.free_blocks(b)
    manager.free_blocks(c)
    d = Sequence("d", list(range(500, 524)), GREEDY, 1)  # 6 blocks: the whole pool
    manager.allocate(d)
    manager.will_compute(d, 24)
    assert set(manager.cached) == set(d.block_hashes)  # the old content is forgotten
    manager.free_blocks(d)
    e = Sequence("e", list(range(1, 10)), GREEDY, 4)
    manager.allocate(e)
    assert e.num_cached_tokens == 0


def test_can_allocate_counts_reused_blocks_that_sit_in_the_free_list():
    manager = BlockManager(num_blocks=3, block_size=2)
    a = Sequence("a", [1, 2, 3, 4, 5], GREEDY, 1)  # 3 blocks: the whole pool
    manager.allocate(a)
    manager.will_compute(a, 5)
    manager.free_blocks(a)
    again = Sequence("again", [1, 2, 3, 4, 5], GREEDY, 1)
    assert manager.can_allocate(again)  # 2 reused (free-listed) + 1 new = 3 free blocks
    assert not manager.can_allocate(again, reserve=1)
    manager.allocate(again)
    assert again.num_cached_tokens == 4 and manager.num_free_blocks == 0


def test_finish_and_abort_free_blocks_at_once():
    manager = BlockManager(num_blocks=10, block_size=4)
    scheduler = Scheduler(manager)
    a, b, c = (Sequence(x, [1, 2, 3, 4, 5, 6], GREEDY, 5) for x in "abc")
    for seq in (a, b, c):
        scheduler.add(seq)
    scheduler.schedule()
    used = manager.num_used_blocks
    scheduler.finish(b, None)
    assert b.is_finished and b.finish_reason is None and not b.block_table
    assert manager.num_used_blocks == used - 1  # its first block is shared with a, the second is its own
    scheduler.finish(a, None)
    scheduler.finish(c, None)
    assert manager.num_used_blocks == 0 and not scheduler.has_work()
    waiting = Sequence("w", [1], GREEDY, 1)
    scheduler.add(waiting)
    scheduler.finish(waiting, None)
    assert not scheduler.waiting


def test_block_manager_rejects_nonsense_sizes():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 16)
    with pytest.raises(ValueError, match="max_num_seqs"):
        Scheduler(BlockManager(4, 4), max_num_seqs=0)
