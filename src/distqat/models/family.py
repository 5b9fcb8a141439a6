"""A built-in model family: its full model as a list of *units* that pipeline stages take contiguous runs of.

Every built-in family (ResNet, DistilGPT2, GPT-Neo, Wav2Vec2, tiny) describes its full model as units, each
a module from one tensor to one tensor: ResNet's stem, each residual block, and the pooled classifier; a
transformer's embeddings, each block, and the final norm with the output head. `family.full` runs all
units, `head`/`body`/`tail` run a range of them (`StageConfig.layers`, else the family's default cut), so
stages chained in order compute exactly the full model. Each unit is initialised from a seed derived from
the run's seed, the family and the unit's index, so a unit has the same weights whichever stage holds it.
"""

from __future__ import annotations

import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from distqat.config import DataConfig
from distqat.errors import ModelError

ROLES = ("full", "head", "body", "tail")


@dataclass(frozen=True)
class BuildContext:
    """What a family needs from the config to build its units."""

    num_classes: int = 10
    data: DataConfig = field(default_factory=DataConfig)
    architecture: dict[str, Any] = field(default_factory=dict)
    pretrained_path: str | None = None
    seed: int = 0


def unit_seed(seed: int, family: str, index: int) -> int:
    return (seed * 1_000_003 + zlib.crc32(f"{family}#{index}".encode())) % 2**31


class StageModule(nn.Sequential):
    """A contiguous run of a family's units; `units` says which ([start, end) of the full model)."""

    def __init__(self, units: list[nn.Module], family: str, start: int, end: int):
        super().__init__(*units)
        self.family, self.units = family, (start, end)


class UnitFamily(ABC):
    """A model family whose full model is a chain of units."""

    name: str
    # Keys a config's `model_pipeline.architecture` may override; anything else is a clear error.
    architecture_keys: frozenset[str] = frozenset()

    def check_architecture(self, context: BuildContext) -> None:
        unknown = sorted(set(context.architecture) - self.architecture_keys)
        if unknown:
            allowed = ", ".join(sorted(self.architecture_keys)) or "none"
            raise ModelError(f"model_pipeline.architecture: {self.name} has no field {unknown} (allowed: {allowed})")

    @abstractmethod
    def unit_names(self, context: BuildContext) -> list[str]:
        """One name per unit, in order (what `distqat dry-run` lists and `layers` indexes)."""

    @abstractmethod
    def build_units(self, context: BuildContext, start: int, end: int) -> list[nn.Module]:
        """Units [start, end), freshly initialised from the seed, or loaded from `pretrained_path`."""

    @abstractmethod
    def sample_input(self, batch_size: int, context: BuildContext) -> torch.Tensor:
        """A batch of the model's input (what the first unit takes)."""

    def default_cuts(self, context: BuildContext, num_stages: int) -> list[int]:
        """Unit indices where `num_stages` stages begin (except the first): evenly spread by default."""
        count = len(self.unit_names(context))
        if num_stages > count:
            raise ModelError(f"{self.name} has {count} units: it cannot be cut into {num_stages} stages")
        return [round(count * i / num_stages) for i in range(1, num_stages)]

    def default_range(self, context: BuildContext, role: str) -> tuple[int, int]:
        """The units a lone `head`/`body`/`tail`/`full` stage takes: head|tail as a 2-stage cut, body as the
        middle of a 3-stage cut."""
        count = len(self.unit_names(context))
        if role == "full":
            return 0, count
        if role == "body":
            first, second = self.default_cuts(context, 3)
            return first, second
        (cut,) = self.default_cuts(context, 2)
        return (0, cut) if role == "head" else (cut, count)

    def build_stage(self, context: BuildContext, start: int, end: int) -> StageModule:
        self.check_architecture(context)
        count = len(self.unit_names(context))
        if not 0 <= start < end <= count:
            raise ModelError(f"layers [{start}, {end}] is outside {self.name}'s units [0, {count}]")
        return StageModule(self.build_units(context, start, end), self.name, start, end)


def seeded(seed: int, family: str, index: int, build):
    """Build one unit under its own seed without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(unit_seed(seed, family, index))
        return build()
