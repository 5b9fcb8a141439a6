"""Which loader a `data.dataset_name` means, and loading a split of it with one-line errors.

Resolution order: an offline source by name (fashion_mnist, shakespeare, spoken_digits), then a local file
or folder (recognised by its content), then a Hugging Face hub name. Sources without their own held-out
split (one folder of classes, one text) keep a fixed tenth of their samples as 'test'.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from distqat.config import DataConfig
from distqat.data import hub, images, speech, text
from distqat.data.datasets import AudioDataset, Dataset, ImageDataset
from distqat.errors import DataError

HOLDOUT_SEED = 1234


@dataclass(frozen=True)
class Source:
    description: str
    task_type: str | None  # None: any (hub datasets follow data.task_type)
    load: Callable[[str], Dataset]  # split -> dataset
    check: Callable[[], None] = lambda: None


def holdout(dataset: Dataset, split: str, where: str) -> Dataset:
    """A fixed tenth of the samples as 'test', the rest as 'train' (same partition in every process)."""
    if split not in ("train", "test", "validation"):
        raise DataError(f"data.dataset_split '{split}': {where} has 'train' and 'test' (a held-out tenth)")
    if not isinstance(dataset, ImageDataset | AudioDataset):
        raise DataError(f"{where}: cannot hold out samples of a {type(dataset).__name__}")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(HOLDOUT_SEED))
    held = max(1, len(dataset) // 10)
    index, _ = (order[held:] if split == "train" else order[:held]).sort()
    return dataset.select(index)


def _split_folder(folder: Path, split: str) -> tuple[Path, bool]:
    """(folder of the split, whether it is a real split folder) for folders with train/ and test/ inside."""
    for name in (split, "val" if split == "validation" else split):
        if (folder / name).is_dir() and (folder / "train").is_dir():
            return folder / name, True
    return folder, False


def _local_source(path: Path, data: DataConfig) -> Source:
    where = str(path)
    if path.is_file():
        if path.suffix.lower() in hub.DATA_FILE_SUFFIXES:
            return Source(f"data file {path}", None, lambda split: _hub_load(str(path), data, split))
        return Source(f"text file {path}", "llm", lambda split: text.load_text_files(path, data, split))
    if (path / images.IDX_FILES["train"][0]).is_file() or (path / images.IDX_FILES["test"][0]).is_file():
        return Source(f"IDX folder {path}", "cv", lambda split: images.load_idx(path, split))
    if images.is_cifar_folder(path):
        return Source(f"CIFAR python batches {path}", "cv", lambda split: images.load_cifar_batches(path, split))
    if hub.is_data_folder(path):
        return Source(f"data files {path}", None, lambda split: _hub_load(str(path), data, split))
    probe, _ = _split_folder(path, "train")
    if images.has_class_images(probe):
        return Source(
            f"image folder {path}", "cv", lambda split: _folder_split(path, split, images.load_image_folder, data)
        )
    if speech.has_class_wavs(probe):
        return Source(
            f"WAV folder {path}", "speech", lambda split: _folder_split(path, split, speech.load_wav_folder, data)
        )
    if any(path.rglob("*.txt")):
        return Source(f"text folder {path}", "llm", lambda split: text.load_text_files(path, data, split))
    raise DataError(
        f"data.dataset_name '{where}': a folder DistQat cannot read (expected IDX .gz files, CIFAR python batches, "
        "class subfolders of images or WAV files, .txt files, or parquet/csv/json files)"
    )


def _folder_split(path: Path, split: str, load: Callable[[Path, DataConfig], Dataset], data: DataConfig) -> Dataset:
    folder, real = _split_folder(path, split)
    if real:
        return load(folder, data)
    return holdout(load(path, data), split, str(path))


def _hub_load(name: str, data: DataConfig, split: str) -> Dataset:
    return hub.hf_to_dataset(hub.load_hf_split(name, data, split), data, name, split)


def _splits_used(data: DataConfig) -> list[str]:
    return [data.dataset_split] + ([data.eval_split] if data.eval_every > 0 else [])


def resolve_source(data: DataConfig) -> Source:
    name = data.dataset_name
    if name == "fashion_mnist":
        return Source(
            "Fashion-MNIST",
            "cv",
            lambda split: images.load_fashion_mnist(data, split),
            lambda: [images.fashion_mnist_files(data, split) for split in _splits_used(data)],
        )
    if name == "shakespeare":
        return Source(
            "Shakespeare's plays",
            "llm",
            lambda split: text.load_shakespeare(data, split),
            lambda: text.check_shakespeare(data),
        )
    if name == "spoken_digits":
        return Source(
            "spoken digits (espeak-ng)",
            "speech",
            lambda split: speech.load_spoken_digits(data, split),
            lambda: speech.check_spoken_digits(data),
        )
    path = Path(name).expanduser()
    if path.exists():
        return _local_source(path, data)
    if name.startswith((".", "/", "~")) or ("/" not in name and "\\" in name):
        raise DataError(f"data.dataset_name '{name}': no such file or folder")
    return Source(
        f"Hugging Face dataset {name}",
        None,
        lambda split: _hub_load(name, data, split),
        lambda: hub.check_hub_dataset(name),
    )


def check_dataset(data: DataConfig) -> Source:
    """Raise DataError now for what `load_dataset` would fail on, without reading the data."""
    source = resolve_source(data)
    if source.task_type is not None and source.task_type != data.task_type:
        raise DataError(
            f"data.task_type '{data.task_type}' does not fit data.dataset_name '{data.dataset_name}' "
            f"({source.description} is a '{source.task_type}' dataset)"
        )
    source.check()
    return source


def load_dataset(data: DataConfig, split: str | None = None, limit: int | None = None) -> Dataset:
    """The configured dataset's split (default: data.dataset_split), cut to `limit` or data.max_samples samples."""
    source = check_dataset(data)
    dataset = source.load(split or data.dataset_split)
    limit = limit if limit is not None else (data.max_samples if split in (None, data.dataset_split) else None)
    if limit is not None and len(dataset) > limit:
        dataset = dataset.subset(limit)
    if len(dataset) == 0:
        raise DataError(f"data.dataset_name '{data.dataset_name}': split '{split or data.dataset_split}' is empty")
    return dataset
