"""Stage checkpoints as a run sees them: the store of each stage under this config, and where a run resumes.

A stage's checkpoints fit a run when they hold the same model and cut (`checkpoints.stage_fingerprint`
of the stage the config builds); the config hash (model pipeline, quantisation, DiLoCo settings) is
recorded beside it, so a checkpoint written under other settings is reported when it loads. `distqat
local --resume` (and `coordinator --resume`) start from the newest checkpoint of every stage that fits
and continue the run's step count from the smallest `run_step` among them: no stage is ahead of it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from distqat.checkpoints import Checkpoint, StageCheckpoints, fingerprint, module_fingerprint
from distqat.config import Config
from distqat.errors import DistQatError

logger = logging.getLogger(__name__)


class ResumeError(DistQatError):
    """`--resume` was asked for, but some stage has no checkpoint that fits the config."""


def config_hash(config: Config) -> str:
    """A short hash of the settings that shape a stage's state: what a checkpoint records it was written under."""
    return fingerprint(
        {
            "model_pipeline": config.model_pipeline.model_dump(mode="json"),
            "quant": config.quant.model_dump(mode="json"),
            "diloco": config.diloco.model_dump(mode="json"),
            "seed": config.seed,
        }
    )


def stage_store(
    config: Config, stage_index: int, module: nn.Module, newer_than: float | None = None
) -> StageCheckpoints:
    """The checkpoints of one stage, for a replica (or the mirror) holding `module` under this config."""
    stage = config.model_pipeline.pipeline[stage_index]
    return StageCheckpoints(
        config.resolved_checkpoint_dir,
        stage.stage_name,
        module_fingerprint(stage.model_name, module),
        keep=config.checkpoint.keep,
        config_hash=config_hash(config),
        newer_than=newer_than,
    )


def stage_manifest(config: Config, stage_index: int, **fields: object) -> dict[str, object]:
    """The manifest fields every writer records besides the state: which model and stage, and the caller's."""
    stage = config.model_pipeline.pipeline[stage_index]
    return {"model": stage.model_name, "layers": stage.layers, "num_stages": config.num_stages, **fields}


@dataclass
class ResumePoint:
    first_step: int  # the run's step count at the oldest of the stage checkpoints
    checkpoints: dict[str, Checkpoint]  # stage -> the newest checkpoint that fits


def find_resume_point(config: Config) -> ResumePoint:
    """The newest fitting, intact checkpoint of every stage; ResumeError naming the stage when one has none."""
    from distqat.quant.stages import build_stages  # the models: imported only when asked

    stages = build_stages(config)  # one pass: quantised stages calibrate on the stages before them
    found: dict[str, Checkpoint] = {}
    for index, (name, module) in enumerate(zip(config.model_pipeline.stage_names, stages, strict=True)):
        store = stage_store(config, index, module)
        checkpoint, problem = store.newest_valid()
        if checkpoint is None:
            raise ResumeError(
                f"--resume: stage '{name}' has no checkpoint that fits this config in {store.folder}"
                + (f" (newest refused: {problem})" if problem else "")
            )
        found[name] = checkpoint
    steps = [int(checkpoint.manifest.get("run_step") or 0) for checkpoint in found.values()]
    return ResumePoint(first_step=min(steps), checkpoints=found)
