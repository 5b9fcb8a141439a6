"""Build a config's stages with their quantisers attached and calibrated, the same way in every process.

A server builds its own stage; to calibrate it, it also builds the stages before it and pushes the run's
seeded sample batch through them (`distqat.dry_run.sample_input`), so every replica of a stage, the local
baseline and the export loader get bit-identical quantisers without seeing any real data. LSQ then
learns the steps during training. With `quant.enable` false and no `codes` boundary this is the plain build.
"""

from __future__ import annotations

import logging

from torch import nn

from distqat.config import Config
from distqat.models import build_pipeline_stages
from distqat.quant.scheme import attach_output_quantizer, calibrate, needs_calibration, quantize_stage

logger = logging.getLogger(__name__)

CALIBRATION_BATCH = 32  # samples of the seeded batch the input and output steps are initialised from


def prepare_stage(config: Config, index: int, module: nn.Module) -> list[str]:
    """Attach the stage's quantisers in place (uncalibrated); returns the quantised layers' names."""
    names = config.model_pipeline.stage_names
    quant, name = config.quant, names[index]
    quantized: list[str] = []
    if quant.enable:
        quantized = quantize_stage(module, quant.scheme_for(name), name, first=index == 0, last=index == len(names) - 1)
    if index < len(names) - 1:
        boundary = quant.boundary_for(name)
        if boundary.activations == "codes":
            attach_output_quantizer(module, boundary.bits)
    return quantized


def build_stages(config: Config, upto: int | None = None) -> list[nn.Module]:
    """Stages 0..upto (all by default), quantised and calibrated as the config says."""
    from distqat.dry_run import sample_input  # dry_run imports the models; keep `quant` importable alone

    stages = build_pipeline_stages(config.model_pipeline, config.data, config.seed)
    stages = stages if upto is None else stages[: upto + 1]
    for index, stage in enumerate(stages):
        quantized = prepare_stage(config, index, stage)
        if quantized:
            logger.info("stage %s: %d quantised layers", config.model_pipeline.stage_names[index], len(quantized))
    if any(needs_calibration(stage) for stage in stages):
        calibrate(stages, sample_input(config, CALIBRATION_BATCH), seed=config.seed)
    return stages


def build_stage(config: Config, index: int) -> nn.Module:
    """One stage (a server's), calibrated on the output of the stages before it."""
    if not config.quant.enable and all(
        config.quant.boundary_for(name).activations != "codes" for name in config.model_pipeline.stage_names[:-1]
    ):
        from distqat.models import build_pipeline_stage

        return build_pipeline_stage(config.model_pipeline, index, config.data, config.seed)
    return build_stages(config, upto=index)[index]
