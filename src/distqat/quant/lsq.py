"""LSQ fake quantisation (Esser et al., "Learned Step Size Quantization", ICLR 2020).

A quantiser maps v to v̂ = round(clamp(v / s, -Qn, Qp)) * s with a learned step s. Backward follows the
paper: the straight-through estimator for v (gradient 1 inside the range, 0 outside) and, for s,
-v/s + round(v/s) inside, -Qn below, Qp above, multiplied by the gradient scale g = 1 / sqrt(N * Qp).
Both come out of autograd through two tricks: `_round_ste` (forward round, backward identity) and
`_scale_grad` (forward identity, backward times g), so no custom autograd function is needed.

k bits give Qn = 0, Qp = 2^k - 1 (unsigned, after a ReLU) or Qn = 2^(k-1), Qp = 2^(k-1) - 1 (signed).
The step is a parameter: the inner optimiser trains it and DiLoCo averages it like any other weight.
It is initialised to 2 * mean(|v|) / sqrt(Qp), per tensor or per output channel (the paper's rule), by
`initialise` on a first tensor: the weight itself, or a calibration batch for activations.
"""

from __future__ import annotations

import math

import torch
from torch import nn

MIN_BITS, MAX_BITS = 2, 8
MIN_STEP = 1e-8  # keeps the step positive whatever the optimiser does to it


def quant_range(bits: int, signed: bool) -> tuple[int, int]:
    """(Qn, Qp): codes run from -Qn to Qp."""
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in {MIN_BITS}..{MAX_BITS}, got {bits}")
    if signed:
        return 2 ** (bits - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


# Both add a term that is exactly zero in the forward (a - a), so the forward value is bit-exact: the
# textbook `(x.round() - x).detach() + x` can land one ulp off the integer, and the codes would not be exact.
def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x.round().detach() + (x - x.detach())


def _scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    scaled = x * scale
    return x.detach() + (scaled - scaled.detach())


class LSQQuantizer(nn.Module):
    """Fake-quantises a weight or an activation to `bits` bits with a learned step.

    `channel_dim` set: one step per slice along that dimension (per output channel of a weight).
    """

    def __init__(
        self, bits: int, signed: bool, channel_dim: int | None = None, channels: int = 1, activation: bool = False
    ):
        super().__init__()
        self.bits, self.signed, self.channel_dim, self.activation = bits, signed, channel_dim, activation
        self.qn, self.qp = quant_range(bits, signed)
        self.step = nn.Parameter(torch.ones(channels if channel_dim is not None else 1))
        # Saved with the weights, so a replica that downloads a state (or a checkpoint) knows it is set.
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def extra_repr(self) -> str:
        kind = "signed" if self.signed else "unsigned"
        per = "per-tensor" if self.channel_dim is None else f"per-channel (dim {self.channel_dim})"
        return f"bits={self.bits}, {kind}, {per}"

    def _shaped(self, step: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if self.channel_dim is None:
            return step.reshape(())
        shape = [1] * like.dim()
        shape[self.channel_dim] = -1
        return step.reshape(shape)

    def effective_step(self) -> torch.Tensor:
        """The step as the forward uses it (what export and the boundary codes carry)."""
        return self.step.detach().abs().clamp_min(MIN_STEP)

    def grad_scale(self, x: torch.Tensor) -> float:
        # N: the elements one step quantises: a weight's channel or whole tensor (N_W), or one sample's
        # features for an activation (the paper's N_F counts a layer's features, not the batch's).
        if self.channel_dim is not None:
            count = x.numel() // x.shape[self.channel_dim]
        elif self.activation and x.dim() > 1:
            count = x[0].numel()
        else:
            count = x.numel()
        return 1.0 / math.sqrt(count * self.qp)

    @torch.no_grad()
    def initialise(self, x: torch.Tensor) -> None:
        """The paper's initialisation from a first tensor: s = 2 * mean(|v|) / sqrt(Qp)."""
        x = x.detach().float()
        if self.channel_dim is not None:
            dims = [d for d in range(x.dim()) if d != self.channel_dim]
            mean_abs = x.abs().mean(dim=dims)
        else:
            mean_abs = x.abs().mean().reshape(1)
        self.step.copy_((2 * mean_abs / math.sqrt(self.qp)).clamp_min(MIN_STEP))
        self.initialised.fill_(True)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The integer codes of x (no gradient), in -Qn..Qp."""
        step = self._shaped(self.effective_step(), x)
        return torch.clamp(torch.round(x.detach().float() / step), -self.qn, self.qp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Quantise in float32 even under autocast: the values must be exactly code * step, which the
        # boundary codes and the exported integers reproduce on the other side.
        x = x.float()
        step = _scale_grad(self.step.abs().clamp_min(MIN_STEP), self.grad_scale(x) if self.training else 1.0)
        step = self._shaped(step, x)
        return _round_ste(torch.clamp(x / step, -self.qn, self.qp)) * step
