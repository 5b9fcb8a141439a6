"""Hugging Face `datasets` sources: a hub name (uoft-cs/cifar10, wikitext) or a local folder of data files.

Rows are converted once into the in-memory datasets of `distqat.data.datasets`: the image column is decoded
and resized, a text column is tokenised into one stream, an audio column (WAV) is resampled to 16 kHz. The
whole split is preloaded, so for a very large one (ImageNet) set `data.max_samples`.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distqat.config import DataConfig
from distqat.data.datasets import AudioDataset, Dataset, ImageDataset, TokenDataset, pad_waves, pixel_stats
from distqat.errors import DataError

HUB_TIMEOUT_S = 15.0
DATA_FILE_SUFFIXES = {".parquet", ".arrow", ".csv", ".json", ".jsonl"}
IMAGE_COLUMNS, TEXT_COLUMNS, AUDIO_COLUMNS = ("img", "image"), ("text", "content"), ("audio",)
LABEL_COLUMNS = ("label", "labels", "fine_label", "coarse_label")


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _need_datasets():
    try:
        import datasets
    except ImportError:
        raise DataError("Hugging Face datasets need the 'datasets' package (pip install datasets)") from None
    return datasets


def is_data_folder(path: Path) -> bool:
    return path.is_dir() and any(p.suffix.lower() in DATA_FILE_SUFFIXES for p in path.rglob("*") if p.is_file())


def check_hub_dataset(name: str) -> None:
    """Fail fast, in one line, when a hub dataset cannot be reached, does not exist or is gated."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"} and not _is_cached(name):
        raise DataError(
            f"data.dataset_name '{name}': HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache "
            "(download it once with internet, or point data.dataset_name at a local folder)"
        )
    if os.environ.get("HF_HUB_OFFLINE"):
        return
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().dataset_info(name, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        raise DataError(
            f"data.dataset_name '{name}': gated on the Hugging Face hub: accept its terms on its page and log in "
            "(hf auth login)"
        ) from None
    except RepositoryNotFoundError:
        raise DataError(
            f"data.dataset_name '{name}': no such dataset on the Hugging Face hub, and no local file or folder "
            "of that name (offline sources: fashion_mnist, shakespeare, spoken_digits)"
        ) from None
    except Exception as error:  # network errors come in many types; all mean the same to the user
        raise DataError(
            f"data.dataset_name '{name}': cannot reach the Hugging Face hub ({_one_line(error)}); connect to the "
            "internet, or point data.dataset_name at a local folder"
        ) from None


def _is_cached(name: str) -> bool:
    from huggingface_hub.constants import HF_HUB_CACHE

    return (Path(HF_HUB_CACHE) / f"datasets--{name.replace('/', '--')}").is_dir()


def load_hf_split(name: str, data: DataConfig, split: str) -> Any:
    datasets = _need_datasets()
    try:
        return datasets.load_dataset(name, data.dataset_config, split=split)
    except ValueError as error:
        raise DataError(f"data.dataset_name '{name}': {_one_line(error)}") from None
    except Exception as error:
        raise DataError(
            f"data.dataset_name '{name}': Hugging Face datasets could not load split '{split}' ({_one_line(error)})"
        ) from None


def _column(table: Any, wanted: tuple[str, ...], feature_type: str, what: str, name: str) -> str:
    for column, feature in table.features.items():
        if type(feature).__name__ == feature_type:
            return column
    for column in wanted:
        if column in table.column_names:
            return column
    raise DataError(f"data.dataset_name '{name}': no {what} column (columns: {', '.join(table.column_names)})")


def _file_bytes(cell: Any, where: str) -> bytes | Path:
    if isinstance(cell, dict) and cell.get("bytes"):
        return cell["bytes"]
    if isinstance(cell, dict) and cell.get("path"):
        return Path(cell["path"])
    raise DataError(f"{where}: a cell holds neither bytes nor a path")


def hf_to_dataset(table: Any, data: DataConfig, name: str, split: str) -> Dataset:
    datasets = _need_datasets()
    if data.max_samples is not None and data.task_type != "llm":
        table = table.select(range(min(len(table), data.max_samples)))
    if data.task_type == "llm":
        return _tokens(table, data, name, split)
    label = _column(table, LABEL_COLUMNS, "ClassLabel", "label", name)
    labels = torch.tensor(table[label], dtype=torch.int64)
    feature = table.features[label]
    num_classes = feature.num_classes if hasattr(feature, "num_classes") else int(labels.max()) + 1
    if data.task_type == "cv":
        column = _column(table, IMAGE_COLUMNS, "Image", "image", name)
        table = table.cast_column(column, datasets.Image(decode=False))
        images = torch.from_numpy(np.stack([_image(cell, data, name) for cell in table[column]]))
        images = images.permute(0, 3, 1, 2).contiguous()
        mean, std = pixel_stats(images)
        return ImageDataset(images, labels, mean, std, num_classes)
    from distqat.data.speech import read_wav

    column = _column(table, AUDIO_COLUMNS, "Audio", "audio", name)
    table = table.cast_column(column, datasets.Audio(decode=False))
    waves = [torch.from_numpy(read_wav(_file_bytes(cell, name), name)) for cell in table[column]]
    return AudioDataset(pad_waves(waves, data.audio_len), labels, num_classes)


def _image(cell: Any, data: DataConfig, name: str) -> np.ndarray:
    from PIL import Image

    source = _file_bytes(cell, name)
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        image = image.convert("L" if data.num_channels == 1 else "RGB")
        image = image.resize((data.img_size, data.img_size), Image.BILINEAR)
        return np.asarray(image, dtype=np.uint8).reshape(data.img_size, data.img_size, -1)


def _tokens(table: Any, data: DataConfig, name: str, split: str) -> TokenDataset:
    from distqat.data.text import tokens_of

    column = _column(table, TEXT_COLUMNS, "", "text", name)
    fingerprint = getattr(table, "_fingerprint", None) or f"{name}:{data.dataset_config}:{split}:{len(table)}"
    key = "hf-" + hashlib.sha1(fingerprint.encode()).hexdigest()[:16]
    ids, vocab = tokens_of(lambda: "\n".join(t for t in table[column] if t), key, data)
    dataset = TokenDataset(torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int32)), data.seq_len, vocab)
    if len(dataset) == 0:
        raise DataError(f"data.dataset_name '{name}': split '{split}' has fewer than seq_len+1 tokens")
    return dataset
