"""A trainer's own batch stream (without a data server, and in `distqat baseline`): batches prepared in a thread."""

from __future__ import annotations

import queue
import threading

import torch

from distqat.config import DataConfig
from distqat.data.datasets import Dataset
from distqat.data.shuffle import epoch_batches
from distqat.errors import DataError


class BatchStream:
    """Endless shuffled batches (reshuffled every epoch), prepared `prefetch` batches ahead in a thread."""

    def __init__(
        self,
        dataset: Dataset,
        data: DataConfig,
        batch_size: int,
        seed: int,
        prefetch: int = 4,
        shuffle_buffer: int = 10_000,
    ):
        if len(dataset) < batch_size:
            raise DataError(f"diloco.batch_size_per_step {batch_size} is larger than the dataset ({len(dataset)})")
        self._dataset, self._data = dataset, data
        self._plans = epoch_batches(len(dataset), batch_size, shuffle_buffer, seed)
        self._queue: queue.Queue[tuple[torch.Tensor, torch.Tensor] | BaseException] = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="batch-prefetch", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        try:
            for plan in self._plans:
                batch = self._dataset.batch(plan.index, self._data)
                while not self._stop.is_set():
                    try:
                        self._queue.put(batch, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as error:  # hand it to the consumer, which would otherwise wait forever
            self._queue.put(error)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise DataError(f"preparing a batch failed: {item}") from item
        return item

    def close(self) -> None:
        self._stop.set()
