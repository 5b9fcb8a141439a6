"""A user's model file, as the docs describe: loaded by path with `model_pipeline.model_module`."""

import torch
from torch import nn

from distqat.models import register_expert_class

HIDDEN = 32


def image_batch(batch_size, data):
    return torch.randn(batch_size, data.num_channels, data.img_size, data.img_size)


def hidden_batch(batch_size, data):
    return torch.randn(batch_size, HIDDEN)


@register_expert_class("custom_mlp.head", image_batch)
class Head(nn.Module):
    def __init__(self, num_channels: int = 1, img_size: int = 28):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(num_channels * img_size * img_size, HIDDEN), nn.ReLU())

    def forward(self, images):
        return self.net(images)


@register_expert_class("custom_mlp.tail", hidden_batch)
def tail(num_classes: int = 10, width: int = HIDDEN, **_):
    # `width` comes from model_pipeline.architecture: a wrong one is what dry-run must catch
    return nn.Sequential(nn.Linear(width, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, num_classes))
