"""DHT records: they survive the DHT's serialiser, old and new peers read each other's, malformed ones are skipped."""

from __future__ import annotations

import logging

import pytest
from hivemind.utils.serializer import MSGPackSerializer

from distqat.swarm.records import RECORD_VERSION, ServerInfo, TrainerMetrics, parse_record


def server_info(**changes) -> ServerInfo:
    fields = dict(
        uid="head.0.0.0", peer_id="QmPeer", maddrs=["/ip4/127.0.0.1/tcp/1"], stage="head", stage_index=0,
        expert_index=0, device="cpu", samples=640, steps=20, samples_per_s=31.5, forward_ms=40.0,
        backward_ms=95.5, queue=1, in_flight=2, batch_size=32, diloco_round=3,
    )  # fmt: skip
    fields.update(changes)
    return ServerInfo(**fields)


def trainer_metrics(**changes) -> TrainerMetrics:
    fields = dict(
        trainer_id="trainer_0", peer_id="QmTrainer", step=12, samples=384, loss=0.8, loss_avg=0.9,
        first_loss_avg=2.1, samples_per_s=25.0, train_time_s=15.0, first_step_at=100.0, updated_at=115.0,
        eval_step=10, eval_loss=0.95, eval_accuracy=0.7, batch_size=32, step_ms=1250.0,
    )  # fmt: skip
    fields.update(changes)
    return TrainerMetrics(**fields)


@pytest.mark.parametrize("record", [server_info(), trainer_metrics()], ids=["ServerInfo", "TrainerMetrics"])
def test_round_trip_through_the_dht_serializer(record) -> None:
    wire = MSGPackSerializer.dumps(record.model_dump())
    back = parse_record(type(record), MSGPackSerializer.loads(wire), "test")
    assert back == record
    assert back.version == RECORD_VERSION


def test_an_older_peers_record_without_the_new_fields_still_validates() -> None:
    old = server_info().model_dump()
    for new_field in ("forward_ms", "backward_ms", "queue", "in_flight", "batch_size"):
        del old[new_field]
    parsed = parse_record(ServerInfo, old, "test")
    assert parsed is not None and parsed.forward_ms == 0.0 and parsed.queue == 0


def test_a_newer_peers_unknown_fields_are_ignored() -> None:
    newer = trainer_metrics().model_dump() | {"version": RECORD_VERSION + 1, "gpu_temperature": 71}
    parsed = parse_record(TrainerMetrics, newer, "test")
    assert parsed is not None and parsed.step == 12


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"step": -1}, "step"),
        ({"samples": "many"}, "samples"),
        ({"version": 0}, "version"),
        ({"bytes_sent": -5}, "bytes_sent"),
        ({"step_ms": -1.0}, "step_ms"),
    ],
)
def test_malformed_trainer_record_is_skipped_with_one_line(change, field, caplog) -> None:
    value = trainer_metrics().model_dump() | change
    with caplog.at_level(logging.WARNING):
        assert parse_record(TrainerMetrics, value, "trainer_0 under demo:trainers") is None
    (line,) = caplog.messages
    assert "malformed TrainerMetrics record trainer_0 under demo:trainers" in line
    assert field in line
    assert "\n" not in line


@pytest.mark.parametrize(
    "value",
    [None, [1, 2], "text", {"uid": "head.0.0.0"}, server_info(in_flight=1).model_dump() | {"in_flight": -2}],
)
def test_malformed_server_record_is_skipped(value) -> None:
    assert parse_record(ServerInfo, value, "test") is None
