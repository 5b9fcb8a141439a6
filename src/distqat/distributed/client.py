"""Client (`distqat client`): keeps one trainer process per complete pipeline.

Every `network.client_poll_period` seconds it counts complete pipelines in the DHT (the smallest replica
count over the stages, capped by `network.max_pipelines`), starts trainers up to that number, stops the
extras once they have lacked a pipeline for `network.trainer_grace` seconds, and restarts a trainer that
crashed (with a growing back-off). A trainer that finished its `--max-steps` is not restarted. Before any
trainer it starts the data server (`data_server.enable`), whose address and per-run secret reach the
trainers in their environment.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from distqat.config import Config, dump_config
from distqat.distributed.data_server import start_data_server
from distqat.errors import DataError, SwarmError
from distqat.launch import ProcessSupervisor, RoleProcess
from distqat.swarm import records
from distqat.swarm.node import start_dht
from distqat.swarm.pipelines import count_complete_pipelines, missing_stages

logger = logging.getLogger(__name__)

RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)


@dataclass
class TrainerSlot:
    process: RoleProcess | None = None
    crashes: int = 0
    next_start_at: float = 0.0
    finished: bool = False


class TrainerFleet:
    """Trainer processes by slot index; `reconcile` makes their number match the complete pipelines."""

    def __init__(
        self,
        supervisor: ProcessSupervisor,
        config_path: Path,
        log_dir: Path,
        max_steps: int,
        env: dict[str, str] | None = None,
        stop_grace: float = 0.0,
    ):
        self._supervisor = supervisor
        self.stop_grace = stop_grace  # seconds pipelines must stay fewer than trainers before one is stopped
        self._fewer_since: float | None = None
        self._config_path, self._log_dir, self._max_steps = config_path, log_dir, max_steps
        self.env = dict(env or {})  # the data server's address and secret, for every trainer
        self.slots: dict[int, TrainerSlot] = {}

    def _argv(self, index: int) -> list[str]:
        # The dumped config already holds the initial peers.
        return [
            sys.executable,
            "-m",
            "distqat",
            "trainer",
            "--config",
            str(self._config_path),
            "--index",
            str(index),
            "--max-steps",
            str(self._max_steps),
        ]

    def reap(self) -> None:
        for index, slot in self.slots.items():
            if slot.process is None or (code := slot.process.poll()) is None:
                continue
            slot.process = None
            if code == 0:
                slot.finished = True
                logger.info("trainer_%d finished", index)
            else:
                slot.crashes += 1
                delay = RESTART_BACKOFF_S[min(slot.crashes, len(RESTART_BACKOFF_S)) - 1]
                slot.next_start_at = time.monotonic() + delay
                logger.error(
                    "trainer_%d exited with code %d (see trainer_%d.log); restarting in %.0f s",
                    index,
                    code,
                    index,
                    delay,
                )

    def reconcile(self, wanted: int) -> None:
        now = time.monotonic()
        for index in range(wanted):
            slot = self.slots.setdefault(index, TrainerSlot())
            if slot.process is None and not slot.finished and now >= slot.next_start_at:
                slot.process = self._supervisor.start(
                    f"trainer_{index}",
                    self._argv(index),
                    self._log_dir / f"trainer_{index}.log",
                    env={"DISTQAT_NUM_THREADS": "1", **self.env},
                )
                logger.info("started trainer_%d (pid %d)", index, slot.process.pid)
        extras = [index for index, slot in self.slots.items() if index >= wanted and slot.process is not None]
        if not extras:
            self._fewer_since = None
            return
        if self._fewer_since is None:
            self._fewer_since = now
            if self.stop_grace > 0:
                logger.info(
                    "fewer pipelines than trainers: stopping %d in %.0f s unless they come back",
                    len(extras),
                    self.stop_grace,
                )
        if now - self._fewer_since < self.stop_grace:
            return
        for index in extras:
            logger.info("stopping trainer_%d: its pipeline is gone", index)
            self._supervisor.stop(f"trainer_{index}")
            self.slots[index].process = None
        self._fewer_since = None

    @property
    def running(self) -> int:
        return sum(slot.process is not None for slot in self.slots.values())


def run_client(config: Config, stop: threading.Event, log_dir: Path, max_steps: int = 0) -> None:
    stage_names = config.model_pipeline.stage_names
    # Trainers must see exactly this config, command-line overrides included.
    config_path = log_dir / "trainer_config.yaml"
    dump_config(config, config_path)
    dht = start_dht(config.network, client_mode=True)
    supervisor = ProcessSupervisor()
    fleet = TrainerFleet(supervisor, config_path, log_dir, max_steps, stop_grace=config.network.trainer_grace)
    data_supervisor = ProcessSupervisor()  # stopped after the trainers, so none sees its batches vanish
    last_state = None
    try:
        if config.data_server.enable:
            fleet.env = start_data_server(data_supervisor, config_path, log_dir, stop)
            logger.info("data server ready; trainers take their batches from it")
        while not stop.is_set():
            for name, code in data_supervisor.exited().items():
                raise DataError(f"the {name.replace('_', ' ')} exited with code {code} (see {name}.log)")
            try:
                replicas = records.fetch_replicas(
                    dht, config.experiment_prefix, stage_names, config.network.dht_timeout
                )
            except SwarmError as error:
                logger.warning("could not read the swarm: %s", error)
                stop.wait(config.network.client_poll_period)
                continue
            pipelines = count_complete_pipelines(replicas, stage_names)
            wanted = min(pipelines, config.network.max_pipelines or pipelines)
            state = (pipelines, tuple(len(replicas[s]) for s in stage_names))
            if state != last_state:
                counts = ", ".join(f"{s}: {len(replicas[s])}" for s in stage_names)
                gaps = missing_stages(replicas, stage_names)
                logger.info(
                    "complete pipelines: %d (replicas %s)%s",
                    pipelines,
                    counts,
                    f"; waiting for stages {gaps}" if gaps else "",
                )
                last_state = state
            fleet.reap()
            fleet.reconcile(wanted)
            stop.wait(config.network.client_poll_period)
    finally:
        supervisor.stop_all()
        data_supervisor.stop_all()
        dht.shutdown()
