"""Param mirror (`distqat mirror`): a CPU copy of every stage's state, served to joiners and checkpointed.

It joins the DHT and, for each stage, opens a state-sharing averager under the stage's DiLoCo prefix (it
never averages: it never calls `step`, so no round ever includes it). After each DiLoCo round of a stage
(a replica's heartbeat shows a higher round), or after `param_mirror.refresh_every` seconds in which the
stage trained on, it downloads the stage's state from its most advanced live replica, exactly as a
joining replica would, and keeps it in memory as it came (one byte tensor). It then shares that state at
a priority below every live replica (`stage_sync.MIRROR_PRIORITY`): a joiner downloads from a replica
while one lives, from the mirror once none does. Its heartbeat record (`records.MirrorInfo`) tells a
joining server which stages it holds, so the server can log that it starts "from the param mirror".

It writes every held stage to the checkpoint folder at most every `refresh_every` seconds, or after
`checkpoint.every_rounds` rounds, and once more when it stops, in the servers' checkpoint format, so a
restarted swarm resumes from it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
from hivemind import DHT

from distqat.checkpoints import split_tensors, stage_fingerprint
from distqat.config import Config
from distqat.distributed.stage_sync import MIRROR_PRIORITY, STATE_FORMAT, read_packed_state
from distqat.errors import ConfigError, SwarmError
from distqat.resume import stage_manifest, stage_store
from distqat.swarm import records
from distqat.swarm.averaging import StageAverager
from distqat.swarm.node import start_dht

logger = logging.getLogger(__name__)

MIRROR_UID = "mirror"


@dataclass
class HeldState:
    metadata: dict[str, Any]
    blob: torch.Tensor  # the packed state, as the replica sent it
    round: int
    steps: int
    samples: int
    pulled_at: float  # unix time
    stage_samples: int  # samples trained by the stage's live replicas at the pull: later progress means stale


def pull_due(held: HeldState | None, replicas: list[records.ServerInfo], now: float, refresh_every: float) -> bool:
    """Pull a stage now? After each DiLoCo round, or when it trained on for `refresh_every` seconds."""
    if not replicas or max(info.steps for info in replicas) == 0:
        return False  # nobody to pull from, or nothing trained yet
    if held is None:
        return True
    if max(info.diloco_round for info in replicas) > held.round:
        return True
    trained_since = sum(info.samples for info in replicas) != held.stage_samples
    return trained_since and now - held.pulled_at >= refresh_every


def write_due(
    held: HeldState | None,
    written: tuple[int, int, float],
    now: float,
    refresh_every: float,
    every_rounds: int | None,
) -> bool:
    """Checkpoint the held state now? `written` = (steps, round, time) of the last checkpoint written."""
    steps, round_, at = written
    if held is None or held.steps == steps:
        return False  # nothing new since
    if every_rounds and held.round - round_ >= every_rounds:
        return True
    return now - at >= refresh_every


class StageMirror:
    """One stage's copy: the averager it pulls and serves through, the state it holds, its checkpoints."""

    def __init__(self, config: Config, dht: DHT, stage_index: int, module: torch.nn.Module):
        self.config, self.stage_index = config, stage_index
        self.stage = config.model_pipeline.stage_names[stage_index]
        self.model_name = config.model_pipeline.pipeline[stage_index].model_name
        self.store = stage_store(config, stage_index, module, newer_than=config.checkpoint.newer_than)
        self.held: HeldState | None = None
        self._lock = threading.Lock()
        self._written_at = 0.0
        self._written_round = -1
        self._written_steps = -1
        self.last_run_step: int | None = None  # the run's step count read just before the last pull
        settings = config.diloco
        self.averager = StageAverager(
            dht,
            experiment_prefix=config.experiment_prefix,
            stage=self.stage,
            uid=f"{MIRROR_UID}.{self.stage}",
            templates=[torch.zeros(1)],  # never averaged: a placeholder the averager requires
            compression="none",
            matchmaking_time=settings.matchmaking_time,
            request_timeout=min(config.network.dht_timeout, settings.matchmaking_time / 2),
            dht_timeout=config.network.dht_timeout,
            outer_digest=lambda: "",
            allreduce_timeout=settings.averaging_timeout,
            state_provider=self._provide,
        )
        self.averager.share_state(False)  # nothing to give until the first pull
        self.averager.set_priority(MIRROR_PRIORITY)

    def _provide(self) -> tuple[dict[str, Any], list[torch.Tensor]]:
        with self._lock:
            held = self.held
        if held is None:
            raise SwarmError(f"the param mirror holds no state of '{self.stage}' yet")
        return {**held.metadata, "uid": f"{MIRROR_UID}.{self.stage}"}, [held.blob]

    def due(self, replicas: list[records.ServerInfo], now: float) -> bool:
        return pull_due(self.held, replicas, now, self.config.param_mirror.refresh_every)

    def pull(self, replicas: list[records.ServerInfo]) -> bool:
        """Download the stage's state from its most advanced live replica; False (and a log line) if none gave it."""
        started = time.monotonic()
        downloaded = self.averager.load_state(timeout=self.config.network.dht_timeout)
        if downloaded is None:
            logger.warning("no live replica of '%s' gave its state", self.stage)
            return False
        metadata, tensors = downloaded
        problem = self._refusal(metadata, tensors)
        if problem:
            logger.warning("refused the state of '%s' from %s: %s", self.stage, _get(metadata, "uid"), problem)
            return False
        held = HeldState(
            metadata=dict(metadata),
            blob=tensors[0],
            round=int(metadata.get("round") or 0),
            steps=int(metadata.get("steps") or 0),
            samples=int(metadata.get("samples") or 0),
            pulled_at=time.time(),
            stage_samples=sum(info.samples for info in replicas),
        )
        with self._lock:
            self.held = held
        self.averager.share_state(True)
        logger.info(
            "pulled '%s' from %s: round %d, %d steps, %.1f MiB in %.2f s",
            self.stage,
            metadata.get("uid"),
            held.round,
            held.steps,
            held.blob.numel() / 2**20,
            time.monotonic() - started,
        )
        return True

    def _refusal(self, metadata: Any, tensors: list[torch.Tensor]) -> str | None:
        if not isinstance(metadata, dict) or metadata.get("format") != STATE_FORMAT or len(tensors) != 1:
            return f"unknown state format {metadata!r}"
        if metadata.get("uid", "").startswith(MIRROR_UID):
            return "it is another mirror's copy"
        if metadata.get("stage") != self.stage:
            return f"it holds stage '{metadata.get('stage')}'"
        try:
            state = read_packed_state(tensors)
        except (RuntimeError, ValueError, EOFError) as error:
            return f"unreadable state: {error}"
        if stage_fingerprint(self.model_name, state.get("module", {})) != self.store.fingerprint:
            return "it does not fit this config's model and stage cut"
        return None

    def write_due(self, now: float) -> bool:
        return write_due(
            self.held,
            (self._written_steps, self._written_round, self._written_at),
            now,
            self.config.param_mirror.refresh_every,
            self.config.checkpoint.every_rounds,
        )

    def write_checkpoint(self, run_step: int | None) -> None:
        held = self.held
        if held is None or held.steps == self._written_steps:
            return
        state = read_packed_state([held.blob])
        state.update(samples=held.samples, weights_version=held.steps)
        manifest = stage_manifest(
            self.config,
            self.stage_index,
            writer=MIRROR_UID,
            uid=held.metadata.get("uid"),
            steps=held.steps,
            samples=held.samples,
            diloco_round=held.round,
            run_step=run_step,
        )
        try:
            path = self.store.write(*split_tensors(state), manifest)
        except OSError as error:
            logger.warning("could not write a checkpoint of '%s': %s", self.stage, error)
            return
        self._written_at, self._written_round, self._written_steps = time.time(), held.round, held.steps
        logger.info("checkpoint of '%s' (round %d, run step %s): %s", self.stage, held.round, run_step, path)

    def describe(self) -> records.MirroredStage | None:
        held = self.held
        return (
            None
            if held is None
            else records.MirroredStage(round=held.round, steps=held.steps, pulled_at=held.pulled_at)
        )

    def shutdown(self) -> None:
        self.averager.shutdown()


def _get(metadata: Any, key: str) -> Any:
    return metadata.get(key) if isinstance(metadata, dict) else None


def mirrored_stage(config: Config, dht: DHT, stage: str) -> records.MirroredStage | None:
    """What a live param mirror holds of `stage` (the most advanced, if several do), or None."""
    try:
        mirrors = records.fetch_mirrors(dht, config.experiment_prefix, config.network.dht_timeout)
    except SwarmError as error:
        logger.warning("could not look for a param mirror: %s", error)
        return None
    held = [mirror.stages[stage] for mirror in mirrors if stage in mirror.stages]
    return max(held, key=lambda entry: (entry.round, entry.steps)) if held else None


class ParamMirror:
    """Every stage's StageMirror, refreshed from the DHT's view of the replicas."""

    def __init__(self, config: Config, dht: DHT):
        from distqat.quant.stages import build_stages  # the models, only to know what a fitting state looks like

        self.config, self.dht = config, dht
        modules = build_stages(config)
        # In this (main) thread: hivemind's averager installs signal handlers, which only the main thread may.
        self.stages = [StageMirror(config, dht, index, module) for index, module in enumerate(modules)]
        del modules
        self.info = records.MirrorInfo(peer_id=dht.peer_id.to_base58())

    def _run_step(self) -> int | None:
        try:
            progress = records.fetch_run_progress(
                self.dht, self.config.experiment_prefix, self.config.network.dht_timeout
            )
        except SwarmError:
            return None
        return progress.steps if progress is not None else None

    def tick(self) -> None:
        """One look at the swarm: pull what is due, write what is due, announce what is held."""
        network = self.config.network
        try:
            replicas = records.fetch_replicas(
                self.dht, self.config.experiment_prefix, self.config.model_pipeline.stage_names, network.dht_timeout
            )
        except SwarmError as error:
            logger.warning("could not read the swarm: %s", error)
            return
        for mirror in self.stages:
            live = replicas.get(mirror.stage, [])
            if mirror.due(live, time.time()):
                run_step = self._run_step()  # before the pull: the state holds at least that many steps
                if not mirror.pull(live):
                    continue
                mirror.last_run_step = run_step
            if mirror.write_due(time.time()):
                mirror.write_checkpoint(mirror.last_run_step)
        self.announce()

    def announce(self) -> None:
        stages = {mirror.stage: described for mirror in self.stages if (described := mirror.describe()) is not None}
        self.info.stages = stages
        try:
            # Lives longer than a server's record: a pull can hold the loop for a while, and a stale record
            # costs a joiner only one failed download before it falls back to a checkpoint.
            ttl = max(self.config.network.heartbeat_expiry, 30.0)
            records.announce_mirror(
                self.dht, self.config.experiment_prefix, self.info, ttl, self.config.network.dht_timeout
            )
        except SwarmError as error:
            logger.warning("mirror heartbeat failed: %s", error)

    def close(self) -> None:
        for mirror in self.stages:
            mirror.write_checkpoint(mirror.last_run_step)  # what it holds survives it
            mirror.shutdown()


def run_mirror(config: Config, stop: threading.Event) -> None:
    if not config.network.initial_peers:
        raise ConfigError(
            "network.initial_peers: the mirror needs the swarm's address (--initial-peers, see initial_peers.txt "
            "in the coordinator's log dir)"
        )
    dht = start_dht(config.network)
    try:
        mirror = ParamMirror(config, dht)
        logger.info(
            "param mirror of stages %s up as peer %s; checkpoints in %s",
            config.model_pipeline.stage_names,
            mirror.info.peer_id,
            config.resolved_checkpoint_dir,
        )
        try:
            while not stop.is_set():
                mirror.tick()
                stop.wait(config.network.heartbeat_period)
        finally:
            mirror.close()
    finally:
        dht.shutdown()
