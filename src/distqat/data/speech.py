"""Speech sources for `speech`: spoken digits synthesised by espeak-ng, and folders of WAV files per class.

`spoken_digits` says the ten digit words in several English accents, voice variants and speeds with the
Debian package `espeak-ng`, resampled to 16 kHz. It is synthesised once and cached as one .npz (in
`data.data_dir`, else ~/.cache/distqat); its 'test' split is two voice variants no 'train' utterance uses.
"""

from __future__ import annotations

import io
import logging
import shutil
import subprocess
import warnings
from concurrent.futures import ThreadPoolExecutor
from math import gcd
from pathlib import Path

import numpy as np
import torch

from distqat.config import DataConfig
from distqat.data.datasets import SAMPLE_RATE, AudioDataset, pad_waves
from distqat.data.text import cache_dir
from distqat.errors import DataError
from distqat.observability.progress import track

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029")
TRAIN_VARIANTS = ("m1", "m3", "m5", "f1", "f2", "f3")
TEST_VARIANTS = ("m7", "f4")
SPEEDS = (140, 180)  # words per minute
SYNTH_TIMEOUT_S = 30.0
CACHE_VERSION = 1
ESPEAK_HINT = "install it: apt-get install -y --no-install-recommends espeak-ng"

logger = logging.getLogger(__name__)


def resample(wave: np.ndarray, rate: int) -> np.ndarray:
    if rate == SAMPLE_RATE:
        return wave
    from scipy.signal import resample_poly

    common = gcd(rate, SAMPLE_RATE)
    return resample_poly(wave, SAMPLE_RATE // common, rate // common).astype(np.float32)


def read_wav(data: bytes | Path, where: str) -> np.ndarray:
    """A WAV file (bytes or path) -> mono float32 in [-1, 1] at 16 kHz."""
    from scipy.io import wavfile

    try:
        rate, samples = wavfile.read(io.BytesIO(data) if isinstance(data, bytes) else data)
    except (OSError, ValueError) as error:
        raise DataError(f"{where}: not a readable WAV file ({error})") from None
    samples = np.asarray(samples)
    if samples.ndim == 2:
        samples = samples.mean(axis=1)
    if samples.dtype.kind == "i":
        scale = float(np.iinfo(samples.dtype).max) + 1.0
        wave = samples.astype(np.float32) / scale
    elif samples.dtype.kind == "u":  # 8-bit WAV is unsigned
        wave = (samples.astype(np.float32) - 128.0) / 128.0
    else:
        wave = samples.astype(np.float32)
    return resample(wave, int(rate))


def synthesise(word: str, voice: str, speed: int) -> np.ndarray:
    try:
        result = subprocess.run(
            ["espeak-ng", "-v", voice, "-s", str(speed), "--stdout", word],
            capture_output=True,
            timeout=SYNTH_TIMEOUT_S,
            check=True,
        )
    except FileNotFoundError:
        raise DataError(f"spoken_digits: espeak-ng is not installed ({ESPEAK_HINT})") from None
    except subprocess.SubprocessError as error:
        raise DataError(f"spoken_digits: espeak-ng -v {voice} failed: {error}") from None
    with warnings.catch_warnings():  # --stdout cannot know the length: its WAV header says 2 GiB
        warnings.simplefilter("ignore")
        return read_wav(result.stdout, f"espeak-ng -v {voice} '{word}'")


def generate_spoken_digits(
    path: Path,
    accents: tuple[str, ...] = ACCENTS,
    variants: tuple[str, ...] = TRAIN_VARIANTS + TEST_VARIANTS,
    speeds: tuple[int, ...] = SPEEDS,
    workers: int = 2,
) -> None:
    """Synthesise every (accent, variant, speed, digit) utterance and save them as one .npz."""
    jobs = [
        (digit, f"{accent}+{variant}", variant, speed)
        for accent in accents
        for variant in variants
        for speed in speeds
        for digit in range(len(DIGITS))
    ]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        synthesised = pool.map(lambda job: synthesise(DIGITS[job[0]], job[1], job[3]), jobs)
        waves = list(track(synthesised, len(jobs), "synthesising spoken_digits (once, then cached)", logger))
    lengths = np.array([len(w) for w in waves], dtype=np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial.npz")
    np.savez(
        partial,
        audio=np.concatenate(waves).astype(np.float32),
        lengths=lengths,
        labels=np.array([job[0] for job in jobs], dtype=np.int64),
        variants=np.array([job[2] for job in jobs]),
    )
    partial.replace(path)


def spoken_digits_cache(data: DataConfig) -> Path:
    return cache_dir(data) / f"spoken_digits-v{CACHE_VERSION}.npz"


def check_spoken_digits(data: DataConfig) -> None:
    if not spoken_digits_cache(data).is_file() and shutil.which("espeak-ng") is None:
        raise DataError(f"spoken_digits: espeak-ng is not installed and no cache exists ({ESPEAK_HINT})")


def load_spoken_digits(data: DataConfig, split: str) -> AudioDataset:
    if split not in ("train", "test"):
        raise DataError(f"data.dataset_split '{split}': spoken_digits has 'train' and 'test' (held-out voices)")
    path = spoken_digits_cache(data)
    if not path.is_file():
        generate_spoken_digits(path, workers=max(2, data.num_workers))
    with np.load(path) as saved:
        audio, lengths, labels, variants = saved["audio"], saved["lengths"], saved["labels"], saved["variants"]
    keep = np.isin(variants, TEST_VARIANTS if split == "test" else TRAIN_VARIANTS)
    if not keep.any():
        raise DataError(f"{path}: holds no '{split}' utterances (delete it to synthesise it again)")
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    waves = [torch.from_numpy(audio[s : s + n]) for s, n, k in zip(starts, lengths, keep, strict=True) if k]
    return AudioDataset(pad_waves(waves, data.audio_len), torch.from_numpy(labels[keep]), num_classes=len(DIGITS))


def load_wav_folder(folder: Path, data: DataConfig) -> AudioDataset:
    """WAV files in one subfolder per class (the folder name is the label), resampled to 16 kHz."""
    from distqat.data.images import class_folders

    classes = class_folders(folder, {".wav"})
    if not classes:
        raise DataError(f"{folder}: no .wav files in class subfolders (expected {folder}/<label>/<clip>.wav)")
    files = [(path, label) for label, paths in enumerate(classes.values()) for path in paths]
    with ThreadPoolExecutor(max(1, data.num_workers)) as pool:
        waves = list(pool.map(lambda item: torch.from_numpy(read_wav(item[0], str(item[0]))), files))
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    return AudioDataset(pad_waves(waves, data.audio_len), labels, num_classes=len(classes))


def has_class_wavs(folder: Path) -> bool:
    return any(sub.is_dir() and any(p.suffix.lower() == ".wav" for p in sub.iterdir()) for sub in folder.iterdir())
