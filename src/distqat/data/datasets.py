"""In-memory datasets of the three tasks, each turning sample indices into a batch of the trainer contract.

A batch is `(inputs, labels)`:
  cv      inputs float32 [B, C, H, W] normalised, labels int64 [B]
  llm     inputs int64 [B, seq_len] token ids, labels int64 [B, seq_len] already shifted (ignored: -100)
  speech  inputs float32 [B, audio_len] waveform at 16 kHz, zero-padded, labels int64 [B]
Samples are kept compact (uint8 pixels, int32 tokens, int16 audio) and converted per batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distqat.config import DataConfig
from distqat.errors import DataError

IGNORE_INDEX = -100  # label of positions the loss skips (contract with the loss function)
SAMPLE_RATE = 16_000


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class ImageDataset:
    images: torch.Tensor  # uint8, N x C x H x W
    labels: torch.Tensor  # int64, N
    mean: float = 0.5  # pixel mean and std in [0, 1] units, for normalisation
    std: float = 0.25
    num_classes: int | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, count: int) -> ImageDataset:
        return self.select(slice(0, count))

    def select(self, index: torch.Tensor | slice) -> ImageDataset:
        return ImageDataset(self.images[index], self.labels[index], self.mean, self.std, self.num_classes)

    def batch(self, index: torch.Tensor, data: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
        return prepare_images(self.images[index], data, self.mean, self.std), self.labels[index]

    def batch_spec(self, batch_size: int, data: DataConfig) -> tuple[TensorSpec, TensorSpec]:
        shape = (batch_size, data.num_channels, data.img_size, data.img_size)
        return TensorSpec(shape, torch.float32), TensorSpec((batch_size,), torch.int64)


def pixel_stats(images: torch.Tensor, limit: int = 10_000) -> tuple[float, float]:
    """Mean and std of the pixels in [0, 1] units, from the first `limit` images (enough for normalising)."""
    sample = images[:limit].float() / 255.0
    return float(sample.mean()), max(float(sample.std()), 1e-3)


def prepare_images(images: torch.Tensor, data: DataConfig, mean: float, std: float) -> torch.Tensor:
    """uint8 N x C x H x W -> normalised float in the config's channel count and size."""
    batch = (images.float() / 255.0 - mean) / std
    channels = batch.shape[1]
    if channels != data.num_channels:
        if channels == 1:
            batch = batch.expand(-1, data.num_channels, -1, -1)
        elif data.num_channels == 1 and channels == 3:
            batch = batch.mean(dim=1, keepdim=True)
        else:
            raise DataError(f"data.num_channels {data.num_channels}: cannot convert {channels}-channel images")
    if batch.shape[-1] != data.img_size or batch.shape[-2] != data.img_size:
        batch = F.interpolate(batch, size=(data.img_size, data.img_size), mode="bilinear", align_corners=False)
    return batch.contiguous()


@dataclass
class TokenDataset:
    """A token stream cut into non-overlapping windows of seq_len + 1 tokens (inputs and shifted labels)."""

    tokens: torch.Tensor  # int32, 1-D
    seq_len: int
    vocab_size: int | None = None

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def subset(self, count: int) -> TokenDataset:
        return TokenDataset(self.tokens[: count * self.seq_len + 1], self.seq_len, self.vocab_size)

    def batch(self, index: torch.Tensor, data: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
        offsets = index.view(-1, 1) * self.seq_len + torch.arange(self.seq_len + 1)
        windows = self.tokens[offsets].long()
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def batch_spec(self, batch_size: int, data: DataConfig) -> tuple[TensorSpec, TensorSpec]:
        return TensorSpec((batch_size, self.seq_len), torch.int64), TensorSpec((batch_size, self.seq_len), torch.int64)


@dataclass
class AudioDataset:
    """Utterances at 16 kHz, zero-padded or cut to one length, each with a class label."""

    waves: torch.Tensor  # int16, N x audio_len
    labels: torch.Tensor  # int64, N
    num_classes: int | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, count: int) -> AudioDataset:
        return self.select(slice(0, count))

    def select(self, index: torch.Tensor | slice) -> AudioDataset:
        return AudioDataset(self.waves[index], self.labels[index], self.num_classes)

    def batch(self, index: torch.Tensor, data: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
        return self.waves[index].float() / 32768.0, self.labels[index]

    def batch_spec(self, batch_size: int, data: DataConfig) -> tuple[TensorSpec, TensorSpec]:
        return TensorSpec((batch_size, self.waves.shape[1]), torch.float32), TensorSpec((batch_size,), torch.int64)


def pad_waves(waves: list[torch.Tensor], length: int) -> torch.Tensor:
    """float waveforms in [-1, 1] -> int16 N x length, zero-padded at the end or cut."""
    out = torch.zeros(len(waves), length, dtype=torch.int16)
    for row, wave in enumerate(waves):
        clip = wave[:length].clamp(-1.0, 1.0)
        out[row, : len(clip)] = (clip * 32767.0).round().to(torch.int16)
    return out


Dataset = ImageDataset | TokenDataset | AudioDataset
