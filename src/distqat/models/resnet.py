"""ResNet stages from torchvision, adapted to small images: a 3x3 stride-1 stem and no max-pool.

`resnet18.head` is the stem, layer1 and layer2; `resnet18.tail` is layer3, layer4, pooling and the
classifier; `resnet18.full` is both in one module (the baseline, or a one-stage pipeline).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet18

from distqat.config import DataConfig
from distqat.models.registry import register_expert_class


def _small_image_resnet18(num_classes: int, num_channels: int) -> nn.Module:
    model = resnet18(weights=None, num_classes=num_classes)
    # 28x28 or 32x32 inputs would shrink to 1x1 by layer3 with the ImageNet stem (7x7/2 conv + max-pool).
    model.conv1 = nn.Conv2d(num_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def _head(model: nn.Module) -> nn.Sequential:
    return nn.Sequential(model.conv1, model.bn1, model.relu, model.layer1, model.layer2)


def _tail(model: nn.Module) -> nn.Sequential:
    return nn.Sequential(model.layer3, model.layer4, model.avgpool, nn.Flatten(), model.fc)


def image_batch(batch_size: int, data: DataConfig) -> torch.Tensor:
    return torch.randn(batch_size, data.num_channels, data.img_size, data.img_size)


def head_output(batch_size: int, data: DataConfig) -> torch.Tensor:
    # layer2 halves the side once (stride 2); ceil for odd sides, as the convolution does.
    side = (data.img_size + 1) // 2
    return torch.randn(batch_size, 128, side, side)


@register_expert_class("resnet18.full", image_batch)
def resnet18_full(num_classes: int = 10, num_channels: int = 3, **_: object) -> nn.Module:
    model = _small_image_resnet18(num_classes, num_channels)
    return nn.Sequential(_head(model), _tail(model))


@register_expert_class("resnet18.head", image_batch)
def resnet18_head(num_classes: int = 10, num_channels: int = 3, **_: object) -> nn.Module:
    return _head(_small_image_resnet18(num_classes, num_channels))


@register_expert_class("resnet18.tail", head_output)
def resnet18_tail(num_classes: int = 10, num_channels: int = 3, **_: object) -> nn.Module:
    return _tail(_small_image_resnet18(num_classes, num_channels))
