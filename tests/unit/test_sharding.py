"""Automatic stage splitting: balanced cut points, explicit cuts, and pipelines whose stages must cover the model."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from distqat.config import DataConfig, ModelPipelineConfig
from distqat.errors import ModelError
from distqat.models import build_pipeline_stages, stage_ranges
from distqat.sharding import balanced_cuts, plan_split, split_at, split_module


def brute_force_best(costs: list[float], stages: int) -> float:
    best = float("inf")
    for cuts in itertools.combinations(range(1, len(costs)), stages - 1):
        bounds = [0, *cuts, len(costs)]
        best = min(best, max(sum(costs[a:b]) for a, b in itertools.pairwise(bounds)))
    return best


@pytest.mark.parametrize("seed", range(5))
def test_balanced_cuts_minimise_the_largest_stage(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    costs = (torch.rand(9, generator=generator) * 10).tolist()
    for stages in (1, 2, 3, 5, 9):
        cuts = balanced_cuts(costs, stages)
        bounds = [0, *cuts, len(costs)]
        assert len(cuts) == stages - 1 and all(a < b for a, b in itertools.pairwise(bounds))
        largest = max(sum(costs[a:b]) for a, b in itertools.pairwise(bounds))
        assert largest == pytest.approx(brute_force_best(costs, stages))


def test_balanced_cuts_refuse_more_stages_than_units() -> None:
    with pytest.raises(ModelError, match="cannot cut 3 units into 4 stages"):
        balanced_cuts([1, 1, 1], 4)


def test_split_module_chains_to_the_same_output() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    x = torch.randn(3, 8)
    for balance in ("params", "time"):
        stages = split_module(model, 3, balance=balance, sample=x)
        assert len(stages) == 3
        hidden = x
        for stage in stages:
            hidden = stage(hidden)
        torch.testing.assert_close(hidden, model(x))
    assert [len(stage) for stage in split_at(list(model), [1, 4])] == [1, 3, 1]
    with pytest.raises(ModelError, match="not increasing"):
        split_at(list(model), [3, 3])


def test_plan_split_by_params_and_by_time_covers_the_model() -> None:
    data = DataConfig(num_channels=1, img_size=16)
    by_params = plan_split("resnet18", 3, data)
    # layer4 holds 8.4M of ResNet-18's 11.2M parameters (layer4.0 3.7M, layer4.1 4.7M): each of its blocks
    # becomes a stage and everything before it (2.8M) the first
    assert by_params == [(0, 7), (7, 8), (8, 10)]
    assert plan_split("gptneo", 4, DataConfig()) == [(0, 1), (1, 7), (7, 13), (13, 14)]
    by_time = plan_split("resnet18", 2, data, balance="time")
    assert len(by_time) == 2 and by_time[0][1] == by_time[1][0]


def stages_of(*layers, split: str = "default") -> ModelPipelineConfig:
    roles = ["head", *["body"] * (len(layers) - 2), "tail"] if len(layers) > 1 else ["full"]
    return ModelPipelineConfig(
        pipeline=[
            {"model_name": f"resnet18.{role}", "name": f"s{i}", **({"layers": span} if span else {})}
            for i, (role, span) in enumerate(zip(roles, layers, strict=True))
        ],
        split=split,
    )


def test_pipeline_cuts_default_params_and_explicit() -> None:
    data = DataConfig()
    assert stage_ranges(stages_of(None, None), data) == [(0, 5), (5, 10)]  # between layer2 and layer3
    assert stage_ranges(stages_of(None, None, None), data) == [(0, 3), (3, 7), (7, 10)]
    params = stage_ranges(stages_of(None, None, split="params"), data)
    assert params[0][1] == 8  # layer4 (8.4M of 11.2M parameters) alone against everything else
    assert stage_ranges(stages_of([0, 2], [2, 9], [9, 10]), data) == [(0, 2), (2, 9), (9, 10)]
    stages = build_pipeline_stages(stages_of([0, 2], [2, 9], [9, 10]), data, seed=0)
    assert [stage.units for stage in stages] == [(0, 2), (2, 9), (9, 10)]


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        (([0, 4], [5, 10]), "stage 's1' starts at resnet18 unit 5, but the stage before it ends at 4"),
        (([0, 4], [4, 9]), "the resnet18 stages end at unit 9 of 10"),
        (([0, 4], [4, 12]), "stage 's1' ends at unit 12; resnet18 has 10"),
        (([0, 4], None), "set 'layers' on every resnet18 stage or on none"),
    ],
)
def test_bad_cuts_are_one_clear_line(layers, message) -> None:
    with pytest.raises(ModelError, match=message):
        stage_ranges(stages_of(*layers), DataConfig())
