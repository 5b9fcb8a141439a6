"""A real swarm on 127.0.0.1 (`distqat local`, real hivemind, real Fashion-MNIST): it trains, it reports a
dead or frozen server as one clear line, and it leaves nothing behind, whichever way it ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"

pytestmark = pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="needs Debian's dataset-fashion-mnist"
)


def start_distqat(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "distqat", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def start_local(log_dir: Path, *args: str) -> subprocess.Popen[str]:
    return start_distqat("local", "--config", str(TINY), "--log-dir", str(log_dir), *args)


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.25) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def steps_so_far(log_dir: Path) -> int:
    try:
        lines = (log_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return max((json.loads(line)["steps"] for line in lines if line.strip()), default=0)


def role_process(launcher: subprocess.Popen[str], *words: str) -> psutil.Process:
    """The role process (not its guardian) whose command line holds all `words`."""
    for proc in psutil.Process(launcher.pid).children(recursive=True):
        try:
            cmdline = proc.cmdline()
        except psutil.Error:
            continue
        if "distqat.guardian" not in cmdline and all(word in cmdline for word in words):
            return proc
    raise AssertionError(f"no role process with {words}")


def test_two_local_swarms_at_once_both_train(tmp_path: Path) -> None:
    """Ports 0 and a locked log dir: two runs of the same config on one machine do not collide. The first sends
    stage tensors over the direct TCP channel (the default), the second through p2p only."""
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    stale_row = {"steps": 999, "loss": 9.0, "samples_per_s": 9.0, "pipelines": 9, "servers": 9}
    (log_dir / "metrics.jsonl").write_text(json.dumps(stale_row) + "\n")  # an earlier run's
    transports = (["--network.tensor-transport", "auto"], ["--network.tensor-transport", "p2p"])
    runs = [
        start_local(log_dir, "--max-steps", "30", "--summary", str(tmp_path / f"summary_{i}.json"), *transports[i])
        for i in (0, 1)
    ]
    outputs = [run.communicate(timeout=240)[0] for run in runs]
    for run, output in zip(runs, outputs, strict=True):
        assert run.returncode == 0, output
        assert "step   999" not in output  # progress is this run's only

    used_dirs = {log_dir, log_dir.with_name("logs-2")}
    assert all((d / "monitor.log").is_file() for d in used_dirs)
    for index in (0, 1):
        summary = json.loads((tmp_path / f"summary_{index}.json").read_text())
        assert summary["steps"] >= 30
        assert summary["samples"] >= 30 * 64
        assert summary["last_loss"] < summary["first_loss"] - 0.3, summary  # the loss fell visibly
        assert summary["pipelines"] == 1
        assert summary["servers"] == 2
        assert summary["startup_s"] > 0
        assert summary["bytes_sent"] > 0
        servers = summary["servers_seen"]
        assert set(servers) == {"head.0.0.0", "tail.0.0.0"}
        for seen in servers.values():
            assert seen["steps"] > 0
            assert seen["first_weights_digest"] != seen["last_weights_digest"]  # the servers' weights moved
    for name in ("monitor.log", "client.log", "server_0.log", "server_1.log", "trainer_0.log", "initial_peers.txt"):
        assert (log_dir / name).is_file(), name
    # Which run got which folder is a race: tell them apart by their servers' channel.
    direct_dirs = {d for d in used_dirs if "direct tensor channel listening" in (d / "server_0.log").read_text()}
    assert len(direct_dirs) == 1, "exactly one of the runs serves a direct tensor channel"
    for d in used_dirs:
        trainer_log = (d / "trainer_0.log").read_text()
        assert "unusable" not in trainer_log  # no fallback to p2p in either run
        assert (trainer_log.count("go over the direct channel") == 2) == (d in direct_dirs), d
    assert "/ip4/127.0.0.1/tcp/" in (log_dir / "initial_peers.txt").read_text()


def test_frozen_then_killed_server_is_reported_not_hung(tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    launcher = start_local(log_dir, "--model-pipeline.forward-timeout", "3", "--model-pipeline.backward-timeout", "3")
    try:
        wait_for(lambda: steps_so_far(log_dir) >= 5, 150, "the swarm to train 5 steps")
        tail_server = role_process(launcher, "server", "tail")
        trainer_log = log_dir / "trainer_0.log"

        tail_server.send_signal(signal.SIGSTOP)  # frozen: its daemon accepts the call, nobody answers
        frozen_at = time.monotonic()
        line = wait_for(
            lambda: next((ln for ln in trainer_log.read_text().splitlines() if "timed out after 3.0 s" in ln), None),
            20,
            "the trainer to report the timeout",
        )
        assert "tail.0.0.0" in line
        assert time.monotonic() - frozen_at < 15

        tail_guardian = tail_server.parent()
        tail_server.kill()  # SIGKILL, even while stopped
        wait_for(
            lambda: "stopping trainer_0: its pipeline is gone" in (log_dir / "client.log").read_text(),
            30,
            "the client to stop the trainer of the vanished pipeline",
        )
        wait_for(lambda: "trainer stopped at step" in trainer_log.read_text(), 20, "the trainer to stop cleanly")
        wait_for(
            lambda: not tail_guardian.is_running() or tail_guardian.status() == psutil.STATUS_ZOMBIE,
            30,
            "the dead server's guardian to clean up and exit",
        )
        time.sleep(1.5)  # the launcher looks at its roles twice a second
        assert launcher.poll() is None  # a dead server does not end a local run
    finally:
        launcher.send_signal(signal.SIGINT)  # what Ctrl+C in its terminal sends
        output = launcher.communicate(timeout=60)[0]
    assert launcher.returncode == 0, output
    assert "server_1 exited" in output, output


def test_sigkill_of_the_launcher_leaves_nothing_behind(tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    launcher = start_local(log_dir)
    try:
        wait_for(lambda: steps_so_far(log_dir) >= 1, 150, "the first training step")
        tree = psutil.Process(launcher.pid).children(recursive=True)
        names = {proc.name() for proc in tree}
        assert "p2pd" in names
        assert sum("trainer" in proc.cmdline() for proc in tree if proc.is_running()) >= 1
    finally:
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.communicate(timeout=10)
    _, alive = psutil.wait_procs(tree, timeout=45)
    assert not alive, [f"{p.pid} {p.name()}" for p in alive]


def test_coordinator_and_servers_on_separate_launchers(tmp_path: Path) -> None:
    """The many-machine path on one host: `distqat coordinator` prints where to join, `distqat servers`
    joins with --initial-peers and --public-ip, each server takes the stage that needs it most."""
    coordinator = start_distqat(
        "coordinator",
        "--config",
        str(TINY),
        "--log-dir",
        str(tmp_path / "coord"),
        "--max-steps",
        "20",
        "--public-ip",
        "127.0.0.1",
    )
    servers = None
    try:
        peers_file = tmp_path / "coord" / "initial_peers.txt"
        peers = str(wait_for(lambda: peers_file.exists() and peers_file.read_text().strip(), 90, "initial_peers.txt"))
        assert peers.startswith("/ip4/127.0.0.1/tcp/")
        servers = start_distqat(
            "servers",
            "--config",
            str(TINY),
            "--num-servers",
            "2",
            "--log-dir",
            str(tmp_path / "servers"),
            "--initial-peers",
            peers,
            "--public-ip",
            "127.0.0.1",
        )
        output = coordinator.communicate(timeout=180)[0]
        assert coordinator.returncode == 0, output
        assert "distqat servers --initial-peers" in output
    finally:
        if coordinator.poll() is None:
            coordinator.kill()
            coordinator.communicate()
        if servers is not None:
            servers.send_signal(signal.SIGTERM)
            server_output = servers.communicate(timeout=60)[0]
    assert servers.returncode == 0, server_output
    assert "server_0 serves head.0.0.0" in server_output
    assert "server_1 serves tail.0.0.0" in server_output
    summary = json.loads((tmp_path / "coord" / "summary.json").read_text())
    assert summary["steps"] >= 20
    assert summary["last_loss"] < summary["first_loss"]
