"""The order in which examples are seen, and how they become tensors.

The data position of a run is one number, the optimizer steps done: global batch k holds positions
[k * batch_size, (k + 1) * batch_size) of a stream that runs through the examples epoch after epoch,
each epoch in its own order drawn from (seed, epoch). So batch k is computed, not replayed, and a
resumed run continues exactly where the stopped one was; the global RNG is never touched.

Data that can be indexed (a list, or any object with `__len__` and `__getitem__`) is shuffled per
epoch. A plain iterable is read in its own order, one pass per epoch, and a resumed run skips the
examples already seen.

Every process computes the same global batch and keeps its own disjoint share (`share`), so the
loss can be normalised by the whole batch's token count without talking to the others.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from .data import IGNORE_INDEX

Example = dict[str, Any]  # {"input_ids": ints, "labels": ints}, of equal length


class GlobalBatches:
    """Global batch k of the example stream, for k = 0, 1, 2, ..."""

    def __init__(self, data: Iterable[Example], batch_size: int, shuffle: bool, seed: int):
        self.data, self.batch_size, self.shuffle, self.seed = data, batch_size, shuffle, seed
        self.indexable = hasattr(data, "__len__") and hasattr(data, "__getitem__")
        if self.indexable and len(data) == 0:
            raise ValueError("the training data holds no example")
        self._epoch, self._order = -1, None  # indexable: the current epoch's order
        self._stream: Iterator[Example] | None = None  # iterable: where reading stands
        self._position = 0  # iterable: examples taken from the stream so far
        self._read_this_pass = 0

    def __len__(self) -> int:
        """Examples per epoch (indexable data only)."""
        if not self.indexable:
            raise TypeError("the length of iterable data is unknown; give max_steps")
        return len(self.data)

    def steps_for(self, epochs: float) -> int:
        """Optimizer steps that make `epochs` passes over indexable data (at least 1)."""
        return max(1, round(epochs * len(self) / self.batch_size))

    def batch(self, k: int) -> list[Example]:
        start = k * self.batch_size
        if self.indexable:
            return [self._example_at(p) for p in range(start, start + self.batch_size)]
        return self._read(start)

    def _example_at(self, position: int) -> Example:
        n = len(self.data)
        epoch, i = divmod(position, n)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = torch.randperm(n, generator=g).tolist() if self.shuffle else None
            self._epoch = epoch
        return self.data[self._order[i] if self._order is not None else i]

    def _read(self, start: int) -> list[Example]:
        if start < self._position:  # asked for an earlier batch: read again from the first example
            self._stream, self._position = None, 0
        batch: list[Example] = []
        while len(batch) < self.batch_size:
            if self._stream is None:
                self._stream, self._read_this_pass = iter(self.data), 0
            try:
                example = next(self._stream)
            except StopIteration:
                if self._read_this_pass == 0:
                    raise ValueError(f"the training data gave no example after the first {self._position}: an "
                                     "iterator cannot be read twice; pass a list or a re-iterable dataset, or "
                                     "fewer max_steps") from None
                self._stream = None  # the next epoch reads the data again
                continue
            self._read_this_pass += 1
            self._position += 1
            if self._position > start:
                batch.append(example)
        return batch


def share(global_batch: Sequence[Example], rank: int, world_size: int) -> list[Example]:
    """This process's disjoint part of a global batch: every world_size-th example from `rank`."""
    return list(global_batch[rank::world_size])


def micro_batches(examples: list[Example], n: int) -> list[list[Example]]:
    """`examples` cut into `n` consecutive micro-batches of equal size."""
    size = len(examples) // n
    return [examples[i * size:(i + 1) * size] for i in range(n)]


def learned_tokens(examples: Iterable[Example]) -> int:
    """Tokens that carry a loss: labels set at positions 1.. (position 0 has no token before it)."""
    return sum(int((_checked(e, None)[1][1:] != IGNORE_INDEX).sum()) for e in examples)


def collate(examples: list[Example], pad_id: int, max_length: int | None,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(input_ids, labels) right-padded to the longest example, (B, T) int64 each, and the real token count.

    Right padding needs no attention mask: attention is causal, so real tokens never see the padding
    after them, and padded positions carry no label.
    """
    rows = [_checked(e, max_length) for e in examples]
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for r, (ids, lab) in enumerate(rows):
        input_ids[r, :len(ids)] = ids
        labels[r, :len(lab)] = lab
    tokens = sum(len(ids) for ids, _ in rows)
    return input_ids.to(device), labels.to(device), tokens


def _checked(example: Example, max_length: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(example, dict) or "input_ids" not in example or "labels" not in example:
        raise ValueError(f"a training example must be a dict with 'input_ids' and 'labels', got "
                         f"{type(example).__name__}" + (f" with keys {sorted(example)}" if isinstance(example, dict)
                                                        else ""))
    ids = torch.as_tensor(example["input_ids"], dtype=torch.long)
    labels = torch.as_tensor(example["labels"], dtype=torch.long)
    if ids.ndim != 1 or ids.shape != labels.shape or len(ids) == 0:
        raise ValueError(f"an example's input_ids and labels must be non-empty lists of the same length, got "
                         f"{tuple(ids.shape)} and {tuple(labels.shape)}")
    if max_length is not None and len(ids) > max_length:
        raise ValueError(f"an example has {len(ids)} tokens, more than max_length={max_length}; truncate or "
                         "drop it when loading the data (load_conversations does, and reports it)")
    return ids, labels
