"""The stage registry: what `model_name: resnet18.head` in a config builds.

Two kinds of entries. Built-in families (`distqat.models.family.UnitFamily`) register `<family>.full`,
`.head`, `.body` and `.tail`, which take a contiguous run of the family's units. Custom stages register
one builder each with `@register_expert_class("mymodel.head", sample_input_fn)`: a function or `nn.Module`
class taking keyword arguments from the config (`num_classes`, `num_channels`, `img_size`, `seq_len`,
`data`, and the `model_pipeline.architecture` entries; it receives those its signature names, or all with
`**kwargs`). `sample_input_fn(batch_size, data_config)` returns an input the stage accepts, for dry runs
and tests. A custom stage is initialised from a seed derived from the run's seed and the stage's name, so
a server's `mymodel.head` and the baseline's are the same tensors.

Built-in families are imported on first use, so a process that needs only the tiny model never pays for
importing torchvision or transformers. A user's file (`model_pipeline.model_module`) is imported by path.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import itertools
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from distqat.config import DataConfig, ModelPipelineConfig, StageConfig
from distqat.errors import ModelError
from distqat.models.family import ROLES, BuildContext, UnitFamily
from distqat.sharding import balanced_cuts

StageBuilder = Callable[..., nn.Module]
SampleInputFn = Callable[[int, DataConfig], torch.Tensor]


@dataclass(frozen=True)
class StageEntry:
    name: str
    builder: StageBuilder
    sample_input_fn: SampleInputFn
    family: UnitFamily | None = None  # set for the stages of a built-in family


_REGISTRY: dict[str, StageEntry] = {}
_LOADED_MODULES: dict[Path, str] = {}

BUILTIN_FAMILIES = {
    "resnet18": "distqat.models.resnet",
    "resnet50": "distqat.models.resnet",
    "resnet101": "distqat.models.resnet",
    "distilgpt2": "distqat.models.distilgpt2",
    "gptneo": "distqat.models.gpt_neo",
    "wav2vec2": "distqat.models.wav2vec2",
    "tiny": "distqat.models.tiny",
}


def register_expert_class(name: str, sample_input_fn: SampleInputFn) -> Callable[[StageBuilder], StageBuilder]:
    """Decorator: register a stage builder (a function or an nn.Module class) under `family.stage`."""

    def decorate(builder: StageBuilder) -> StageBuilder:
        _add(StageEntry(name, builder, sample_input_fn))
        return builder

    return decorate


def register_family(family: UnitFamily) -> UnitFamily:
    """Register a built-in family's `full`, `head`, `body` and `tail` stages."""
    for role in ROLES:
        _add(StageEntry(f"{family.name}.{role}", family.build_stage, _boundary_input_fn(family, role), family))
    return family


def _add(entry: StageEntry) -> None:
    if entry.name in _REGISTRY:
        raise ModelError(f"model stage '{entry.name}' is registered twice")
    _REGISTRY[entry.name] = entry


def _boundary_input_fn(family: UnitFamily, role: str) -> SampleInputFn:
    def sample(batch_size: int, data: DataConfig) -> torch.Tensor:
        context = BuildContext(data=data)
        start, _ = family.default_range(context, role)
        return boundary_input(family, context, start, batch_size)

    return sample


def boundary_input(family: UnitFamily, context: BuildContext, start: int, batch_size: int) -> torch.Tensor:
    """A random tensor shaped like the input of unit `start` (shapes found on the meta device, so no compute)."""
    first = family.sample_input(batch_size, context)
    if start == 0:
        return first
    with torch.device("meta"):
        units = family.build_units(BuildContext(context.num_classes, context.data, context.architecture), 0, start)
        hidden = first.to("meta")
        for unit in units:
            hidden = unit(hidden)
    return torch.randn(hidden.shape, dtype=hidden.dtype)


def registered_names() -> list[str]:
    for module in sorted(set(BUILTIN_FAMILIES.values())):
        importlib.import_module(module)
    return sorted(_REGISTRY)


def get_stage_entry(model_name: str) -> StageEntry:
    family = model_name.split(".", 1)[0]
    if model_name not in _REGISTRY and family in BUILTIN_FAMILIES:
        importlib.import_module(BUILTIN_FAMILIES[family])
    try:
        return _REGISTRY[model_name]
    except KeyError:
        known = ", ".join(registered_names())
        raise ModelError(f"unknown model stage '{model_name}' (known: {known})") from None


def load_model_module(path: str | Path) -> None:
    """Import a user's model file by path (once per process), so its @register_expert_class stages exist."""
    resolved = Path(path).expanduser().resolve()
    if resolved in _LOADED_MODULES:
        return
    if not resolved.is_file():
        raise ModelError(f"model_pipeline.model_module: {path}: no such file")
    name = f"distqat_user_model_{resolved.stem}_{hashlib.sha1(str(resolved).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise ModelError(f"model_pipeline.model_module: {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[name]
        raise ModelError(
            f"model_pipeline.model_module: {path}: import failed: {type(error).__name__}: {error}"
        ) from None
    _LOADED_MODULES[resolved] = name


def stage_seed(seed: int, model_name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(model_name.encode())) % 2**31


def _context(stage: StageConfig, data: DataConfig, seed: int, pipeline: ModelPipelineConfig | None) -> BuildContext:
    return BuildContext(
        num_classes=stage.num_classes,
        data=data,
        architecture=dict(pipeline.architecture) if pipeline else {},
        pretrained_path=pipeline.pretrained_path if pipeline else None,
        seed=seed,
    )


def build_stage(
    stage: StageConfig,
    data: DataConfig,
    seed: int,
    pipeline: ModelPipelineConfig | None = None,
    layers: tuple[int, int] | None = None,
) -> nn.Module:
    """Build one stage. Without `pipeline`, a built-in family's stage takes `stage.layers` or its default range."""
    entry = get_stage_entry(stage.model_name)
    context = _context(stage, data, seed, pipeline)
    if entry.family is not None:
        role = stage.model_name.split(".", 1)[1]
        start, end = layers or stage.layers or entry.family.default_range(context, role)
        return entry.family.build_stage(context, start, end)
    kwargs = {
        "num_classes": stage.num_classes,
        "num_channels": data.num_channels,
        "img_size": data.img_size,
        "seq_len": data.seq_len,
        "data": data,
        **context.architecture,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stage_seed(seed, stage.model_name))
        try:
            return entry.builder(**_accepted(entry.builder, kwargs))
        except TypeError as error:
            raise ModelError(f"cannot build model stage '{stage.model_name}': {error}") from error


def _accepted(builder: StageBuilder, kwargs: dict) -> dict:
    try:
        parameters = inspect.signature(builder).parameters.values()
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return kwargs
    names = {p.name for p in parameters}
    return {key: value for key, value in kwargs.items() if key in names}


# --- whole pipelines ------------------------------------------------------------------------------------


def prepare_pipeline(pipeline: ModelPipelineConfig) -> list[StageEntry]:
    """Import the user's model module, if any, and look every stage up (a ModelError names the first bad one)."""
    if pipeline.model_module:
        load_model_module(pipeline.model_module)
    return [get_stage_entry(stage.model_name) for stage in pipeline.pipeline]


def stage_ranges(pipeline: ModelPipelineConfig, data: DataConfig) -> list[tuple[int, int] | None]:
    """The unit range of every stage of a built-in family (None for custom stages).

    Stages of one family must together cover its units in order. Without explicit `layers`, they are cut by
    `pipeline.split`: the family's default cut, or balanced parameter counts.
    """
    entries = prepare_pipeline(pipeline)
    ranges: list[tuple[int, int] | None] = [None] * len(entries)
    families = {entry.family.name: entry.family for entry in entries if entry.family is not None}
    for family in families.values():
        positions = [i for i, entry in enumerate(entries) if entry.family is family]
        stages = [pipeline.pipeline[i] for i in positions]
        context = _context(stages[0], data, 0, pipeline)
        family.check_architecture(context)
        count = len(family.unit_names(context))
        explicit = [stage.layers for stage in stages]
        if all(layers is not None for layers in explicit):
            spans = [(layers[0], layers[1]) for layers in explicit]  # type: ignore[index]
        elif any(layers is not None for layers in explicit):
            raise ModelError(f"model_pipeline: set 'layers' on every {family.name} stage or on none")
        else:
            cuts = _cuts(family, context, len(stages), pipeline.split)
            bounds = [0, *cuts, count]
            spans = list(itertools.pairwise(bounds))
        _check_spans(family.name, stages, spans, count)
        for position, span in zip(positions, spans, strict=True):
            ranges[position] = span
    return ranges


def _cuts(family: UnitFamily, context: BuildContext, num_stages: int, split: str) -> list[int]:
    if num_stages == 1:
        return []
    if split == "params":
        from distqat.sharding import unit_param_counts

        return balanced_cuts(unit_param_counts(family, context), num_stages)
    return family.default_cuts(context, num_stages)


def _check_spans(family: str, stages: list[StageConfig], spans: list[tuple[int, int]], count: int) -> None:
    expected_start = 0
    for stage, (start, end) in zip(stages, spans, strict=True):
        if start != expected_start:
            raise ModelError(
                f"model_pipeline: stage '{stage.stage_name}' starts at {family} unit {start}, "
                f"but the stage before it ends at {expected_start}"
            )
        if end > count:
            raise ModelError(f"model_pipeline: stage '{stage.stage_name}' ends at unit {end}; {family} has {count}")
        expected_start = end
    if expected_start != count:
        raise ModelError(f"model_pipeline: the {family} stages end at unit {expected_start} of {count}")
    roles = [stage.model_name.split(".", 1)[1] for stage in stages]
    if "full" in roles and len(stages) > 1:
        raise ModelError(f"model_pipeline: '{family}.full' is the whole model: it cannot share the pipeline")


def build_pipeline_stage(pipeline: ModelPipelineConfig, index: int, data: DataConfig, seed: int) -> nn.Module:
    """Build the stage at `index` of a pipeline, with its unit range resolved against the whole pipeline."""
    span = stage_ranges(pipeline, data)[index]
    return build_stage(pipeline.pipeline[index], data, seed, pipeline, span)


def build_pipeline_stages(
    pipeline: ModelPipelineConfig | list[StageConfig], data: DataConfig, seed: int
) -> list[nn.Module]:
    """Build every stage; a bare list of stages is a pipeline with default settings."""
    if isinstance(pipeline, list):
        pipeline = ModelPipelineConfig(pipeline=pipeline)
    spans = stage_ranges(pipeline, data)
    return [
        build_stage(stage, data, seed, pipeline, span) for stage, span in zip(pipeline.pipeline, spans, strict=True)
    ]
