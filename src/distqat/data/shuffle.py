"""Sample order: a seeded shuffle through a bounded buffer, cut into batches, epoch after epoch forever.

The buffer holds at most `buffer_size` sample indices, so the order costs bounded memory whatever the
dataset's size; the dataset is read in contiguous blocks of that size, in a random block order, so samples
far apart in storage still mix. With a buffer as large as the dataset it is a uniform shuffle.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch


def buffered_shuffle(count: int, buffer_size: int, rng: np.random.Generator) -> Iterator[int]:
    """Every index in range(count) exactly once, shuffled through a buffer of at most `buffer_size`."""
    buffer_size = max(1, min(buffer_size, count))
    blocks = rng.permutation((count + buffer_size - 1) // buffer_size)
    buffer: list[int] = []
    for block in blocks:
        start = int(block) * buffer_size
        stop = min(count, start + buffer_size)
        picks = rng.integers(0, buffer_size, size=stop - start)
        for index, pick in zip(range(start, stop), picks, strict=True):
            if len(buffer) < buffer_size:
                buffer.append(index)
                continue
            # Reservoir step: emit a random buffered index and keep the new one in its place.
            yield buffer[pick]
            buffer[pick] = index
    rng.shuffle(buffer)
    yield from buffer


@dataclass(frozen=True)
class BatchPlan:
    epoch: int
    number: int  # batch number within the epoch
    index: torch.Tensor  # int64 sample indices


def epoch_batches(count: int, batch_size: int, buffer_size: int, seed: int) -> Iterator[BatchPlan]:
    """Full batches of a reshuffled order per epoch (the last partial batch of an epoch is dropped)."""
    epoch = 0
    while True:
        rng = np.random.default_rng([seed, epoch])
        batch: list[int] = []
        number = 0
        for index in buffered_shuffle(count, buffer_size, rng):
            batch.append(index)
            if len(batch) == batch_size:
                yield BatchPlan(epoch, number, torch.tensor(batch, dtype=torch.int64))
                batch, number = [], number + 1
        epoch += 1
