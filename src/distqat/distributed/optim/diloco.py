"""DiLoCo for the replicas of one stage: many inner steps apart, then one averaged outer step.

Each replica trains its own copy with its inner optimiser. At the end of a round every replica computes
its pseudo-gradient, Δ_i = θ₀ - θ_i (the outer params θ₀ it started the round from, minus its params now),
the replicas average it weighted by the samples each trained on, and every replica applies the same outer
optimiser step (SGD with Nesterov momentum by default) to the same θ₀ and continues from the result.

The averaging itself is behind the `Averager` protocol, so this module needs no network: the server
plugs in the hivemind all-reduce of `distqat.swarm.averaging`, tests and benchmarks an in-process one.
A round the averager could not verify is never applied: params, θ₀ and the outer optimiser stay as they
were, so the replicas keep the same θ₀ and the next round's pseudo-gradient covers both rounds' steps.
"""

from __future__ import annotations

import copy
import enum
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from distqat.config import OptimConfig
from distqat.distributed.optim.factory import build_optimizer


class RoundStatus(enum.Enum):
    AVERAGED = "averaged"  # a verified group average: apply it
    ALONE = "alone"  # no other replica joined: apply this replica's own pseudo-gradient
    FAILED = "failed"  # partial, unverified or timed out: apply nothing


@dataclass
class AveragingResult:
    status: RoundStatus
    tensors: list[torch.Tensor] | None = None  # the weighted mean, when AVERAGED
    group_size: int = 1
    detail: str = ""  # why a round failed, for the log


class Averager(Protocol):
    """Averages one list of tensors with the other replicas of a stage, weighted by `weight`."""

    def average(
        self, tensors: Sequence[torch.Tensor], weight: float, round_id: int, timeout: float
    ) -> AveragingResult: ...


@dataclass
class RoundReport:
    round_id: int  # the round this attempt was for
    status: RoundStatus
    group_size: int
    weight: float
    detail: str = ""
    seconds: float = 0.0  # wall time of the attempt


@dataclass
class DiLoCo:
    """The outer loop of one replica: θ₀, the outer optimiser and the round counters."""

    params: list[nn.Parameter]
    outer_config: OptimConfig
    outer_params: list[torch.Tensor] = field(init=False)  # θ₀, float32 on the CPU
    outer_optimizer: torch.optim.Optimizer = field(init=False)
    round: int = 0  # rounds applied
    samples_since_sync: int = 0  # samples trained since θ₀: the weight in the next average
    samples_since_attempt: int = 0  # samples trained since the last round, applied or not: the trigger
    _digest: str | None = field(default=None, init=False, repr=False)  # of θ₀, until θ₀ changes

    def __post_init__(self) -> None:
        self.params = list(self.params)
        self.outer_params = [param.detach().to("cpu", torch.float32, copy=True) for param in self.params]
        self.outer_optimizer = build_optimizer(self.outer_params, self.outer_config)

    def record_inner_step(self, samples: int) -> None:
        self.samples_since_sync += samples
        self.samples_since_attempt += samples

    def pseudo_gradient(self) -> list[torch.Tensor]:
        with torch.no_grad():
            pairs = zip(self.outer_params, self.params, strict=True)
            return [start - param.detach().to("cpu", torch.float32) for start, param in pairs]

    def run_round(self, averager: Averager, timeout: float) -> RoundReport:
        """Average this replica's pseudo-gradient with its stage and apply the outer step, or apply nothing."""
        round_id, weight = self.round, float(self.samples_since_sync)
        self.samples_since_attempt = 0
        delta = self.pseudo_gradient()
        result = averager.average(delta, weight, round_id, timeout)
        if result.status is RoundStatus.AVERAGED:
            assert result.tensors is not None
            self._apply(result.tensors)
        elif result.status is RoundStatus.ALONE:
            self._apply(delta)
        return RoundReport(round_id, result.status, result.group_size, weight, result.detail)

    def _apply(self, mean_delta: Sequence[torch.Tensor]) -> None:
        with torch.no_grad():
            for start, delta in zip(self.outer_params, mean_delta, strict=True):
                start.grad = delta.to(torch.float32)
            self.outer_optimizer.step()
            self.outer_optimizer.zero_grad(set_to_none=True)
            for param, start in zip(self.params, self.outer_params, strict=True):
                param.copy_(start)
        self._digest = None
        self.round += 1
        self.samples_since_sync = 0

    def outer_digest(self) -> str:
        """A hash of θ₀: replicas that applied the same rounds have the same digest, to the last bit."""
        if self._digest is None:
            self._digest = tensors_digest(self.outer_params)
        return self._digest

    # --- state, for a joining replica ---

    def state_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "outer_params": [tensor.clone() for tensor in self.outer_params],
            # A copy: torch's state_dict holds the live momentum buffers.
            "outer_optimizer": copy.deepcopy(self.outer_optimizer.state_dict()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for start, loaded in zip(self.outer_params, state["outer_params"], strict=True):
                start.copy_(loaded)
        self.outer_optimizer.load_state_dict(state["outer_optimizer"])
        self._digest = None
        self.round = int(state["round"])
        self.samples_since_sync = self.samples_since_attempt = 0


def tensors_digest(tensors: Sequence[torch.Tensor]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for tensor in tensors:
        digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return digest.hexdigest()


def weighted_mean(tensor_lists: Sequence[Sequence[torch.Tensor]], weights: Sequence[float]) -> list[torch.Tensor]:
    """The exact weighted mean (float64 accumulation) of several replicas' tensors."""
    total = float(sum(weights))
    mean = [torch.zeros_like(t, dtype=torch.float64) for t in tensor_lists[0]]
    for tensors, weight in zip(tensor_lists, weights, strict=True):
        for accumulator, tensor in zip(mean, tensors, strict=True):
            accumulator.add_(tensor.double(), alpha=weight / total)
    return [m.float() for m in mean]


@dataclass
class PresetAverager:
    """An Averager that returns a result computed elsewhere (in-process groups, tests)."""

    result: AveragingResult

    def average(self, tensors: Sequence[torch.Tensor], weight: float, round_id: int, timeout: float) -> AveragingResult:
        return self.result


def run_local_round(replicas: Sequence[DiLoCo]) -> list[RoundReport]:
    """One DiLoCo round of replicas living in one process (benchmarks, tests), averaged exactly."""
    mean = weighted_mean([r.pseudo_gradient() for r in replicas], [float(r.samples_since_sync) for r in replicas])
    result = AveragingResult(RoundStatus.AVERAGED, mean, group_size=len(replicas))
    return [replica.run_round(PresetAverager(result), timeout=0.0) for replica in replicas]
