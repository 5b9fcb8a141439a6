"""Export a quantisation-aware trained model to integers, and load it back as a model that runs on them.

`export_checkpoint(stage-state folder, out)` writes, per stage, `<stage>.safetensors` with:

- for every quantised layer `<name>`: `<name>.weight_int` (int8 codes), `<name>.weight_step` (float32, one per
  output channel or one), `<name>.weight_zero_point` (int8, all zero: LSQ codes are symmetric around 0),
  `<name>.input_step` and `<name>.input_zero_point` (the input activation's), and `<name>.bias` (float32);
- for a stage whose output is quantised (a `codes` boundary): `boundary.step`, `boundary.zero_point`;
- every other tensor of the stage (BatchNorm, full-precision layers) in float, under the plain model's names;

and `manifest.json` with the config and, per layer, its type, bits and signedness.

`load_exported(out)` rebuilds the plain stages from the config and puts an `IntegerLayer` in place of
every quantised layer: it turns its input into integer codes, accumulates codes x integer weights
exactly (float64 holds every such sum exactly), and scales the sum by input step x weight step. The
result equals the fake-quantised model's output up to float32 rounding (checked <= 1e-5 in the tests).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from distqat.config import Config
from distqat.errors import ConfigError
from distqat.quant.lsq import LSQQuantizer, quant_range
from distqat.quant.scheme import BoundaryQuantizer, QuantizedLayer
from distqat.stage_state import load_stage_state, read_manifest

FORMAT, VERSION = "distqat-integer-export", 1


def _quantizer_info(quantizer: LSQQuantizer) -> dict[str, Any]:
    return {"bits": quantizer.bits, "signed": quantizer.signed, "per_channel": quantizer.channel_dim is not None}


def export_stage(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, manifest entry) of one trained, quantised stage."""
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    output: dict[str, Any] | None = None
    skip_prefixes: list[str] = []
    for name, child in module.named_modules():
        if isinstance(child, QuantizedLayer):
            assert child.input_quantizer is not None, "export of an uncalibrated stage"
            weight_q, input_q = child.weight_quantizer, child.input_quantizer
            tensors[f"{name}.weight_int"] = weight_q.codes(child.layer.weight).to(torch.int8)
            tensors[f"{name}.weight_step"] = weight_q.effective_step().float()
            tensors[f"{name}.weight_zero_point"] = torch.zeros_like(weight_q.step, dtype=torch.int8)
            tensors[f"{name}.input_step"] = input_q.effective_step().float()
            tensors[f"{name}.input_zero_point"] = torch.zeros_like(input_q.step, dtype=torch.int8)
            if child.layer.bias is not None:
                tensors[f"{name}.bias"] = child.layer.bias.detach().float()
            layers[name] = {
                "type": type(child.layer).__name__,
                "weight": _quantizer_info(weight_q),
                "input": _quantizer_info(input_q),
            }
            skip_prefixes.append(f"{name}.")
        elif isinstance(child, BoundaryQuantizer):
            assert child.quantizer is not None, "export of an uncalibrated stage"
            tensors["boundary.step"] = child.quantizer.effective_step().float()
            tensors["boundary.zero_point"] = torch.zeros_like(child.quantizer.step, dtype=torch.int8)
            output = {"module": name, **_quantizer_info(child.quantizer)}
            skip_prefixes.append(f"{name}.")
    for key, value in module.state_dict().items():
        if not any(key.startswith(prefix) for prefix in skip_prefixes):
            tensors[key] = value.detach()
    tensors = {key: value.cpu().contiguous().clone() for key, value in tensors.items()}
    return tensors, {"layers": layers, "output": output}


def _load_swarm_checkpoints(root: Path, config: Config, stages: list[nn.Module]) -> list[dict[str, Any]]:
    """Load every stage's newest swarm checkpoint (`<root>/<stage>/ckpt-*`) that fits; entries like a manifest's."""
    from safetensors import SafetensorError

    from distqat.checkpoints import StageCheckpoints, join_tensors

    entries = []
    for index, (name, module) in enumerate(zip(config.model_pipeline.stage_names, stages, strict=True)):
        loaded = None
        for checkpoint in StageCheckpoints(root, name, fingerprint="").list():
            try:
                state = join_tensors(checkpoint.manifest["state"], load_file(str(checkpoint.tensors_path)))
                module.load_state_dict(state["module"])
            except (OSError, SafetensorError, KeyError, TypeError, RuntimeError):
                continue  # another model, a cut that differs, or a truncated file: try the one before
            loaded = checkpoint.path
            break
        if loaded is None:
            raise ConfigError(f"--checkpoint {root}: no checkpoint of stage '{name}' in {root / name} fits this config")
        model_name = config.model_pipeline.pipeline[index].model_name
        entries.append({"index": index, "name": name, "model_name": model_name, "file": f"{name}.safetensors",
                        "checkpoint": str(loaded)})  # fmt: skip
    return entries


def export_checkpoint(checkpoint: Path, out: Path, config: Config | None = None) -> Path:
    """Export every stage of a stage-state folder (its manifest holds the config), or of a swarm's checkpoint
    folder (`<checkpoint_dir>/<stage>/ckpt-*`, with the run's `config`); returns the written manifest's path."""
    from distqat.quant.stages import build_stages

    if (Path(checkpoint) / "manifest.json").is_file() or config is None:
        config, entries = read_manifest(checkpoint)
    else:
        entries = []
    if not config.quant.enable:
        raise ConfigError(f"--checkpoint {checkpoint}: trained with quant.enable false: nothing to export as integers")
    stages = build_stages(config)
    if entries:
        for entry in entries:
            load_stage_state(checkpoint, entry, stages[entry["index"]])
    else:
        entries = _load_swarm_checkpoints(Path(checkpoint), config, stages)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for entry in entries:
        module = stages[entry["index"]]
        tensors, info = export_stage(module.eval())
        save_file(tensors, str(out / entry["file"]))
        written.append({**entry, **info})
    manifest = {"format": FORMAT, "version": VERSION, "config": config.model_dump(mode="json"), "stages": written}
    path = out / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2))
    return path


class IntegerLayer(nn.Module):
    """A Linear/Conv1d/Conv2d that runs on integer input codes and integer weights."""

    def __init__(self, like: nn.Module, tensors: dict[str, torch.Tensor], prefix: str, info: dict[str, Any]):
        super().__init__()
        self.like = like  # the plain layer: its stride, padding, groups (its float weight is not used)
        self.kind = info["type"]
        self.input_qn, self.input_qp = quant_range(info["input"]["bits"], info["input"]["signed"])
        for key in ("weight_int", "weight_step", "weight_zero_point", "input_step", "input_zero_point"):
            self.register_buffer(key, tensors[f"{prefix}.{key}"])
        self.register_buffer("bias", tensors.get(f"{prefix}.bias"))
        like.weight = None  # type: ignore[assignment]  (only the integers are kept)
        like.bias = None  # type: ignore[assignment]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zero = self.input_zero_point.double()
        codes = torch.clamp(torch.round(x.double() / self.input_step.double()) + zero, -self.input_qn, self.input_qp)
        codes = codes - zero
        if self.kind == "Conv1D":  # transformers' GPT-2 layer: weight [in, out], channels on dim 1
            weights = self.weight_int.double() - self.weight_zero_point.double().reshape(1, -1)
        else:
            weights = self.weight_int.double() - self.weight_zero_point.double().reshape(
                -1, *[1] * (self.weight_int.dim() - 1)
            )
        # Integer x integer products summed in float64: exact (|sum| < 2^53 for any layer we build).
        if self.kind == "Linear":
            accumulated = F.linear(codes, weights)
            channel_shape = [-1]
        elif self.kind == "Conv1D":
            accumulated = (codes.reshape(-1, codes.shape[-1]) @ weights).view(*codes.shape[:-1], weights.shape[1])
            channel_shape = [-1]
        else:
            accumulated = self.like._conv_forward(codes, weights, None)
            channel_shape = [-1] + [1] * (accumulated.dim() - 2)
        scale = self.input_step.double() * self.weight_step.double().reshape(channel_shape)
        out = accumulated * scale
        if self.bias is not None:
            out = out + self.bias.double().reshape(channel_shape)
        return out.float()


class IntegerOutput(nn.Module):
    """A stage's output quantiser, from its exported step."""

    def __init__(self, step: torch.Tensor, zero_point: torch.Tensor, bits: int, signed: bool):
        super().__init__()
        self.register_buffer("step", step)
        self.register_buffer("zero_point", zero_point)
        self.qn, self.qp = quant_range(bits, signed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes = torch.clamp(torch.round(x.float() / self.step) + self.zero_point, -self.qn, self.qp) - self.zero_point
        return codes * self.step


def load_exported(directory: Path) -> tuple[Config, list[nn.Module]]:
    """The exported stages, rebuilt as modules that run on the integers (in eval mode)."""
    from distqat.models import build_pipeline_stages

    path = Path(directory) / "manifest.json"
    if not path.is_file():
        raise ConfigError(f"{directory}: no manifest.json (not a distqat export)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ConfigError(f"{path}: not a {FORMAT} version {VERSION} manifest")
    config = Config.model_validate(manifest["config"])
    plain = build_pipeline_stages(config.model_pipeline, config.data, config.seed)
    stages = []
    for entry in manifest["stages"]:
        module = plain[entry["index"]]
        tensors = load_file(str(Path(directory) / entry["file"]))
        for name, info in entry["layers"].items():
            parent_name, _, child_name = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, child_name, IntegerLayer(parent.get_submodule(child_name), tensors, name, info))
        layer_keys = {
            f"{name}.{key}"
            for name in entry["layers"]
            for key in ("weight_int", "weight_step", "weight_zero_point", "input_step", "input_zero_point", "bias")
        }
        floats = {k: v for k, v in tensors.items() if k not in layer_keys and not k.startswith("boundary.")}
        missing, unexpected = module.load_state_dict(floats, strict=False)
        missing = [key for key in missing if not _is_integer_buffer(key, entry["layers"])]
        if missing or unexpected:
            raise ConfigError(
                f"{entry['file']}: does not fit stage '{entry['name']}' (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]})"
            )
        if entry["output"] is not None:
            output = IntegerOutput(
                tensors["boundary.step"],
                tensors["boundary.zero_point"],
                entry["output"]["bits"],
                entry["output"]["signed"],
            )
            module = nn.Sequential(module, output)
        stages.append(module.eval())
    return config, stages


def _is_integer_buffer(key: str, layers: dict[str, Any]) -> bool:
    return any(key.startswith(f"{name}.") for name in layers)
