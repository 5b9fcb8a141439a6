"""Datasets, batches and the shared-memory data server (`distqat.data`).

Sources (`sources`): offline packages, local files and Hugging Face datasets, loaded into the in-memory
datasets of `datasets`, which collate the batches of the trainer contract. A trainer takes its batches
from the client's data server (`server`, `consumer`, `shm`) or, on its own, from a `BatchStream`.
"""

from distqat.data.datasets import AudioDataset, Dataset, ImageDataset, TokenDataset, prepare_images
from distqat.data.images import FASHION_MNIST_DIR, fashion_mnist_files, load_fashion_mnist
from distqat.data.sources import check_dataset, load_dataset
from distqat.data.stream import BatchStream

__all__ = [
    "FASHION_MNIST_DIR",
    "AudioDataset",
    "BatchStream",
    "Dataset",
    "ImageDataset",
    "TokenDataset",
    "check_dataset",
    "fashion_mnist_files",
    "load_dataset",
    "load_fashion_mnist",
    "prepare_images",
]
