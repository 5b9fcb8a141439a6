"""The client's trainer fleet: one trainer per complete pipeline, crashed ones restarted with back-off,
finished ones left alone, extras stopped."""

from __future__ import annotations

from pathlib import Path

import pytest

from distqat.distributed import client as client_module
from distqat.distributed.client import TrainerFleet


class FakeProcess:
    def __init__(self, name: str):
        self.name, self.pid, self.code = name, 1000, None

    def poll(self) -> int | None:
        return self.code


class FakeSupervisor:
    """Stands in for ProcessSupervisor: records what the fleet starts and stops."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.stopped: list[str] = []
        self.processes: dict[str, FakeProcess] = {}

    def start(self, name, argv, log_path, env=None) -> FakeProcess:
        assert argv[argv.index("--index") + 1] == name.removeprefix("trainer_")
        self.started.append(name)
        self.processes[name] = FakeProcess(name)
        return self.processes[name]

    def stop(self, name: str) -> None:
        self.stopped.append(name)


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(client_module.time, "monotonic", lambda: now[0])
    return now


def make_fleet(supervisor: FakeSupervisor) -> TrainerFleet:
    return TrainerFleet(supervisor, Path("cfg.yaml"), Path("logs"), max_steps=0)


def test_one_trainer_per_pipeline_and_extras_stopped(clock) -> None:
    supervisor = FakeSupervisor()
    fleet = make_fleet(supervisor)
    fleet.reconcile(2)
    assert supervisor.started == ["trainer_0", "trainer_1"]
    assert fleet.running == 2
    fleet.reconcile(2)
    assert len(supervisor.started) == 2  # nothing new while they run
    fleet.reconcile(1)
    assert supervisor.stopped == ["trainer_1"]
    assert fleet.running == 1


def test_crashed_trainer_restarts_after_backoff(clock) -> None:
    supervisor = FakeSupervisor()
    fleet = make_fleet(supervisor)
    fleet.reconcile(1)
    supervisor.processes["trainer_0"].code = 1
    fleet.reap()
    fleet.reconcile(1)
    assert supervisor.started == ["trainer_0"]  # waits for the back-off
    clock[0] += 1.5
    fleet.reconcile(1)
    assert supervisor.started == ["trainer_0", "trainer_0"]
    supervisor.processes["trainer_0"].code = 1
    fleet.reap()
    clock[0] += 1.5
    fleet.reconcile(1)
    assert len(supervisor.started) == 2  # the second crash waits longer
    clock[0] += 1.0
    fleet.reconcile(1)
    assert len(supervisor.started) == 3


def test_finished_trainer_is_not_restarted(clock) -> None:
    supervisor = FakeSupervisor()
    fleet = make_fleet(supervisor)
    fleet.reconcile(1)
    supervisor.processes["trainer_0"].code = 0
    fleet.reap()
    clock[0] += 100
    fleet.reconcile(1)
    assert supervisor.started == ["trainer_0"]
    assert fleet.running == 0


def test_a_pipeline_missing_for_less_than_the_grace_costs_no_trainer(clock) -> None:
    supervisor = FakeSupervisor()
    fleet = TrainerFleet(supervisor, Path("cfg.yaml"), Path("logs"), max_steps=0, stop_grace=10.0)
    fleet.reconcile(2)
    fleet.reconcile(1)  # a replica missed its heartbeats
    clock[0] += 9.0
    fleet.reconcile(1)
    assert supervisor.stopped == []
    fleet.reconcile(2)  # it is back: the count starts over
    clock[0] += 5.0
    fleet.reconcile(1)
    clock[0] += 9.0
    fleet.reconcile(1)
    assert supervisor.stopped == []
    clock[0] += 1.5
    fleet.reconcile(1)
    assert supervisor.stopped == ["trainer_1"] and fleet.running == 1
