"""Monitor (`distqat monitor`): bootstraps the DHT, watches the swarm, logs metrics, ends bounded runs.

It writes `initial_peers.txt` in the log dir (the addresses other peers join through), reads the
servers' and trainers' records every half second, appends the swarm's state to `metrics.jsonl` (and
W&B, and TensorBoard with `monitor.tensorboard`), and, when `--max-steps` is set, writes the run summary
and exits once the trainers' steps add up. Each row holds a `fleet` section (stages with their replicas,
trainers, alerts: see `distqat.observability.fleet`) that the launchers' live view draws; when the
monitor stops it draws the run's plots (`monitor.plots`).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distqat.config import Config
from distqat.distributed.sinks import JsonlSink, WandbSink
from distqat.errors import SwarmError
from distqat.observability.fleet import STRAGGLER_RATIO, alert_changes, fleet_snapshot
from distqat.observability.plots import FILES as PLOT_FILES
from distqat.observability.plots import PLOTS_DIR, plot_run
from distqat.observability.tensorboard import TensorBoardSink
from distqat.swarm import records
from distqat.swarm.node import start_dht, visible_maddrs
from distqat.swarm.pipelines import count_complete_pipelines

logger = logging.getLogger(__name__)

POLL_PERIOD = 0.5  # seconds between two looks at the DHT
INITIAL_PEERS_FILE = "initial_peers.txt"
METRICS_FILE = "metrics.jsonl"


@dataclass
class SwarmView:
    """What the monitor has seen so far; survives trainer restarts (a restarted trainer counts from 0 again)."""

    latest: dict[str, records.TrainerMetrics] = field(default_factory=dict)
    first_loss: dict[str, float] = field(default_factory=dict)  # of each trainer's first life
    restarted: set[str] = field(default_factory=set)
    retired_steps: int = 0
    retired_samples: int = 0
    # A restarted trainer's record starts from zero: what its earlier lives did is kept here.
    retired: dict[str, int] = field(default_factory=lambda: {"bytes_sent": 0, "bytes_received": 0, "failures": 0})
    first_step_at: dict[str, float] = field(default_factory=dict)  # the earliest any life of each trainer saw
    replicas: dict[str, list[records.ServerInfo]] = field(default_factory=dict)
    servers: dict[str, dict[str, Any]] = field(default_factory=dict)  # uid -> what we saw of it, first and last
    pipelines: int = 0
    stage_names: list[str] = field(default_factory=list)
    straggler_ratio: float = STRAGGLER_RATIO
    alerts: dict[str, str] = field(default_factory=dict)  # of the last row, by key
    first_step: int = 0  # where a resumed run's step count starts (`--resume`: the checkpoints' run step)

    def update(
        self,
        trainers: list[records.TrainerMetrics],
        replicas: dict[str, list[records.ServerInfo]],
        stage_names: list[str],
    ) -> None:
        for metrics in trainers:
            previous = self.latest.get(metrics.trainer_id)
            if previous is not None and metrics.updated_at < previous.updated_at:
                continue  # an older copy from another DHT node
            if previous is not None and metrics.step < previous.step:
                self.retired_steps += previous.step
                self.retired_samples += previous.samples
                for key in self.retired:
                    self.retired[key] += getattr(previous, key)
                self.restarted.add(metrics.trainer_id)
            self.latest[metrics.trainer_id] = metrics
            if metrics.first_step_at > 0:
                earliest = self.first_step_at.get(metrics.trainer_id, metrics.first_step_at)
                self.first_step_at[metrics.trainer_id] = min(earliest, metrics.first_step_at)
            # first_loss_avg grows to its window over the first steps; a restarted trainer's starts later.
            if math.isfinite(metrics.first_loss_avg) and metrics.trainer_id not in self.restarted:
                self.first_loss[metrics.trainer_id] = metrics.first_loss_avg
        self.replicas = replicas
        for info in (info for found in replicas.values() for info in found):
            seen = self.servers.setdefault(info.uid, {"first_weights_digest": info.weights_digest})
            seen.update(
                peer_id=info.peer_id,
                device=info.device,
                steps=info.steps,
                samples=info.samples,
                last_weights_digest=info.weights_digest,
                last_seen=time.time(),
                stage=info.stage,
                diloco_round=info.diloco_round,
                rounds_failed=info.rounds_failed,
                outer_digest=info.outer_digest,
                bytes_activations=info.bytes_activations,
                bytes_averaging=info.bytes_averaging,
                utilisation=info.utilisation,
                busy_s=info.busy_s,
                refused=info.refused,
            )
        self.pipelines = count_complete_pipelines(replicas, stage_names)
        self.stage_names = list(stage_names)

    def traffic(self) -> dict[str, int]:
        """Bytes moved by the servers seen, live or gone, split into stage traffic and averaging."""
        return {
            "bytes_activations": sum(seen.get("bytes_activations", 0) for seen in self.servers.values()),
            "bytes_averaging": sum(seen.get("bytes_averaging", 0) for seen in self.servers.values()),
        }

    def diloco_rounds(self) -> dict[str, int]:
        """The most DiLoCo rounds any replica seen of each stage has applied."""
        rounds: dict[str, int] = {}
        for seen in self.servers.values():
            rounds[seen["stage"]] = max(rounds.get(seen["stage"], 0), seen["diloco_round"])
        return rounds

    def total(self, key: str) -> int:
        """A trainer counter (bytes_sent, bytes_received, failures) over every life of every trainer."""
        return self.retired[key] + sum(getattr(m, key) for m in self.latest.values())

    @property
    def steps(self) -> int:
        return self.first_step + self.retired_steps + sum(m.step for m in self.latest.values())

    @property
    def samples(self) -> int:
        return self.retired_samples + sum(m.samples for m in self.latest.values())

    def row(self, now: float) -> dict[str, Any]:
        active = [m for m in self.latest.values() if now - m.updated_at < 30 and not m.finished]
        losses = [m.loss_avg for m in self.latest.values() if math.isfinite(m.loss_avg)]
        return {
            "time": now,
            "steps": self.steps,
            "samples": self.samples,
            "loss": sum(losses) / len(losses) if losses else None,
            "samples_per_s": sum(m.samples_per_s for m in active),
            "pipelines": self.pipelines,
            "servers": sum(len(r) for r in self.replicas.values()),
            "replicas": {stage: len(found) for stage, found in self.replicas.items()},
            "trainers": {
                m.trainer_id: {
                    "step": m.step,
                    "loss": m.loss_avg,
                    "samples_per_s": m.samples_per_s,
                    "failures": m.failures,
                    "eval_step": m.eval_step,
                    "eval_loss": m.eval_loss,
                    "eval_accuracy": m.eval_accuracy,
                }
                for m in self.latest.values()
            },
            "bytes_sent": self.total("bytes_sent"),
            "bytes_received": self.total("bytes_received"),
            **self.traffic(),
            "diloco_rounds": self.diloco_rounds(),
            "fleet": fleet_snapshot(self.latest.values(), self.replicas, self.stage_names, now, self.straggler_ratio),
        }

    def summary(self, started_at: float, now: float) -> dict[str, Any]:
        trainers = list(self.latest.values())
        first_steps = list(self.first_step_at.values())
        last = [m.loss_avg for m in trainers if math.isfinite(m.loss_avg)]
        return {
            "mode": "swarm",
            "first_step": self.first_step,
            "steps": self.steps,
            "samples": self.samples,
            "first_loss": sum(self.first_loss.values()) / len(self.first_loss) if self.first_loss else None,
            "last_loss": sum(last) / len(last) if last else None,
            "wall_s": now - started_at,
            "samples_per_s": sum(m.samples / m.train_time_s for m in trainers if m.train_time_s > 0),
            "startup_s": min(first_steps) - started_at if first_steps else None,
            "started_at": started_at,
            "first_step_at": min(first_steps) if first_steps else None,
            "pipelines": self.pipelines,
            "servers": sum(len(r) for r in self.replicas.values()),
            "trainers": len(trainers),
            "failed_steps": self.total("failures"),
            "bytes_sent": self.total("bytes_sent"),
            "bytes_received": self.total("bytes_received"),
            **self.traffic(),
            "diloco_rounds": self.diloco_rounds(),
            "servers_seen": self.servers,
        }


def run_monitor(
    config: Config,
    stop: threading.Event,
    log_dir: Path,
    max_steps: int = 0,
    summary_path: Path | None = None,
    started_at: float | None = None,
    first_step: int = 0,
) -> None:
    started_at = started_at or time.time()
    stage_names = config.model_pipeline.stage_names
    dht = start_dht(config.network)
    sinks: list[JsonlSink | WandbSink | TensorBoardSink] = []
    view = SwarmView(straggler_ratio=config.monitor.straggler_ratio, first_step=first_step)
    published: tuple[int, float] = (-1, 0.0)
    try:
        peers = ",".join(visible_maddrs(dht))
        log_dir.mkdir(parents=True, exist_ok=True)
        # Write then rename, so a launcher polling for the file never reads half of it.
        staging = log_dir / f".{INITIAL_PEERS_FILE}.tmp"
        staging.write_text(peers + "\n")
        staging.replace(log_dir / INITIAL_PEERS_FILE)
        logger.info("DHT up; initial peers: %s", peers)
        sinks.append(JsonlSink(log_dir / METRICS_FILE))
        for stale in PLOT_FILES:  # an earlier run's plots must not pass for this run's
            (log_dir / PLOTS_DIR / stale).unlink(missing_ok=True)
        wandb_sink = WandbSink.open(
            config.wandb_project, config.wandb_entity, config.experiment_prefix, config.model_dump(mode="json")
        )
        if wandb_sink is not None:
            sinks.append(wandb_sink)
        if config.monitor.tensorboard:
            tensorboard_sink = TensorBoardSink.open(log_dir / "tensorboard")
            if tensorboard_sink is not None:
                sinks.append(tensorboard_sink)
        last_shape: tuple[int, ...] = (-1,)
        last_row_at = 0.0
        while not stop.is_set():
            try:
                trainers = records.fetch_trainer_metrics(dht, config.experiment_prefix, config.network.dht_timeout)
                replicas = records.fetch_replicas(
                    dht, config.experiment_prefix, stage_names, config.network.dht_timeout
                )
                view.update(trainers, replicas, stage_names)
            except SwarmError as error:
                logger.warning("could not read the swarm: %s", error)
            now = time.time()
            # A row per new step total, and per change in who is there (the live view's set-up bar follows it).
            shape = (view.steps, view.pipelines, sum(len(r) for r in view.replicas.values()), len(view.latest))
            if shape != last_shape or now - last_row_at > 5.0:
                row = view.row(now)
                for sink in sinks:
                    sink.log(row)
                logger.info(
                    "step %d | loss %s | %.1f samples/s | pipelines %d | servers %d",
                    row["steps"],
                    f"{row['loss']:.4f}" if row["loss"] is not None else "-",
                    row["samples_per_s"],
                    row["pipelines"],
                    row["servers"],
                )
                last_shape, last_row_at = shape, now
                _log_alert_changes(view, row["fleet"])
            published = _publish_progress(dht, config, view, published)
            if max_steps > 0 and view.steps >= max_steps:
                logger.info("reached %d steps: run complete", view.steps)
                break
            stop.wait(POLL_PERIOD)
    finally:
        if summary_path is not None:
            summary_path.parent.mkdir(parents=True, exist_ok=True)
            summary_path.write_text(json.dumps(view.summary(started_at, time.time()), indent=2))
        for sink in sinks:
            sink.close()
        dht.shutdown()
        if config.monitor.plots:
            _draw_plots(log_dir)


def _publish_progress(dht, config: Config, view: SwarmView, last: tuple[int, float]) -> tuple[int, float]:
    """The run's step count into the DHT (on change, at most every poll), for checkpoints to record."""
    now = time.monotonic()
    if view.steps == last[0] or now - last[1] < POLL_PERIOD:
        return last
    try:
        records.publish_run_progress(
            dht,
            config.experiment_prefix,
            records.RunProgress(steps=view.steps, samples=view.samples),
            config.network.dht_timeout,
        )
    except SwarmError as error:
        logger.warning("could not publish the run's progress: %s", error)
        return last
    return view.steps, now


def _log_alert_changes(view: SwarmView, fleet: dict[str, Any]) -> None:
    appeared, cleared, view.alerts = alert_changes(view.alerts, fleet)
    for alert in appeared:
        logger.warning("alert: %s", alert)
    for alert in cleared:
        logger.info("cleared: %s", alert)


def _draw_plots(log_dir: Path) -> None:
    # After the DHT is down: a slow or failing plot must never cost the run its summary or its peers.
    try:
        written = plot_run(log_dir, METRICS_FILE)
    except Exception as error:  # matplotlib raises many types (fonts, backends, bad data); none ends the run badly
        logger.warning("could not draw the plots: %s", error)
        return
    if written:
        logger.info("plots: %s", ", ".join(str(path) for path in written))
