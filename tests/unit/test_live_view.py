"""The live view: plain lines when not on a terminal, a rich view on one; both from the monitor's rows."""

from __future__ import annotations

import io
import json
from pathlib import Path

from rich.console import Console
from swarm_records import NOW, STAGES, replica, trainer

from distqat.distributed.monitor import SwarmView
from distqat.observability.live import LiveView, MetricsTail
from distqat.observability.render import fleet_view


def rows() -> list[dict]:
    view = SwarmView()
    out = []
    view.update([], {"head": [], "body": [], "tail": []}, STAGES)
    out.append(view.row(NOW))  # set-up: nothing announced yet
    full = {stage: [replica(stage, 0, 30.0)] for stage in STAGES}
    view.update([], full, STAGES)
    out.append(view.row(NOW + 1))
    view.update([trainer("trainer_0", 5, 30.0)], full, STAGES)
    out.append(view.row(NOW + 2))
    view.update([trainer("trainer_0", 9, 30.0)], {**full, "tail": []}, STAGES)  # the tail server died
    out.append(view.row(NOW + 3))
    return out


def write(path: Path, items: list[dict], torn: str = "") -> None:
    with path.open("a") as handle:
        for item in items:
            handle.write(json.dumps(item) + "\n")
        handle.write(torn)


def plain_console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=False, width=200, highlight=False), buffer


def test_tail_reads_only_complete_new_lines(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    tail = MetricsTail(path)
    assert tail.read() == []  # no file yet
    write(path, [{"steps": 1}], torn='{"steps": 2')
    assert tail.read() == [{"steps": 1}]
    with path.open("a") as handle:
        handle.write("}\n")
    assert tail.read() == [{"steps": 2}]


def test_not_a_terminal_gives_plain_lines(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    console, buffer = plain_console()
    with LiveView(path, console, "auto", expected_servers=3, started_at=NOW) as live:
        assert not live.rich
        write(path, rows())
        live.poll()
    lines = buffer.getvalue().splitlines()
    assert lines[0].startswith("setup: servers announced 0/3, pipelines 0, trainers 0")
    assert lines[1].startswith("setup: servers announced 3/3, pipelines 1, trainers 0")
    assert lines[2].startswith("step     5 | loss 1.0000")
    assert lines[3].startswith("step     9 |")
    assert lines[4] == "alert: stage 'tail' has no live replica"
    assert "\x1b[" not in buffer.getvalue()  # no terminal escapes in a pipe


def test_terminal_gives_the_rich_view(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=160, color_system=None)
    write(path, rows()[:3])
    with LiveView(path, console, "auto", expected_servers=3, started_at=NOW) as live:
        assert live.rich
        live.poll()
    text = buffer.getvalue()
    for expected in ("stages", "trainers", "head.0.0.0", "tail.0.0.0", "trainer_0", "no alerts", "step 5"):
        assert expected in text, expected


def test_status_table_names_every_replica_and_trainer() -> None:
    fleet = rows()[-1]["fleet"]
    console = Console(file=io.StringIO(), width=160, color_system=None, record=True)
    console.print(fleet_view(fleet, steps=9))
    text = console.export_text()
    assert "head.0.0.0" in text and "body.0.0.0" in text
    assert "no live replica" in text  # the tail
    assert "trainer_0" in text
    assert "! stage 'tail' has no live replica" in text
