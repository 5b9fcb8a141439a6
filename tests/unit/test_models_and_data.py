"""Stage builders produce the advertised shapes and parameter counts; the data stream is real and shuffled."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from distqat.config import DataConfig, StageConfig
from distqat.data import BatchStream, load_dataset
from distqat.errors import DataError, ModelError
from distqat.models import build_stage, get_stage_entry, register_expert_class, registered_names


def test_resnet18_split_matches_the_full_model() -> None:
    data = DataConfig(num_channels=1, img_size=28)
    head = build_stage(StageConfig(model_name="resnet18.head"), data, seed=0)
    tail = build_stage(StageConfig(model_name="resnet18.tail"), data, seed=0)
    full = build_stage(StageConfig(model_name="resnet18.full"), data, seed=0)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    # torchvision's ResNet-18 at 10 classes has 11.18M parameters; our stem is 3x3 on 1 channel.
    assert count(head) + count(tail) == count(full)
    assert 11.0e6 < count(full) < 11.2e6
    x = get_stage_entry("resnet18.head").sample_input_fn(2, data)
    hidden = head(x)
    assert hidden.shape == get_stage_entry("resnet18.tail").sample_input_fn(2, data).shape
    assert tail(hidden).shape == (2, 10)


def test_same_seed_same_weights_and_other_seed_other_weights() -> None:
    data = DataConfig()
    a = build_stage(StageConfig(model_name="tiny.head"), data, seed=0)
    b = build_stage(StageConfig(model_name="tiny.head"), data, seed=0)
    c = build_stage(StageConfig(model_name="tiny.head"), data, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters(), strict=True))


def test_unknown_stage_names_the_known_ones() -> None:
    with pytest.raises(ModelError, match=r"unknown model stage 'nope.head' \(known: .*tiny.head"):
        build_stage(StageConfig(model_name="nope.head"), DataConfig(), seed=0)


def test_custom_stage_registration() -> None:
    @register_expert_class("unit_test_model.head", lambda batch, data: torch.zeros(batch, 4))
    def build(num_classes: int = 10, **_: object) -> torch.nn.Module:
        return torch.nn.Linear(4, num_classes)

    assert "unit_test_model.head" in registered_names()
    module = build_stage(StageConfig(model_name="unit_test_model.head", num_classes=3), DataConfig(), seed=0)
    assert module(torch.zeros(2, 4)).shape == (2, 3)
    with pytest.raises(ModelError, match="registered twice"):
        register_expert_class("unit_test_model.head", lambda b, d: torch.zeros(1))(build)


def write_idx(folder: Path, images: np.ndarray, labels: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / "train-images-idx3-ubyte.gz", "wb") as handle:
        handle.write(b"\0" * 16 + images.astype(np.uint8).tobytes())
    with gzip.open(folder / "train-labels-idx1-ubyte.gz", "wb") as handle:
        handle.write(b"\0" * 8 + labels.astype(np.uint8).tobytes())


def test_idx_files_load_and_batches_cover_an_epoch(tmp_path: Path) -> None:
    labels = np.arange(40) % 10
    images = np.repeat(labels[:, None, None], 28 * 28, axis=1).reshape(40, 28, 28) * 20
    write_idx(tmp_path, images, labels)
    data = DataConfig(data_dir=str(tmp_path), num_channels=3, img_size=32)
    dataset = load_dataset(data)
    assert len(dataset) == 40
    stream = BatchStream(dataset, data, batch_size=8, seed=0, prefetch=2)
    try:
        seen = []
        for _ in range(5):
            inputs, batch_labels = stream.next()
            assert inputs.shape == (8, 3, 32, 32)
            # each image's pixels encode its label: the pairing survived shuffling and resizing
            pixel = (inputs[:, 0, 16, 16] * 0.3530 + 0.2860) * 255 / 20
            assert torch.allclose(pixel, batch_labels.float(), atol=0.05)
            seen.extend(batch_labels.tolist())
        assert sorted(seen) == sorted(labels.tolist())  # one epoch: every sample exactly once
        assert seen != labels.tolist()  # shuffled
    finally:
        stream.close()


def test_missing_dataset_files_say_how_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        load_dataset(DataConfig(data_dir=str(tmp_path)))


def test_unreachable_hub_dataset_is_one_line(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"data\.dataset_name 'uoft-cs/cifar10': HF_HUB_OFFLINE is set") as caught:
        load_dataset(DataConfig(dataset_name="uoft-cs/cifar10"))
    assert "\n" not in str(caught.value)


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="needs dataset-fashion-mnist")
def test_real_fashion_mnist() -> None:
    dataset = load_dataset(DataConfig())
    assert len(dataset) == 60_000
    assert dataset.images.shape == (60_000, 1, 28, 28)
    assert sorted(dataset.labels.unique().tolist()) == list(range(10))


def test_a_failing_batch_is_an_error_not_a_hang(tmp_path: Path, monkeypatch) -> None:
    write_idx(tmp_path, np.zeros((16, 28, 28)), np.zeros(16))
    data = DataConfig(data_dir=str(tmp_path))

    def broken(*args):
        raise RuntimeError("decoder exploded")

    monkeypatch.setattr("distqat.data.datasets.prepare_images", broken)
    stream = BatchStream(load_dataset(data), data, batch_size=4, seed=0)
    try:
        with pytest.raises(DataError, match="preparing a batch failed: decoder exploded"):
            stream.next()
    finally:
        stream.close()
