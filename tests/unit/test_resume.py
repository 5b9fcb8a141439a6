"""Where a run resumes: per-stage checkpoints that fit the config, the step they continue from, fresh runs
ignoring older checkpoints, the mirror's config check, and the monitor counting on from the resumed step."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from distqat.checkpoints import split_tensors
from distqat.config import load_config
from distqat.distributed.monitor import SwarmView
from distqat.errors import ConfigError
from distqat.launchers import resume_or_start_fresh
from distqat.models import build_pipeline_stages
from distqat.resume import ResumeError, config_hash, find_resume_point, stage_manifest, stage_store

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"


def tiny(tmp_path: Path, *overrides: str):
    return load_config(TINY, ["--log-dir", str(tmp_path / "logs"), *overrides])


def write_stage_checkpoints(config, run_steps: list[int | None]) -> None:
    modules = build_pipeline_stages(config.model_pipeline, config.data, config.seed)
    for index, (module, run_step) in enumerate(zip(modules, run_steps, strict=True)):
        state = {"module": module.state_dict(), "samples": 0, "weights_version": 1}
        manifest = stage_manifest(config, index, steps=1, diloco_round=0, run_step=run_step)
        stage_store(config, index, module).write(*split_tensors(state), manifest)


def test_resume_continues_from_the_oldest_stage_checkpoint(tmp_path: Path) -> None:
    config = tiny(tmp_path)
    write_stage_checkpoints(config, [40, 20])
    write_stage_checkpoints(config, [60, 50])
    point = find_resume_point(config)
    assert point.first_step == 50  # the newest of each stage; the tail's is the older one
    assert sorted(point.checkpoints) == ["head", "tail"]
    resumed, first_step = resume_or_start_fresh(config, True, time.time())
    assert first_step == 50 and resumed.checkpoint.newer_than is None


def test_resume_without_a_fitting_checkpoint_names_the_stage(tmp_path: Path) -> None:
    config = tiny(tmp_path)
    with pytest.raises(ResumeError, match="stage 'head' has no checkpoint that fits"):
        find_resume_point(config)
    other = tiny(tmp_path, "--data.img-size", "14")
    write_stage_checkpoints(other, [5, 5])
    with pytest.raises(ResumeError, match=r"newest refused: .*another model or stage cut"):
        find_resume_point(config)


def test_a_fresh_run_ignores_checkpoints_written_before_it(tmp_path: Path) -> None:
    config = tiny(tmp_path)
    write_stage_checkpoints(config, [10, 10])
    fresh, first_step = resume_or_start_fresh(config, False, time.time() + 1)
    assert first_step == 0
    module = build_pipeline_stages(config.model_pipeline, config.data, config.seed)[0]
    assert stage_store(fresh, 0, module, newer_than=fresh.checkpoint.newer_than).load_newest() is None
    assert stage_store(config, 0, module).load_newest() is not None


def test_config_hash_follows_the_training_settings(tmp_path: Path) -> None:
    assert config_hash(tiny(tmp_path)) == config_hash(tiny(tmp_path, "--network.ban-time", "9"))
    assert config_hash(tiny(tmp_path)) != config_hash(tiny(tmp_path, "--diloco.inner-steps", "7"))


def test_the_mirror_needs_diloco(tmp_path: Path) -> None:
    assert tiny(tmp_path, "--param-mirror.enable", "true").param_mirror.enable
    with pytest.raises(ConfigError, match=r"param_mirror\.enable: .*needs diloco\.enable true"):
        tiny(tmp_path, "--param-mirror.enable", "true", "--diloco.enable", "false")


def test_the_monitor_counts_on_from_the_resumed_step() -> None:
    view = SwarmView(first_step=50)
    assert view.steps == 50
    summary = view.summary(started_at=0.0, now=1.0)
    assert summary["first_step"] == 50 and summary["steps"] == 50


def test_stage_fingerprints_refuse_a_torch_state_of_another_shape(tmp_path: Path) -> None:
    config = tiny(tmp_path)
    module = build_pipeline_stages(config.model_pipeline, config.data, config.seed)[0]
    other = torch.nn.Linear(3, 3)
    assert stage_store(config, 0, module).fingerprint != stage_store(config, 0, other).fingerprint
