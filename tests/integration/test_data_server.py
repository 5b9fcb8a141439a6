"""The data server as the client runs it: real processes, real shared memory, real sockets on 127.0.0.1.

Samples carry their index in their pixels, so a test can tell exactly which samples each consumer got.
"""

from __future__ import annotations

import gzip
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from distqat.data.consumer import ADDRESS_ENV, SECRET_ENV, SharedBatches
from distqat.data.shm import RECORD_FILE
from distqat.errors import DataError

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
SAMPLES, BATCH = 96, 8

# A consumer process: takes batches until the second epoch starts; prints the sample ids of each batch.
CONSUMER = """
import json, os, sys
from distqat.data.consumer import SharedBatches
batches = SharedBatches.from_env(sys.argv[1], timeout=60)
got = []
while True:
    inputs, labels = batches.next()
    epoch, number = batches.last
    if epoch > 0:
        break
    pixels = ((inputs[:, 0, 0, :2] * 0.3530 + 0.2860) * 255).round().long()
    got.append([int(lo + 256 * hi) for lo, hi in pixels.tolist()])
    if os.environ.get("HOLD"):
        print(json.dumps(got), flush=True)
        sys.stdin.read()  # hold the slot until killed
batches.close()
print(json.dumps(got), flush=True)
"""


def write_numbered_idx(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    images = np.zeros((SAMPLES, 28, 28), dtype=np.uint8)
    images[:, 0, 0] = np.arange(SAMPLES) % 256
    images[:, 0, 1] = np.arange(SAMPLES) // 256
    with gzip.open(folder / "train-images-idx3-ubyte.gz", "wb") as handle:
        handle.write(b"\0" * 16 + images.tobytes())
    with gzip.open(folder / "train-labels-idx1-ubyte.gz", "wb") as handle:
        handle.write(b"\0" * 8 + (np.arange(SAMPLES) % 10).astype(np.uint8).tobytes())


class ServerRun:
    """One `distqat data-server` process, as the client starts it (secret in the environment)."""

    def __init__(self, tmp_path: Path, log_dir: Path, pool_size: int = 4):
        write_numbered_idx(tmp_path / "idx")
        self.log_dir, self.secret = log_dir, secrets.token_hex(32)
        ready = log_dir / "address"
        ready.unlink(missing_ok=True)
        overrides = ["--data.dataset-name", str(tmp_path / "idx"), "--diloco.batch-size-per-step", str(BATCH)]
        overrides += ["--data.eval-every", "0", "--data-server.pool-size", str(pool_size)]
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "distqat",
                "data-server",
                "--config",
                str(TINY),
                "--log-dir",
                str(log_dir),
                "--ready-file",
                str(ready),
                *overrides,
            ],
            env={**os.environ, SECRET_ENV: self.secret},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert self.process.poll() is None, self.process.communicate()[0]
            assert time.monotonic() < deadline, "the data server did not start"
            time.sleep(0.1)
        self.address = ready.read_text().strip()
        self.segment = Path(json.loads((log_dir / RECORD_FILE).read_text())["segments"][0])

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, ADDRESS_ENV: self.address, SECRET_ENV: self.secret}

    def consumer(self, name: str, **env: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-c", CONSUMER, name],
            env={**self.env, **env},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> str:
        self.process.send_signal(sig)
        return self.process.communicate(timeout=60)[0]


@pytest.mark.parametrize("consumers", [1, 2, 4])
def test_every_sample_once_per_epoch_across_consumers(tmp_path: Path, consumers: int) -> None:
    server = ServerRun(tmp_path, tmp_path / "logs")
    try:
        assert server.segment.exists()
        runs = [server.consumer(f"trainer_{i}") for i in range(consumers)]
        outputs = [run.communicate(timeout=120)[0] for run in runs]
        assert all(run.returncode == 0 for run in runs), outputs
    finally:
        output = server.stop()
    batches = [batch for out in outputs for batch in json.loads(out)]
    assert len(batches) == SAMPLES // BATCH
    ids = [sample for batch in batches for sample in batch]
    assert sorted(ids) == list(range(SAMPLES))  # every sample exactly once: no batch went to two trainers
    assert ids != list(range(SAMPLES))  # shuffled
    assert server.process.returncode == 0, output
    assert not server.segment.exists()
    assert not (server.log_dir / RECORD_FILE).exists()


def test_wrong_secret_and_dead_consumer(tmp_path: Path) -> None:
    """A wrong secret is refused; a consumer killed while holding the only slot does not starve the others."""
    server = ServerRun(tmp_path, tmp_path / "logs", pool_size=1)
    try:
        host, port = server.address.rsplit(":", 1)
        with pytest.raises(DataError, match="cannot connect"):
            SharedBatches((host, int(port)), secrets.token_bytes(32), "intruder", timeout=20)
        holder = server.consumer("holder", HOLD="1")
        assert json.loads(holder.stdout.readline())  # it took a batch and holds its slot
        holder.kill()
        holder.communicate(timeout=10)
        other = server.consumer("other")
        output = other.communicate(timeout=120)[0]
        assert other.returncode == 0
        assert len(json.loads(output)) >= SAMPLES // BATCH - 1
    finally:
        server.stop()
    assert not server.segment.exists()


def test_next_run_removes_what_a_killed_run_left(tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    killed = ServerRun(tmp_path, log_dir)
    killed.stop(signal.SIGKILL)
    assert killed.segment.exists()  # nothing could clean up after SIGKILL...
    fresh = ServerRun(tmp_path, log_dir)
    try:
        assert not killed.segment.exists()  # ...until the next run in that log dir read the record
        assert fresh.segment.exists() and fresh.segment != killed.segment
    finally:
        output = fresh.stop()
    assert "a killed run left" in output, output
    assert not fresh.segment.exists()


CLIENT = """
import sys, threading, time
from pathlib import Path
from distqat.config import dump_config, load_config
from distqat.distributed.data_server import start_data_server
from distqat.launch import ProcessSupervisor
log_dir = Path(sys.argv[1])
config = load_config(sys.argv[2], sys.argv[3:])
dump_config(config, log_dir / "config.yaml")
env = start_data_server(ProcessSupervisor(), log_dir / "config.yaml", log_dir)
print(env["DISTQAT_DATA_SERVER"], flush=True)
time.sleep(600)
"""


def test_sigkill_of_the_client_leaves_no_shared_memory(tmp_path: Path) -> None:
    write_numbered_idx(tmp_path / "idx")
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    client = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CLIENT,
            str(log_dir),
            str(TINY),
            "--data.dataset-name",
            str(tmp_path / "idx"),
            "--diloco.batch-size-per-step",
            str(BATCH),
            "--data.eval-every",
            "0",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert client.stdout.readline().startswith("127.0.0.1:")
        segment = Path(json.loads((log_dir / RECORD_FILE).read_text())["segments"][0])
        tree = psutil.Process(client.pid).children(recursive=True)
        assert segment.exists()
    finally:
        client.kill()
        client.communicate(timeout=10)
    _, alive = psutil.wait_procs(tree, timeout=45)  # the guardian stops the data server, which cleans up
    assert not alive
    assert not segment.exists()
    assert not (log_dir / RECORD_FILE).exists()
