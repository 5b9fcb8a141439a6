"""A tiny two-stage MLP for fast tests and smoke runs: `tiny.head` (flatten + hidden layer), `tiny.tail`."""

from __future__ import annotations

import torch
from torch import nn

from distqat.config import DataConfig
from distqat.models.registry import register_expert_class

HIDDEN = 64


def image_batch(batch_size: int, data: DataConfig) -> torch.Tensor:
    return torch.randn(batch_size, data.num_channels, data.img_size, data.img_size)


def hidden_batch(batch_size: int, data: DataConfig) -> torch.Tensor:
    return torch.randn(batch_size, HIDDEN)


@register_expert_class("tiny.head", image_batch)
def tiny_head(num_channels: int = 1, img_size: int = 28, **_: object) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(num_channels * img_size * img_size, HIDDEN), nn.ReLU())


@register_expert_class("tiny.tail", hidden_batch)
def tiny_tail(num_classes: int = 10, **_: object) -> nn.Module:
    return nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, num_classes))
