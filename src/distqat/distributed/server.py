"""Stage server (`distqat server`): hosts one replica of one stage and announces it in the DHT.

It picks its stage (the config's choice, else the stage with the fewest live replicas, the slowest on
ties) and the smallest free replica index, then takes the stage's state: from the most advanced live
replica (with `diloco.enable`), else from the param mirror, else from the newest checkpoint of the stage,
else fresh init (`join_stage`, which logs the source). Only then
does it announce itself, serve forward/backward over the stage RPC, and heartbeat a `ServerInfo` record
whose expiry makes a dead server vanish from every routing table within `network.heartbeat_expiry` s.

While serving it writes a checkpoint of its state every `checkpoint.every` seconds, averages with the
stage's other replicas (DiLoCo, `stage_sync`), and, when another stage has had no replica for
`network.rebalance_after` seconds and its own stage has spares, the designated spare moves there
(`swarm.pipelines.stage_to_fill`), keeping its peer id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from hivemind import DHT

from distqat.checkpoints import restore_rng_state, rng_state, split_tensors
from distqat.config import Config
from distqat.distributed.compute_queue import ComputeQueue, Kind
from distqat.distributed.optim import build_optimizer
from distqat.distributed.replica import StageReplica
from distqat.distributed.stage_sync import StageSync, load_replica_state
from distqat.errors import ConfigError, StageCallError, SwarmError
from distqat.models import build_pipeline_stage
from distqat.observability.call_stats import CallStats
from distqat.quant.scheme import boundary_quantizer
from distqat.quant.stages import build_stage
from distqat.resume import stage_manifest, stage_store
from distqat.runtime import autocast, resolve_device
from distqat.swarm import boundary_codecs, direct, records
from distqat.swarm.events import EventLog
from distqat.swarm.node import start_dht, visible_maddrs
from distqat.swarm.pipelines import free_expert_index, stage_to_fill, stage_with_fewest_replicas
from distqat.swarm.rpc import register_stage_service
from distqat.swarm.uids import make_uid

logger = logging.getLogger(__name__)


class StageServer:
    """Serves one StageReplica; compute runs on one thread fed by a bounded priority queue (`compute_queue`), so
    the event loop stays responsive and a full server answers busy instead of growing memory."""

    def __init__(self, config: Config, dht: DHT, stage_name: str, expert_index: int):
        self.config, self.dht = config, dht
        self.stage_index = config.model_pipeline.stage_names.index(stage_name)
        self.device = resolve_device(config.device)
        module = build_stage(config, self.stage_index)  # with its LSQ quantisers, when quant.enable
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
        # Wire encodings of the boundary after this stage (outputs) and of the one before it (input gradients).
        names = config.model_pipeline.stage_names
        last = self.stage_index == len(names) - 1
        self.output_codec = "none" if last else config.quant.boundary_for(stage_name).activations
        self.grad_codec = (
            "none" if self.stage_index == 0 else config.quant.boundary_for(names[self.stage_index - 1]).gradients
        )
        self.events = EventLog(f"server_{self.info.peer_id[-8:]}")
        pipelining = config.pipelining
        self._compute = ComputeQueue(
            pipelining.server_max_in_flight,
            pipelining.server_max_in_flight_per_trainer,
            held=lambda caller: self.replica.in_flight if caller is None else self.replica.in_flight_of(caller),
            before_other=self.replica.before_weight_change,  # a DiLoCo round or a state load may write the weights
        )
        self._window_start, self._window_samples = time.monotonic(), 0
        self._syncing = False  # a DiLoCo round or state download holds the compute thread
        self._halt = threading.Event()  # set on stop, or to move to another stage
        self.move_to: str | None = None
        self._serving_since = time.monotonic()
        self.sync = (
            StageSync(
                config,
                dht,
                self.info,
                self.replica,
                on_compute=lambda fn: self._compute.submit(Kind.OTHER, fn).result(),
            )
            if config.diloco.enable
            else None
        )
        # What a checkpoint must match: the stage's model and the exact names and shapes of its state.
        self.checkpoints = stage_store(config, self.stage_index, module, newer_than=config.checkpoint.newer_than)
        self._checkpointed_version = -1
        self._checkpointed_round = 0
        self._trained = False  # has served a backward yet
        self.calls = CallStats()  # recent forward/backward latency, for the heartbeat

    def count_traffic(self, received: int, sent: int) -> None:
        self.info.bytes_activations += received + sent

    # --- the stage RPC (StageService, through StageEndpoint) ---

    def _encoded(self, tensor: torch.Tensor, codec: str) -> tuple[list[torch.Tensor], dict[str, Any]]:
        payload, header = boundary_codecs.encode(tensor, codec, boundary_quantizer(self.replica.module))
        return [payload], {"codec": header}

    async def forward(self, tensors: list[torch.Tensor], metadata: dict[str, Any], caller: str):
        (payload,) = tensors
        inputs = boundary_codecs.decode(payload, metadata.get("codec"))
        if metadata.get("eval"):  # held-out evaluation: no backward follows, keep nothing
            return self._encoded(await self._run(self.replica.infer, inputs, kind=Kind.READ), self.output_codec)
        if not self._compute.admit(caller):  # full: a busy reply, not unbounded memory; the trainer retries
            return [], {"busy": True}
        with self.calls.track("forward"):
            outputs = await self._queued(
                self._compute.submit_forward(caller, self.replica.forward, caller, str(metadata["mb"]), inputs)
            )
        return self._encoded(outputs, self.output_codec)

    async def backward(self, tensors: list[torch.Tensor], metadata: dict[str, Any], caller: str):
        (payload,) = tensors
        grad_outputs = boundary_codecs.decode(payload, metadata.get("codec"))
        with self.calls.track("backward"):
            grad_inputs = await self._run(
                self.replica.backward, caller, str(metadata["mb"]), grad_outputs, kind=Kind.BACKWARD
            )
        self.info.batch_size = len(grad_outputs)
        if not self._trained:
            self._trained = True
            self.events.emit("first_backward", uid=self.info.uid)
        self._window_samples += len(grad_outputs)
        if self.sync is not None:
            self.sync.record_step(len(grad_outputs))
        if grad_inputs is None or not metadata.get("want_grad", True):
            return [], {}
        return self._encoded(grad_inputs, self.grad_codec)

    async def _run(self, function, *args, kind: Kind = Kind.OTHER):
        # One compute thread: forward, backward and the weights digest never overlap an optimiser step.
        return await self._queued(self._compute.submit(kind, function, *args))

    async def _queued(self, future):
        self.info.queue += 1  # calls waiting for or holding the compute thread: trainers prefer short queues
        try:
            return await asyncio.wrap_future(future)
        finally:
            self.info.queue -= 1

    # --- taking the stage's state ---

    async def join_stage(self) -> str:
        """Before serving: take the stage's state from a live replica, else a checkpoint; returns which."""
        stage = self.info.stage
        peers = await self._stage_peers_or_none()
        if peers and self.sync is not None:
            if await self._run(self.sync.catch_up):
                return "a live replica"
            logger.warning("no live replica of '%s' gave its state", stage)
        elif peers:
            logger.warning("'%s' has live replicas but diloco.enable is false: not downloading their state", stage)
        if not peers and self.sync is not None:
            mirrored = await self._from_mirror()
            if mirrored is not None:
                return mirrored
        if self.config.checkpoint.resume:
            loaded = await self._run(self._load_checkpoint)
            if loaded is not None:
                return loaded
        return "fresh weights"

    async def _from_mirror(self) -> str | None:
        """The stage's state from a param mirror that holds it (the state download picks live replicas first)."""
        from distqat.distributed.mirror import mirrored_stage

        held = await asyncio.to_thread(mirrored_stage, self.config, self.dht, self.info.stage)
        if held is None:
            return None
        assert self.sync is not None
        if not await self._run(self.sync.catch_up):
            logger.warning("the param mirror holds '%s' but its state could not be downloaded", self.info.stage)
            return None
        return f"the param mirror (round {self.sync.diloco.round}, {held.steps} steps)"

    def _replica_state(self) -> dict[str, Any]:
        return {
            "module": self.replica.module.state_dict(),
            "inner_optimizer": self.replica.optimizer.state_dict(),
            "diloco": self.sync.diloco.state_dict() if self.sync is not None else None,
            "samples": self.replica.samples,
            "weights_version": self.replica.weights_version,
            "rng": rng_state(),  # dropout and friends continue their sequence after a resume
        }

    def _load_checkpoint(self) -> str | None:
        found = self.checkpoints.load_newest()
        if found is None:
            return None
        checkpoint, state = found
        diloco = self.sync.diloco if self.sync is not None else None
        problem = load_replica_state(state, self.replica.module, self.replica.optimizer, diloco)
        if problem:
            logger.warning("could not load checkpoint %s: %s", checkpoint.path, problem)
            return None
        self.replica.samples = int(state.get("samples") or 0)
        self.replica.weights_version = int(state.get("weights_version") or 0) + 1
        restore_rng_state(state.get("rng"))
        self._checkpointed_version = self.replica.weights_version
        self._checkpointed_round = self.sync.diloco.round if self.sync is not None else 0
        return (
            f"checkpoint {checkpoint.path} (step {checkpoint.manifest.get('steps')}, "
            f"run step {checkpoint.manifest.get('run_step')})"
        )

    def _checkpoint_snapshot(self, run_step: int | None):
        manifest = stage_manifest(
            self.config,
            self.stage_index,
            writer=self.info.uid,
            uid=self.info.uid,
            steps=self.replica.weights_version,
            samples=self.replica.samples,
            diloco_round=self.sync.diloco.round if self.sync is not None else 0,
            run_step=run_step,
        )
        return (*split_tensors(self._replica_state()), manifest)

    async def _run_step(self) -> int | None:
        """The run's step count (the monitor's), read before the snapshot: the state holds at least that much."""
        try:
            progress = await asyncio.to_thread(
                records.fetch_run_progress, self.dht, self.config.experiment_prefix, self.config.network.dht_timeout
            )
        except SwarmError:
            return None
        return progress.steps if progress is not None else None

    async def write_checkpoint(self) -> None:
        version = self.replica.weights_version
        if version == self._checkpointed_version or version == 0:
            return  # nothing trained since the last one (or at all)
        run_step = await self._run_step()
        skeleton, tensors, manifest = await self._run(self._checkpoint_snapshot, run_step, kind=Kind.READ)
        try:
            path = await asyncio.to_thread(self.checkpoints.write, skeleton, tensors, manifest)
        except OSError as error:
            logger.warning("could not write a checkpoint of '%s': %s", self.info.stage, error)
            return
        self._checkpointed_version = version
        self._checkpointed_round = manifest["diloco_round"]
        logger.debug("checkpoint of %s at step %d: %s", self.info.uid, version, path)

    # --- lifecycle ---

    async def serve(self, stop: threading.Event, endpoint: StageEndpoint, ready_file: Path | None = None) -> str | None:
        """Join the stage, serve it until `stop`; returns the stage to move to, or None when stopped."""
        joining = time.monotonic()
        source = await self.join_stage()
        logger.info("%s starts from %s (%.1f s)", self.info.uid, source, time.monotonic() - joining)
        endpoint.server = self
        self._serving_since = time.monotonic()
        logger.info("serving %s on %s as peer %s", self.info.uid, self.device, self.info.peer_id)
        loops = [self._relay_stop(stop), self._heartbeat_loop(ready_file), self._expiry_loop(), self._rebalance_loop()]
        if self.sync is not None:
            loops.append(self._sync_loop())
        if self.config.checkpoint.enable:
            loops.append(self._checkpoint_loop())
        try:
            await asyncio.gather(*loops)
        finally:
            endpoint.server = None
            logger.info(
                "stopping %s after %d steps, %d samples",
                self.info.uid,
                self.replica.weights_version,
                self.replica.samples,
            )
            if self.config.checkpoint.enable:
                await self.write_checkpoint()  # a stopped or moving replica leaves its latest state behind
            self._compute.shutdown(wait=True)
            if self.sync is not None:
                self.sync.shutdown()
        return self.move_to

    async def _relay_stop(self, stop: threading.Event) -> None:
        while not self._halt.is_set():
            if await asyncio.to_thread(stop.wait, 0.5):
                self._halt.set()

    async def _pause(self, seconds: float) -> bool:
        """Wait `seconds` or until halted; True while the server should go on."""
        return not await asyncio.to_thread(self._halt.wait, seconds)

    async def _heartbeat_loop(self, ready_file: Path | None) -> None:
        # Never waits long for the compute thread: an averaging round there must not stop the heartbeat,
        # or the replica would vanish from the DHT in the middle of its round.
        announced = False
        while not self._halt.is_set():
            if await self._announce():
                if not announced:
                    self.events.emit("serving", uid=self.info.uid)
                    announced = True
                if ready_file is not None and not ready_file.exists():
                    partial = ready_file.with_name(ready_file.name + ".partial")
                    partial.write_text(self.info.uid)
                    partial.replace(ready_file)  # a reader never sees the file half written
            await self._pause(self.config.network.heartbeat_period)

    async def _expiry_loop(self) -> None:
        # Apart from the heartbeat: this waits for the compute thread, which a queue of calls can hold for long.
        max_age = self.config.model_pipeline.forward_timeout + self.config.model_pipeline.backward_timeout
        while await self._pause(max(1.0, max_age / 4)):
            if not self._syncing:
                dropped = await self._run(self.replica.drop_expired, max_age, kind=Kind.READ)
                if dropped:
                    logger.warning("dropped %d micro-batches whose backward never came", dropped)

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
                await asyncio.wait_for(
                    self._run(self._describe_weights, kind=Kind.READ), self.config.network.heartbeat_period
                )
        self.info.forward_ms, self.info.backward_ms = self.calls.mean_ms["forward"], self.calls.mean_ms["backward"]
        self.info.in_flight = self.replica.in_flight
        self.info.busy_s = self._compute.busy_seconds()
        self.info.refused = self._compute.refused
        if elapsed >= 5.0:
            self.info.utilisation = self._compute.utilisation()
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

    async def _sync_loop(self) -> None:
        assert self.sync is not None
        while await self._pause(self.config.network.heartbeat_period):
            peers = await self._stage_peers_or_none()
            if peers is None:
                continue
            self._syncing = True
            try:
                await self.sync.tick(peers, self._run, self._announce)
            finally:
                self._syncing = False

    async def _checkpoint_loop(self) -> None:
        settings = self.config.checkpoint
        last = time.monotonic()
        # Looks often enough to notice `every_rounds` rounds soon after the round that completes them.
        while await self._pause(min(settings.every, self.config.network.heartbeat_period)):
            rounds = self.sync.diloco.round - self._checkpointed_round if self.sync is not None else 0
            if time.monotonic() - last >= settings.every or (settings.every_rounds and rounds >= settings.every_rounds):
                await self.write_checkpoint()
                last = time.monotonic()

    async def _rebalance_loop(self) -> None:
        """Move to a stage that has had no replica for `rebalance_after` s, if this is its designated spare."""
        network = self.config.network
        if network.rebalance_after <= 0:
            return
        stage_names = self.config.model_pipeline.stage_names
        empty_since: float | None = None
        while await self._pause(network.heartbeat_period):
            try:
                replicas = await asyncio.to_thread(
                    records.fetch_replicas, self.dht, self.config.experiment_prefix, stage_names, network.dht_timeout
                )
            except SwarmError:
                continue
            target = stage_to_fill(replicas, stage_names, self.info.uid)
            if target is None:
                empty_since = None
                continue
            now = time.monotonic()
            if empty_since is None:
                empty_since = now
                logger.warning(
                    "stage '%s' has no replica: %s moves there in %.0f s unless another server fills it",
                    target,
                    self.info.uid,
                    network.rebalance_after,
                )
            # Hysteresis: the gap must last, and a server that just arrived stays put as long.
            if now - empty_since >= network.rebalance_after and now - self._serving_since >= network.rebalance_after:
                logger.warning("moving from '%s' to '%s', which has no replica", self.info.stage, target)
                self.events.emit("moving", uid=self.info.uid, to=target)
                self.move_to = target
                self._halt.set()


class StageEndpoint:
    """This peer's stage RPC, registered once: it hands each call to the stage server of the moment, so a
    server that moves to another stage keeps its peer id and handlers. A call meant for another replica
    (the caller's view is older than our move) is refused rather than computed with the wrong stage."""

    def __init__(self) -> None:
        self.server: StageServer | None = None

    def _target(self, metadata: dict[str, Any]) -> StageServer:
        server = self.server
        if server is None:
            raise StageCallError("this peer serves no stage right now")
        wanted = metadata.get("uid")
        if wanted is not None and wanted != server.info.uid:
            raise StageCallError(f"this peer now serves {server.info.uid}, not {wanted}")
        return server

    async def forward(self, tensors: list[torch.Tensor], metadata: dict[str, Any], caller: str):
        return await self._target(metadata).forward(tensors, metadata, caller)

    async def backward(self, tensors: list[torch.Tensor], metadata: dict[str, Any], caller: str):
        return await self._target(metadata).backward(tensors, metadata, caller)

    def count_traffic(self, received: int, sent: int) -> None:
        if self.server is not None:
            self.server.count_traffic(received, sent)


def choose_slot(config: Config, dht: DHT, stage: str | None, expert_index: int | None) -> tuple[str, int]:
    """The stage to serve (given, else the neediest) and a replica index that no live server uses."""
    stage_names = config.model_pipeline.stage_names
    if stage is not None and stage not in stage_names:
        raise ConfigError(f"--stage '{stage}' is not a stage of model_pipeline (stages: {', '.join(stage_names)})")
    replicas = records.fetch_replicas(dht, config.experiment_prefix, stage_names, config.network.dht_timeout)
    if stage is None:
        stage = stage_with_fewest_replicas(replicas, stage_names)
        counts = ", ".join(f"{name}: {len(replicas[name])}" for name in stage_names)
        logger.info("taking stage '%s', the neediest (live replicas %s)", stage, counts)
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


async def serve_stages(
    config: Config,
    dht: DHT,
    stop: threading.Event,
    stage: str | None,
    expert_index: int | None,
    ready_file: Path | None,
) -> None:
    """Serve a stage until stopped; when the server moves, build the new stage's replica and go on."""
    p2p = await dht.replicate_p2p()
    endpoint = StageEndpoint()
    await register_stage_service(p2p, endpoint, count_traffic=endpoint.count_traffic)
    # Stage tensors also over a direct TCP channel (same endpoint, same counting); the address goes in every record.
    channel, tensor_addr = await direct.start_for_network(
        p2p, endpoint, dht.peer_id.to_base58(), config.network, visible_maddrs(dht), endpoint.count_traffic
    )
    try:
        while not stop.is_set():
            stage, expert_index = await asyncio.to_thread(choose_slot, config, dht, stage, expert_index)
            # In this (main) thread: hivemind's averager installs signal handlers, which only the main thread may.
            built = time.monotonic()
            server = StageServer(config, dht, stage, expert_index)
            server.info.tensor_addr = tensor_addr
            logger.info("built %s and its averager in %.1f s", server.info.uid, time.monotonic() - built)
            stage = await server.serve(stop, endpoint, ready_file)
            if stage is None:
                break
            expert_index = None
    finally:
        if channel is not None:
            await channel.close()
        await p2p.shutdown()


def _warm_up_models(config: Config, took: list[float]) -> None:
    started = time.monotonic()
    try:
        build_pipeline_stage(config.model_pipeline, 0, config.data, config.seed)
    except Exception as error:  # the real build reports it properly; this is only a head start
        logger.debug("model warm-up failed: %s", error)
    took.append(time.monotonic() - started)


def run_server(
    config: Config,
    stop: threading.Event,
    stage: str | None = None,
    expert_index: int | None = None,
    ready_file: Path | None = None,
) -> None:
    started = time.monotonic()
    # Joining the DHT is mostly waiting for p2pd; meanwhile a thread pays the model code's first-use costs
    # (lazy imports of torchvision/transformers), which would otherwise delay the server after it joined.
    warm_up_took: list[float] = []
    warm_up = threading.Thread(target=_warm_up_models, args=(config, warm_up_took), name="warm-up", daemon=True)
    warm_up.start()
    dht = start_dht(config.network)
    joined = time.monotonic() - started
    warm_up.join()
    logger.info(
        "joined the DHT in %.1f s (model warm-up %.1f s, both done after %.1f s)",
        joined,
        warm_up_took[0] if warm_up_took else float("nan"),
        time.monotonic() - started,
    )
    try:
        asyncio.run(serve_stages(config, dht, stop, stage, expert_index, ready_file))
    finally:
        dht.shutdown()
