"""Split a model into pipeline stages: at explicit cut points, or balanced by parameter count or forward time.

A model here is a chain of units (an `nn.Sequential`, or a built-in family's units). `balanced_cuts` is the
pure part: the contiguous partition of per-unit costs into N stages whose most expensive stage is as cheap
as possible. The rest measures costs (parameters on the meta device, so nothing is allocated; forward time
on a sample batch) and cuts modules. A config states the result as `layers: [start, end]` on its stages,
so every server of a swarm builds the same cut (forward times differ between machines and runs).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from distqat.errors import ModelError

if TYPE_CHECKING:
    from distqat.config import DataConfig
    from distqat.models.family import BuildContext, UnitFamily

Balance = Literal["params", "time"]


def balanced_cuts(costs: Sequence[float], num_stages: int) -> list[int]:
    """Cut points (the first unit of stages 2..N) minimising the largest stage's summed cost; every stage
    gets at least one unit. Exact (dynamic programming over prefix sums), fine for the few dozen units of a model."""
    count = len(costs)
    if not 1 <= num_stages <= count:
        raise ModelError(f"cannot cut {count} units into {num_stages} stages")
    prefix = [0.0]
    for cost in costs:
        prefix.append(prefix[-1] + float(cost))
    inf = float("inf")
    # best[k][i]: the smallest possible largest-stage cost of units [0, i) cut into k stages
    best = [[inf] * (count + 1) for _ in range(num_stages + 1)]
    choice = [[0] * (count + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, num_stages + 1):
        for i in range(k, count - (num_stages - k) + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i]:
                    best[k][i], choice[k][i] = value, j
    cuts, end = [], count
    for k in range(num_stages, 1, -1):
        end = choice[k][end]
        cuts.append(end)
    return sorted(cuts)


def split_at(units: Sequence[nn.Module], cuts: Sequence[int]) -> list[nn.Sequential]:
    """Cut a chain of units at explicit cut points (stage i runs units [cuts[i-1], cuts[i]))."""
    bounds = [0, *cuts, len(units)]
    if any(a >= b for a, b in itertools.pairwise(bounds)):
        raise ModelError(f"cut points {list(cuts)} are not increasing within 1..{len(units) - 1}")
    return [nn.Sequential(*units[a:b]) for a, b in itertools.pairwise(bounds)]


def param_counts(units: Sequence[nn.Module]) -> list[int]:
    return [sum(p.numel() for p in unit.parameters()) for unit in units]


def forward_times(units: Sequence[nn.Module], sample: torch.Tensor, repeats: int = 3) -> list[float]:
    """Seconds each unit's forward takes on `sample` (the best of `repeats`, after one warm-up run)."""
    times = []
    hidden = sample
    with torch.no_grad():
        for unit in units:
            unit(hidden)
            best = float("inf")
            for _ in range(repeats):
                started = time.perf_counter()
                output = unit(hidden)
                best = min(best, time.perf_counter() - started)
            times.append(best)
            hidden = output
    return times


def split_module(
    model: nn.Sequential, num_stages: int, balance: Balance = "params", sample: torch.Tensor | None = None
) -> list[nn.Sequential]:
    """Split any `nn.Sequential` into balanced stages (by parameters, or by forward time on `sample`)."""
    units = list(model)
    if balance == "time":
        if sample is None:
            raise ModelError("balancing by forward time needs a sample input")
        costs: list[float] = forward_times(units, sample)
    else:
        costs = [float(c) for c in param_counts(units)]
    return split_at(units, balanced_cuts(costs, num_stages))


def unit_param_counts(family: UnitFamily, context: BuildContext) -> list[int]:
    """Parameters per unit of a built-in family, counted on the meta device (no memory, no init cost)."""
    from distqat.models.family import BuildContext

    count = len(family.unit_names(context))
    plain = BuildContext(context.num_classes, context.data, context.architecture, context.pretrained_path)
    with torch.device("meta"):
        return param_counts(family.build_units(plain, 0, count))


def plan_split(
    family_name: str,
    num_stages: int,
    data: DataConfig,
    balance: Balance = "params",
    architecture: dict | None = None,
    num_classes: int = 10,
    batch_size: int = 2,
) -> list[tuple[int, int]]:
    """Unit ranges of a built-in family cut into `num_stages` balanced stages (write them as `layers`)."""
    from distqat.models.family import BuildContext
    from distqat.models.registry import get_stage_entry

    family = get_stage_entry(f"{family_name}.full").family
    if family is None:
        raise ModelError(f"'{family_name}' is not a built-in family (split custom models with split_module)")
    context = BuildContext(num_classes=num_classes, data=data, architecture=dict(architecture or {}))
    family.check_architecture(context)
    if balance == "time":
        units = family.build_units(context, 0, len(family.unit_names(context)))
        for unit in units:
            unit.eval()
        costs: list[float] = forward_times(units, family.sample_input(batch_size, context))
    else:
        costs = [float(c) for c in unit_param_counts(family, context)]
    bounds = [0, *balanced_cuts(costs, num_stages), len(costs)]
    return list(itertools.pairwise(bounds))
