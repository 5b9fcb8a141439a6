"""The monitor's aggregation on synthetic records: stages, replicas, trainers, totals, alerts, scalars."""

from __future__ import annotations

import math

from swarm_records import NOW, STAGES, replica, trainer

from distqat.distributed.monitor import SwarmView
from distqat.observability.fleet import alert_changes, fleet_snapshot
from distqat.observability.scalars import fleet_scalars


def test_stages_list_their_replicas_and_totals() -> None:
    replicas = {
        "head": [replica("head", 1, 30.0), replica("head", 0, 32.0)],
        "body": [replica("body", 0, 30.0, averaging=True)],
        "tail": [replica("tail", 0, 0.0, fwd=0.0, bwd=0.0)],
    }
    fleet = fleet_snapshot([trainer("trainer_0", 5, 30.0, loss_avg=0.5)], replicas, STAGES, NOW)
    head, body, tail = fleet["stages"]
    assert [r["uid"] for r in head["replicas"]] == ["head.0.0.0", "head.0.0.1"]  # by replica index
    assert head["alive"] == 2 and math.isclose(head["samples_per_s"], 62.0)
    assert body["replicas"][0]["state"] == "averaging"
    assert tail["replicas"][0]["state"] == "idle"
    assert head["replicas"][0]["peer"] == "xxxxxxxx"  # the tail of the peer id, as log lines show it
    assert fleet["pipelines"] == 1
    assert math.isclose(fleet["samples_per_s"], 30.0)
    assert math.isclose(fleet["loss"], 0.5)
    assert fleet["alerts"] == []


def test_a_stage_without_replica_is_an_alert() -> None:
    replicas = {"head": [replica("head", 0, 30.0)], "body": [], "tail": [replica("tail", 0, 30.0)]}
    fleet = fleet_snapshot([], replicas, STAGES, NOW)
    assert fleet["pipelines"] == 0
    assert fleet["alerts"] == ["stage 'body' has no live replica"]


def test_stragglers_among_replicas_and_trainers() -> None:
    replicas = {
        "head": [replica("head", 0, 40.0), replica("head", 1, 38.0), replica("head", 2, 9.0)],
        "body": [replica("body", 0, 40.0)],  # alone: nobody to compare with
        "tail": [replica("tail", 0, 40.0)],
    }
    trainers = [trainer("trainer_0", 10, 20.0), trainer("trainer_1", 10, 4.0)]
    fleet = fleet_snapshot(trainers, replicas, STAGES, NOW, straggler_ratio=0.5)
    assert "straggler: replica head.0.0.2 at 9.0 samples/s (stage median 38.0)" in fleet["alerts"]
    assert any(a.startswith("straggler: trainer_1 at 4.0") for a in fleet["alerts"])
    assert len(fleet["alerts"]) == 2


def test_stale_and_finished_trainers() -> None:
    trainers = [
        trainer("trainer_0", 10, 20.0, updated_at=NOW - 100),
        trainer("trainer_1", 40, 20.0, finished=True),
        trainer("trainer_2", 3, 20.0, waiting=True),
    ]
    fleet = fleet_snapshot(trainers, {}, STAGES, NOW)
    states = {t["trainer_id"]: t["state"] for t in fleet["trainers"]}
    assert states == {"trainer_0": "stale", "trainer_1": "finished", "trainer_2": "waiting"}
    assert "trainer_0: no record for 100 s" in fleet["alerts"]
    assert math.isclose(fleet["samples_per_s"], 20.0)  # only the waiting one counts as active


def test_bottleneck_is_the_stage_with_most_time_per_replica() -> None:
    replicas = {
        "head": [replica("head", 0, 30.0, fwd=10, bwd=20), replica("head", 1, 30.0, fwd=10, bwd=20)],
        "body": [replica("body", 0, 30.0, fwd=30, bwd=50)],
        "tail": [replica("tail", 0, 30.0, fwd=5, bwd=5)],
    }
    fleet = fleet_snapshot([], replicas, STAGES, NOW)
    assert fleet["bottleneck"] == {"stage": "body", "ms_per_call": 80.0}


def test_monitor_row_carries_the_fleet_and_flat_scalars() -> None:
    view = SwarmView()
    replicas = {"head": [replica("head", 0, 30.0)], "body": [replica("body", 0, 31.0)], "tail": []}
    view.update([trainer("trainer_0", 7, 25.0, eval_step=5, eval_loss=0.9, eval_accuracy=0.6)], replicas, STAGES)
    row = view.row(NOW)
    assert row["fleet"]["alerts"] == ["stage 'tail' has no live replica"]
    assert row["trainers"]["trainer_0"]["eval_loss"] == 0.9
    scalars = fleet_scalars(row)
    assert scalars["fleet/steps"] == 7
    assert scalars["loss/trainer_0"] == 1.0
    assert scalars["eval_loss/trainer_0"] == 0.9
    assert scalars["replicas/head"] == 1 and scalars["replicas/tail"] == 0
    assert scalars["stage_samples_per_s/body"] == 31.0
    assert "bytes/sent" in scalars
    assert all(isinstance(value, float) and math.isfinite(value) for value in scalars.values())


def test_alert_changes_follow_what_an_alert_is_about_not_its_numbers() -> None:
    replicas = {
        "head": [replica("head", 0, 40.0), replica("head", 1, 9.0)],
        "body": [],
        "tail": [replica("tail", 0, 9)],
    }
    first = fleet_snapshot([], replicas, STAGES, NOW)
    appeared, cleared, current = alert_changes({}, first)
    assert appeared == [
        "stage 'body' has no live replica",
        "straggler: replica head.0.0.1 at 9.0 samples/s (stage median 24.5)",
    ]
    replicas["head"][1] = replica("head", 1, 9.5)  # still a straggler, other numbers
    appeared, cleared, current = alert_changes(current, fleet_snapshot([], replicas, STAGES, NOW))
    assert (appeared, cleared) == ([], [])
    replicas["body"] = [replica("body", 0, 30.0)]
    appeared, cleared, current = alert_changes(current, fleet_snapshot([], replicas, STAGES, NOW))
    assert (appeared, cleared) == ([], ["stage 'body' has no live replica"])
