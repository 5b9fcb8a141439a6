"""Failover in a real local swarm (`distqat failover-demo` on configs/tiny.yaml): servers are SIGKILLed when
the trainers reach a chosen step, and the swarm must route around them, refill the gap from a live replica
or a checkpoint, recombine broken pipelines, and move a spare to a stage that lost every replica."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from test_local_swarm import REPO, TINY  # the same folder: pytest puts it on sys.path

from distqat.swarm.events import read_events

pytestmark = pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="needs Debian's dataset-fashion-mnist"
)


def failover(tmp_path: Path, *args: str) -> tuple[dict, Path]:
    """Run the demo; returns its figures and the run's log dir. Asserts it left no process behind."""
    report_path = tmp_path / "failover.json"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "distqat",
            "failover-demo",
            "--config",
            str(TINY),
            "--log-dir",
            str(tmp_path / "logs"),
            "--json",
            str(report_path),
            *args,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    assert not leftovers, leftovers
    (log_dir,) = (tmp_path / "logs").glob("failover-*")
    return json.loads(report_path.read_text()), log_dir


def logs(log_dir: Path, pattern: str) -> str:
    return "\n".join(path.read_text() for path in sorted(log_dir.glob(pattern)))


def trainer_pids(log_dir: Path) -> set[int]:
    return {event["pid"] for event in read_events(log_dir / "events") if event["role"].startswith("trainer_")}


def test_a_killed_replica_with_a_spare_costs_at_most_a_retried_micro_batch(tmp_path: Path) -> None:
    figures, log_dir = failover(
        tmp_path, "--replicas", "2", "--kill", "head.0.0.0", "--kill-at-step", "15", "--restart-after", "1"
    )
    assert figures["detect_s"] is not None and figures["refill_s"] is not None
    assert figures["serve_s"] <= figures["seen_s"] + 1.0 and figures["seen_s"] <= figures["refill_s"]
    assert figures["steps_lost"] <= 1
    assert len(trainer_pids(log_dir)) == 1  # the trainer went on: never stopped or restarted
    assert "starts from a live replica" in (log_dir / "server_new.log").read_text()


def test_a_killed_only_replica_is_refilled_from_its_checkpoint(tmp_path: Path) -> None:
    figures, log_dir = failover(
        tmp_path,
        *("--replicas", "1", "--kill", "tail.0.0.0", "--kill-at-step", "30", "--restart-after", "1"),
        *("--checkpoint.every", "0.5"),
    )
    new_server = (log_dir / "server_new.log").read_text()
    assert "taking stage 'tail'" in new_server
    assert "starts from checkpoint" in new_server  # the stage's last state, not a fresh init
    assert figures["refill_s"] is not None


def test_two_broken_pipelines_recombine_into_one(tmp_path: Path) -> None:
    figures, log_dir = failover(
        tmp_path,
        *("--replicas", "2", "--trainers", "2", "--kill", "head.0.0.0", "--kill", "tail.0.1.0"),
        *("--kill-at-step", "20", "--restart-after", "-1", "--max-steps", "80"),
    )
    events = read_events(log_dir / "events")
    killed_at = min(e["t"] for e in events if e["event"] == "route_lost")
    assert sum(e["event"] == "step" and e["t"] > killed_at for e in events) >= 20
    rows = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert any(row["replicas"] == {"head": 1, "tail": 1} and row["pipelines"] == 1 for row in rows)
    assert figures["detect_s"] is not None


def test_a_spare_moves_to_a_stage_that_lost_every_replica(tmp_path: Path) -> None:
    _, log_dir = failover(
        tmp_path,
        *("--replicas", "2", "--kill", "head.0.0.0", "--kill", "head.0.1.0"),
        *("--kill-at-step", "30", "--restart-after", "-1", "--max-steps", "80"),
        *("--network.rebalance-after", "2", "--checkpoint.every", "0.5"),
    )
    servers = logs(log_dir, "server_*.log")
    assert "moving from 'tail' to 'head'" in servers
    assert "head.0.0.0 starts from checkpoint" in servers
    events = read_events(log_dir / "events")
    moved_at = next(e["t"] for e in events if e["event"] == "moving")
    assert any(e["event"] == "step" and e["t"] > moved_at for e in events)  # training resumed after the move
