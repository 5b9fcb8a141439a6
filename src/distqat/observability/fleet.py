"""The swarm at a glance, from its DHT records: stages with their replicas, trainers, totals and alerts.

Pure: records in, a JSON-able dict out. The monitor writes it into every `metrics.jsonl` row (the live
view and the plots read it from there), and `distqat status` prints it. Alerts name what needs an
operator: a stage without a live replica (no pipeline can be complete), a straggler replica or trainer
(under `straggler_ratio` of its peers' median samples/s), a trainer whose record went stale, and the
bottleneck stage (the most compute time per sample for the replicas it has).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from typing import Any

from distqat.observability.logs import short_peer
from distqat.swarm.pipelines import count_complete_pipelines
from distqat.swarm.records import ServerInfo, TrainerMetrics

STALE_AFTER_S = 30.0  # a trainer record older than this is no longer "training"
STRAGGLER_RATIO = 0.5


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def replica_state(info: ServerInfo) -> str:
    if info.averaging:
        return "averaging"
    if info.queue or info.in_flight or info.samples_per_s > 0:
        return "training"
    return "idle"


def trainer_state(metrics: TrainerMetrics, now: float) -> str:
    if metrics.finished:
        return "finished"
    if now - metrics.updated_at > STALE_AFTER_S:
        return "stale"
    return "waiting" if metrics.waiting else "training"


def replica_row(info: ServerInfo, now: float) -> dict[str, Any]:
    return {
        "uid": info.uid,
        "peer": short_peer(info.peer_id),
        "device": info.device,
        "state": replica_state(info),
        "samples_per_s": info.samples_per_s,
        "steps": info.steps,
        "forward_ms": info.forward_ms,
        "backward_ms": info.backward_ms,
        "queue": info.queue,
        "in_flight": info.in_flight,
        "utilisation": info.utilisation,
        "refused": info.refused,
        "diloco_round": info.diloco_round,
        "bytes_activations": info.bytes_activations,
        "bytes_averaging": info.bytes_averaging,
        "age_s": max(0.0, now - info.updated_at) if info.updated_at else None,
    }


def trainer_row(metrics: TrainerMetrics, now: float) -> dict[str, Any]:
    return {
        "trainer_id": metrics.trainer_id,
        "peer": short_peer(metrics.peer_id),
        "state": trainer_state(metrics, now),
        "step": metrics.step,
        "loss": _finite(metrics.loss),
        "loss_avg": _finite(metrics.loss_avg),
        "eval_step": metrics.eval_step,
        "eval_loss": _finite(metrics.eval_loss),
        "eval_accuracy": _finite(metrics.eval_accuracy),
        "samples_per_s": metrics.samples_per_s,
        "step_ms": metrics.step_ms,
        "batch_size": metrics.batch_size,
        "failures": metrics.failures,
        "bytes_sent": metrics.bytes_sent,
        "bytes_received": metrics.bytes_received,
        "age_s": max(0.0, now - metrics.updated_at),
    }


def _stragglers(rates: Mapping[str, float], ratio: float) -> list[tuple[str, float, float]]:
    """(name, rate, median) of everything below `ratio` x the median of the group; needs 2 to compare."""
    if len(rates) < 2:
        return []
    median = statistics.median(rates.values())
    if median <= 0:
        return []
    return [(name, rate, median) for name, rate in sorted(rates.items()) if rate < ratio * median]


def bottleneck(stages: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The stage whose replicas together need the most time per call: what limits the swarm's speed."""
    costs = {}
    for stage in stages:
        measured = [r["forward_ms"] + r["backward_ms"] for r in stage["replicas"] if r["forward_ms"] + r["backward_ms"]]
        if measured:
            costs[stage["name"]] = statistics.mean(measured) / len(stage["replicas"])
    if len(costs) < 2:
        return None
    name = max(costs, key=costs.__getitem__)
    return {"stage": name, "ms_per_call": costs[name]}


def fleet_snapshot(
    trainers: Iterable[TrainerMetrics],
    replicas: Mapping[str, list[ServerInfo]],
    stage_names: list[str],
    now: float,
    straggler_ratio: float = STRAGGLER_RATIO,
) -> dict[str, Any]:
    trainers = sorted(trainers, key=lambda m: m.trainer_id)
    stages = []
    for name in stage_names:
        found = sorted(replicas.get(name, []), key=lambda info: info.expert_index)
        rows = [replica_row(info, now) for info in found]
        stages.append(
            {
                "name": name,
                "alive": len(rows),
                "samples_per_s": sum(row["samples_per_s"] for row in rows),
                "replicas": rows,
            }
        )
    trainer_rows = [trainer_row(metrics, now) for metrics in trainers]
    active = [row for row in trainer_rows if row["state"] in {"training", "waiting"}]
    # Each alert has a stable key (what it is about) and a text (with today's numbers): change detection
    # compares keys, so a straggler whose rate moves from 9.1 to 9.3 is not a new alert.
    alerts: dict[str, str] = {}
    for stage in stages:
        if not stage["alive"]:
            alerts[f"no_replica:{stage['name']}"] = f"stage '{stage['name']}' has no live replica"
    for stage in stages:
        rates = {row["uid"]: row["samples_per_s"] for row in stage["replicas"]}
        for uid, rate, median in _stragglers(rates, straggler_ratio):
            alerts[f"straggler:{uid}"] = f"straggler: replica {uid} at {rate:.1f} samples/s (stage median {median:.1f})"
    rates = {row["trainer_id"]: row["samples_per_s"] for row in active}
    for trainer_id, rate, median in _stragglers(rates, straggler_ratio):
        alerts[f"straggler:{trainer_id}"] = (
            f"straggler: {trainer_id} at {rate:.1f} samples/s (trainers' median {median:.1f})"
        )
    for row in trainer_rows:
        if row["state"] == "stale":
            alerts[f"stale:{row['trainer_id']}"] = f"{row['trainer_id']}: no record for {row['age_s']:.0f} s"
    losses = [row["loss_avg"] for row in trainer_rows if row["loss_avg"] is not None]
    return {
        "time": now,
        "pipelines": count_complete_pipelines(dict(replicas), stage_names),
        "samples_per_s": sum(row["samples_per_s"] for row in active),
        "loss": sum(losses) / len(losses) if losses else None,
        "stages": stages,
        "trainers": trainer_rows,
        "bottleneck": bottleneck(stages),
        "alerts": list(alerts.values()),
        "alert_keys": list(alerts),
    }


def alert_changes(previous: dict[str, str], fleet: dict[str, Any]) -> tuple[list[str], list[str], dict[str, str]]:
    """(texts of alerts that appeared, texts of alerts that cleared, the current alerts by key)."""
    current = dict(zip(fleet.get("alert_keys", fleet["alerts"]), fleet["alerts"], strict=True))
    appeared = [text for key, text in current.items() if key not in previous]
    cleared = [text for key, text in previous.items() if key not in current]
    return appeared, cleared, current
