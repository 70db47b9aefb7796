"""The KV cache's bookkeeping: fixed-size blocks, a free list, reference counts, prefix reuse.

Plain Python, no torch: it hands out block ids; the runner owns the memory behind them. Slot
`block_table[i // block_size] * block_size + i % block_size` of the pool holds token i's keys/values.

Prefix reuse: every full block is known by a hash of its tokens chained with the hash of the block
before it (so a hash names the whole prefix up to that block's end, and with it the block's
keys/values). A new sequence whose first full blocks have hashes already in the cache shares those
blocks (reference count + 1) instead of computing them again. A block whose last user is gone keeps
its content and hash while it sits in the free list, so a later request can still reuse it; it is
evicted (its hash forgotten) only when the free list hands it out for new content, least recently
freed first.

A full block is registered (its hash made findable) when the step that computes its last token is
scheduled (`will_compute`): a prompt's blocks as its chunks are scheduled, a generated block when its
last token is fed. A sequence admitted later in that same step may then share it: sharing happens only
at admission, admitted sequences come last in a step, the runner computes a step's sequences in
order, and within one model call every layer writes all rows' new keys/values before any row reads.

A sequence always computes at least its last token (its logits are needed), so the block holding it
is never shared: at most `(num_tokens - 1) // block_size` blocks are reused.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from .sequence import Sequence


def block_hash(previous: bytes, token_ids: list[int]) -> bytes:
    """The content hash of a full block: 16 bytes of BLAKE2b over the previous hash and the ids."""
    return hashlib.blake2b(previous + array("q", token_ids).tobytes(), digest_size=16).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.hashes: list[bytes | None] = [None] * num_blocks  # content hash of each cached full block
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # eviction order
        self.cached: dict[bytes, int] = {}  # hash -> the block holding that prefix
        self.hit_tokens = 0  # prompt tokens whose keys/values were reused instead of computed
        self.hit_blocks = 0

    # ---- sizes -----------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        """Blocks some sequence holds (cached-but-free blocks are not used)."""
        return self.num_blocks - len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- admission -------------------------------------------------------------------------------
    def can_allocate(self, seq: Sequence, reserve: int = 0) -> bool:
        """Whether `seq`'s tokens fit now, leaving `reserve` free blocks, counting reusable blocks."""
        reused = self._reusable(seq)
        # A reused block still in the free list is taken out of it, so it costs a free block too.
        cost = sum(1 for b in reused if self.ref_counts[b] == 0) + self.blocks_for(seq.num_tokens) - len(reused)
        return cost + reserve <= len(self.free)

    def allocate(self, seq: Sequence) -> None:
        """Give `seq` blocks for all its tokens, sharing the cached prefix; sets num_cached_tokens.
        The new blocks are registered as steps compute them (`will_compute`)."""
        if seq.block_table:
            raise RuntimeError(f"{seq} already holds blocks")
        reused = self._reusable(seq)
        for block in reused:
            if self.ref_counts[block] == 0:
                del self.free[block]
            self.ref_counts[block] += 1
        seq.block_table = list(reused)
        for _ in range(len(reused), self.blocks_for(seq.num_tokens)):
            seq.block_table.append(self._take_free_block())
        seq.num_cached_tokens = len(reused) * self.block_size
        self.hit_blocks += len(reused)
        self.hit_tokens += seq.num_cached_tokens

    # ---- growth ----------------------------------------------------------------------------------
    def can_append(self, seq: Sequence) -> bool:
        """Whether the next step of `seq` (which feeds its last token) finds room in the cache."""
        return len(seq.block_table) >= self.blocks_for(seq.num_tokens) or len(self.free) > 0

    def append(self, seq: Sequence) -> None:
        """Make room for the token the next step feeds, its last one; register the block it completes."""
        if len(seq.block_table) < self.blocks_for(seq.num_tokens):
            seq.block_table.append(self._take_free_block())
        self.will_compute(seq, seq.num_tokens)

    def will_compute(self, seq: Sequence, end: int) -> None:
        """The step being scheduled computes `seq`'s tokens from num_cached_tokens up to `end`:
        register the full blocks that completes, so that sequences admitted after it may share them."""
        size = self.block_size
        first, last = seq.num_cached_tokens // size, end // size  # blocks [first, last) end by `end`
        if first < last:
            self._update_hashes(seq)
            for i in range(first, last):
                self._register(seq.block_table[i], seq.block_hashes[i])

    # ---- release ---------------------------------------------------------------------------------
    def free_blocks(self, seq: Sequence) -> None:
        """Return `seq`'s blocks; their cached content stays reusable until evicted."""
        for block in reversed(seq.block_table):  # the tail is evicted first, the shared head last
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None
        seq.block_table = []
        seq.num_cached_tokens = 0

    def forget_cached(self) -> None:
        """Drop every prefix hash: after a step failed, blocks registered for it may hold no keys/values."""
        self.cached.clear()
        self.hashes = [None] * self.num_blocks

    # ---- internals -------------------------------------------------------------------------------
    def _update_hashes(self, seq: Sequence) -> None:
        """Extend `seq.block_hashes` to cover every full block of its tokens."""
        size, hashes = self.block_size, seq.block_hashes
        for i in range(len(hashes), seq.num_tokens // size):
            hashes.append(block_hash(hashes[-1] if hashes else b"", seq.token_ids[i * size:(i + 1) * size]))

    def _reusable(self, seq: Sequence) -> list[int]:
        """The cached blocks that hold `seq`'s first tokens, at most all but the last token's."""
        self._update_hashes(seq)
        reused = []
        for h in seq.block_hashes[:(seq.num_tokens - 1) // self.block_size]:
            block = self.cached.get(h)
            if block is None:
                break
            reused.append(block)
        return reused

    def _take_free_block(self) -> int:
        if not self.free:
            raise RuntimeError("no free KV cache block (the scheduler should have checked)")
        block, _ = self.free.popitem(last=False)
        old = self.hashes[block]
        if old is not None:  # evict the content it held
            if self.cached.get(old) == block:
                del self.cached[old]
            self.hashes[block] = None
        self.ref_counts[block] = 1
        return block

    def _register(self, block: int, h: bytes) -> None:
        self.hashes[block] = h
        self.cached[h] = block
