"""The param mirror's policy, without a network: when it pulls a stage and when it writes its checkpoint."""

from __future__ import annotations

import torch

from distqat.distributed.mirror import HeldState, pull_due, write_due
from distqat.swarm.records import ServerInfo


def replica(steps: int, samples: int, diloco_round: int = 0) -> ServerInfo:
    return ServerInfo(
        uid="head.0.0.0", peer_id="p", maddrs=[], stage="head", stage_index=0, expert_index=0, device="cpu",
        steps=steps, samples=samples, diloco_round=diloco_round,
    )  # fmt: skip


def held(round_: int = 0, steps: int = 10, pulled_at: float = 100.0, stage_samples: int = 640) -> HeldState:
    return HeldState({}, torch.zeros(1, dtype=torch.uint8), round_, steps, 640, pulled_at, stage_samples)


def test_pulls_a_trained_stage_first_then_after_each_round() -> None:
    assert not pull_due(None, [], 0.0, 30.0)  # no replica to pull from
    assert not pull_due(None, [replica(0, 0)], 0.0, 30.0)  # nothing trained yet
    assert pull_due(None, [replica(5, 320)], 0.0, 30.0)
    assert pull_due(held(round_=0), [replica(12, 768, diloco_round=1)], 101.0, 30.0)  # a round: at once


def test_between_rounds_pulls_every_refresh_while_the_stage_trains() -> None:
    assert not pull_due(held(), [replica(12, 768)], 110.0, 30.0)  # trained, but too soon
    assert pull_due(held(), [replica(12, 768)], 131.0, 30.0)
    assert not pull_due(held(), [replica(10, 640)], 500.0, 30.0)  # nothing trained since the last pull


def test_writes_a_new_state_every_refresh_or_every_n_rounds() -> None:
    assert not write_due(None, (-1, -1, 0.0), 100.0, 30.0, None)
    assert write_due(held(), (-1, -1, 0.0), 100.0, 30.0, None)  # the first one
    assert not write_due(held(steps=10), (10, 0, 90.0), 200.0, 30.0, None)  # already written
    assert not write_due(held(steps=20), (10, 0, 90.0), 100.0, 30.0, None)  # too soon
    assert write_due(held(steps=20), (10, 0, 90.0), 121.0, 30.0, None)
    assert write_due(held(round_=2, steps=20), (10, 0, 90.0), 100.0, 30.0, 2)  # every_rounds reached
