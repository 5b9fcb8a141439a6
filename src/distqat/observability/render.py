"""Draws a fleet snapshot (see `fleet`): rich tables for a terminal, one plain line for logs and pipes."""

from __future__ import annotations

from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

STATE_STYLES = {
    "training": "green",
    "averaging": "cyan",
    "idle": "yellow",
    "waiting": "yellow",
    "stale": "red",
    "finished": "dim",
}


def _num(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def _ms(value: float) -> str:
    return f"{value:.0f}" if value else "-"


def _state(state: str) -> Text:
    return Text(state, style=STATE_STYLES.get(state, ""))


def headline(fleet: dict[str, Any], steps: int | None = None, elapsed_s: float | None = None) -> str:
    parts = []
    if steps is not None:
        parts.append(f"step {steps}")
    parts.append(f"loss {_num(fleet.get('loss'))}")
    parts.append(f"{fleet['samples_per_s']:.1f} samples/s")
    parts.append(f"pipelines {fleet['pipelines']}")
    replicas = ", ".join(f"{stage['name']} {stage['alive']}" for stage in fleet["stages"])
    parts.append(f"replicas {replicas}")
    if elapsed_s is not None:
        parts.append(f"{elapsed_s:.0f} s")
    return " | ".join(parts)


def stages_table(fleet: dict[str, Any]) -> Table:
    table = Table(title="stages", title_justify="left", expand=False)
    for column in ("stage", "replica", "peer", "device", "state", "samples/s", "fwd ms", "bwd ms", "queue", "round"):
        table.add_column(
            column, justify="right" if column in {"samples/s", "fwd ms", "bwd ms", "queue", "round"} else "left"
        )
    for stage in fleet["stages"]:
        if not stage["replicas"]:
            table.add_row(stage["name"], Text("no live replica", style="bold red"), *[""] * 8)
            continue
        for position, replica in enumerate(stage["replicas"]):
            table.add_row(
                stage["name"] if position == 0 else "",
                replica["uid"],
                replica["peer"],
                replica["device"],
                _state(replica["state"]),
                f"{replica['samples_per_s']:.1f}",
                _ms(replica["forward_ms"]),
                _ms(replica["backward_ms"]),
                str(replica["queue"]),
                str(replica["diloco_round"]),
            )
    return table


def trainers_table(fleet: dict[str, Any]) -> Table:
    table = Table(title="trainers", title_justify="left", expand=False)
    for column in (
        "trainer",
        "peer",
        "state",
        "step",
        "loss",
        "eval loss",
        "eval acc",
        "samples/s",
        "step ms",
        "failed",
    ):
        table.add_column(column, justify="left" if column in {"trainer", "peer", "state"} else "right")
    if not fleet["trainers"]:
        table.add_row(Text("no trainer yet", style="yellow"), *[""] * 9)
    for trainer in fleet["trainers"]:
        table.add_row(
            trainer["trainer_id"],
            trainer["peer"],
            _state(trainer["state"]),
            str(trainer["step"]),
            _num(trainer["loss_avg"]),
            _num(trainer["eval_loss"]),
            _num(trainer["eval_accuracy"], ".3f"),
            f"{trainer['samples_per_s']:.1f}",
            _ms(trainer["step_ms"]),
            str(trainer["failures"]),
        )
    return table


def alerts_text(fleet: dict[str, Any]) -> Text:
    text = Text()
    if fleet.get("bottleneck"):
        neck = fleet["bottleneck"]
        text.append(f"bottleneck: stage '{neck['stage']}' ({neck['ms_per_call']:.0f} ms per call per replica)\n")
    for alert in fleet["alerts"]:
        text.append(f"! {alert}\n", style="bold red")
    if not fleet["alerts"]:
        text.append("no alerts\n", style="green")
    text.rstrip()
    return text


def fleet_view(fleet: dict[str, Any], steps: int | None = None, elapsed_s: float | None = None) -> RenderableType:
    return Group(
        Text(headline(fleet, steps, elapsed_s), style="bold"),
        stages_table(fleet),
        trainers_table(fleet),
        alerts_text(fleet),
    )
