"""Export round trip: a trained, quantised model written as integers and loaded back runs on the integers and
gives the fake-quantised model's outputs (max abs difference <= 1e-5)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from distqat.cli import app
from distqat.config import Config, load_config
from distqat.distributed.pipeline import LocalPipeline
from distqat.errors import ConfigError
from distqat.quant.export import IntegerLayer, export_checkpoint, load_exported
from distqat.quant.scheme import QuantizedLayer
from distqat.stage_state import save_stage_states

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"


def trained(config: Config, steps: int = 5) -> LocalPipeline:
    torch.manual_seed(1)
    pipeline = LocalPipeline(config)
    inputs = torch.randn(16, config.data.num_channels, config.data.img_size, config.data.img_size)
    labels = torch.randint(0, 10, (16,))
    for _ in range(steps):
        asyncio.run(pipeline.train_step(inputs, labels))
    return pipeline


def outputs(stages: list[torch.nn.Module], inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        for stage in stages:
            inputs = stage.eval()(inputs)
    return inputs


@pytest.mark.parametrize(
    "overrides",
    [
        [
            "--quant.weight-bits",
            "4",
            "--quant.activation-bits",
            "4",
            "--quant.boundary.activations",
            "codes",
            "--quant.boundary.bits",
            "3",
        ],
        # a small ResNet: convolutions, per-channel steps, BatchNorm left in float
        [
            "--model-pipeline.pipeline",
            "[{model_name: resnet18.head}, {model_name: resnet18.tail}]",
            "--model-pipeline.architecture",
            "{blocks: [1, 1, 1, 1]}",
            "--data.img-size",
            "12",
            "--quant.weight-bits",
            "2",
            "--quant.activation-bits",
            "3",
        ],
    ],
    ids=["mlp-codes-boundary", "resnet-w2a3"],
)
def test_export_round_trip_matches_the_fake_quantised_model(tmp_path: Path, overrides: list[str]) -> None:
    config = load_config(TINY, ["--quant.enable", "true", *overrides])
    pipeline = trained(config)
    save_stage_states(tmp_path / "state", config, dict(enumerate(pipeline.stages)))
    export_checkpoint(tmp_path / "state", tmp_path / "export")
    _, integer_stages = load_exported(tmp_path / "export")

    integer_layers = [m for stage in integer_stages for m in stage.modules() if isinstance(m, IntegerLayer)]
    assert integer_layers
    for layer in integer_layers:
        assert layer.weight_int.dtype == torch.int8
        assert layer.like.weight is None  # only the integers are kept
    inputs = torch.randn(8, 1, config.data.img_size, config.data.img_size, generator=torch.Generator().manual_seed(0))
    expected, got = outputs(pipeline.stages, inputs), outputs(integer_stages, inputs)
    assert (expected - got).abs().max().item() <= 1e-5


def test_exported_weights_are_integers_in_range(tmp_path: Path) -> None:
    config = load_config(TINY, ["--quant.enable", "true", "--quant.weight-bits", "3", "--quant.skip-first", "false"])
    pipeline = trained(config, steps=2)
    save_stage_states(tmp_path / "state", config, dict(enumerate(pipeline.stages)))
    export_checkpoint(tmp_path / "state", tmp_path / "export")
    head = load_file(str(tmp_path / "export" / "head.safetensors"))
    assert head["1.weight_int"].dtype == torch.int8
    assert head["1.weight_int"].min() >= -4 and head["1.weight_int"].max() <= 3
    assert head["1.weight_step"].shape == (64,)
    assert not head["1.weight_zero_point"].any()
    assert "1.input_step" in head and "1.bias" in head


def test_export_refuses_what_it_cannot_export(tmp_path: Path) -> None:
    config = load_config(TINY)
    save_stage_states(tmp_path / "plain", config, dict(enumerate(LocalPipeline(config).stages)))
    with pytest.raises(ConfigError, match=r"trained with quant\.enable false"):
        export_checkpoint(tmp_path / "plain", tmp_path / "out")
    result = CliRunner().invoke(app, ["export", "--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "no manifest.json (not a stage-state folder; a swarm's checkpoint folder needs --config)" in result.output


def test_gpt2_conv1d_layers_are_quantised_and_exported(tmp_path: Path) -> None:
    """DistilGPT2's blocks use transformers' Conv1D (weight [in, out]): per-channel steps on its output dim."""
    config = load_config(
        REPO / "configs" / "distilgpt2.yaml",
        [
            "--quant.enable", "true", "--quant.weight-bits", "4", "--data.seq-len", "8", "--device", "cpu",
            "--model-pipeline.architecture", "{n_layer: 2, n_embd: 32, n_head: 2, vocab_size: 512}",
        ],
    )  # fmt: skip
    pipeline = LocalPipeline(config)
    counts = [sum(isinstance(m, QuantizedLayer) for m in stage.modules()) for stage in pipeline.stages]
    assert counts == [0, 8, 0]  # embeddings-only head; 2 blocks x (c_attn, c_proj, c_fc, mlp c_proj); lm_head last
    # Fixed tokens: on a random batch a float32 rounding of the fake-quantised model can land an activation on
    # the other side of a rounding boundary (about 1 batch in 30 here), and one code then differs by one step.
    tokens = torch.randint(0, 512, (4, 8), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        asyncio.run(pipeline.train_step(tokens, tokens))
    save_stage_states(tmp_path / "state", config, dict(enumerate(pipeline.stages)))
    export_checkpoint(tmp_path / "state", tmp_path / "export")
    _, integer_stages = load_exported(tmp_path / "export")
    expected, got = outputs(pipeline.stages, tokens), outputs(integer_stages, tokens)
    assert (expected - got).abs().max().item() <= 1e-5
