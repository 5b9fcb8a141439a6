"""One training step through the stages: remotely through the swarm, or locally (the baseline).

The remote step relays every hop through the trainer (as SWARM and Petals do): the trainer holds each
boundary's activations, so a failed hop can be retried on another replica without asking a server to
redo work; the cost is that the trainer's link carries each boundary twice per step (reported as
bytes_sent / bytes_received).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from distqat.config import Config
from distqat.distributed.local_boundary import LocalBoundary
from distqat.distributed.optim import build_optimizer
from distqat.errors import StageBusyError, StageCallError
from distqat.quant.scheme import boundary_quantizer
from distqat.quant.stages import build_stages
from distqat.swarm import boundary_codecs
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
    busy_replies: int = 0  # forwards refused by a full replica and retried
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
        # A boundary's payload is relayed as it came (encoded, with its codec header): no hop adds error.
        activations, header = inputs, None
        for stage in self.router.stage_names:
            replica, (activations,), header = await self._forward_with_retries(
                stage, activations, _with_codec({"mb": micro_batch}, header)
            )
            route.append(replica)

        logits = boundary_codecs.decode(activations, header).requires_grad_(True)
        loss = loss_fn(logits, labels)
        loss.backward()
        grad, header = logits.grad, None
        for position in reversed(range(len(route))):
            want_grad = position > 0  # the first stage's input is data: its gradient is not needed
            replies, header = await self._hop(
                route[position],
                "backward",
                grad,
                _with_codec({"mb": micro_batch, "want_grad": want_grad}, header),
                self.config.model_pipeline.backward_timeout,
                replies=int(want_grad),
            )
            if want_grad:
                (grad,) = replies
        return float(loss.detach())

    async def _forward_with_retries(
        self, stage: str, activations: torch.Tensor, metadata: dict
    ) -> tuple[ServerInfo, list[torch.Tensor], dict | None]:
        """Forward on one replica of `stage`; on failure (that replica is then banned) on the next one.

        A busy reply (the replica's queue is full) is no failure: wait, doubling the wait, and ask again
        (the router may pick another replica), for at most `forward_timeout` seconds."""
        busy_until, backoff = time.monotonic() + self.config.model_pipeline.forward_timeout, None
        while True:
            replica = self.router.pick(stage)  # NoReplicaError when every replica has failed: the step fails
            try:
                outputs, header = await self._hop(
                    replica, "forward", activations, metadata, self.config.model_pipeline.forward_timeout, replies=1
                )
            except StageBusyError as error:
                self.busy_replies += 1
                if time.monotonic() >= busy_until:
                    self.router.ban(replica)
                    raise StageCallError(f"{error} for {self.config.model_pipeline.forward_timeout:.0f} s") from None
                backoff = min(1.0, 2 * backoff) if backoff else self.config.pipelining.busy_backoff
                await asyncio.sleep(backoff)
                continue
            except StageCallError as error:
                if not self.router.usable(stage):
                    raise
                self.rerouted += 1
                logger.warning("%s; retrying on another replica of '%s'", error, stage)
                continue
            return replica, outputs, header

    async def infer(self, inputs: torch.Tensor) -> torch.Tensor:
        metadata = {"mb": f"eval-{next(self._ids)}", "eval": True}
        activations, header = inputs, None
        for stage in self.router.stage_names:
            _, (activations,), header = await self._forward_with_retries(
                stage, activations, _with_codec(metadata, header)
            )
        return boundary_codecs.decode(activations, header)

    async def _hop(
        self, replica: ServerInfo, method: Method, tensor: torch.Tensor, metadata: dict, timeout: float, replies: int
    ) -> tuple[list[torch.Tensor], dict | None]:
        """One call, returning the reply's tensors and their codec header; a replica that fails is avoided a while."""
        metadata = {**metadata, "uid": replica.uid}  # a peer that now serves another stage refuses the call
        try:
            result = await self.client.call(replica, method, [tensor], metadata, timeout)
            if result.metadata.get("busy"):
                raise StageBusyError(f"{method} to {replica.uid} refused: its queue is full")
            outputs = expect_tensors(result, replies, f"{method} of {replica.uid}")
        except StageCallError:
            self.router.ban(replica)
            raise
        self.traffic.bytes_sent += result.bytes_sent
        self.traffic.bytes_received += result.bytes_received
        return outputs, result.metadata.get("codec")


def _with_codec(metadata: dict, header: dict | None) -> dict:
    return metadata if header is None else {**metadata, "codec": header}


class LocalPipeline:
    """The same stages, optimisers and loss in this one process: the baseline the swarm is measured against.

    Quantisers and boundary encodings are those of the config, as on the servers (`LocalBoundary`)."""

    def __init__(self, config: Config):
        self.stages: list[nn.Module] = [stage.train() for stage in build_stages(config)]
        self.optimizers = [build_optimizer(stage.parameters(), config.diloco.inner_optim) for stage in self.stages]
        self.traffic = TrafficCounter()
        names = config.model_pipeline.stage_names
        self.boundaries = [
            LocalBoundary(config.quant.boundary_for(name), partial(boundary_quantizer, stage))
            for name, stage in zip(names[:-1], self.stages, strict=False)
        ]

    def _through(self, inputs: torch.Tensor, count: bool) -> torch.Tensor:
        activations = inputs
        for position, stage in enumerate(self.stages):
            activations = stage(activations)
            if position < len(self.boundaries):
                activations = self.boundaries[position].carry(activations, count)
        return activations

    async def train_step(self, inputs: torch.Tensor, labels: torch.Tensor) -> float:
        activations = self._through(inputs, count=True)
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
                activations = self._through(inputs, count=False)
        finally:
            for stage in self.stages:
                stage.train()
        return activations
