"""Launchers: `distqat local`, `distqat coordinator` and `distqat servers` start role processes and watch them.

Each role runs as `python -m distqat <role>` under a guardian (see `launch.py`), logs to its own file in
the log dir, and is stopped by the PID we started, on every way out: normal end, Ctrl+C, SIGTERM, or the
launcher being killed (then the guardians stop the roles themselves).
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table

from distqat.config import Config, dump_config
from distqat.distributed.monitor import INITIAL_PEERS_FILE, METRICS_FILE
from distqat.errors import DistQatError
from distqat.launch import ProcessSupervisor, RoleProcess
from distqat.observability.live import LiveView
from distqat.observability.plots import PLOTS_DIR

console = Console(highlight=False, soft_wrap=True)

ROLE_START_TIMEOUT = 180.0  # seconds for a role to come up (imports torch, starts a DHT node)


class LaunchError(DistQatError):
    """A role failed to start or died while the launcher needed it."""


def claim_log_dir(config: Config) -> tuple[Path, TextIO]:
    """Lock the config's log dir for this run; if another live run holds it, use `<log_dir>-2`, `-3`, ..."""
    base = config.resolved_log_dir
    for attempt in range(1, 100):
        candidate = base if attempt == 1 else base.with_name(f"{base.name}-{attempt}")
        candidate.mkdir(parents=True, exist_ok=True)
        lock = (candidate / ".lock").open("w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        lock.write(str(os.getpid()))
        lock.flush()
        if candidate != base:
            console.print(f"[yellow]{base} is in use by another run; logging to {candidate}[/]")
        console.print(f"logs in {candidate}")
        return candidate, lock
    raise LaunchError(f"{base}: could not find a free log dir next to it")


def preflight(config: Config) -> None:
    """Fail now, with one line, on what every server or trainer would fail on after starting.

    Otherwise a missing dataset would show up only as a trainer crashing and restarting in its log.
    """
    from distqat.data import check_dataset
    from distqat.models import stage_ranges
    from distqat.runtime import resolve_device

    stage_ranges(config.model_pipeline, config.data)  # every stage exists and the cut covers the model
    check_dataset(config.data)
    resolve_device(config.device)


def role_argv(role: str, config_path: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "distqat", role, "--config", str(config_path), *args]


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def describe_exit(process: RoleProcess, code: int) -> str:
    last = _last_line(process.log_path)
    return f"{process.name} exited with code {code} (log: {process.log_path})" + (f": {last}" if last else "")


def wait_for_file(path: Path, owner: RoleProcess, stop: threading.Event, timeout: float = ROLE_START_TIMEOUT) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stop.is_set():
        content = path.read_text().strip() if path.exists() else ""
        if content:  # an empty file is one its writer has created but not yet written
            return content
        code = owner.poll()
        if code is not None:
            raise LaunchError(describe_exit(owner, code))
        time.sleep(0.1)
    if stop.is_set():
        raise KeyboardInterrupt
    raise LaunchError(f"{owner.name} did not write {path} within {timeout:.0f} s (log: {owner.log_path})")


def threads_per_server(num_servers: int, num_stages: int, in_flight: int = 1) -> int:
    """Torch threads for each local server, so that the servers busy at one moment share the cores.

    With one micro-batch in flight, each pipeline keeps one of its servers busy at a time: the busy servers
    are as many as the pipelines, and they divide the cores among them. With several in flight
    (`pipelining.in_flight`), every server computes at once: the cores are divided among all of them.
    """
    busy = num_servers if in_flight > 1 else max(1, num_servers // max(1, num_stages))
    return max(1, (os.cpu_count() or 1) // busy)


SUMMARY_ROWS = {
    "first_step": "resumed from step",
    "steps": "steps",
    "samples": "samples",
    "first_loss": "loss, first 10 steps",
    "last_loss": "loss, last 10 steps",
    "samples_per_s": "samples/s",
    "startup_s": "start to first step (s)",
    "wall_s": "wall time (s)",
    "pipelines": "pipelines",
    "servers": "servers",
    "failed_steps": "failed steps",
}


def print_summary(summary: dict[str, Any]) -> None:
    table = Table(title="run summary", show_header=False)
    for key, label in SUMMARY_ROWS.items():
        value = summary.get(key)
        if key in summary and not (key == "first_step" and not value):  # a fresh run resumed from nothing
            table.add_row(label, f"{value:.4g}" if isinstance(value, float) else str(value))
    steps = max(1, summary.get("steps") or 1)
    if "bytes_sent" in summary:
        per_step = (summary["bytes_sent"] + summary["bytes_received"]) / steps / 2**20
        table.add_row("trainer traffic (MiB/step)", f"{per_step:.2f}")
    for key, label in (("bytes_activations", "stage traffic (MiB)"), ("bytes_averaging", "averaging traffic (MiB)")):
        if key in summary:
            table.add_row(label, f"{summary[key] / 2**20:.2f}")
    for uid, seen in summary.get("servers_seen", {}).items():
        moved = "weights moved" if seen["first_weights_digest"] != seen["last_weights_digest"] else "weights unchanged"
        rounds = f", {seen['diloco_round']} DiLoCo rounds" if seen.get("diloco_round") else ""
        table.add_row(uid, f"{seen['steps']} steps, {moved}{rounds}")
    console.print(table)


def _watch(
    supervisor: ProcessSupervisor,
    stop: threading.Event,
    done: Callable[[str, int], bool],
    printer: LiveView | None,
    essential: Callable[[str], bool] = lambda name: True,
) -> None:
    """Block until `done(name, code)` accepts a role's exit, or stop.

    An essential role that exits otherwise raises LaunchError; another (a server: the swarm lives on
    without it) is reported and forgotten.
    """
    while not stop.is_set():
        if printer is not None:
            printer.poll()
        for name, code in supervisor.exited().items():
            if done(name, code):
                if printer is not None:
                    printer.poll()
                return
            message = describe_exit(supervisor.processes[name], code)
            if essential(name):
                raise LaunchError(message)
            console.print(f"[yellow]{message}[/]")
            supervisor.forget(name)
        stop.wait(0.5)


def _start_monitor(
    supervisor: ProcessSupervisor,
    config_path: Path,
    log_dir: Path,
    max_steps: int,
    summary_path: Path | None,
    started_at: float,
    first_step: int = 0,
) -> Callable[[threading.Event], str]:
    """Start the monitor; returns a function that waits for its DHT and returns the initial peers."""
    # What an earlier run left in this log dir must not be mistaken for this run's.
    for stale in (INITIAL_PEERS_FILE, METRICS_FILE):
        (log_dir / stale).unlink(missing_ok=True)
    args = ["--log-dir", str(log_dir), "--max-steps", str(max_steps), "--started-at", repr(started_at)]
    args += ["--first-step", str(first_step)]
    if summary_path is not None:
        args += ["--summary", str(summary_path)]
    monitor = supervisor.start(
        "monitor", role_argv("monitor", config_path, *args), log_dir / "monitor.log", env={"DISTQAT_NUM_THREADS": "1"}
    )
    return lambda stop: wait_for_file(log_dir / INITIAL_PEERS_FILE, monitor, stop)


def _start_client(supervisor, config_path, log_dir, peers: str, max_steps: int) -> None:
    supervisor.start(
        "client",
        role_argv(
            "client", config_path, "--log-dir", str(log_dir), "--max-steps", str(max_steps), "--initial-peers", peers
        ),
        log_dir / "client.log",
        env={"DISTQAT_NUM_THREADS": "1"},
    )


def _run_monitored(
    config: Config,
    stop: threading.Event,
    max_steps: int,
    summary_path: Path | None,
    announce: Callable[[str], None],
    start_servers: Callable[[ProcessSupervisor, Path, Path, str], None] | None = None,
    expected_servers: int | None = None,
    resume: bool = False,
) -> dict[str, Any] | None:
    """Monitor, optional local servers, client; until the monitor ends the run or we are stopped."""
    started_at = time.time()
    log_dir, _lock = claim_log_dir(config)  # the lock is held until we return
    summary_path = summary_path or log_dir / "summary.json"
    summary_path.unlink(missing_ok=True)
    config, first_step = resume_or_start_fresh(config, resume, started_at)
    config_path = log_dir / "config.yaml"
    dump_config(config, config_path)
    with ProcessSupervisor() as supervisor:
        monitor_ready = _start_monitor(
            supervisor, config_path, log_dir, max_steps, summary_path, started_at, first_step
        )
        preflight(config)  # while the monitor starts
        peers = monitor_ready(stop)
        announce(peers)
        if config.param_mirror.enable:
            start_mirror(supervisor, config_path, log_dir, peers)
        if start_servers is not None:
            start_servers(supervisor, config_path, log_dir, peers)
        _start_client(supervisor, config_path, log_dir, peers, max_steps)
        live = LiveView(
            log_dir / METRICS_FILE, console, config.monitor.live_view, expected_servers, started_at=started_at
        )
        with live:
            _watch(
                supervisor,
                stop,
                lambda name, code: name == "monitor" and code == 0,
                live,
                # The swarm lives on without a server, or without its mirror.
                essential=lambda name: not name.startswith("server_") and name != "mirror",
            )
        supervisor.stop("client")  # trainers first, so that none sees its servers vanish mid-step
    plots = sorted((log_dir / PLOTS_DIR).glob("*.png"))
    if plots:
        console.print(f"plots in {log_dir / PLOTS_DIR}: {', '.join(path.name for path in plots)}")
    return _read_summary(summary_path)


def resume_or_start_fresh(config: Config, resume: bool, started_at: float) -> tuple[Config, int]:
    """(the config the roles get, the step the run's count starts from).

    With `resume`, every stage must have a checkpoint that fits (else one ResumeError line) and the count
    continues from theirs; without it, checkpoints written before `started_at` are ignored by every role.
    """
    if not resume:
        if config.checkpoint.newer_than is not None:  # the user's own choice stands
            return config, 0
        fresh = config.checkpoint.model_copy(update={"newer_than": started_at})
        return config.model_copy(update={"checkpoint": fresh}), 0
    from distqat.resume import find_resume_point

    point = find_resume_point(config)
    found = ", ".join(
        f"{stage}: {checkpoint.path.name} (run step {checkpoint.manifest.get('run_step')}, "
        f"round {checkpoint.manifest.get('diloco_round')})"
        for stage, checkpoint in point.checkpoints.items()
    )
    console.print(f"resuming from step {point.first_step}: {found}")
    settings = config.checkpoint.model_copy(update={"newer_than": None, "resume": True})
    return config.model_copy(update={"checkpoint": settings}), point.first_step


def start_mirror(supervisor: ProcessSupervisor, config_path: Path, log_dir: Path, peers: str) -> None:
    """The param mirror (`param_mirror.enable`), joining through `peers`."""
    supervisor.start(
        "mirror",
        role_argv("mirror", config_path, "--initial-peers", peers),
        log_dir / "mirror.log",
        env={"DISTQAT_NUM_THREADS": "1"},
    )


def run_local(
    config: Config,
    stop: threading.Event,
    max_steps: int,
    summary_path: Path | None,
    num_servers: int | None = None,
    resume: bool = False,
) -> dict[str, Any] | None:
    """The whole swarm on this machine: monitor, servers (round-robin over the stages) and client."""
    stage_names = config.model_pipeline.stage_names
    num_servers = num_servers or config.world_size or len(stage_names)
    threads = str(
        config.pipelining.server_threads
        or threads_per_server(num_servers, len(stage_names), config.pipelining.in_flight)
    )

    def start_servers(supervisor: ProcessSupervisor, config_path: Path, log_dir: Path, peers: str) -> None:
        # The first replica of every stage starts at once; the spares start once those serve, so that each
        # spare joins its stage by downloading a live replica's state, as it would in a real swarm (started
        # together, a spare could look before the first replica has announced itself and start fresh).
        started = []
        for index in range(num_servers):
            if index == len(stage_names):  # the first replica of every stage has been started
                for process, ready_file in started:
                    wait_for_file(ready_file, process, stop)
            stage = stage_names[index % len(stage_names)]
            ready_file = log_dir / f"server_{index}.ready"
            ready_file.unlink(missing_ok=True)
            args = ["--stage", stage, "--expert-index", str(index // len(stage_names)), "--initial-peers", peers]
            process = supervisor.start(
                f"server_{index}",
                role_argv("server", config_path, *args, "--ready-file", str(ready_file)),
                log_dir / f"server_{index}.log",
                env={"DISTQAT_NUM_THREADS": threads},
            )
            started.append((process, ready_file))

    console.print(
        f"[bold]distqat local[/]: {config.experiment_prefix}, {num_servers} servers over stages {stage_names}"
    )
    return _run_monitored(
        config,
        stop,
        max_steps,
        summary_path,
        lambda peers: console.print(f"DHT up at {peers}"),
        start_servers,
        expected_servers=num_servers,
        resume=resume,
    )


def run_coordinator(
    config: Config, stop: threading.Event, max_steps: int, summary_path: Path | None, resume: bool = False
) -> dict[str, Any] | None:
    """Monitor + client on this machine; servers join from others with the printed initial peers."""

    def announce(peers: str) -> None:
        console.print(f"DHT up. Start servers elsewhere with:\n  distqat servers --initial-peers {peers}")

    return _run_monitored(config, stop, max_steps, summary_path, announce, resume=resume)


def run_servers(config: Config, stop: threading.Event, num_servers: int, stage: str | None) -> None:
    """Start servers one after another, so that each picks the stage that needs it most at its start."""
    if not config.network.initial_peers:
        raise LaunchError(
            "network.initial_peers: servers need the swarm's address (--initial-peers, "
            f"see {INITIAL_PEERS_FILE} in the coordinator's log dir)"
        )
    preflight(config)
    log_dir, _lock = claim_log_dir(config)
    config_path = log_dir / "servers_config.yaml"
    dump_config(config, config_path)
    threads = str(
        config.pipelining.server_threads
        or threads_per_server(num_servers, config.num_stages, config.pipelining.in_flight)
    )
    with ProcessSupervisor() as supervisor:
        for index in range(num_servers):
            ready_file = log_dir / f"server_{index}.ready"
            ready_file.unlink(missing_ok=True)
            args = ["--ready-file", str(ready_file)] + (["--stage", stage] if stage else [])
            process = supervisor.start(
                f"server_{index}",
                role_argv("server", config_path, *args),
                log_dir / f"server_{index}.log",
                env={"DISTQAT_NUM_THREADS": threads},
            )
            uid = wait_for_file(ready_file, process, stop)
            console.print(f"server_{index} serves {uid}")
        console.print(f"{num_servers} servers running; Ctrl+C stops them")
        _watch(supervisor, stop, lambda name, code: False, None, essential=lambda name: False)


def _read_summary(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
