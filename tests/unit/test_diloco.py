"""DiLoCo's math against a fake averager, the round trigger, and the int8 codec: no network."""

from __future__ import annotations

import pytest
import torch
from hivemind.compression.serialization import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2

from distqat.config import OptimConfig
from distqat.distributed.optim.collaborative import PeerProgress, ahead_of, round_due
from distqat.distributed.optim.diloco import (
    AveragingResult,
    DiLoCo,
    PresetAverager,
    RoundStatus,
    run_local_round,
    weighted_mean,
)
from distqat.swarm.codecs import BLOCK

NESTEROV = OptimConfig(type="sgd", sgd_lr=0.7, sgd_momentum=0.9, sgd_nesterov=True)


def replica(start: torch.Tensor, moved_by: float, samples: int) -> DiLoCo:
    param = torch.nn.Parameter(start.clone())
    diloco = DiLoCo([param], NESTEROV)
    with torch.no_grad():
        param.add_(moved_by)  # stands in for the inner steps
    diloco.record_inner_step(samples)
    return diloco


def test_one_round_is_the_nesterov_step_on_the_weighted_mean_pseudo_gradient():
    start = torch.tensor([1.0, -2.0, 0.5])
    a, b = replica(start, moved_by=-0.3, samples=10), replica(start, moved_by=0.1, samples=30)
    reports = run_local_round([a, b])

    mean_delta = (10 * 0.3 + 30 * -0.1) / 40  # Δ_i = θ₀ - θ_i, weighted by samples
    # First Nesterov step from a zero buffer: buffer = g, update = g + μ·buffer = (1 + μ)·g.
    expected = start - 0.7 * (1 + 0.9) * mean_delta
    for diloco in (a, b):
        torch.testing.assert_close(diloco.params[0].detach(), expected)
        assert diloco.round == 1 and diloco.samples_since_sync == 0
    assert a.outer_digest() == b.outer_digest()
    assert [r.status for r in reports] == [RoundStatus.AVERAGED] * 2
    assert [r.weight for r in reports] == [10.0, 30.0]


def test_second_round_uses_the_momentum_of_the_first():
    start = torch.zeros(2)
    diloco = replica(start, moved_by=-1.0, samples=1)
    diloco.run_round(PresetAverager(AveragingResult(RoundStatus.ALONE)), timeout=1)
    after_first = diloco.params[0].detach().clone()
    with torch.no_grad():
        diloco.params[0].add_(-1.0)
    diloco.record_inner_step(1)
    diloco.run_round(PresetAverager(AveragingResult(RoundStatus.ALONE)), timeout=1)

    reference = torch.nn.Parameter(start.clone())
    sgd = torch.optim.SGD([reference], lr=0.7, momentum=0.9, nesterov=True)
    for _ in range(2):
        reference.grad = torch.ones(2)
        sgd.step()
    torch.testing.assert_close(after_first, start - 0.7 * 1.9)
    torch.testing.assert_close(diloco.params[0].detach(), reference.detach())


def test_a_failed_round_changes_nothing_and_the_next_covers_both_rounds_of_steps():
    start = torch.tensor([3.0])
    diloco = replica(start, moved_by=-0.5, samples=8)
    report = diloco.run_round(PresetAverager(AveragingResult(RoundStatus.FAILED, detail="partial")), timeout=1)
    assert report.status is RoundStatus.FAILED and report.detail == "partial"
    torch.testing.assert_close(diloco.params[0].detach(), torch.tensor([2.5]))  # training goes on from here
    torch.testing.assert_close(diloco.outer_params[0], start)  # θ₀ untouched
    assert diloco.round == 0 and diloco.samples_since_sync == 8 and diloco.samples_since_attempt == 0

    with torch.no_grad():
        diloco.params[0].add_(-0.5)
    diloco.record_inner_step(8)
    diloco.run_round(PresetAverager(AveragingResult(RoundStatus.ALONE)), timeout=1)
    torch.testing.assert_close(diloco.params[0].detach(), start - 0.7 * 1.9 * 1.0)  # Δ = 1.0 over both
    assert diloco.round == 1


def test_weighted_mean_counts_each_replica_for_its_samples():
    mean = weighted_mean([[torch.tensor([0.0])], [torch.tensor([4.0])]], [3, 1])
    torch.testing.assert_close(mean[0], torch.tensor([1.0]))


def test_state_round_trip_restores_outer_params_momentum_and_round():
    start = torch.tensor([1.0, 1.0])
    source = replica(start, moved_by=0.25, samples=4)
    source.run_round(PresetAverager(AveragingResult(RoundStatus.ALONE)), timeout=1)
    joiner = DiLoCo([torch.nn.Parameter(torch.zeros(2))], NESTEROV)
    joiner.load_state_dict(source.state_dict())
    assert joiner.round == 1 and joiner.outer_digest() == source.outer_digest()
    # Same momentum: the same pseudo-gradient gives the same next step on both.
    for diloco in (source, joiner):
        with torch.no_grad():
            diloco.params[0].copy_(diloco.outer_params[0] - 0.1)
        diloco.record_inner_step(1)
        diloco.run_round(PresetAverager(AveragingResult(RoundStatus.ALONE)), timeout=1)
    torch.testing.assert_close(joiner.outer_params[0], source.outer_params[0])


def progress(round_: int, samples: int, at: float = 100.0, averaging: bool = False) -> PeerProgress:
    return PeerProgress(round_, samples, at, averaging)


def test_a_round_is_due_when_the_stage_together_trained_enough():
    peers = [progress(0, 250)]
    assert not round_due(0, 100, peers, since=0.0, samples_per_replica=200)  # 350 < 2 * 200
    assert round_due(0, 150, peers, since=0.0, samples_per_replica=200)  # 400 >= 2 * 200


def test_stale_records_and_other_rounds_do_not_count():
    assert not round_due(0, 100, [progress(0, 500, at=5.0)], since=10.0, samples_per_replica=200)
    assert not round_due(0, 100, [progress(1, 500)], since=0.0, samples_per_replica=200)
    assert not round_due(0, 0, [progress(0, 5000)], since=0.0, samples_per_replica=200)  # nothing of ours


def test_a_peer_that_started_averaging_pulls_the_others_in():
    assert round_due(2, 1, [progress(2, 0, averaging=True)], since=0.0, samples_per_replica=10_000)
    assert not round_due(2, 1, [progress(1, 0, averaging=True)], since=0.0, samples_per_replica=10_000)


def test_a_replica_behind_its_stage_knows_it():
    assert ahead_of(3, [progress(3, 0), progress(5, 0)]) == 5
    assert ahead_of(3, [progress(3, 0), progress(2, 0)]) is None
    assert ahead_of(3, []) is None


@pytest.mark.parametrize("numel", [1, BLOCK - 1, 3 * BLOCK + 7])
def test_int8_codec_error_is_bounded_by_each_blocks_absmax(numel):
    torch.manual_seed(numel)
    values = torch.randn(numel)
    values[0] = 50.0  # an outlier coarsens only its own block
    encoded = serialize_torch_tensor(values, runtime_pb2.CompressionType.BLOCKWISE_8BIT)
    decoded = deserialize_torch_tensor(encoded)
    assert decoded.shape == values.shape and decoded.dtype == values.dtype
    assert len(encoded.buffer) <= numel + 4 * (numel // BLOCK + 1) + BLOCK  # one byte a value, a scale a block
    for block in range(0, numel, BLOCK):
        part, got = values[block : block + BLOCK], decoded[block : block + BLOCK]
        assert (part - got).abs().max() <= part.abs().max() / 254 + 1e-6


def test_int8_codec_keeps_zeros_and_shapes():
    zeros = torch.zeros(4, 5)
    decoded = deserialize_torch_tensor(serialize_torch_tensor(zeros, runtime_pb2.CompressionType.BLOCKWISE_8BIT))
    assert torch.equal(decoded, zeros)


def _stage(model_name: str) -> tuple[torch.nn.Module, torch.optim.Optimizer, DiLoCo]:
    from distqat.config import DataConfig, StageConfig
    from distqat.models import build_stage

    module = build_stage(StageConfig(model_name=model_name), DataConfig(), seed=0)
    optimizer = torch.optim.Adam(module.parameters())
    return module, optimizer, DiLoCo(list(module.parameters()), NESTEROV)


def test_a_packed_state_loads_whole_into_a_replica_of_the_same_stage():
    from distqat.distributed.stage_sync import pack_state, unpack_state

    module, optimizer, diloco = _stage("tiny.head")
    module(torch.randn(2, 1, 28, 28)).sum().backward()
    optimizer.step()
    diloco.record_inner_step(2)
    diloco.run_round(PresetAverager(AveragingResult(RoundStatus.ALONE)), timeout=0)
    metadata, tensors = pack_state(module, optimizer, diloco, "head", "head.0.0.0")

    joiner = _stage("tiny.head")
    with torch.no_grad():
        for param in joiner[0].parameters():
            param.add_(1.0)
    assert unpack_state(metadata, tensors, *joiner, stage="head") is None
    for mine, theirs in zip(joiner[0].parameters(), module.parameters(), strict=True):
        assert torch.equal(mine, theirs)
    assert joiner[2].round == 1 and joiner[2].outer_digest() == diloco.outer_digest()
    assert joiner[1].state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]


def test_a_state_that_does_not_fit_is_refused_and_changes_nothing():
    from distqat.distributed.stage_sync import pack_state, unpack_state

    metadata, tensors = pack_state(*_stage("tiny.head"), "head", "head.0.0.0")
    tail = _stage("tiny.tail")
    before = [p.clone() for p in tail[0].parameters()]
    assert "stage 'head', this is 'tail'" in unpack_state(metadata, tensors, *tail, stage="tail")
    problem = unpack_state({**metadata, "stage": "tail"}, tensors, *tail, stage="tail")
    assert problem is not None and "does not fit" in problem
    for now, then in zip(tail[0].parameters(), before, strict=True):
        assert torch.equal(now, then)
    assert "unknown state format" in unpack_state({"format": 99}, tensors, *tail, stage="tail")
