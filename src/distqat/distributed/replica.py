"""One stage replica's compute: forward keeps the caller's inputs, backward steps the inner optimiser.

No networking here, so the gradient logic is testable against a local reference. Forward keeps the
autograd graph of every micro-batch in flight, keyed by (caller, micro-batch id), until its backward
arrives or it expires. If the weights changed between a micro-batch's forward and its backward (another
trainer's backward stepped the optimiser in between), the kept graph would be stale: backward then
recomputes the forward from the kept inputs with the current weights, so every gradient is the exact
gradient of the current weights and autograd never sees a modified tensor.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from distqat.errors import StageCallError


@dataclass
class _InFlight:
    inputs: torch.Tensor
    outputs: torch.Tensor
    weights_version: int
    created_at: float = field(default_factory=time.monotonic)


class StageReplica:
    def __init__(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        autocast: Callable[[], torch.autocast],
        inputs_need_grad: bool,
    ):
        self.module = module.to(device).train()
        self.optimizer = optimizer
        self.device = device
        self._autocast = autocast
        self._inputs_need_grad = inputs_need_grad
        self._in_flight: dict[tuple[str, str], _InFlight] = {}
        self.weights_version = 0  # bumped by every optimiser step
        self.samples = 0
        self.recomputed_forwards = 0

    def forward(self, caller: str, micro_batch: str, inputs: torch.Tensor) -> torch.Tensor:
        inputs = inputs.to(self.device).detach()  # our own leaf: never mark the caller's tensor
        if self._inputs_need_grad and inputs.is_floating_point():
            inputs.requires_grad_(True)
        with torch.enable_grad(), self._autocast():
            outputs = self.module(inputs)
        self._in_flight[(caller, micro_batch)] = _InFlight(inputs, outputs, self.weights_version)
        return outputs.detach().float().cpu()

    def infer(self, inputs: torch.Tensor) -> torch.Tensor:
        """A forward for evaluation: eval mode (BatchNorm uses its running statistics), no graph kept."""
        self.module.eval()
        try:
            with torch.no_grad(), self._autocast():
                outputs = self.module(inputs.to(self.device))
        finally:
            self.module.train()
        return outputs.float().cpu()

    def backward(self, caller: str, micro_batch: str, grad_outputs: torch.Tensor) -> torch.Tensor | None:
        """Apply the gradient of the loss w.r.t. this stage's outputs; return the gradient w.r.t. its inputs."""
        saved = self._in_flight.pop((caller, micro_batch), None)
        if saved is None:
            raise StageCallError(f"backward for unknown micro-batch '{micro_batch}' (expired, or no forward here)")
        outputs = saved.outputs
        if saved.weights_version != self.weights_version:
            self.recomputed_forwards += 1
            with torch.enable_grad(), self._autocast():
                outputs = self.module(saved.inputs)
        grad_outputs = grad_outputs.to(device=self.device, dtype=outputs.dtype)
        if grad_outputs.shape != outputs.shape:
            raise StageCallError(f"gradient of shape {tuple(grad_outputs.shape)} for output {tuple(outputs.shape)}")
        self.optimizer.zero_grad(set_to_none=True)
        outputs.backward(grad_outputs)
        self.optimizer.step()
        self.weights_version += 1
        self.samples += len(grad_outputs)
        grad_inputs = saved.inputs.grad
        return None if grad_inputs is None else grad_inputs.detach().float().cpu()

    def weights_digest(self) -> float:
        with torch.no_grad():
            return float(sum(parameter.sum(dtype=torch.float64) for parameter in self.module.parameters()))

    def drop_expired(self, max_age_s: float) -> int:
        """Forget micro-batches whose backward never came (their trainer died or gave up)."""
        now = time.monotonic()
        expired = [key for key, saved in self._in_flight.items() if now - saved.created_at > max_age_s]
        for key in expired:
            del self._in_flight[key]
        return len(expired)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)
