"""Several micro-batches in flight: the compute queue's order, admission and utilisation; the trainer's
in-flight window; a quantised stage replica against a local reference (issue 7)."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import threading
import time
from pathlib import Path

import pytest
import torch

from distqat.config import load_config
from distqat.distributed.compute_queue import ComputeQueue, Kind
from distqat.distributed.optim import build_optimizer
from distqat.distributed.replica import StageReplica
from distqat.distributed.trainer import Progress, train
from distqat.errors import StageCallError
from distqat.launchers import threads_per_server
from distqat.models.tiny import HIDDEN
from distqat.quant.stages import build_stage

REPO = Path(__file__).resolve().parents[2]


# --- ComputeQueue ---


def test_backward_runs_before_queued_forwards_and_internal_work_between() -> None:
    queue = ComputeQueue(max_in_flight=10, max_per_caller=10)
    gate, order = threading.Event(), []
    try:
        blocker = queue.submit(Kind.OTHER, gate.wait, 5.0)  # holds the thread while the others queue up
        time.sleep(0.05)
        futures = [
            queue.submit(Kind.FORWARD, order.append, "forward 1"),
            queue.submit(Kind.READ, order.append, "read"),
            queue.submit(Kind.BACKWARD, order.append, "backward"),
            queue.submit(Kind.FORWARD, order.append, "forward 2"),
            queue.submit(Kind.OTHER, order.append, "other"),
        ]
        gate.set()
        blocker.result(5.0)
        for future in futures:
            future.result(5.0)
    finally:
        queue.shutdown()
    assert order == ["backward", "other", "read", "forward 1", "forward 2"]


def test_admission_bounds_each_caller_and_all_callers() -> None:
    held = {"a": 0, "b": 0}
    queue = ComputeQueue(
        max_in_flight=3, max_per_caller=2, held=lambda caller: sum(held.values()) if caller is None else held[caller]
    )
    try:
        assert queue.admit("a") and queue.admit("a")
        assert not queue.admit("a")  # its own bound, though the server has room
        assert queue.admit("b")
        assert not queue.admit("b")  # the server's bound
        assert queue.refused == 2
        # An admitted forward that runs hands its slot to the replica (held), which its backward frees.
        held["a"] += 1
        queue.submit_forward("a", lambda: None).result(5.0)
        assert not queue.admit("b")
        held["a"] -= 1
        assert queue.admit("b")
    finally:
        queue.shutdown()


def test_a_forward_dropped_before_it_runs_gives_its_slot_back() -> None:
    queue = ComputeQueue(max_in_flight=1, max_per_caller=1)
    gate = threading.Event()
    try:
        queue.submit(Kind.OTHER, gate.wait, 5.0)
        assert queue.admit("a")
        future = queue.submit_forward("a", lambda: "ran")
        assert future.cancel()  # its caller went away while it was queued
        gate.set()
        deadline = time.monotonic() + 5
        while not queue.admit("a"):
            assert time.monotonic() < deadline, "the slot was never given back"
            time.sleep(0.01)
    finally:
        queue.shutdown()


def test_utilisation_is_busy_time_over_wall_time() -> None:
    queue = ComputeQueue(max_in_flight=1, max_per_caller=1)
    try:
        queue.utilisation()  # start a window
        queue.submit(Kind.OTHER, time.sleep, 0.3).result(5.0)
        time.sleep(0.3)
        used = queue.utilisation()
        assert 0.2 < used < 0.8
        assert queue.busy_seconds() >= 0.3
    finally:
        queue.shutdown()


def test_errors_reach_the_caller_and_shutdown_cancels_queued_calls() -> None:
    queue = ComputeQueue(max_in_flight=1, max_per_caller=1)
    gate = threading.Event()
    failing = queue.submit(Kind.BACKWARD, lambda: 1 / 0)
    with contextlib.suppress(ZeroDivisionError):
        failing.result(5.0)
    assert isinstance(failing.exception(), ZeroDivisionError)
    queue.submit(Kind.OTHER, gate.wait, 0.2)
    queued = queue.submit(Kind.FORWARD, lambda: "never")
    queue.shutdown(wait=True)
    assert queued.cancelled()
    assert queue.submit(Kind.FORWARD, lambda: None).cancelled()  # closed: nothing runs any more


def test_local_launcher_divides_the_cores_among_all_servers_when_several_are_in_flight(monkeypatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert threads_per_server(2, 2, in_flight=1) == 8  # one micro-batch: the two servers take turns
    assert threads_per_server(2, 2, in_flight=4) == 4  # both busy at once
    assert threads_per_server(4, 2, in_flight=1) == 4
    assert threads_per_server(16, 2, in_flight=2) == 1


# --- the trainer's in-flight window ---


class FakePipeline:
    """Answers each step after a delay; fails the micro-batches listed in `fail_once` the first time."""

    def __init__(self, delay: float = 0.05, fail_once: tuple[float, ...] = ()):
        self.delay, self.fail_once = delay, set(fail_once)
        self.running = self.most_running = self.calls = 0
        self.seen: list[float] = []

    async def train_step(self, inputs: torch.Tensor, labels: torch.Tensor) -> float:
        self.calls += 1
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await asyncio.sleep(self.delay)
            key = float(inputs[0])
            if key in self.fail_once:
                self.fail_once.discard(key)
                raise StageCallError(f"hop failed for {key}")
            self.seen.append(key)
            return key
        finally:
            self.running -= 1


class CountingBatches:
    def __init__(self) -> None:
        self.index = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.index += 1
        return torch.full((2,), float(self.index)), torch.zeros(2, dtype=torch.long)

    def close(self) -> None:
        pass


def test_trainer_keeps_the_configured_micro_batches_in_flight_and_stops_at_max_steps() -> None:
    pipeline, progress = FakePipeline(), Progress(trainer_id="t")
    asyncio.run(train(pipeline, CountingBatches(), progress, 12, threading.Event(), in_flight=4, poll_s=0.01))
    assert pipeline.most_running == 4
    assert progress.step == 12 and progress.samples == 24 and pipeline.calls == 12


def test_a_failed_micro_batch_is_sent_again_whole() -> None:
    pipeline, progress = FakePipeline(fail_once=(2.0,)), Progress(trainer_id="t")
    asyncio.run(train(pipeline, CountingBatches(), progress, 5, threading.Event(), in_flight=3, poll_s=0.01))
    assert progress.step == 5 and progress.failures == 1
    assert 2.0 in pipeline.seen and sorted(pipeline.seen) == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_stop_cancels_the_micro_batches_in_flight() -> None:
    pipeline, progress, stop = FakePipeline(delay=30.0), Progress(trainer_id="t"), threading.Event()
    threading.Timer(0.3, stop.set).start()
    began = time.monotonic()
    asyncio.run(train(pipeline, CountingBatches(), progress, 0, stop, in_flight=2, poll_s=0.05))
    assert time.monotonic() - began < 10 and pipeline.running == 0 and progress.step == 0


# --- a quantised stage against a local reference ---


def test_quantised_stage_replica_matches_local_training_and_stashes_under_interleaving() -> None:
    """LSQ initialises its step sizes in the first forward: through the aliases that lands in the live
    weights. With one micro-batch in flight the replica equals plain local training (the baseline); with two
    interleaved each gradient is that of the weights its forward ran with."""
    config = load_config(REPO / "configs" / "tiny.yaml", ["--quant.enable", "true"])
    torch.manual_seed(0)
    module = build_stage(config, 1)
    reference = copy.deepcopy(module)
    replica = StageReplica(
        module,
        build_optimizer(module.parameters(), config.diloco.inner_optim),
        torch.device("cpu"),
        autocast=contextlib.nullcontext,
        inputs_need_grad=True,
    )
    ref_optimizer = build_optimizer(reference.parameters(), config.diloco.inner_optim)
    xs, gs = torch.randn(3, 8, HIDDEN), torch.randn(3, 8, 10)
    assert any(name.endswith("step") for name, _ in module.named_parameters())  # LSQ step sizes are trained

    for step in range(2):  # depth 1: the same as local training
        replica.forward("t", str(step), xs[step])
        grad_in = replica.backward("t", str(step), gs[step])
        ref_in = xs[step].clone().requires_grad_(True)
        ref_optimizer.zero_grad(set_to_none=True)
        reference(ref_in).backward(gs[step])
        ref_optimizer.step()
        assert torch.allclose(grad_in, ref_in.grad, atol=1e-6)
    for param, ref in zip(module.parameters(), reference.parameters(), strict=True):
        assert torch.allclose(param, ref, atol=1e-6)

    # depth 2: two forwards at the same weights, then both backwards (the second on stashed weights)
    frozen = copy.deepcopy(reference)
    replica.forward("t", "a", xs[0])
    replica.forward("t", "b", xs[1])
    replica.backward("t", "a", gs[0])
    grad_b = replica.backward("t", "b", gs[1])
    ref_in = xs[1].clone().requires_grad_(True)
    frozen(ref_in).backward(gs[1])
    assert torch.allclose(grad_b, ref_in.grad, atol=1e-6)
    assert replica.stashed_versions == 1


# --- the trainer's side of backpressure ---


class BusyThenServing:
    """A stage client whose replica answers busy `busy` times, then echoes."""

    def __init__(self, busy: int):
        self.busy, self.calls = busy, 0

    async def call(self, replica, method, tensors, metadata, timeout):
        from distqat.swarm.rpc import CallResult

        self.calls += 1
        if self.calls <= self.busy:
            return CallResult([], {"busy": True}, 10, 10)
        return CallResult(tensors, {}, 10, 10)


def _one_stage_pipeline(client, *overrides: str):
    from distqat.distributed.pipeline import RemotePipeline
    from distqat.swarm.records import ServerInfo
    from distqat.swarm.routing import Router

    config = load_config(REPO / "configs" / "tiny.yaml", list(overrides))
    router = Router(["head"], ban_time=60.0)
    info = ServerInfo(uid="head.0", peer_id="p", maddrs=[], stage="head", stage_index=0, expert_index=0, device="cpu")
    router.update({"head": [info]})
    return RemotePipeline(config, client, router), router


def test_a_busy_replica_is_asked_again_after_a_backoff_and_not_banned() -> None:
    client = BusyThenServing(busy=3)
    pipeline, router = _one_stage_pipeline(client, "--pipelining.busy-backoff", "0.01")
    _, outputs, _ = asyncio.run(pipeline._forward_with_retries("head", torch.ones(2), {"mb": "0"}))
    assert client.calls == 4 and pipeline.busy_replies == 3
    assert torch.equal(outputs[0], torch.ones(2)) and router.usable("head")


def test_a_replica_busy_for_longer_than_the_forward_timeout_fails_the_hop() -> None:
    client = BusyThenServing(busy=10**6)
    pipeline, router = _one_stage_pipeline(
        client, "--pipelining.busy-backoff", "0.01", "--model-pipeline.forward-timeout", "0.3"
    )
    with pytest.raises(StageCallError, match="queue is full"):
        asyncio.run(pipeline._forward_with_retries("head", torch.ones(2), {"mb": "0"}))
    assert not router.usable("head")  # now it is avoided like any replica that failed
