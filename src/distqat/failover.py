"""`distqat failover-demo`: kill servers of a live local swarm at a chosen step, start a new one, time it all.

The swarm is `distqat local` (in a thread of this process) with `replicas` servers per stage; every role
records timestamped events (`swarm.events`). At trainer step `kill_at_step` the named servers are SIGKILLed
(no goodbye: as a preempted machine), `restart_after` seconds later a fresh `distqat server` starts with no
stage given, and when the run has its steps the events become a timeline and these figures:

- `detect_s`: kill -> the dead server gone from the routing table of every trainer still training;
- `reroute_s`: the longest gap between two completed steps (of any trainer) that starts in the 30 s after
  the kill (and before the new server starts), minus the median gap before the kill: the failure's stall;
- `refill_s`: new server started -> the first micro-batch it trained; its parts: `serve_s` (-> it serves,
  its state loaded and its record in the DHT) and `seen_s` (-> the first trainer has it in its routing table);
- `steps_lost`: micro-batches dropped after the kill (their work was lost and they were retried);
- `steps_total`, `step_s` (median gap between steps before the kill).
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from distqat.config import Config, dump_config
from distqat.distributed.monitor import INITIAL_PEERS_FILE
from distqat.errors import DistQatError
from distqat.launch import ProcessSupervisor
from distqat.launchers import console, role_argv, run_local
from distqat.swarm.events import EVENTS_DIR_ENV, read_events
from distqat.swarm.uids import parse_uid

STEPS_AFTER_REFILL = 10  # steps the run goes on after the new server trained its first micro-batch
REROUTE_WINDOW_S = 30.0  # gaps between steps that end this long after the kill count as the failure's stall
FIGURES = ("detect_s", "reroute_s", "refill_s", "serve_s", "seen_s", "steps_lost", "steps_total", "step_s")


class FailoverError(DistQatError):
    """The demo could not stage its failure (no such server, the run ended first, ...)."""


@dataclass
class FailoverPlan:
    kill: list[str]  # uids of the servers to kill, e.g. head.0.0.0
    kill_at_step: int = 20
    restart_after: float = 10.0  # seconds after the kill a new server starts; negative: none starts
    replicas: int = 2  # servers per stage at the start
    trainers: int = 1  # cap on trainers (network.max_pipelines): the other replicas are spares
    max_steps: int = 80
    timeout: float = 600.0  # seconds the whole run may take


@dataclass
class FailoverRun:
    """What one demo run saw: the events of every role, and the moments the demo itself acted."""

    log_dir: Path
    events: list[dict[str, Any]]
    killed: dict[str, int]  # uid -> pid
    killed_at: float
    kill_step: int
    new_server_at: float | None
    summary: dict[str, Any] | None
    figures: dict[str, Any] = field(default_factory=dict)


def prepare(config: Config, plan: FailoverPlan, run_index: int) -> Config:
    for uid in plan.kill:
        stage, index = parse_uid(uid)
        if stage not in config.model_pipeline.stage_names:
            raise FailoverError(f"--kill {uid}: '{stage}' is not a stage (stages: {config.model_pipeline.stage_names})")
        if index >= plan.replicas:
            raise FailoverError(f"--kill {uid}: only {plan.replicas} replicas per stage are started")
    log_dir = config.resolved_log_dir / f"failover-{time.strftime('%Y%m%d-%H%M%S')}-{run_index}"
    return config.model_copy(
        update={
            "log_dir": str(log_dir),
            "world_size": plan.replicas * config.num_stages,
            "network": config.network.model_copy(update={"max_pipelines": plan.trainers}),
        }
    )


def _wait(condition, stop: threading.Event, deadline: float, what: str):
    while not stop.is_set():
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise FailoverError(f"gave up waiting for {what}")
        time.sleep(0.05)
    raise KeyboardInterrupt


def run_once(config: Config, plan: FailoverPlan, stop: threading.Event, run_index: int = 0) -> FailoverRun:
    config = prepare(config, plan, run_index)
    log_dir = config.resolved_log_dir
    events_dir = log_dir / "events"
    shutil.rmtree(events_dir, ignore_errors=True)
    events_dir.mkdir(parents=True)
    deadline = time.monotonic() + plan.timeout
    os.environ[EVENTS_DIR_ENV] = str(events_dir)  # every role started from now on records its events
    run_stop = threading.Event()
    result: dict[str, Any] = {}

    def swarm() -> None:
        try:
            # No step limit: the demo ends the run itself, once the new server has also been seen training.
            result["summary"] = run_local(config, run_stop, 0, log_dir / "summary.json")
        except BaseException as error:  # reported by the main thread
            result["error"] = error

    thread = threading.Thread(target=swarm, name="failover-swarm", daemon=True)
    thread.start()
    new_server_at = None
    supervisor = ProcessSupervisor()  # the new server; stopped after the swarm, so no trainer sees it vanish
    try:

        def serving() -> dict[str, int] | None:
            if "error" in result:
                raise result["error"]
            pids = {e["uid"]: e["pid"] for e in read_events(events_dir) if e["event"] == "serving"}
            return pids if all(uid in pids for uid in plan.kill) else None

        def reached_step() -> int | None:
            if "error" in result or not thread.is_alive():
                raise FailoverError("the run ended before the kill step")
            steps = [e["step"] for e in read_events(events_dir) if e["event"] == "step"]
            return max(steps) if steps and max(steps) >= plan.kill_at_step else None

        pids = _wait(serving, stop, deadline, f"servers {plan.kill} to serve")
        kill_step = _wait(reached_step, stop, deadline, f"trainer step {plan.kill_at_step}")
        killed_at = time.time()
        for uid in plan.kill:
            os.kill(pids[uid], signal.SIGKILL)
            console.print(f"[red]killed {uid} (pid {pids[uid]}) at step {kill_step}[/]")
        if plan.restart_after >= 0:
            stop.wait(plan.restart_after)
            peers = (log_dir / INITIAL_PEERS_FILE).read_text().strip()
            config_path = log_dir / "failover_server.yaml"
            dump_config(config, config_path)
            new_server_at = time.time()
            supervisor.start(
                "server_new",
                role_argv("server", config_path, "--initial-peers", peers),
                log_dir / "server_new.log",
                env={"DISTQAT_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // 2))},
            )
            console.print("[green]started a new server (it picks the neediest stage)[/]")

        def done() -> bool:
            if "error" in result or not thread.is_alive():
                raise FailoverError("the swarm stopped before the demo ended it (see its logs)")
            events = read_events(events_dir)
            steps = [e for e in events if e["event"] == "step"]
            if len(steps) < plan.max_steps:
                return False
            if new_server_at is None:
                return True
            # Refilled: the new server trained, and training went on for a few steps after that.
            refilled_at = first_trained_by_new_server(events, new_server_at)
            return refilled_at is not None and sum(e["t"] > refilled_at for e in steps) >= STEPS_AFTER_REFILL

        _wait(done, stop, deadline, f"{plan.max_steps} steps and the new server training")
    finally:
        run_stop.set()
        thread.join(120)
        supervisor.stop_all()
        os.environ.pop(EVENTS_DIR_ENV, None)
    if stop.is_set():
        raise KeyboardInterrupt
    if "error" in result:
        raise result["error"]
    killed = {uid: pids[uid] for uid in plan.kill}
    run = FailoverRun(
        log_dir, read_events(events_dir), killed, killed_at, kill_step, new_server_at, result.get("summary")
    )
    run.figures = figures(run)
    return run


def first_trained_by_new_server(events: list[dict[str, Any]], started_at: float) -> float | None:
    """When a server that began serving after `started_at` trained its first micro-batch (None: not yet)."""
    new_roles = {e["role"] for e in events if e["event"] == "serving" and e["t"] > started_at}
    firsts = [e["t"] for e in events if e["event"] == "first_backward" and e["role"] in new_roles]
    return min(firsts) if firsts else None


def refill_parts(events: list[dict[str, Any]], started_at: float) -> tuple[float | None, float | None]:
    """When the new server (serving after `started_at`) first served, and when a trainer first saw it."""
    serving = [e for e in events if e["event"] == "serving" and e["t"] > started_at]
    if not serving:
        return None, None
    served_at = serving[0]["t"]
    seen = [e["t"] for e in events if e["event"] == "route_found" and e["uid"] == serving[0]["uid"]]
    seen = [t for t in seen if t >= served_at - 1.0]  # the record may reach a trainer before "serving" is written
    return served_at, (min(seen) if seen else None)


def figures(run: FailoverRun) -> dict[str, Any]:
    """The issue's figures, from the events alone."""
    events = run.events
    step_times = [e["t"] for e in events if e["event"] == "step"]
    before = [b - a for a, b in itertools.pairwise(step_times) if b <= run.killed_at]
    step_s = statistics.median(before) if before else None
    # Detection: every trainer that trained after the kill stopped routing to every killed server.
    trained_after = {e["role"] for e in events if e["event"] == "step" and e["t"] > run.killed_at}
    lost_at: dict[tuple[str, str], float] = {}
    for e in events:
        if e["event"] == "route_lost" and e["t"] >= run.killed_at and e["uid"] in run.killed:
            lost_at.setdefault((e["role"], e["uid"]), e["t"])
    detections = [lost_at.get((role, uid)) for role in trained_after for uid in run.killed]
    detect_s = max(t - run.killed_at for t in detections) if detections and None not in detections else None
    # The stall: the longest gap that ends after the kill and starts before the window closes. The window
    # closes when the new server starts: its start-up competes for the CPU, which is not the failure's stall.
    window_end = min(run.killed_at + REROUTE_WINDOW_S, run.new_server_at or float("inf"))
    around = [b - a for a, b in itertools.pairwise(step_times) if b > run.killed_at and a < window_end]
    reroute_s = max(around) - step_s if around and step_s is not None else None
    refilled_at = first_trained_by_new_server(events, run.new_server_at) if run.new_server_at is not None else None
    refill_s = refilled_at - run.new_server_at if refilled_at is not None else None
    served_at, seen_at = refill_parts(events, run.new_server_at) if run.new_server_at is not None else (None, None)
    return {
        "detect_s": detect_s,
        "reroute_s": reroute_s,
        "refill_s": refill_s,
        "serve_s": served_at - run.new_server_at if served_at is not None else None,
        "seen_s": seen_at - run.new_server_at if seen_at is not None else None,
        "steps_lost": sum(e["event"] == "step_failed" and e["t"] > run.killed_at for e in events),
        "steps_total": len(step_times),
        "step_s": step_s,
    }


def timeline(run: FailoverRun) -> Table:
    """What happened from just before the kill on, in seconds relative to the kill."""
    table = Table(title=f"failover timeline ({run.log_dir})")
    table.add_column("t (s)", justify="right")
    table.add_column("who")
    table.add_column("what")
    rows = [(run.killed_at, "demo", f"SIGKILL {', '.join(run.killed)} at step {run.kill_step}")]
    if run.new_server_at is not None:
        rows.append((run.new_server_at, "demo", "started a new server"))
    steps_after = [e for e in run.events if e["event"] == "step" and e["t"] > run.killed_at]
    if steps_after:
        first = steps_after[0]
        rows.append((first["t"], first["role"], f"first step after the kill (step {first['step']})"))
    for e in run.events:
        if e["t"] < run.killed_at:
            continue
        if e["event"] == "route_lost":
            rows.append((e["t"], e["role"], f"stopped routing to {e['uid']}: {e['why']}"))
        elif e["event"] == "route_found" and run.new_server_at is not None and e["t"] > run.new_server_at:
            rows.append((e["t"], e["role"], f"routing to {e['uid']} (new server)"))
        elif e["event"] == "step_failed":
            rows.append((e["t"], e["role"], f"micro-batch of step {e['step']} dropped, retried"))
        elif e["event"] in ("serving", "first_backward", "moving"):
            what = {"serving": "serving", "first_backward": "trained its first micro-batch", "moving": "moving to"}
            rows.append((e["t"], e["role"], f"{e['uid']} {what[e['event']]} {e.get('to', '')}".rstrip()))
    for t, who, what in sorted(rows, key=lambda row: row[0]):
        table.add_row(f"{t - run.killed_at:+.2f}", who, what)
    return table


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and max of each figure over runs (None where a run could not measure it)."""
    out: dict[str, Any] = {"median": {}, "max": {}}
    for name in FIGURES:
        values = [run[name] for run in runs if run[name] is not None]
        out["median"][name] = statistics.median(values) if values else None
        out["max"][name] = max(values) if values else None
    return out


def figures_table(runs: list[dict[str, Any]]) -> Table:
    table = Table(title="failover figures (seconds, steps)")
    table.add_column("run")
    for name in FIGURES:
        table.add_column(name, justify="right")
    for index, run in enumerate(runs, 1):
        table.add_row(str(index), *(_fmt(run[name]) for name in FIGURES))
    if len(runs) > 1:
        summary = aggregate(runs)
        for label in ("median", "max"):
            table.add_row(label, *(_fmt(summary[label][name]) for name in FIGURES))
    return table
