"""The launchers' live view: follows the monitor's `metrics.jsonl` and shows the swarm while it runs.

On a terminal (or `monitor.live_view: rich`) it redraws one rich view in place: a set-up bar until the
first training step (servers announced out of those started, trainers), then the stage and trainer
tables with alerts. Anywhere else (CI, pipes, `monitor.live_view: plain`) it prints plain lines: one per
new step total, one per set-up change, and one per alert when it appears or clears.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from distqat.observability.fleet import alert_changes
from distqat.observability.render import fleet_view, stages_table

Mode = Literal["auto", "rich", "plain"]


class MetricsTail:
    """New complete rows of a JSON-lines file that another process appends to."""

    def __init__(self, path: Path):
        self._path, self._offset = path, 0

    def read(self) -> list[dict[str, Any]]:
        try:
            with self._path.open() as handle:
                handle.seek(self._offset)
                chunk = handle.read()
        except FileNotFoundError:
            return []
        complete, _, _ = chunk.rpartition("\n")
        self._offset += len(complete.encode()) + (1 if complete else 0)
        rows = []
        for line in filter(None, complete.splitlines()):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn line from a killed writer: the next row says the same, newer
        return rows


def setup_state(row: dict[str, Any], expected_servers: int | None) -> str:
    servers = row.get("servers", 0)
    expected = f"/{expected_servers}" if expected_servers else ""
    trainers = len(row.get("trainers", {}))
    return f"servers announced {servers}{expected}, pipelines {row.get('pipelines', 0)}, trainers {trainers}"


def plain_line(row: dict[str, Any]) -> str:
    loss = f"{row['loss']:.4f}" if row.get("loss") is not None else "-"
    return (
        f"step {row['steps']:>5} | loss {loss} | {row['samples_per_s']:7.1f} samples/s | "
        f"pipelines {row['pipelines']} | servers {row['servers']}"
    )


class LiveView:
    """Call `poll()` often (the launcher does, twice a second); use as a context manager."""

    def __init__(
        self,
        metrics_path: Path,
        console: Console,
        mode: Mode = "auto",
        expected_servers: int | None = None,
        started_at: float | None = None,
    ):
        self._tail = MetricsTail(metrics_path)
        self._console = console
        self.rich = mode == "rich" or (mode == "auto" and console.is_terminal)
        self._expected_servers = expected_servers
        self._started_at = started_at or time.time()
        self._live: Live | None = None
        self._last_steps, self._last_setup = -1, ""
        self._alerts: dict[str, str] = {}
        self.last_row: dict[str, Any] | None = None

    def __enter__(self) -> LiveView:
        if self.rich:
            self._live = Live(self._setup_view(None), console=self._console, auto_refresh=False, redirect_stderr=False)
            self._live.start(refresh=True)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None):
        self.poll()
        if self._live is not None:
            self._live.stop()  # the last view stays on screen above the summary

    def poll(self) -> None:
        rows = self._tail.read()
        if self.rich:
            if rows:
                self.last_row = rows[-1]
            if self._live is not None:
                self._live.update(self._view(self.last_row), refresh=True)
            return
        for row in rows:
            self.last_row = row
            self._print_plain(row)

    # --- rich ---

    def _elapsed(self) -> float:
        return time.time() - self._started_at

    def _setup_view(self, row: dict[str, Any] | None) -> RenderableType:
        grid = Table.grid(padding=(0, 1))
        servers = row.get("servers", 0) if row else 0
        total = self._expected_servers or max(servers, 1)
        state = setup_state(row, self._expected_servers) if row else "starting the monitor's DHT"
        grid.add_row(
            Text("setup", style="bold"),
            ProgressBar(total=total, completed=min(servers, total), width=30),
            Text(f"{state} (waiting for the first training step, {self._elapsed():.0f} s)"),
        )
        return grid

    def _view(self, row: dict[str, Any] | None) -> RenderableType:
        if row is None or not row.get("steps"):
            if row is not None and row.get("fleet"):
                # Servers appear one by one; "no live replica" is expected here, not an alert yet.
                return Group(self._setup_view(row), stages_table(row["fleet"]))
            return self._setup_view(row)
        if row.get("fleet"):
            return fleet_view(row["fleet"], row["steps"], self._elapsed())
        return Text(plain_line(row))  # a monitor that writes no fleet section

    # --- plain ---

    def _print_plain(self, row: dict[str, Any]) -> None:
        if not row.get("steps"):
            state = setup_state(row, self._expected_servers)
            if state != self._last_setup:
                self._console.print(f"setup: {state} ({self._elapsed():.0f} s)")
                self._last_setup = state
        elif row["steps"] != self._last_steps:
            self._last_steps = row["steps"]
            self._console.print(plain_line(row))
        fleet = row.get("fleet")
        if not fleet or not row.get("steps"):
            return  # during set-up stages without a replica are expected, not news
        appeared, cleared, self._alerts = alert_changes(self._alerts, fleet)
        for alert in appeared:
            self._console.print(f"alert: {alert}", style="yellow", markup=False)
        for alert in cleared:
            self._console.print(f"cleared: {alert}", markup=False)
