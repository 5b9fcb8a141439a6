"""Config loading: good files, every documented spelling of an override, and one-line errors for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from distqat.config import load_config, parse_override_args, resolve_override_key
from distqat.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]

MINIMAL = """
model_pipeline:
  pipeline:
    - model_name: tiny.head
    - model_name: tiny.tail
"""


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["demo.yaml", "tiny.yaml"])
def test_shipped_configs_load(name: str) -> None:
    config = load_config(REPO / "configs" / name)
    assert config.num_stages == 2


def test_defaults_and_log_dir(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    assert config.model_pipeline.stage_names == ["head", "tail"]
    assert config.network.port == 0
    assert config.resolved_log_dir == Path("logs") / config.experiment_prefix
    assert config.diloco.outer_optim.sgd_nesterov is True


def test_overrides_in_every_documented_spelling(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    config = load_config(
        path,
        [
            "--diloco.batch-size-per-step",
            "16",
            "--diloco-inner-steps=7",
            "--device",
            "cpu",
            "--initial-peers",
            "/ip4/127.0.0.1/tcp/1/p2p/A,/ip4/127.0.0.1/tcp/2/p2p/B",
            "--wandb-project",
            "None",
            "--diloco.inner_optim.adam_lr",
            "3e-4",
        ],
    )
    assert config.diloco.batch_size_per_step == 16
    assert config.diloco.inner_steps == 7
    assert config.device == "cpu"
    assert config.network.initial_peers == ["/ip4/127.0.0.1/tcp/1/p2p/A", "/ip4/127.0.0.1/tcp/2/p2p/B"]
    assert config.wandb_project is None
    assert config.diloco.inner_optim.adam_lr == pytest.approx(3e-4)


def test_bare_flag_means_true() -> None:
    assert parse_override_args(["--diloco.inner-optim.sgd-nesterov"]) == [("diloco.inner-optim.sgd-nesterov", "true")]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (MINIMAL + "bogus: 1\n", "bogus: unknown field"),
        (MINIMAL + "diloco:\n  inner_steps: -3\n", "diloco.inner_steps: Input should be greater than or equal to 1"),
        (MINIMAL + "diloco:\n  inner_optim:\n    type: lion\n", "diloco.inner_optim.type"),
        (MINIMAL + "network:\n  heartbeat_period: 5\n  heartbeat_expiry: 2\n", "heartbeat_expiry must be longer"),
        ("model_pipeline:\n  pipeline:\n    - model_name: resnet18\n", "is not of the form '<family>.<stage>'"),
        ("model_pipeline:\n  pipeline:\n    - model_name: a.x\n    - model_name: b.x\n", "stage names must be unique"),
        ("data: {}\n", "model_pipeline: Field required"),
        (MINIMAL + "device: tpu\n", "device: 'tpu' is not one of"),
        (MINIMAL + "quant:\n  weight_bits: 9\n", "quant.weight_bits: Input should be less than or equal to 8"),
    ],
)
def test_bad_files_fail_with_one_line_naming_file_and_field(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    assert expected in message


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "data: [unclosed\n")
    with pytest.raises(ConfigError, match=r"invalid YAML at line \d+"):
        load_config(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")


def test_bad_override_value_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"diloco\.batch_size_per_step: Input should be a valid integer"):
        load_config(write(tmp_path, MINIMAL), ["--diloco.batch-size-per-step", "lots"])


def test_unknown_override_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"--diloco\.nonsense is not a config field"):
        resolve_override_key("diloco.nonsense")


def test_ambiguous_short_override_is_an_error() -> None:
    # `type` is a leaf of both inner_optim and outer_optim
    with pytest.raises(ConfigError, match="ambiguous"):
        resolve_override_key("type")


def test_stray_positional_argument_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unexpected argument 'oops'"):
        load_config(write(tmp_path, MINIMAL), ["oops"])


def test_template_documents_every_field_and_is_up_to_date() -> None:
    from distqat.config import Config as ConfigModel
    from distqat.config import _leaf_paths, render_template

    template = REPO / "configs" / "template_config.yaml"
    assert template.read_text() == render_template(), "regenerate it with the command in its header"
    config = load_config(template)
    assert config.model_pipeline.stage_names == ["head", "tail"]
    text = template.read_text()
    for path in _leaf_paths(ConfigModel):
        assert f"{path[-1]}:" in text, path
