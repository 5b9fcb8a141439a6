"""`distqat dry-run` on every config in configs/ (real full models: their totals are the published counts),
and custom models loaded by path."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from distqat.config import load_config
from distqat.dry_run import dry_run, format_report
from distqat.errors import ModelError
from distqat.models import build_pipeline_stages, load_model_module, registered_names

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted(path.name for path in (REPO / "configs").glob("*.yaml"))
CUSTOM = REPO / "tests" / "data" / "custom_mlp.py"

# Full-size models with short inputs (the weights are the real ones; only the sample batch shrinks).
SHORTER = {"llm": ["--data.seq-len", "16"], "cv": ["--data.img-size", "64"]}
TOTALS = {
    "demo": 11_172_810,  # ResNet-18, 1 channel, 10 classes, 3x3 stem
    "resnet18": 11_173_962,  # 3 channels (DESIGN: 11.18M at 10 classes)
    "resnet50": 25_557_032,  # torchvision's published counts at 1000 classes
    "resnet101": 44_549_160,
    "distilgpt2": 120_509_952,  # 81.9M tied + the untied 50257 x 768 LM head
    "gptneo": 163_795_968,  # 125.2M tied + the untied LM head
    "wav2vec2": 94_570_378,  # Wav2Vec2-base 94.4M + the classification head
    "tiny": 55_050,
    "template_config": 11_172_810,
}


@pytest.mark.parametrize("name", CONFIGS)
def test_dry_run_of_every_config(name: str) -> None:
    path = REPO / "configs" / name
    task = load_config(path).data.task_type
    overrides = SHORTER.get(task, []) if load_config(path).data.img_size >= 64 or task == "llm" else []
    config = load_config(path, [*overrides, "--device", "cpu"])
    report = dry_run(config, batch_size=1)
    family = name.removesuffix(".yaml").removesuffix("_split").removesuffix("_full")
    assert report.total_params == TOTALS[family]
    assert [stage.name for stage in report.stages] == config.model_pipeline.stage_names
    last = report.stages[-1].output_shape
    assert last[-1] == (50257 if task == "llm" else config.model_pipeline.pipeline[-1].num_classes)
    for stage in report.stages:
        assert stage.boundary_bytes_per_sample == 4 * _numel(stage.output_shape[1:])
    assert "total" in format_report(report, name)
    gc.collect()


def _numel(shape: list[int]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def custom_config(tmp_path: Path, width: int = 32) -> Path:
    text = (REPO / "configs" / "tiny.yaml").read_text()
    text = text.replace("tiny.head", "custom_mlp.head").replace("tiny.tail", "custom_mlp.tail")
    text = text.replace(
        "  forward_timeout:", f"  model_module: {CUSTOM}\n  architecture: {{width: {width}}}\n  forward_timeout:"
    )
    path = tmp_path / "custom.yaml"
    path.write_text(text)
    return path


def test_custom_model_by_path_and_a_mismatch_it_catches(tmp_path: Path) -> None:
    config = load_config(custom_config(tmp_path))
    report = dry_run(config)
    assert [s.model_name for s in report.stages] == ["custom_mlp.head", "custom_mlp.tail"]
    assert report.stages[0].output_shape == [2, 32] and report.stages[0].units is None
    assert "custom_mlp.tail" in registered_names()
    load_model_module(CUSTOM)  # a second load is a no-op, not "registered twice"
    build_pipeline_stages(config.model_pipeline, config.data, seed=0)
    with pytest.raises(
        ModelError, match=r"stage 'tail' \(custom_mlp.tail\) cannot take the output of stage 'head' of shape \(2, 32\)"
    ):
        dry_run(load_config(custom_config(tmp_path, width=16)))


def test_model_module_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"model_pipeline.model_module: .*missing.py: no such file"):
        load_model_module(tmp_path / "missing.py")
    broken = tmp_path / "broken.py"
    broken.write_text("import torch\nraise RuntimeError('typo in my model')\n")
    with pytest.raises(ModelError, match=r"broken.py: import failed: RuntimeError: typo in my model"):
        load_model_module(broken)


def test_cli_prints_the_table_writes_json_and_fails_with_one_line(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    command = [sys.executable, "-m", "distqat", "dry-run", "--config"]
    good = subprocess.run(
        [*command, str(REPO / "configs" / "tiny.yaml"), "--json", str(tmp_path / "r.json")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert good.returncode == 0, good.stderr
    assert "bytes/sample" in good.stdout and "55,050" in good.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["total_params"] == 55_050
    assert all(
        set(stage) >= {"name", "params", "output_shape", "boundary_bytes_per_sample"} for stage in report["stages"]
    )
    assert report["stages"][0]["output_shape"] == [2, 64] and report["stages"][0]["boundary_bytes_per_sample"] == 256

    bad = subprocess.run(
        [*command, str(custom_config(tmp_path, width=16))], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        "distqat: error: dry run: stage 'tail' (custom_mlp.tail) cannot take the output of stage 'head' of shape "
        "(2, 32): mat1 and mat2 shapes cannot be multiplied (2x32 and 16x32)"
    ]
