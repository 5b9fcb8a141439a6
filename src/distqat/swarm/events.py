"""Timestamped events of a role, as JSON lines, for measuring failover (`distqat failover-demo`).

Off unless `DISTQAT_EVENTS_DIR` is set (the environment reaches every role the launchers start); then
each role appends to `<dir>/<role>.events.jsonl`: trainers their completed steps and the replicas they
stop routing to, servers when they start serving and their first trained micro-batch. Wall-clock times,
so events of different processes on one machine can be ordered.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

EVENTS_DIR_ENV = "DISTQAT_EVENTS_DIR"


class EventLog:
    def __init__(self, role: str, directory: str | os.PathLike | None = None):
        directory = directory if directory is not None else os.environ.get(EVENTS_DIR_ENV)
        self.path = Path(directory) / f"{role}.events.jsonl" if directory else None
        self._lock = threading.Lock()

    def emit(self, event: str, **fields: Any) -> None:
        if self.path is None:
            return
        line = json.dumps({"t": time.time(), "event": event, "pid": os.getpid(), **fields})
        with self._lock, self.path.open("a") as handle:  # one line per write: readers never see half a line
            handle.write(line + "\n")


def read_events(directory: Path) -> list[dict[str, Any]]:
    """Every role's events in `directory`, each with its `role`, in time order; torn last lines skipped."""
    events = []
    for path in sorted(Path(directory).glob("*.events.jsonl")):
        role = path.name.removesuffix(".events.jsonl")
        for line in path.read_text().splitlines():
            try:
                events.append({**json.loads(line), "role": role})
            except json.JSONDecodeError:
                continue
    return sorted(events, key=lambda event: event["t"])
