"""One training step through the stages: remotely through the swarm, or locally (the baseline).

The remote step relays every hop through the trainer (as SWARM and Petals do): the trainer holds each
boundary's activations, so a failed hop can be retried on another replica without asking a server to
redo work; the cost is that the trainer's link carries each boundary twice per step (reported as
bytes_sent / bytes_received).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from distqat.config import Config
from distqat.distributed.optim import build_optimizer
from distqat.errors import StageCallError
from distqat.models import build_pipeline_stages
from distqat.swarm.records import ServerInfo
from distqat.swarm.routing import Router
from distqat.swarm.rpc import Method, StageClient, expect_tensors


def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the last dimension for every task: classes [B, C] with labels [B] (cv, speech), or
    next-token logits [B, T, V] with labels [B, T] already shifted by the data side (llm); -100 is ignored."""
    return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=-100)


class Pipeline(Protocol):
    async def train_step(self, inputs: torch.Tensor, labels: torch.Tensor) -> float: ...

    async def infer(self, inputs: torch.Tensor) -> torch.Tensor:
        """The tail's output for held-out inputs, without training anything."""
        ...


@dataclass
class TrafficCounter:
    bytes_sent: int = 0
    bytes_received: int = 0


@dataclass
class RemotePipeline:
    """Routes a micro-batch through one replica per stage and its gradient back through the same ones."""

    config: Config
    client: StageClient
    router: Router
    traffic: TrafficCounter = field(default_factory=TrafficCounter)
    _ids: itertools.count = field(default_factory=itertools.count)

    async def train_step(self, inputs: torch.Tensor, labels: torch.Tensor) -> float:
        timeouts = self.config.model_pipeline
        micro_batch = str(next(self._ids))
        route: list[ServerInfo] = [self.router.pick(stage) for stage in self.router.stage_names]
        activations = inputs
        for replica in route:
            (activations,) = await self._hop(
                replica, "forward", activations, {"mb": micro_batch}, timeouts.forward_timeout, replies=1
            )

        logits = activations.requires_grad_(True)
        loss = loss_fn(logits, labels)
        loss.backward()
        grad = logits.grad
        for position in reversed(range(len(route))):
            want_grad = position > 0  # the first stage's input is data: its gradient is not needed
            replies = await self._hop(
                route[position],
                "backward",
                grad,
                {"mb": micro_batch, "want_grad": want_grad},
                timeouts.backward_timeout,
                replies=int(want_grad),
            )
            if want_grad:
                (grad,) = replies
        return float(loss.detach())

    async def infer(self, inputs: torch.Tensor) -> torch.Tensor:
        micro_batch = f"eval-{next(self._ids)}"
        activations = inputs
        for stage in self.router.stage_names:
            replica = self.router.pick(stage)
            (activations,) = await self._hop(
                replica,
                "forward",
                activations,
                {"mb": micro_batch, "eval": True},
                self.config.model_pipeline.forward_timeout,
                replies=1,
            )
        return activations

    async def _hop(
        self, replica: ServerInfo, method: Method, tensor: torch.Tensor, metadata: dict, timeout: float, replies: int
    ) -> list[torch.Tensor]:
        """One call; a replica that fails it is avoided for a while."""
        try:
            result = await self.client.call(replica, method, [tensor], metadata, timeout)
            outputs = expect_tensors(result, replies, f"{method} of {replica.uid}")
        except StageCallError:
            self.router.ban(replica.uid)
            raise
        self.traffic.bytes_sent += result.bytes_sent
        self.traffic.bytes_received += result.bytes_received
        return outputs


class LocalPipeline:
    """The same stages, optimisers and loss in this one process: the baseline the swarm is measured against."""

    def __init__(self, config: Config):
        self.stages: list[nn.Module] = [
            stage.train() for stage in build_pipeline_stages(config.model_pipeline, config.data, config.seed)
        ]
        self.optimizers = [build_optimizer(stage.parameters(), config.diloco.inner_optim) for stage in self.stages]
        self.traffic = TrafficCounter()

    async def train_step(self, inputs: torch.Tensor, labels: torch.Tensor) -> float:
        activations = inputs
        for stage in self.stages:
            activations = stage(activations)
        loss = loss_fn(activations, labels)
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in self.optimizers:
            optimizer.step()
        return float(loss.detach())

    async def infer(self, inputs: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            stage.eval()
        try:
            with torch.no_grad():
                activations = inputs
                for stage in self.stages:
                    activations = stage(activations)
        finally:
            for stage in self.stages:
                stage.train()
        return activations
