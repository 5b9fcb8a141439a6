"""One stage replica's compute: forward keeps the caller's inputs, backward steps the inner optimiser.

No networking here, so the gradient logic is testable against a local reference. Forward keeps the
autograd graph of every micro-batch in flight, keyed by (caller, micro-batch id), until its backward
arrives or it expires.

Gradients under concurrency: weight stashing (PipeDream). Several micro-batches (of one trainer or of
several) can be in flight, and another one's backward steps the optimiser in between. Each micro-batch's
gradient is the exact gradient of the weights its own forward used, applied to the current weights (one
optimiser step per backward, as with one micro-batch in flight). How, without copying per call: a forward
runs the module (`torch.func.functional_call`) on *aliases* of the live parameters, tensors that share
their storage but not their autograd version counter. Before anything writes the weights in place (an
optimiser step, a DiLoCo round, a state download) while a kept graph still holds those aliases, the live
parameters move to fresh storage (`_release_weights`, one copy of the stage's parameters) and the old
storage stays with the graphs that use it. So autograd never sees a modified tensor, a kept graph is never
silently stale, and with one micro-batch in flight nothing is ever copied.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call

from distqat.errors import StageCallError

Weights = dict[str, torch.Tensor]


@dataclass
class _InFlight:
    inputs: torch.Tensor
    outputs: torch.Tensor
    weights: Weights  # the parameter tensors this forward ran with (aliases of the live ones, or a stash)
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
        self._per_caller: Counter[str] = Counter()
        self._aliases: Weights | None = None  # aliases of the live parameters' current storage
        self.weights_version = 0  # bumped by every optimiser step
        self.samples = 0
        self.stashed_versions = 0  # times the live weights moved to fresh storage to keep a graph valid

    # --- the weights a forward runs with ---

    def _live_aliases(self) -> Weights:
        if self._aliases is None:
            # `.data` shares the storage but not the version counter: an in-place write on the live parameter
            # does not invalidate graphs built on the alias (we move the live storage away first instead).
            self._aliases = {
                name: parameter.data.requires_grad_(parameter.requires_grad)
                for name, parameter in self.module.named_parameters()
            }
        return self._aliases

    def _release_weights(self) -> None:
        """Before an in-place write to the weights: leave their current storage to the kept graphs using it."""
        aliases = self._aliases
        if aliases is None or not any(saved.weights is aliases for saved in self._in_flight.values()):
            return
        with torch.no_grad():
            for parameter in self.module.parameters():
                parameter.data = parameter.data.clone()
        self._aliases = None
        self.stashed_versions += 1

    def before_weight_change(self) -> None:
        """Called (on the compute thread) before code outside this class may write the weights in place."""
        self._release_weights()

    # --- forward and backward ---

    def forward(self, caller: str, micro_batch: str, inputs: torch.Tensor) -> torch.Tensor:
        inputs = inputs.to(self.device).detach()  # our own leaf: never mark the caller's tensor
        if self._inputs_need_grad and inputs.is_floating_point():
            inputs.requires_grad_(True)
        weights = self._live_aliases()
        with torch.enable_grad(), self._autocast():
            outputs = functional_call(self.module, weights, (inputs,))
        self._pop(caller, micro_batch)  # a retried forward (its first reply was lost) replaces the first one
        self._in_flight[(caller, micro_batch)] = _InFlight(inputs, outputs, weights, self.weights_version)
        self._per_caller[caller] += 1
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
        """Apply the gradient of the loss w.r.t. this stage's outputs; return the gradient w.r.t. its inputs.

        The gradient is that of the weights the micro-batch's forward ran with (see the module docstring)."""
        saved = self._pop(caller, micro_batch)
        if saved is None:
            raise StageCallError(f"backward for unknown micro-batch '{micro_batch}' (expired, or no forward here)")
        outputs = saved.outputs
        grad_outputs = grad_outputs.to(device=self.device, dtype=outputs.dtype)
        if grad_outputs.shape != outputs.shape:
            raise StageCallError(f"gradient of shape {tuple(grad_outputs.shape)} for output {tuple(outputs.shape)}")
        names = [name for name, tensor in saved.weights.items() if tensor.requires_grad]
        wanted = [saved.weights[name] for name in names]
        with_inputs = saved.inputs.requires_grad
        if with_inputs:
            wanted.append(saved.inputs)
        # autograd.grad, not .backward: several graphs share the same alias tensors, whose .grad must not mix.
        grads = torch.autograd.grad(outputs, wanted, grad_outputs, allow_unused=True)
        grad_inputs = grads[-1] if with_inputs else None
        self._release_weights()  # other kept graphs may still use the weights this step is about to change
        parameters = dict(self.module.named_parameters())
        for name, grad in zip(names, grads, strict=False):
            parameters[name].grad = grad
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.weights_version += 1
        self.samples += len(grad_outputs)
        return None if grad_inputs is None else grad_inputs.detach().float().cpu()

    def _pop(self, caller: str, micro_batch: str) -> _InFlight | None:
        saved = self._in_flight.pop((caller, micro_batch), None)
        if saved is not None:
            self._per_caller[caller] -= 1
            if self._per_caller[caller] <= 0:
                del self._per_caller[caller]
        return saved

    def weights_digest(self) -> float:
        with torch.no_grad():
            return float(sum(parameter.sum(dtype=torch.float64) for parameter in self.module.parameters()))

    def drop_expired(self, max_age_s: float) -> int:
        """Forget micro-batches whose backward never came (their trainer died or gave up)."""
        now = time.monotonic()
        expired = [key for key, saved in self._in_flight.items() if now - saved.created_at > max_age_s]
        for caller, micro_batch in expired:
            self._pop(caller, micro_batch)
        return len(expired)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def in_flight_of(self, caller: str) -> int:
        return self._per_caller.get(caller, 0)
