"""The failover demo's figures and timeline, from a hand-written event log."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from distqat.failover import FailoverRun, figures, timeline

KILL, NEW = 100.0, 110.0


def event(t: float, role: str, name: str, **fields) -> dict:
    return {"t": t, "role": role, "event": name, "pid": 1, **fields}


def run_with(events: list[dict]) -> FailoverRun:
    return FailoverRun(Path("logs"), events, {"head.0.0.0": 42}, KILL, 8, NEW, None)


EVENTS = [
    event(90.0, "trainer_0", "route_found", uid="head.0.0.0"),  # the original server, long before
    *(event(90.0 + 2 * i, "trainer_0", "step", step=i) for i in range(1, 6)),  # steps every 2 s up to t=100
    event(101.0, "trainer_0", "route_lost", uid="head.0.0.0", why="gone from the DHT"),
    event(103.0, "trainer_0", "step", step=6),  # a 3 s gap: 1 s of stall
    *(event(105.0 + 2 * i, "trainer_0", "step", step=7 + i) for i in range(10)),  # steps go on, up to t=123
    event(120.0, "server_new", "serving", uid="head.0.0.0"),
    event(121.5, "trainer_0", "route_found", uid="head.0.0.0"),
    event(124.0, "server_new", "first_backward", uid="head.0.0.0"),
    *(event(124.0 + 2 * i, "trainer_0", "step", step=16 + i) for i in range(1, 4)),
]


def test_refill_and_its_parts() -> None:
    result = figures(run_with(EVENTS))
    assert result["detect_s"] == pytest.approx(1.0)
    assert result["reroute_s"] == pytest.approx(1.0)
    assert result["refill_s"] == pytest.approx(14.0)
    assert result["serve_s"] == pytest.approx(10.0)
    assert result["seen_s"] == pytest.approx(11.5)  # not the original server's route_found at t=90
    assert result["step_s"] == pytest.approx(2.0)


def test_parts_are_none_while_no_new_server_serves() -> None:
    result = figures(run_with([e for e in EVENTS if e["t"] < 110.0]))
    assert result["refill_s"] is None and result["serve_s"] is None and result["seen_s"] is None


def test_timeline_names_the_trainer_finding_the_new_server() -> None:
    console = Console(width=200, record=True)
    console.print(timeline(run_with(EVENTS)))
    text = console.export_text()
    assert "routing to head.0.0.0 (new server)" in text
    assert "+21.50" in text  # relative to the kill
    assert text.count("(new server)") == 1  # the original server's route_found came before the kill
