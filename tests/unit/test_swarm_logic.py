"""Pure swarm logic: uids, pipeline counting, stage assignment, routing."""

from __future__ import annotations

import random

import pytest

from distqat.errors import NoReplicaError, SwarmError
from distqat.swarm.pipelines import (
    count_complete_pipelines,
    free_expert_index,
    missing_stages,
    stage_to_fill,
    stage_with_fewest_replicas,
)
from distqat.swarm.records import ServerInfo, TrainerMetrics
from distqat.swarm.routing import Router
from distqat.swarm.uids import make_uid, parse_uid


def server(stage: str, index: int, rate: float = 0.0, queue: int = 0) -> ServerInfo:
    return ServerInfo(
        uid=make_uid(stage, index),
        peer_id=f"peer-{stage}-{index}",
        maddrs=[],
        stage=stage,
        stage_index=0,
        expert_index=index,
        device="cpu",
        samples_per_s=rate,
        queue=queue,
    )


def test_uid_round_trip() -> None:
    assert make_uid("head", 3) == "head.0.3.0"
    assert parse_uid("front.0.12.0") == ("front", 12)


@pytest.mark.parametrize("bad", ["head", "head.0.x.0", "head.1.2.0", "head.0.2", "he ad.0.1.0", ""])
def test_malformed_uid_is_named(bad: str) -> None:
    with pytest.raises(SwarmError, match="malformed expert uid"):
        parse_uid(bad)


def test_make_uid_rejects_bad_parts() -> None:
    with pytest.raises(SwarmError):
        make_uid("a.b", 0)
    with pytest.raises(SwarmError):
        make_uid("head", -1)


def test_pipeline_count_is_the_smallest_replica_count() -> None:
    stages = ["head", "body", "tail"]
    replicas = {
        "head": [server("head", 0), server("head", 1)],
        "body": [server("body", 0)],
        "tail": [server("tail", 0)] * 3,
    }
    assert count_complete_pipelines(replicas, stages) == 1
    assert count_complete_pipelines({"head": [server("head", 0)]}, stages) == 0
    assert missing_stages({"head": [server("head", 0)]}, stages) == ["body", "tail"]
    assert count_complete_pipelines({}, []) == 0


def test_new_server_takes_the_neediest_stage() -> None:
    stages = ["head", "tail"]
    assert stage_with_fewest_replicas({}, stages) == "head"
    assert stage_with_fewest_replicas({"head": [server("head", 0)]}, stages) == "tail"
    assert stage_with_fewest_replicas({"head": [server("head", 0)], "tail": [server("tail", 0)]}, stages) == "head"


def test_ties_go_to_the_stage_with_the_lowest_throughput() -> None:
    stages = ["head", "body", "tail"]
    replicas = {
        "head": [server("head", 0, rate=50.0)],
        "body": [server("body", 0, rate=20.0)],
        "tail": [server("tail", 0, rate=30.0)],
    }
    assert stage_with_fewest_replicas(replicas, stages) == "body"


def test_only_the_designated_spare_moves_to_an_empty_stage() -> None:
    stages = ["head", "body", "tail"]
    tails = [server("tail", 0, rate=40.0), server("tail", 1, rate=10.0), server("tail", 2, rate=10.0)]
    replicas = {"head": [server("head", 0)], "body": [], "tail": tails}
    # The slowest tail moves; on equal throughput the highest replica index; nobody else.
    assert stage_to_fill(replicas, stages, tails[2].uid) == "body"
    assert [stage_to_fill(replicas, stages, info.uid) for info in tails[:2]] == [None, None]
    assert stage_to_fill(replicas, stages, "head.0.0.0") is None


def test_nobody_moves_without_a_gap_or_without_a_spare() -> None:
    stages = ["head", "tail"]
    full = {"head": [server("head", 0)], "tail": [server("tail", 0), server("tail", 1)]}
    assert stage_to_fill(full, stages, "tail.0.1.0") is None
    no_spare = {"head": [], "tail": [server("tail", 0)]}
    assert stage_to_fill(no_spare, stages, "tail.0.0.0") is None


def test_two_broken_pipelines_lend_a_spare_to_the_earliest_empty_stage() -> None:
    # head.0 and head.1 died: two tails left, the later-indexed one (slowest on ties) becomes a head.
    stages = ["head", "tail"]
    replicas = {"head": [], "tail": [server("tail", 0, rate=5.0), server("tail", 1, rate=5.0)]}
    assert stage_to_fill(replicas, stages, "tail.0.1.0") == "head"
    assert stage_to_fill(replicas, stages, "tail.0.0.0") is None


def test_free_expert_index() -> None:
    assert free_expert_index(set(), 4) == 0
    assert free_expert_index({0, 1, 3}, 4) == 2
    with pytest.raises(ValueError, match="max_expert_index"):
        free_expert_index({0, 1}, 2)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_router_bans_failed_replicas_for_ban_time() -> None:
    clock = FakeClock()
    router = Router(["head"], ban_time=10.0, rng=random.Random(0), clock=clock)
    a, b = server("head", 0), server("head", 1)
    router.update({"head": [a, b]})
    router.ban(a)
    assert {router.pick("head").uid for _ in range(20)} == {b.uid}
    router.ban(b)
    with pytest.raises(NoReplicaError, match="all recently failed"):
        router.pick("head")
    assert not router.has_route()
    clock.now += 10.1
    assert router.has_route()


def test_a_new_peer_with_a_banned_uid_is_not_banned() -> None:
    router = Router(["head"], ban_time=10.0, clock=FakeClock())
    dead = server("head", 0)
    router.update({"head": [dead]})
    router.ban(dead)
    successor = dead.model_copy(update={"peer_id": "peer-new"})  # took the free replica index 0
    router.update({"head": [successor]})
    assert router.pick("head").peer_id == "peer-new"


def test_router_weights_by_throughput_and_tries_unmeasured() -> None:
    router = Router(["head"], ban_time=1.0, rng=random.Random(1))
    fast, slow, new = server("head", 0, rate=90.0), server("head", 1, rate=10.0), server("head", 2)
    router.update({"head": [fast, slow, new]})
    assert router.pick("head").uid == new.uid  # the first micro-batch probes the newcomer at once
    picks = [router.pick("head").uid for _ in range(3000)]
    share = {uid: picks.count(uid) / len(picks) for uid in {fast.uid, slow.uid, new.uid}}
    # weights 90 : 10 : 50 (the newcomer gets the average of the measured ones)
    assert share[fast.uid] == pytest.approx(90 / 150, abs=0.04)
    assert share[slow.uid] == pytest.approx(10 / 150, abs=0.03)
    assert share[new.uid] == pytest.approx(50 / 150, abs=0.04)


def test_router_probes_each_new_replica_once() -> None:
    router = Router(["head"], ban_time=1.0, rng=random.Random(3))
    old = server("head", 0, rate=50.0)
    router.update({"head": [old]})
    assert router.pick("head").uid == old.uid
    first, second = server("head", 1), server("head", 2)
    router.update({"head": [old, first, second]})
    # each newcomer gets one micro-batch straight away, then the draw is weighted again
    assert {router.pick("head").uid, router.pick("head").uid} == {first.uid, second.uid}
    picks = [router.pick("head").uid for _ in range(600)]
    assert picks.count(old.uid) / len(picks) == pytest.approx(1 / 3, abs=0.07)


def test_router_prefers_short_queues() -> None:
    router = Router(["head"], ban_time=1.0, rng=random.Random(2))
    idle, busy = server("head", 0, rate=40.0), server("head", 1, rate=40.0, queue=3)
    router.update({"head": [idle, busy]})
    picks = [router.pick("head").uid for _ in range(2000)]
    # weights 40/1 : 40/4
    assert picks.count(idle.uid) / len(picks) == pytest.approx(0.8, abs=0.04)


def test_router_reports_each_lost_replica_once() -> None:
    clock, lost = FakeClock(), []
    router = Router(["head"], ban_time=5.0, clock=clock, on_lost=lambda uid, why: lost.append((uid, why)))
    a, b = server("head", 0), server("head", 1)
    router.update({"head": [a, b]})
    router.ban(a)
    router.ban(a)  # still banned: not news
    router.update({"head": [b]})  # a leaves the DHT while banned: already lost
    router.update({"head": []})
    assert lost == [(a.uid, "failed a call"), (b.uid, "gone from the DHT")]


def test_router_reports_each_new_server_once_even_on_a_dead_ones_uid() -> None:
    found = []
    router = Router(["head", "tail"], ban_time=5.0, on_found=found.append)
    a, b = server("head", 0), server("tail", 0)
    router.update({"head": [a], "tail": [b]})
    router.update({"head": [a], "tail": [b]})  # nothing new
    router.update({"head": [], "tail": [b]})  # a dies
    newcomer = a.model_copy(update={"peer_id": "another-peer"})  # a new server takes the free index
    router.update({"head": [newcomer], "tail": [b]})
    assert found == [a.uid, b.uid, a.uid]


def test_router_without_replicas() -> None:
    router = Router(["head", "tail"], ban_time=1.0)
    with pytest.raises(NoReplicaError, match="stage 'tail' has no live replica"):
        router.pick("tail")


def test_records_ignore_unknown_fields_from_newer_peers() -> None:
    data = server("head", 0).model_dump() | {"version": 2, "shiny_new_field": [1, 2]}
    info = ServerInfo.model_validate(data)
    assert info.uid == "head.0.0.0"
    metrics = TrainerMetrics(
        trainer_id="trainer_0",
        peer_id="p",
        step=1,
        samples=8,
        loss=1.0,
        loss_avg=1.0,
        first_loss_avg=1.0,
        samples_per_s=1.0,
        train_time_s=1.0,
        first_step_at=1.0,
        updated_at=1.0,
    )
    assert TrainerMetrics.model_validate(metrics.model_dump() | {"extra": True}) == metrics
