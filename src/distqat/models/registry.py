"""The stage registry: what `model_name: resnet18.head` in a config builds.

A stage builder takes keyword arguments from the config (`num_classes`, `num_channels`, `img_size`, ...)
and returns an `nn.Module`. `sample_input_fn(batch_size, data_config)` returns an input the stage accepts,
for dry runs and tests. Every stage is initialised from a seed derived from the run's seed and the stage's
name, so a server's `resnet18.head` and the baseline's are the same tensors.
"""

from __future__ import annotations

import importlib
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from distqat.config import DataConfig, StageConfig
from distqat.errors import ModelError

StageBuilder = Callable[..., nn.Module]
SampleInputFn = Callable[[int, DataConfig], torch.Tensor]


@dataclass(frozen=True)
class StageEntry:
    name: str
    builder: StageBuilder
    sample_input_fn: SampleInputFn


_REGISTRY: dict[str, StageEntry] = {}

# Built-in families register themselves when their module is imported. They are imported on first
# use, so a process that needs only the tiny model never pays for importing torchvision.
BUILTIN_FAMILIES = {"resnet18": "distqat.models.resnet", "tiny": "distqat.models.tiny"}


def register_expert_class(name: str, sample_input_fn: SampleInputFn) -> Callable[[StageBuilder], StageBuilder]:
    """Decorator: register a stage builder (a function or an nn.Module class) under `family.stage`."""

    def decorate(builder: StageBuilder) -> StageBuilder:
        if name in _REGISTRY:
            raise ModelError(f"model stage '{name}' is registered twice")
        _REGISTRY[name] = StageEntry(name, builder, sample_input_fn)
        return builder

    return decorate


def registered_names() -> list[str]:
    for module in BUILTIN_FAMILIES.values():
        importlib.import_module(module)
    return sorted(_REGISTRY)


def get_stage_entry(model_name: str) -> StageEntry:
    family = model_name.split(".", 1)[0]
    if model_name not in _REGISTRY and family in BUILTIN_FAMILIES:
        importlib.import_module(BUILTIN_FAMILIES[family])
    try:
        return _REGISTRY[model_name]
    except KeyError:
        known = ", ".join(registered_names())
        raise ModelError(f"unknown model stage '{model_name}' (known: {known})") from None


def stage_seed(seed: int, model_name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(model_name.encode())) % 2**31


def build_stage(stage: StageConfig, data: DataConfig, seed: int) -> nn.Module:
    entry = get_stage_entry(stage.model_name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stage_seed(seed, stage.model_name))
        try:
            return entry.builder(num_classes=stage.num_classes, num_channels=data.num_channels, img_size=data.img_size)
        except TypeError as error:
            raise ModelError(f"cannot build model stage '{stage.model_name}': {error}") from error


def build_pipeline_stages(stages: list[StageConfig], data: DataConfig, seed: int) -> list[nn.Module]:
    return [build_stage(stage, data, seed) for stage in stages]
