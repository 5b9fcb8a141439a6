"""Quant schemes: config errors at load, which layers a scheme quantises, calibration, and training through
quantised stages and encoded boundaries in one process."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from distqat.config import Config, load_config
from distqat.distributed.pipeline import LocalPipeline
from distqat.errors import ConfigError
from distqat.quant.lsq import LSQQuantizer
from distqat.quant.scheme import QuantizedLayer, boundary_quantizer, quantizers
from distqat.quant.stages import build_stage, build_stages

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
CUSTOM = REPO / "tests" / "data" / "custom_mlp.py"


def tiny(*overrides: str) -> Config:
    return load_config(TINY, ["--quant.enable", "true", *overrides])


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["--quant.weight-bits", "9"], "quant.weight_bits: Input should be less than or equal to 8 (got 9)"),
        (["--quant.activation-bits", "1"], "quant.activation_bits: Input should be greater than or equal to 2"),
        (["--quant.boundary.bits", "12"], "quant.boundary.bits"),
        (["--quant.stages", "{body: {weight_bits: 4}}"], "quant.stages.body: not a stage of model_pipeline"),
        (["--quant.stages", "{tail: {weight_bits: 1}}"], "quant.stages.tail.weight_bits"),
        (["--quant.stages", "{tail: {bits: 4}}"], "quant.stages.tail.bits: unknown field"),
        (["--quant.boundaries", "{tail: {activations: codes}}"], "quant.boundaries.tail: not a stage boundary"),
        (["--quant.layer-types", "[Conv3d]"], "quant.layer_types.0"),
    ],
)
def test_bad_quant_settings_fail_at_load_with_one_line(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        tiny(*overrides)
    assert "\n" not in str(caught.value)
    assert expected in str(caught.value)


def test_a_scheme_naming_no_layer_of_a_stage_is_refused() -> None:
    with pytest.raises(
        ConfigError, match=r"quant.layer_types \['Conv2d'\] name no layer of stage 'head' \(it has: Linear\)"
    ):
        build_stages(tiny("--quant.layer-types", "[Conv2d]"))


def test_scheme_quantises_all_but_the_first_and_last_layer() -> None:
    head, tail = build_stages(tiny("--quant.weight-bits", "4", "--quant.activation-bits", "3"))
    assert not any(isinstance(m, QuantizedLayer) for m in head.modules())  # its only Linear is the model's first
    quantized = [name for name, m in tail.named_modules() if isinstance(m, QuantizedLayer)]
    assert quantized == ["0"]  # tail: Linear, ReLU, Linear(last, kept in full precision)
    layer = tail[0]
    assert layer.weight_quantizer.bits == 4 and layer.weight_quantizer.signed
    assert layer.weight_quantizer.step.shape == (64,)  # per output channel
    assert layer.input_quantizer.bits == 3 and not layer.input_quantizer.signed  # after the head's ReLU
    # the steps are parameters: the inner optimiser trains them and DiLoCo averages them
    names = {name for name, _ in tail.named_parameters()}
    assert {"0.weight_quantizer.step", "0.input_quantizer.step"} <= names


def test_per_stage_overrides_and_skips() -> None:
    config = tiny(
        "--quant.skip-first", "false", "--quant.stages", "{head: {weight_bits: 2, per_channel_weights: false}}"
    )
    head, _ = build_stages(config)
    assert head[1].weight_quantizer.bits == 2
    assert head[1].weight_quantizer.step.shape == (1,)
    assert head[1].input_quantizer.signed  # images are normalised: signed
    _, tail = build_stages(tiny("--quant.skip-last", "false", "--quant.skip", "['0']"))
    assert [n for n, m in tail.named_modules() if isinstance(m, QuantizedLayer)] == ["2"]


def test_every_replica_builds_identical_calibrated_quantisers() -> None:
    config = tiny("--quant.boundary.activations", "codes", "--quant.boundary.bits", "4")
    first, second = build_stage(config, 1), build_stage(config, 1)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    head = build_stage(config, 0)
    output = boundary_quantizer(head)
    assert isinstance(output, LSQQuantizer) and output.bits == 4 and not output.signed
    assert all(bool(q.initialised) for q in quantizers(head))


def test_disabled_quant_builds_the_plain_model_and_sends_codes_as_floats() -> None:
    config = load_config(TINY, ["--quant.enable=false", "--quant.boundary.activations", "codes"])
    assert config.quant.boundary_for("head").activations == "none"
    head, tail = build_stages(config)
    assert not any(isinstance(m, LSQQuantizer) for m in [*head.modules(), *tail.modules()])


def test_custom_non_sequential_stage_gets_an_output_quantiser_hook() -> None:
    config = load_config(
        TINY,
        [
            "--quant.enable",
            "true",
            "--model-pipeline.model-module",
            str(CUSTOM),
            "--quant.boundary.activations",
            "codes",
            "--quant.boundary.bits",
            "2",
            "--model-pipeline.pipeline",
            "[{model_name: custom_mlp.head}, {model_name: custom_mlp.tail}]",
        ],
    )
    head = build_stage(config, 0)
    out = head(torch.randn(5, 1, 28, 28))
    step = boundary_quantizer(head).effective_step()
    assert len(torch.unique(out)) <= 4  # 2-bit codes
    assert torch.equal(out, torch.round(out / step) * step)


def _train(config: Config, steps: int) -> tuple[LocalPipeline, list[float]]:
    torch.manual_seed(0)
    pipeline = LocalPipeline(config)
    inputs, labels = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    losses = [asyncio.run(pipeline.train_step(inputs, labels)) for _ in range(steps)]
    return pipeline, losses


def test_local_pipeline_trains_quantised_steps_and_counts_boundary_bytes() -> None:
    fp32, _ = _train(load_config(TINY), 3)
    config = tiny(
        "--quant.weight-bits",
        "4",
        "--quant.activation-bits",
        "4",
        "--quant.boundary.activations",
        "codes",
        "--quant.boundary.bits",
        "4",
        "--quant.boundary.gradients",
        "int8",
    )
    coded, losses = _train(config, 12)
    assert losses[-1] < losses[0]  # it learns (the same batch over and over)
    step = coded.stages[1][0].input_quantizer.step
    assert step.grad is not None and step.grad.abs().sum() > 0
    fp32_traffic, coded_traffic = fp32.boundaries[0].traffic, coded.boundaries[0].traffic
    assert coded_traffic.samples == 12 * 32
    per_sample = coded_traffic.activation_bytes / coded_traffic.samples
    fp32_per_sample = fp32_traffic.activation_bytes / fp32_traffic.samples
    assert per_sample == pytest.approx(64 * 4 / 8, rel=0.15)  # 64 features at 4 bits, plus the header
    assert fp32_per_sample / per_sample > 7
    assert coded_traffic.gradient_bytes / coded_traffic.samples == pytest.approx(64, rel=0.15)  # int8
