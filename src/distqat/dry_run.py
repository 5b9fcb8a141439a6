"""`distqat dry-run`: build every stage of a config on CPU and push one sample batch through them.

The batch travels as it does in a swarm: each stage gets a detached copy of the previous stage's output,
the trainer's loss runs on the last output, and gradients go back stage by stage. The report lists each
stage's parameters, output shape and bytes per sample at its boundary (as its `quant` boundary encodes it),
so a config's cut and its traffic are known before any machine is started. Any mismatch (a stage that
cannot take its predecessor's output, labels the loss cannot use, a stage without gradients) is a
ModelError naming the stage.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from distqat.config import Config
from distqat.errors import ModelError
from distqat.models import get_stage_entry, prepare_pipeline, stage_ranges
from distqat.models.family import BuildContext, StageModule
from distqat.quant.scheme import boundary_quantizer
from distqat.quant.stages import build_stages
from distqat.swarm import boundary_codecs

WIRE_BYTES_PER_ELEMENT = 4  # float32: the last stage's output, and every boundary without a `quant` codec


@dataclass
class StageReport:
    name: str
    model_name: str
    units: list[int] | None  # [start, end) of the family's units, None for a custom stage
    unit_names: str
    params: int
    output_shape: list[int]
    boundary_bytes_per_sample: int
    forward_backward_s: float


@dataclass
class DryRunReport:
    stages: list[StageReport]
    total_params: int
    batch_size: int
    input_shape: list[int]
    loss: float

    def to_json(self) -> dict:
        return asdict(self)


def sample_input(config: Config, batch_size: int) -> torch.Tensor:
    """A batch of the first stage's input, drawn from the run's seed."""
    first = config.model_pipeline.pipeline[0]
    entry = get_stage_entry(first.model_name)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(config.seed)
    try:
        if entry.family is not None:
            context = BuildContext(first.num_classes, config.data, dict(config.model_pipeline.architecture))
            if config.model_pipeline.pretrained_path:
                context = BuildContext(first.num_classes, config.data, {}, config.model_pipeline.pretrained_path)
            inputs = entry.family.sample_input(batch_size, context)
        else:
            inputs = entry.sample_input_fn(batch_size, config.data)
    finally:
        torch.random.set_rng_state(generator_state)
    return inputs


def _labels(logits: torch.Tensor, config: Config) -> torch.Tensor:
    """Labels as the batch contract has them: [B] classes (cv, speech) or [B, T] next tokens (llm)."""
    classes = logits.shape[-1]
    if config.data.task_type == "llm" or logits.dim() == 3:
        return torch.randint(0, classes, logits.shape[:-1])
    return torch.randint(0, classes, logits.shape[:1])


def _unit_label(stage: nn.Module, config: Config, index: int) -> str:
    if not isinstance(stage, StageModule):
        return "-"
    entry = get_stage_entry(config.model_pipeline.pipeline[index].model_name)
    assert entry.family is not None
    context = BuildContext(
        config.model_pipeline.pipeline[index].num_classes,
        config.data,
        dict(config.model_pipeline.architecture),
        config.model_pipeline.pretrained_path,
    )
    names = entry.family.unit_names(context)
    start, end = stage.units
    return names[start] if end - start == 1 else f"{names[start]} .. {names[end - 1]}"


def dry_run(config: Config, batch_size: int = 2) -> DryRunReport:
    """Build, forward, loss, backward; raise ModelError on the first mismatch."""
    from distqat.distributed.pipeline import loss_fn  # the trainer's own loss

    prepare_pipeline(config.model_pipeline)
    spans = stage_ranges(config.model_pipeline, config.data)
    # With their LSQ quantisers, as servers build them (a scheme that names no layer of a stage fails here).
    stages = [stage.train() for stage in build_stages(config)]
    pipeline = config.model_pipeline.pipeline
    inputs = sample_input(config, batch_size)
    boundary_inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    timings: list[float] = []
    hidden = inputs
    for index, stage in enumerate(stages):
        leaf = hidden.detach()
        if leaf.is_floating_point() and index > 0:
            leaf.requires_grad_(True)
        started = time.perf_counter()
        try:
            output = stage(leaf)
        except Exception as error:  # any shape or dtype mismatch surfaces here as some torch error
            came_from = f"the output of stage '{pipeline[index - 1].stage_name}'" if index else "the sample input"
            raise ModelError(
                f"dry run: stage '{pipeline[index].stage_name}' ({pipeline[index].model_name}) cannot take "
                f"{came_from} of shape {tuple(leaf.shape)}: {_first_line(error)}"
            ) from None
        timings.append(time.perf_counter() - started)
        if not isinstance(output, torch.Tensor) or not output.is_floating_point():
            raise ModelError(f"dry run: stage '{pipeline[index].stage_name}' must return one float tensor")
        boundary_inputs.append(leaf)
        outputs.append(output)
        hidden = output

    logits = outputs[-1].detach().requires_grad_(True)
    labels = _labels(logits, config)
    try:
        loss = loss_fn(logits, labels)
    except Exception as error:
        raise ModelError(
            f"dry run: the loss cannot use the last stage's output of shape {tuple(logits.shape)}: {_first_line(error)}"
        ) from None
    loss.backward()
    grad = logits.grad
    for index in reversed(range(len(stages))):
        started = time.perf_counter()
        outputs[index].backward(grad)
        timings[index] += time.perf_counter() - started
        grad = boundary_inputs[index].grad

    reports = []
    for index, (stage, output) in enumerate(zip(stages, outputs, strict=True)):
        params = list(stage.parameters())
        if params and all(p.grad is None for p in params):
            raise ModelError(f"dry run: stage '{pipeline[index].stage_name}' got no gradient")
        span = spans[index]
        reports.append(
            StageReport(
                name=pipeline[index].stage_name,
                model_name=pipeline[index].model_name,
                units=list(span) if span else None,
                unit_names=_unit_label(stage, config, index),
                params=sum(p.numel() for p in params),
                output_shape=list(output.shape),
                boundary_bytes_per_sample=_boundary_bytes(config, index, stage, output),
                forward_backward_s=timings[index],
            )
        )
    return DryRunReport(
        stages=reports,
        total_params=sum(report.params for report in reports),
        batch_size=batch_size,
        input_shape=list(inputs.shape),
        loss=float(loss.detach()),
    )


def _boundary_bytes(config: Config, index: int, stage: nn.Module, output: torch.Tensor) -> int:
    """Payload bytes of one sample's output as the boundary's codec encodes it (float32 after the last stage)."""
    names = config.model_pipeline.stage_names
    if index == len(names) - 1:
        return output[0].numel() * WIRE_BYTES_PER_ELEMENT
    codec = config.quant.boundary_for(names[index]).activations
    payload, _ = boundary_codecs.encode(output[:1].detach(), codec, boundary_quantizer(stage))
    return payload.numel() * payload.element_size()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def format_report(report: DryRunReport, title: str) -> str:
    """A plain-text table (what the CLI prints)."""
    header = ("stage", "model", "units", "params", "output shape", "bytes/sample", "fwd+bwd s")
    rows = [
        (
            r.name,
            r.model_name,
            f"{r.units[0]}-{r.units[1] - 1}: {r.unit_names}" if r.units else "-",
            f"{r.params:,}",
            "x".join(str(d) for d in r.output_shape),
            f"{r.boundary_bytes_per_sample:,}",
            f"{r.forward_backward_s:.2f}",
        )
        for r in report.stages
    ]
    rows.append(("total", "", "", f"{report.total_params:,}", "", "", ""))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.append(
        f"input {'x'.join(map(str, report.input_shape))}, loss {report.loss:.4f}: forward and backward ran through "
        f"{len(report.stages)} stage(s)"
    )
    return "\n".join(lines)
