"""Image sources: IDX files (Fashion-MNIST), CIFAR python batches, and folders of images per class.

`fashion_mnist` reads the IDX files of Debian's `dataset-fashion-mnist` package (or any folder with the same
four files, `data.data_dir`). Images are kept as uint8, so 60,000 28x28 images cost 47 MB of memory.
"""

from __future__ import annotations

import gzip
import pickle
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from distqat.config import DataConfig
from distqat.data.datasets import ImageDataset, pixel_stats
from distqat.errors import DataError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Fashion-MNIST's pixel mean and std over the training set, in [0, 1] units.
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530
CIFAR_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm"}


def _read_idx(path: Path, header_bytes: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as error:
        raise DataError(f"{path}: unreadable: {error}") from None
    return np.frombuffer(raw, dtype=np.uint8, offset=header_bytes)


def idx_files(folder: Path, split: str, hint: str) -> tuple[Path, Path]:
    """The (images, labels) files of a split; raises DataError if either is missing."""
    if split not in IDX_FILES:
        raise DataError(f"data.dataset_split '{split}': IDX datasets have only 'train' and 'test'")
    files = tuple(folder / name for name in IDX_FILES[split])
    for path in files:
        if not path.is_file():
            raise DataError(f"{path}: not found ({hint})")
    return files  # type: ignore[return-value]


def fashion_mnist_folder(data: DataConfig) -> Path:
    return Path(data.data_dir) if data.data_dir else FASHION_MNIST_DIR


FASHION_HINT = (
    "install Debian's dataset-fashion-mnist, or set data.data_dir to a folder holding the four Fashion-MNIST .gz files"
)


def fashion_mnist_files(data: DataConfig, split: str | None = None) -> tuple[Path, Path]:
    return idx_files(fashion_mnist_folder(data), split or data.dataset_split, FASHION_HINT)


def load_idx(folder: Path, split: str, hint: str = "a folder of IDX .gz files") -> ImageDataset:
    image_path, label_path = idx_files(folder, split, hint)
    images = _read_idx(image_path, header_bytes=16)
    labels = _read_idx(label_path, header_bytes=8)
    side = round((images.size / max(labels.size, 1)) ** 0.5)
    if labels.size == 0 or images.size != labels.size * side * side:
        raise DataError(f"{image_path}: holds {images.size} pixels, not {labels.size} square images")
    return ImageDataset(
        images=torch.from_numpy(images.copy()).view(-1, 1, side, side),
        labels=torch.from_numpy(labels.astype(np.int64)),
        mean=FASHION_MEAN,
        std=FASHION_STD,
        num_classes=10,
    )


def load_fashion_mnist(data: DataConfig, split: str) -> ImageDataset:
    return load_idx(fashion_mnist_folder(data), split, FASHION_HINT)


def is_cifar_folder(folder: Path) -> bool:
    return (folder / "data_batch_1").is_file() or (folder / "test_batch").is_file()


def load_cifar_batches(folder: Path, split: str) -> ImageDataset:
    """The CIFAR-10/100 'python version': pickled dicts with b'data' (N x 3072 uint8) and the labels."""
    if split not in CIFAR_FILES:
        raise DataError(f"data.dataset_split '{split}': CIFAR python batches have only 'train' and 'test'")
    names = CIFAR_FILES[split]
    if split == "train" and not (folder / names[0]).is_file() and (folder / "train").is_file():
        names = ["train"]  # CIFAR-100 ships one 'train' and one 'test' file
    images, labels = [], []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise DataError(f"{path}: not found (a CIFAR python batches folder holds {', '.join(names)})")
        try:
            with path.open("rb") as handle:
                batch = pickle.load(handle, encoding="bytes")
            data = np.asarray(batch[b"data"], dtype=np.uint8)
            label_key = next(k for k in (b"labels", b"fine_labels") if k in batch)
            labels.append(np.asarray(batch[label_key], dtype=np.int64))
        except (OSError, pickle.UnpicklingError, KeyError, StopIteration, EOFError, TypeError) as error:
            raise DataError(f"{path}: not a CIFAR python batch ({type(error).__name__}: {error})") from None
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels[-1]):
            raise DataError(f"{path}: b'data' has shape {data.shape}, expected N x 3072 with N labels")
        images.append(data.reshape(-1, 3, 32, 32))
    stacked = torch.from_numpy(np.concatenate(images))
    mean, std = pixel_stats(stacked)
    label_tensor = torch.from_numpy(np.concatenate(labels))
    return ImageDataset(stacked, label_tensor, mean, std, num_classes=int(label_tensor.max()) + 1)


def class_folders(folder: Path, suffixes: set[str]) -> dict[str, list[Path]]:
    """{class name: files} of a folder with one subfolder per class (sorted: labels are stable)."""
    classes = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(p for p in sub.rglob("*") if p.suffix.lower() in suffixes)
        if files:
            classes[sub.name] = files
    return classes


def load_image_folder(folder: Path, data: DataConfig) -> ImageDataset:
    """Images in one subfolder per class, decoded once and resized to img_size x img_size."""
    from PIL import Image, UnidentifiedImageError

    classes = class_folders(folder, IMAGE_SUFFIXES)
    if not classes:
        raise DataError(f"{folder}: no images in class subfolders (expected {folder}/<class>/<image>.png)")
    files = [(path, label) for label, paths in enumerate(classes.values()) for path in paths]
    mode = "L" if data.num_channels == 1 else "RGB"

    def decode(path: Path) -> np.ndarray:
        try:
            with Image.open(path) as image:
                image = image.convert(mode).resize((data.img_size, data.img_size), Image.BILINEAR)
                return np.asarray(image, dtype=np.uint8).reshape(data.img_size, data.img_size, -1)
        except (OSError, UnidentifiedImageError) as error:
            raise DataError(f"{path}: not a readable image ({error})") from None

    with ThreadPoolExecutor(max(1, data.num_workers)) as pool:
        arrays = list(pool.map(decode, [path for path, _ in files]))
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    mean, std = pixel_stats(images)
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    return ImageDataset(images, labels, mean, std, num_classes=len(classes))


def has_class_images(folder: Path) -> bool:
    return any(
        sub.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in sub.iterdir()) for sub in folder.iterdir()
    )
