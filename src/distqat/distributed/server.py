"""Stage server (`distqat server`): hosts one replica of one stage and announces it in the DHT.

It picks its stage (the config's choice, else the stage with the fewest live replicas) and the smallest
free replica index, serves forward/backward over the stage RPC, and heartbeats a `ServerInfo` record whose
expiry makes a dead server vanish from every routing table within `network.heartbeat_expiry` seconds.
With `diloco.enable`, a server that joins a stage with live replicas first downloads the state of the most
advanced one, and the replicas of a stage average with DiLoCo (`stage_sync`).
"""

from __future__ import annotations

import asyncio
import contextlib
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
from distqat.distributed.stage_sync import StageSync
from distqat.errors import ConfigError, SwarmError
from distqat.models import build_pipeline_stage
from distqat.observability.call_stats import CallStats
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
        self.device = resolve_device(config.device)
        module = build_pipeline_stage(config.model_pipeline, self.stage_index, config.data, config.seed)
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
        self._syncing = False  # a DiLoCo round or state download holds the compute thread
        self.calls = CallStats()  # latency and calls in progress, for the heartbeat
        self.sync = (
            StageSync(config, dht, self.info, self.replica, on_compute=lambda fn: self._compute.submit(fn).result())
            if config.diloco.enable
            else None
        )

    def count_traffic(self, received: int, sent: int) -> None:
        self.info.bytes_activations += received + sent

    # --- the stage RPC (StageService) ---

    async def forward(self, tensors: list[torch.Tensor], metadata: dict[str, Any], caller: str):
        (inputs,) = tensors
        if metadata.get("eval"):  # held-out evaluation: no backward follows, keep nothing
            return [await self._run(self.replica.infer, inputs)], {}
        with self.calls.track("forward"):
            outputs = await self._run(self.replica.forward, caller, str(metadata["mb"]), inputs)
        return [outputs], {}

    async def backward(self, tensors: list[torch.Tensor], metadata: dict[str, Any], caller: str):
        (grad_outputs,) = tensors
        with self.calls.track("backward"):
            grad_inputs = await self._run(self.replica.backward, caller, str(metadata["mb"]), grad_outputs)
        self._window_samples += len(grad_outputs)
        self.info.batch_size = len(grad_outputs)
        if self.sync is not None:
            self.sync.record_step(len(grad_outputs))
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
        changed = self.info.steps != self.replica.weights_version or self.info.weights_digest == 0.0
        if changed and not self._syncing:
            # Read on the compute thread, so the digest and the step count describe the same weights.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._run(self._describe_weights), self.config.network.heartbeat_period)
        self.info.forward_ms, self.info.backward_ms = self.calls.mean_ms["forward"], self.calls.mean_ms["backward"]
        self.info.queue_length, self.info.in_flight = self.calls.in_progress, self.replica.in_flight
        self.info.updated_at = time.time()
        return self.info

    def _describe_weights(self) -> None:
        self.info.weights_digest = self.replica.weights_digest()
        self.info.steps, self.info.samples = self.replica.weights_version, self.replica.samples
        if self.sync is not None:
            self.sync.describe(self.info)

    async def _stage_peers(self) -> list[records.ServerInfo]:
        replicas = await asyncio.to_thread(
            records.fetch_replicas,
            self.dht,
            self.config.experiment_prefix,
            [self.info.stage],
            self.config.network.dht_timeout,
        )
        return [info for info in replicas[self.info.stage] if info.uid != self.info.uid]

    async def _stage_peers_or_none(self) -> list[records.ServerInfo] | None:
        """The other live replicas of this stage; None (and one log line) when the DHT cannot tell."""
        try:
            return await self._stage_peers()
        except SwarmError as error:
            logger.warning("could not read the replicas of '%s': %s", self.info.stage, error)
            return None

    async def join_stage(self) -> None:
        """Before serving: take the state of the stage's most advanced live replica, if there is one."""
        if self.sync is None:
            return
        peers = await self._stage_peers_or_none()
        if peers is None:
            return
        if not peers:
            logger.info("first replica of '%s': starting from fresh weights", self.info.stage)
            return
        if not await self._run(self.sync.catch_up):
            logger.warning("no replica of '%s' gave its state: starting from fresh weights", self.info.stage)

    async def serve(self, stop: threading.Event, ready_file: Path | None = None) -> None:
        p2p = await self.dht.replicate_p2p()
        await self.join_stage()
        await register_stage_service(p2p, self, count_traffic=self.count_traffic)
        logger.info("serving %s on %s as peer %s", self.info.uid, self.device, self.info.peer_id)
        loops = [self._heartbeat_loop(stop, ready_file)]
        if self.sync is not None:
            loops.append(self._sync_loop(stop))
        try:
            await asyncio.gather(*loops)
        finally:
            logger.info(
                "stopping %s after %d steps, %d samples",
                self.info.uid,
                self.replica.weights_version,
                self.replica.samples,
            )
            self._compute.shutdown(wait=True, cancel_futures=True)
            if self.sync is not None:
                self.sync.shutdown()
            await p2p.shutdown()

    async def _heartbeat_loop(self, stop: threading.Event, ready_file: Path | None) -> None:
        # Never waits long for the compute thread: an averaging round there must not stop the heartbeat,
        # or the replica would vanish from the DHT in the middle of its round.
        network = self.config.network
        max_age = self.config.model_pipeline.forward_timeout + self.config.model_pipeline.backward_timeout
        while not stop.is_set():
            if await self._announce() and ready_file is not None and not ready_file.exists():
                ready_file.write_text(self.info.uid)
            if not self._syncing:
                dropped = await self._run(self.replica.drop_expired, max_age)
                if dropped:
                    logger.warning("dropped %d micro-batches whose backward never came", dropped)
            await asyncio.to_thread(stop.wait, network.heartbeat_period)

    async def _announce(self) -> bool:
        network = self.config.network
        try:
            info = await self._refresh_info()
            await asyncio.to_thread(
                records.announce_server,
                self.dht,
                self.config.experiment_prefix,
                info,
                network.heartbeat_expiry,
                network.dht_timeout,
            )
        except SwarmError as error:
            logger.warning("heartbeat failed: %s", error)
            return False
        return True

    async def _sync_loop(self, stop: threading.Event) -> None:
        assert self.sync is not None
        while not stop.is_set():
            await asyncio.to_thread(stop.wait, self.config.network.heartbeat_period)
            if stop.is_set():
                break
            peers = await self._stage_peers_or_none()
            if peers is None:
                continue
            self._syncing = True
            try:
                await self.sync.tick(peers, self._run, self._announce)
            finally:
                self._syncing = False


def choose_slot(config: Config, dht: DHT, stage: str | None, expert_index: int | None) -> tuple[str, int]:
    """The stage to serve (given, else the neediest) and a replica index that no live server uses."""
    stage_names = config.model_pipeline.stage_names
    if stage is not None and stage not in stage_names:
        raise ConfigError(f"--stage '{stage}' is not a stage of model_pipeline (stages: {', '.join(stage_names)})")
    replicas = records.fetch_replicas(dht, config.experiment_prefix, stage_names, config.network.dht_timeout)
    stage = stage or stage_with_fewest_replicas(replicas, stage_names)
    taken = {info.expert_index for info in replicas[stage]}
    if taken and not config.diloco.enable:
        logger.warning("stage '%s' has %d other replicas; with diloco.enable false they train apart", stage, len(taken))
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
