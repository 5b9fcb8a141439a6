"""One training step through the stages: remotely through the swarm, or locally (the baseline).

The remote step relays every hop through the trainer (as SWARM and Petals do): the trainer holds each
boundary's activations, so a failed hop can be retried on another replica without asking a server to
redo work; the cost is that the trainer's link carries each boundary twice per step (reported as
bytes_sent / bytes_received).
"""

from __future__ import annotations

import itertools
import logging
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

logger = logging.getLogger(__name__)


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
    rerouted: int = 0  # forward hops retried on another replica after a failure
    _ids: itertools.count = field(default_factory=itertools.count)

    async def train_step(self, inputs: torch.Tensor, labels: torch.Tensor) -> float:
        """One micro-batch forward through one replica per stage, backward through the same replicas.

        A forward hop that fails is retried at once on another replica of its stage (the trainer still holds
        its input). A failed backward raises: the micro-batch is dropped and the caller retries it whole.
        Replicas that already ran their backward keep that step; the others forget the micro-batch when its
        backward does not come (`StageReplica.drop_expired`).
        """
        micro_batch = str(next(self._ids))
        route: list[ServerInfo] = []
        activations = inputs
        for stage in self.router.stage_names:
            replica, (activations,) = await self._forward_with_retries(stage, activations, {"mb": micro_batch})
            route.append(replica)

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
                self.config.model_pipeline.backward_timeout,
                replies=int(want_grad),
            )
            if want_grad:
                (grad,) = replies
        return float(loss.detach())

    async def _forward_with_retries(
        self, stage: str, activations: torch.Tensor, metadata: dict
    ) -> tuple[ServerInfo, list[torch.Tensor]]:
        """Forward on one replica of `stage`; on failure (that replica is then banned) on the next one."""
        while True:
            replica = self.router.pick(stage)  # NoReplicaError when every replica has failed: the step fails
            try:
                outputs = await self._hop(
                    replica, "forward", activations, metadata, self.config.model_pipeline.forward_timeout, replies=1
                )
            except StageCallError as error:
                if not self.router.usable(stage):
                    raise
                self.rerouted += 1
                logger.warning("%s; retrying on another replica of '%s'", error, stage)
                continue
            return replica, outputs

    async def infer(self, inputs: torch.Tensor) -> torch.Tensor:
        metadata = {"mb": f"eval-{next(self._ids)}", "eval": True}
        activations = inputs
        for stage in self.router.stage_names:
            _, (activations,) = await self._forward_with_retries(stage, activations, metadata)
        return activations

    async def _hop(
        self, replica: ServerInfo, method: Method, tensor: torch.Tensor, metadata: dict, timeout: float, replies: int
    ) -> list[torch.Tensor]:
        """One call; a replica that fails it is avoided for a while."""
        metadata = {**metadata, "uid": replica.uid}  # a peer that now serves another stage refuses the call
        try:
            result = await self.client.call(replica, method, [tensor], metadata, timeout)
            outputs = expect_tensors(result, replies, f"{method} of {replica.uid}")
        except StageCallError:
            self.router.ban(replica)
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
