"""Observability against a real local swarm: `distqat status --json` lists every server and trainer, the run's
log dir ends with metrics.jsonl (fleet rows), valid PNG plots and a W&B offline run; an unreachable swarm is one
error line within the timeout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"

needs_fashion_mnist = pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="needs Debian's dataset-fashion-mnist"
)


def distqat(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "distqat", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def last_row(log_dir: Path) -> dict:
    try:
        lines = (log_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return {}
    return json.loads(lines[-1]) if lines else {}


@needs_fashion_mnist
def test_status_of_a_live_swarm_then_metrics_plots_and_wandb_offline(tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    wandb_env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "NETRC": str(tmp_path / "no-netrc")}
    wandb_env.pop("WANDB_API_KEY", None)
    args = ["--log-dir", str(log_dir), "--num-servers", "3", "--wandb-project", "distqat-test"]
    launcher = subprocess.Popen(
        [sys.executable, "-m", "distqat", "local", "--config", str(TINY), *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **wandb_env},
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not (last_row(log_dir).get("steps", 0) >= 5):
            assert launcher.poll() is None, launcher.communicate()[0]
            time.sleep(0.5)
        assert last_row(log_dir).get("steps", 0) >= 5, "the swarm did not train 5 steps in 180 s"
        peers = (log_dir / "initial_peers.txt").read_text().strip()
        result = distqat("status", "--config", str(TINY), "--initial-peers", peers, "--json", "--timeout", "30")
        assert result.returncode == 0, result.stderr
        fleet = json.loads(result.stdout)
        uids = sorted(replica["uid"] for stage in fleet["stages"] for replica in stage["replicas"])
        assert uids == ["head.0.0.0", "head.0.1.0", "tail.0.0.0"]
        assert [t["trainer_id"] for t in fleet["trainers"]] == ["trainer_0"]
        assert fleet["trainers"][0]["step"] >= 5 and fleet["trainers"][0]["batch_size"] == 64
        assert fleet["pipelines"] == 1
        served = [r for stage in fleet["stages"] for r in stage["replicas"] if r["steps"] > 0]
        assert served and all(r["forward_ms"] > 0 and r["backward_ms"] > 0 for r in served)
    finally:
        launcher.send_signal(signal.SIGINT)
        output = launcher.communicate(timeout=90)[0]
    assert launcher.returncode == 0, output

    rows = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["fleet"]["stages"][0]["name"] == "head"
    assert max(row["steps"] for row in rows) >= 5
    for name in ("loss_vs_step.png", "loss_vs_time.png", "samples_per_s.png", "replicas.png"):
        with Image.open(log_dir / "plots" / name) as image:
            image.verify()
    assert f"plots in {log_dir / 'plots'}" in output
    assert "setup: servers announced" in output  # not a terminal: plain lines, no live redraws
    assert "\x1b[" not in output
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    assert list(run_dir.glob("run-*.wandb"))
    assert "[monitor " in (log_dir / "monitor.log").read_text()  # log lines name the role


def test_status_of_an_unreachable_swarm_is_one_line(tmp_path: Path) -> None:
    dead = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWNyMzicdJHmzczLk2UNr5reyz6PGypReiUT2vPMAmMnKv"
    result = distqat("status", "--config", str(TINY), "--initial-peers", dead, "--timeout", "10", timeout=180)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("distqat: error:")]
    assert len(errors) == 1, result.stderr
    assert "cannot read the swarm 'tiny'" in errors[0] and dead in errors[0]
    assert result.stdout == ""


def test_plot_command_without_metrics_is_one_line(tmp_path: Path) -> None:
    result = distqat("plot", "--config", str(TINY), "--log-dir", str(tmp_path))
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("distqat: error:")]
    assert errors == [f"distqat: error: {tmp_path / 'metrics.jsonl'}: no such file (is --log-dir the run's log dir?)"]
