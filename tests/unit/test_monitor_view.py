"""The monitor's view: totals survive trainer restarts, stale copies are ignored, the summary adds up."""

from __future__ import annotations

import math

from distqat.distributed.monitor import SwarmView
from distqat.swarm.records import ServerInfo, TrainerMetrics


def metrics(trainer: str, step: int, updated_at: float, loss: float = 1.0, first: float = 2.0) -> TrainerMetrics:
    return TrainerMetrics(
        trainer_id=trainer,
        peer_id="p",
        step=step,
        samples=step * 10,
        loss=loss,
        loss_avg=loss,
        first_loss_avg=first,
        samples_per_s=10.0,
        train_time_s=float(step),
        first_step_at=100.0,
        updated_at=updated_at,
    )


def server(stage: str, digest: float, steps: int) -> ServerInfo:
    return ServerInfo(
        uid=f"{stage}.0.0.0",
        peer_id="s",
        maddrs=[],
        stage=stage,
        stage_index=0,
        expert_index=0,
        device="cpu",
        weights_digest=digest,
        steps=steps,
    )


def test_restarted_trainer_keeps_the_total() -> None:
    view = SwarmView()
    stages = ["head", "tail"]
    view.update([metrics("trainer_0", 8, 10.0)], {"head": [], "tail": []}, stages)
    view.update([metrics("trainer_0", 3, 20.0)], {"head": [], "tail": []}, stages)  # crashed and restarted
    assert view.steps == 11
    assert view.samples == 110


def test_older_copy_of_a_record_is_ignored() -> None:
    view = SwarmView()
    view.update([metrics("trainer_0", 8, 10.0)], {}, [])
    view.update([metrics("trainer_0", 5, 9.0)], {}, [])
    assert view.steps == 8


def test_summary_reports_first_and_last_loss_and_weights_movement() -> None:
    view = SwarmView()
    stages = ["head", "tail"]
    replicas = {"head": [server("head", 1.0, 0)], "tail": [server("tail", 2.0, 0)]}
    view.update([], replicas, stages)
    replicas = {"head": [server("head", 1.5, 9)], "tail": [server("tail", 2.5, 9)]}
    view.update([metrics("trainer_0", 9, 10.0, loss=0.5, first=2.2)], replicas, stages)
    summary = view.summary(started_at=90.0, now=110.0)
    assert summary["steps"] == 9
    assert math.isclose(summary["first_loss"], 2.2)
    assert math.isclose(summary["last_loss"], 0.5)
    assert math.isclose(summary["startup_s"], 10.0)
    assert summary["pipelines"] == 1
    assert summary["servers"] == 2
    assert summary["servers_seen"]["head.0.0.0"]["first_weights_digest"] == 1.0
    assert summary["servers_seen"]["head.0.0.0"]["last_weights_digest"] == 1.5


def test_first_loss_is_the_window_of_the_first_life() -> None:
    view = SwarmView()
    view.update([metrics("trainer_0", 1, 1.0, first=2.5)], {}, [])  # seen after one step
    view.update([metrics("trainer_0", 12, 2.0, first=2.1)], {}, [])  # the window has filled
    assert view.first_loss["trainer_0"] == 2.1
    view.update([metrics("trainer_0", 3, 3.0, first=0.9)], {}, [])  # restarted: its window starts late
    assert view.first_loss["trainer_0"] == 2.1


def test_restarts_keep_first_step_time_traffic_and_failures() -> None:
    view = SwarmView()
    first = metrics("trainer_0", 8, 10.0)
    first.bytes_sent, first.failures = 800, 2
    view.update([first], {}, [])
    second = metrics("trainer_0", 3, 20.0)
    second.first_step_at, second.bytes_sent, second.failures = 150.0, 300, 1
    view.update([second], {}, [])  # restarted later: its own first step is later
    summary = view.summary(started_at=90.0, now=200.0)
    assert summary["startup_s"] == 10.0  # the run's first step, not the restarted trainer's
    assert summary["bytes_sent"] == 1100
    assert summary["failed_steps"] == 3
