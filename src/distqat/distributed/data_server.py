"""Data server role (`distqat data-server`, started by the client) and the client's handle to start it.

The client makes a random secret per run, starts the data server under a guardian with the secret in its
environment (never on the command line), waits for the address it bound (127.0.0.1, a port the OS
picked), and gives both to its trainers in their environment.
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
import threading
import time
from pathlib import Path

from distqat.config import Config
from distqat.data import load_dataset
from distqat.data.consumer import ADDRESS_ENV, SECRET_ENV
from distqat.data.server import DataServer
from distqat.errors import DataError
from distqat.launch import ProcessSupervisor

logger = logging.getLogger(__name__)

ADDRESS_FILE = "data_server.address"
START_TIMEOUT_S = 600.0  # first use of a dataset may synthesise or tokenise it


def run_data_server(config: Config, stop: threading.Event, log_dir: Path, ready_file: Path | None = None) -> None:
    secret = os.environ.get(SECRET_ENV)
    if not secret:
        raise DataError(f"{SECRET_ENV} is not set (the client starts the data server with the run's secret)")
    started = time.monotonic()
    dataset = load_dataset(config.data)
    log_dir.mkdir(parents=True, exist_ok=True)
    server = DataServer(
        dataset,
        config.data,
        config.data_server,
        config.diloco.batch_size_per_step,
        config.seed,
        log_dir,
        bytes.fromhex(secret),
    )
    try:
        server.wait_ready(config.data_server.timeout)
    except BaseException:
        server.close()
        raise
    host, port = server.address
    logger.info(
        "data server: %s, %d samples, %d slots of %.2f MiB in %s, listening on %s:%d (ready in %.1f s)",
        config.data.dataset_name,
        len(dataset),
        server.layout.pool_size,
        server.layout.slot_bytes / 2**20,
        server.slots.path,
        host,
        port,
        time.monotonic() - started,
    )
    if ready_file is not None:
        partial = ready_file.with_name(ready_file.name + ".partial")
        partial.write_text(f"{host}:{port}")
        partial.replace(ready_file)
    server.serve(stop)


def start_data_server(
    supervisor: ProcessSupervisor, config_path: Path, log_dir: Path, stop: threading.Event | None = None
) -> dict[str, str]:
    """Start the data server and wait until it serves; returns the environment its trainers need."""
    secret = secrets.token_hex(32)
    ready_file = log_dir / ADDRESS_FILE
    ready_file.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "distqat", "data-server", "--config", str(config_path)]
    argv += ["--log-dir", str(log_dir), "--ready-file", str(ready_file)]
    process = supervisor.start(
        "data_server", argv, log_dir / "data_server.log", env={SECRET_ENV: secret, "DISTQAT_NUM_THREADS": "1"}
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready_file.exists():
        code = process.poll()
        if code is not None:
            raise DataError(f"the data server exited with code {code} (see {process.log_path})")
        if time.monotonic() > deadline:
            raise DataError(f"the data server did not start within {START_TIMEOUT_S:.0f} s (see {process.log_path})")
        if stop is not None and stop.is_set():
            raise KeyboardInterrupt
        time.sleep(0.1)
    return {ADDRESS_ENV: ready_file.read_text().strip(), SECRET_ENV: secret}
