"""Attach LSQ quantisers to a stage by a scheme: which layer types, how many bits, what stays full precision.

Every selected layer (Linear, Conv1d, Conv2d) is replaced in place by a `QuantizedLayer` that quantises
its weight (signed, per output channel or per tensor) and its input activation (per tensor) before the
layer's own operation. As in the LSQ paper, the model's first and last quantisable layers stay in full
precision by default (they live in the first and the last stage). A stage whose boundary sends integer
codes gets one more quantiser on its output (`attach_output_quantizer`).

Weight steps are initialised at once from the weights. Input steps need data, and their sign too
(unsigned after a ReLU, signed otherwise): `calibrate` runs one batch through the stages and creates them.
Every replica of a stage calibrates on the same seeded batch, so they start from identical weights.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from distqat.config import QuantScheme
from distqat.errors import ConfigError
from distqat.quant.lsq import LSQQuantizer

LAYER_TYPES: dict[str, type[nn.Module]] = {"Linear": nn.Linear, "Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d}


def layer_class(name: str) -> type[nn.Module]:
    """The module class of a `quant.layer_types` name; `Conv1D` is transformers' GPT-2 layer (weight [in, out])."""
    if name == "Conv1D":
        from transformers.pytorch_utils import Conv1D  # imported only when a scheme names it

        return Conv1D
    return LAYER_TYPES[name]


def _is_hf_conv1d(layer: nn.Module) -> bool:
    return type(layer).__name__ == "Conv1D"


class QuantizedLayer(nn.Module):
    """A Linear/Conv layer whose weight and input are fake-quantised with LSQ."""

    def __init__(self, layer: nn.Module, weight_bits: int, activation_bits: int, per_channel: bool):
        super().__init__()
        self.layer = layer
        self.activation_bits = activation_bits
        out_dim = 1 if _is_hf_conv1d(layer) else 0  # transformers' Conv1D stores its weight as [in, out]
        self.weight_quantizer = LSQQuantizer(
            weight_bits, signed=True, channel_dim=out_dim if per_channel else None, channels=layer.weight.shape[out_dim]
        )
        self.weight_quantizer.initialise(layer.weight)
        # Created by `calibrate`, which sees the first input and so its sign.
        self.input_quantizer: LSQQuantizer | None = None
        self._calibrating = False

    def extra_repr(self) -> str:
        return "input quantiser pending calibration" if self.input_quantizer is None else ""

    def linear_op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The layer's own operation with the given (quantised) weight."""
        layer = self.layer
        if isinstance(layer, nn.Linear):
            return F.linear(x, weight, layer.bias)
        if _is_hf_conv1d(layer):
            flat = torch.addmm(layer.bias, x.reshape(-1, x.shape[-1]), weight)
            return flat.view(*x.shape[:-1], weight.shape[1])
        return layer._conv_forward(x, weight, layer.bias)  # Conv1d / Conv2d, with their padding modes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is None:
            if not self._calibrating:
                raise RuntimeError("QuantizedLayer used before calibrate(): its input step is not set")
            quantizer = LSQQuantizer(self.activation_bits, signed=bool((x < 0).any()), activation=True)
            quantizer.initialise(x)
            self.input_quantizer = quantizer.to(x.device)
        return self.linear_op(self.input_quantizer(x), self.weight_quantizer(self.layer.weight))


def _named_layers(module: nn.Module, types: tuple[type[nn.Module], ...]) -> list[tuple[str, nn.Module]]:
    return [(name, child) for name, child in module.named_modules() if isinstance(child, types) and name]


def quantize_stage(module: nn.Module, scheme: QuantScheme, stage_name: str, first: bool, last: bool) -> list[str]:
    """Replace the layers the scheme selects by QuantizedLayers, in place; returns their names.

    `first`/`last`: this stage holds the model's first/last layer (skipped when the scheme says so).
    A scheme whose layer types name none of the stage's Linear/Conv layers is a ConfigError: it would quantise
    nothing. A stage with no such layer at all (an embeddings-only head) is left as it is.
    """
    types = tuple(layer_class(name) for name in scheme.layer_types)
    layers = _named_layers(module, types)
    if not layers:
        present = sorted({type(child).__name__ for child in module.modules()} & {*LAYER_TYPES, "Conv1D"})
        if present:  # the scheme names the wrong types for this stage
            raise ConfigError(
                f"quant.layer_types {scheme.layer_types} name no layer of stage '{stage_name}' "
                f"(it has: {', '.join(present)})"
            )
        return []  # nothing quantisable here (an embeddings-only stage): nothing to do
    skipped = set()
    if first and scheme.skip_first:
        skipped.add(layers[0][0])
    if last and scheme.skip_last:
        skipped.add(layers[-1][0])
    for pattern in scheme.skip:
        skipped.update(name for name, _ in layers if fnmatch.fnmatchcase(name, pattern))
    chosen = [(name, layer) for name, layer in layers if name not in skipped]
    for name, layer in chosen:
        parent_name, _, child_name = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        wrapped = QuantizedLayer(layer, scheme.weight_bits, scheme.activation_bits, scheme.per_channel_weights)
        setattr(parent, child_name, wrapped.to(layer.weight.device))
    return [name for name, _ in chosen]


class _OutputQuantizerHook:
    """Forward hook applying a module's boundary quantiser (modules that are not an nn.Sequential)."""

    def __call__(self, module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
        return module.boundary_quantizer(output)


def attach_output_quantizer(module: nn.Module, bits: int) -> LSQQuantizer:
    """Quantise the stage's output to `bits` bits (per tensor), so its boundary can send integer codes.

    The quantiser is created pending: `calibrate` sets its sign and step from the first output.
    """
    quantizer = BoundaryQuantizer(bits)
    if isinstance(module, nn.Sequential):
        module.append(quantizer)  # a Sequential runs every child in order: the quantiser runs last
    else:
        module.add_module("boundary_quantizer", quantizer)
        module.register_forward_hook(_OutputQuantizerHook())
    return quantizer


class BoundaryQuantizer(nn.Module):
    """A stage's output quantiser; its LSQ quantiser is made on the first (calibration) output."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits
        self.quantizer: LSQQuantizer | None = None
        self._calibrating = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantizer is None:
            if not self._calibrating:
                raise RuntimeError("BoundaryQuantizer used before calibrate(): its step is not set")
            quantizer = LSQQuantizer(self.bits, signed=bool((x < 0).any()), activation=True)
            quantizer.initialise(x)
            self.quantizer = quantizer.to(x.device)
        return self.quantizer(x)


def boundary_quantizer(module: nn.Module) -> LSQQuantizer | None:
    """The stage's output quantiser, if it has one and it is calibrated."""
    for child in module.modules():
        if isinstance(child, BoundaryQuantizer):
            return child.quantizer
    return None


def quantizers(module: nn.Module) -> Iterator[LSQQuantizer]:
    yield from (child for child in module.modules() if isinstance(child, LSQQuantizer))


def needs_calibration(module: nn.Module) -> bool:
    return any(
        (isinstance(child, QuantizedLayer) and child.input_quantizer is None)
        or (isinstance(child, BoundaryQuantizer) and child.quantizer is None)
        for child in module.modules()
    )


@contextlib.contextmanager
def _calibrating(modules: list[nn.Module]) -> Iterator[None]:
    pending = [
        child
        for module in modules
        for child in module.modules()
        if isinstance(child, QuantizedLayer | BoundaryQuantizer)
    ]
    for child in pending:
        child._calibrating = True
    try:
        yield
    finally:
        for child in pending:
            child._calibrating = False


@torch.no_grad()
def calibrate(stages: list[nn.Module], inputs: torch.Tensor, seed: int = 0) -> None:
    """Push one batch through the stages in order, creating every pending input and output quantiser.

    Runs in training mode (BatchNorm normalises with the batch's statistics, as in training) and then puts
    every buffer that existed before back (BatchNorm's running statistics must not learn from this batch).
    """
    saved = [{name: buffer.clone() for name, buffer in stage.named_buffers()} for stage in stages]
    modes = [stage.training for stage in stages]
    with torch.random.fork_rng(devices=[]), _calibrating(stages):
        torch.manual_seed(seed)  # dropout draws the same masks on every replica
        activations = inputs
        for stage in stages:
            stage.train()
            device = next(stage.parameters()).device
            activations = stage(activations.to(device))
    for stage, buffers, mode in zip(stages, saved, modes, strict=True):
        current = dict(stage.named_buffers())
        for name, value in buffers.items():
            current[name].copy_(value)
        stage.train(mode)
