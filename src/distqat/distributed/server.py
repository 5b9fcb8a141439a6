"""Stage server (`distqat server`): hosts one replica of one stage and announces it in the DHT.

It picks its stage (the config's choice, else the stage with the fewest live replicas) and the smallest
free replica index, serves forward/backward over the stage RPC, and heartbeats a `ServerInfo` record whose
expiry makes a dead server vanish from every routing table within `network.heartbeat_expiry` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import torch
from hivemind import DHT

from distqat.config import Config
from distqat.distributed.optim import build_optimizer
from distqat.distributed.replica import StageReplica
from distqat.errors import ConfigError, SwarmError
from distqat.models import build_stage
from distqat.runtime import autocast, resolve_device
from distqat.swarm import records
from distqat.swarm.node import start_dht, visible_maddrs
from distqat.swarm.pipelines import free_expert_index, stage_with_fewest_replicas
from distqat.swarm.rpc import register_stage_service
from distqat.swarm.uids import make_uid

logger = logging.getLogger(__name__)


class StageServer:
    """Serves one StageReplica; compute runs on one worker thread so the event loop stays responsive."""

    def __init__(self, config: Config, dht: DHT, stage_name: str, expert_index: int):
        self.config, self.dht = config, dht
        self.stage_index = config.model_pipeline.stage_names.index(stage_name)
        stage = config.model_pipeline.pipeline[self.stage_index]
        self.device = resolve_device(config.device)
        module = build_stage(stage, config.data, config.seed)
        self.replica = StageReplica(
            module,
            build_optimizer(module.parameters(), config.diloco.inner_optim),
            self.device,
            autocast=partial(autocast, self.device, config.data.precision),
            inputs_need_grad=self.stage_index > 0,
        )
        self.info = records.ServerInfo(
            uid=make_uid(stage_name, expert_index),
            peer_id=dht.peer_id.to_base58(),
            maddrs=visible_maddrs(dht),
            stage=stage_name,
            stage_index=self.stage_index,
            expert_index=expert_index,
            device=str(self.device),
            started_at=time.time(),
        )
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stage-compute")
        self._window_start, self._window_samples = time.monotonic(), 0

    # --- the stage RPC (StageService) ---

    async def forward(self, tensors: list[torch.Tensor], metadata: dict[str, Any], caller: str):
        (inputs,) = tensors
        outputs = await self._run(self.replica.forward, caller, str(metadata["mb"]), inputs)
        return [outputs], {}

    async def backward(self, tensors: list[torch.Tensor], metadata: dict[str, Any], caller: str):
        (grad_outputs,) = tensors
        grad_inputs = await self._run(self.replica.backward, caller, str(metadata["mb"]), grad_outputs)
        self._window_samples += len(grad_outputs)
        return ([] if grad_inputs is None or not metadata.get("want_grad", True) else [grad_inputs]), {}

    async def _run(self, function, *args):
        # One compute thread: forward, backward and the weights digest never overlap an optimiser step.
        return await asyncio.get_running_loop().run_in_executor(self._compute, function, *args)

    # --- lifecycle ---

    async def _refresh_info(self) -> records.ServerInfo:
        now = time.monotonic()
        elapsed = now - self._window_start
        if elapsed >= 5.0:
            rate = self._window_samples / elapsed
            # Smooth so that one slow step does not make trainers flee this replica.
            self.info.samples_per_s = (
                rate if self.info.samples_per_s == 0 else 0.5 * self.info.samples_per_s + 0.5 * rate
            )
            self._window_start, self._window_samples = now, 0
        if self.info.steps != self.replica.weights_version or self.info.weights_digest == 0.0:
            # Read on the compute thread, so the digest and the step count describe the same weights.
            self.info.weights_digest, self.info.steps, self.info.samples = await self._run(
                lambda: (self.replica.weights_digest(), self.replica.weights_version, self.replica.samples)
            )
        return self.info

    async def serve(self, stop: threading.Event, ready_file: Path | None = None) -> None:
        network = self.config.network
        p2p = await self.dht.replicate_p2p()
        await register_stage_service(p2p, self)
        logger.info("serving %s on %s as peer %s", self.info.uid, self.device, self.info.peer_id)
        max_age = self.config.model_pipeline.forward_timeout + self.config.model_pipeline.backward_timeout
        try:
            while not stop.is_set():
                try:
                    await asyncio.to_thread(
                        records.announce_server,
                        self.dht,
                        self.config.experiment_prefix,
                        await self._refresh_info(),
                        network.heartbeat_expiry,
                        network.dht_timeout,
                    )
                except SwarmError as error:
                    logger.warning("heartbeat failed: %s", error)
                else:
                    if ready_file is not None and not ready_file.exists():
                        ready_file.write_text(self.info.uid)
                dropped = await self._run(self.replica.drop_expired, max_age)
                if dropped:
                    logger.warning("dropped %d micro-batches whose backward never came", dropped)
                await asyncio.to_thread(stop.wait, network.heartbeat_period)
        finally:
            logger.info(
                "stopping %s after %d steps, %d samples",
                self.info.uid,
                self.replica.weights_version,
                self.replica.samples,
            )
            self._compute.shutdown(wait=True, cancel_futures=True)
            await p2p.shutdown()


def choose_slot(config: Config, dht: DHT, stage: str | None, expert_index: int | None) -> tuple[str, int]:
    """The stage to serve (given, else the neediest) and a replica index that no live server uses."""
    stage_names = config.model_pipeline.stage_names
    if stage is not None and stage not in stage_names:
        raise ConfigError(f"--stage '{stage}' is not a stage of model_pipeline (stages: {', '.join(stage_names)})")
    replicas = records.fetch_replicas(dht, config.experiment_prefix, stage_names, config.network.dht_timeout)
    stage = stage or stage_with_fewest_replicas(replicas, stage_names)
    taken = {info.expert_index for info in replicas[stage]}
    if taken:
        logger.warning(
            "stage '%s' has %d other replicas; they train independently in this version (no DiLoCo averaging yet)",
            stage,
            len(taken),
        )
    if expert_index is None:
        try:
            expert_index = free_expert_index(taken, config.max_expert_index)
        except ValueError as error:
            raise SwarmError(f"stage '{stage}': {error}") from None
    elif expert_index in taken:
        raise SwarmError(f"replica index {expert_index} of stage '{stage}' is already served by a live peer")
    return stage, expert_index


def run_server(
    config: Config,
    stop: threading.Event,
    stage: str | None = None,
    expert_index: int | None = None,
    ready_file: Path | None = None,
) -> None:
    dht = start_dht(config.network)
    try:
        stage, expert_index = choose_slot(config, dht, stage, expert_index)
        server = StageServer(config, dht, stage, expert_index)
        if stop.is_set():
            return
        asyncio.run(server.serve(stop, ready_file))
    finally:
        dht.shutdown()
