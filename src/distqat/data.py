"""Datasets and batches: reading image datasets from local files, and an endless shuffled batch stream.

`fashion_mnist` reads the IDX files of Debian's `dataset-fashion-mnist` package (or any folder with the
same four files, `data.data_dir`). Images are kept as uint8 and normalised per batch, so a 60,000-image
dataset costs 47 MB of memory.
"""

from __future__ import annotations

import gzip
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from distqat.config import DataConfig
from distqat.errors import DataError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Fashion-MNIST's pixel mean and std over the training set, in [0, 1] units.
_MEAN, _STD = 0.2860, 0.3530


@dataclass
class ImageDataset:
    images: torch.Tensor  # uint8, N x C x H x W
    labels: torch.Tensor  # int64, N

    def __len__(self) -> int:
        return len(self.labels)


def _read_idx(path: Path, header_bytes: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as error:
        raise DataError(f"{path}: unreadable: {error}") from None
    return np.frombuffer(raw, dtype=np.uint8, offset=header_bytes)


def fashion_mnist_files(data: DataConfig) -> tuple[Path, Path]:
    """The (images, labels) files of the configured split; raises DataError if either is missing."""
    if data.dataset_split not in _IDX_FILES:
        raise DataError(f"data.dataset_split '{data.dataset_split}': Fashion-MNIST has only 'train' and 'test'")
    folder = Path(data.data_dir) if data.data_dir else FASHION_MNIST_DIR
    files = tuple(folder / name for name in _IDX_FILES[data.dataset_split])
    for path in files:
        if not path.is_file():
            raise DataError(
                f"{path}: not found (install Debian's dataset-fashion-mnist, or set data.data_dir to a folder "
                "holding the four Fashion-MNIST .gz files)"
            )
    return files  # type: ignore[return-value]


def load_fashion_mnist(data: DataConfig) -> ImageDataset:
    image_path, label_path = fashion_mnist_files(data)
    folder, image_file = image_path.parent, image_path.name
    images = _read_idx(image_path, header_bytes=16)
    labels = _read_idx(label_path, header_bytes=8)
    if images.size != labels.size * 28 * 28:
        raise DataError(f"{folder}: {image_file} holds {images.size} pixels, expected {labels.size} images of 28x28")
    return ImageDataset(
        images=torch.from_numpy(images.copy()).view(-1, 1, 28, 28),
        labels=torch.from_numpy(labels.astype(np.int64)),
    )


_LOADERS = {"fashion_mnist": load_fashion_mnist}
_CHECKS = {"fashion_mnist": fashion_mnist_files}


def check_dataset(data: DataConfig) -> None:
    """Raise DataError now for what `load_dataset` would fail on, without reading the data."""
    if data.task_type != "cv":
        raise DataError(f"data.task_type '{data.task_type}': only 'cv' datasets can be loaded in this version")
    if data.dataset_name not in _LOADERS:
        raise DataError(
            f"data.dataset_name '{data.dataset_name}' is not available (available: {', '.join(sorted(_LOADERS))})"
        )
    _CHECKS[data.dataset_name](data)


def load_dataset(data: DataConfig) -> ImageDataset:
    check_dataset(data)
    dataset = _LOADERS[data.dataset_name](data)
    if data.max_samples is not None:
        dataset = ImageDataset(dataset.images[: data.max_samples], dataset.labels[: data.max_samples])
    return dataset


def prepare_images(images: torch.Tensor, data: DataConfig) -> torch.Tensor:
    """uint8 N x C x H x W -> normalised float in the config's channel count and size."""
    batch = (images.float() / 255.0 - _MEAN) / _STD
    if batch.shape[1] != data.num_channels:
        if batch.shape[1] != 1:
            raise DataError(f"data.num_channels {data.num_channels}: cannot convert {batch.shape[1]}-channel images")
        batch = batch.expand(-1, data.num_channels, -1, -1)
    if batch.shape[-1] != data.img_size or batch.shape[-2] != data.img_size:
        batch = F.interpolate(batch, size=(data.img_size, data.img_size), mode="bilinear", align_corners=False)
    return batch.contiguous()


class BatchStream:
    """Endless shuffled batches (a new permutation every epoch), prepared `prefetch` batches ahead in a thread."""

    def __init__(self, dataset: ImageDataset, data: DataConfig, batch_size: int, seed: int, prefetch: int = 4):
        if len(dataset) < batch_size:
            raise DataError(f"diloco.batch_size_per_step {batch_size} is larger than the dataset ({len(dataset)})")
        self._dataset, self._data, self._batch_size = dataset, data, batch_size
        self._generator = torch.Generator().manual_seed(seed)
        self._queue: queue.Queue[tuple[torch.Tensor, torch.Tensor] | BaseException] = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="batch-prefetch", daemon=True)
        self._thread.start()

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            order = torch.randperm(len(self._dataset), generator=self._generator)
            for start in range(0, len(order) - self._batch_size + 1, self._batch_size):
                index = order[start : start + self._batch_size]
                yield prepare_images(self._dataset.images[index], self._data), self._dataset.labels[index]

    def _fill(self) -> None:
        try:
            self._fill_forever()
        except BaseException as error:  # hand it to the consumer, which would otherwise wait forever
            self._queue.put(error)

    def _fill_forever(self) -> None:
        for batch in self._batches():
            while not self._stop.is_set():
                try:
                    self._queue.put(batch, timeout=0.2)
                    break
                except queue.Full:
                    continue
            if self._stop.is_set():
                return

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise DataError(f"preparing a batch failed: {item}") from item
        return item

    def close(self) -> None:
        self._stop.set()
