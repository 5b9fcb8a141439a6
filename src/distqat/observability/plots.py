"""After the run: PNG curves from the monitor's `metrics.jsonl` (`<log_dir>/plots/`, or `distqat plot`).

  loss_vs_step.png     each trainer's training loss (mean of its last 10 steps) and held-out loss against its step
  loss_vs_time.png     the same against wall time since the monitor's first row
  samples_per_s.png    the fleet's and each trainer's samples/s against wall time
  replicas.png         live replicas of every stage against wall time

Failures are marked on every plot: a red dashed line where a trainer's failed-step count grew (on the
step plot, at that trainer's step), a dotted one where a stage lost a replica, a grey one where a trainer
restarted. A restarted trainer counts its steps from 0 again; the step plot goes on from where its earlier
life stopped, so a trainer slot is one curve. Drawn with matplotlib's Agg backend, so no display is needed.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PLOTS_DIR = "plots"
FILES = ("loss_vs_step.png", "loss_vs_time.png", "samples_per_s.png", "replicas.png")


@dataclass
class Series:
    """What the plots draw, extracted from the rows (kept apart from drawing so it can be tested as data)."""

    train: dict[str, list[tuple[float, int, float]]] = field(
        default_factory=lambda: defaultdict(list)
    )  # (t, step, loss)
    eval: dict[str, list[tuple[float, int, float]]] = field(default_factory=lambda: defaultdict(list))
    rate: dict[str, list[tuple[float, float]]] = field(default_factory=lambda: defaultdict(list))  # "fleet" + trainers
    replicas: dict[str, list[tuple[float, int]]] = field(default_factory=lambda: defaultdict(list))
    trainer_failures: list[tuple[float, str, int]] = field(default_factory=list)  # (t, trainer, its step)
    replica_losses: list[tuple[float, str]] = field(default_factory=list)  # (t, stage)
    restarts: list[tuple[float, str, int]] = field(default_factory=list)  # (t, trainer, its step over all lives)


def read_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line of a killed monitor
    return rows


def extract(rows: list[dict[str, Any]]) -> Series:
    series = Series()
    if not rows:
        return series
    start = rows[0]["time"]
    last_step: dict[str, int] = {}
    offset: dict[str, int] = {}  # steps of a trainer's earlier lives
    last_eval: dict[str, int] = {}
    last_failures: dict[str, int] = {}
    last_replicas: dict[str, int] = {}
    for row in rows:
        t = row["time"] - start
        series.rate["fleet"].append((t, row.get("samples_per_s", 0.0)))
        for trainer_id, trainer in sorted(row.get("trainers", {}).items()):
            step = trainer["step"]
            if step < last_step.get(trainer_id, 0):  # restarted: counts from 0 again
                offset[trainer_id] = offset.get(trainer_id, 0) + last_step[trainer_id]
                series.restarts.append((t, trainer_id, offset[trainer_id]))
                last_failures[trainer_id] = 0
                last_eval.pop(trainer_id, None)
            base = offset.get(trainer_id, 0)
            if step != last_step.get(trainer_id):
                last_step[trainer_id] = step
                if trainer.get("loss") is not None:
                    series.train[trainer_id].append((t, base + step, trainer["loss"]))
                series.rate[trainer_id].append((t, trainer.get("samples_per_s", 0.0)))
            eval_step = trainer.get("eval_step") or 0
            if eval_step and eval_step != last_eval.get(trainer_id) and trainer.get("eval_loss") is not None:
                last_eval[trainer_id] = eval_step
                series.eval[trainer_id].append((t, base + eval_step, trainer["eval_loss"]))
            failures = trainer.get("failures", 0)
            if failures > last_failures.get(trainer_id, 0):
                series.trainer_failures.append((t, trainer_id, base + step))
            last_failures[trainer_id] = failures
        for stage, alive in row.get("replicas", {}).items():
            series.replicas[stage].append((t, alive))
            if alive < last_replicas.get(stage, 0):
                series.replica_losses.append((t, stage))
            last_replicas[stage] = alive
    return series


FAILED = {"color": "red", "linestyle": "--", "linewidth": 0.8}
LOST = {"color": "red", "linestyle": ":", "linewidth": 1.2}
RESTARTED = {"color": "grey", "linestyle": "-.", "linewidth": 1.0}


def _vlines(axes: Any, xs: list[float], label: str, style: dict[str, Any]) -> None:
    for index, x in enumerate(xs):
        axes.axvline(x, label=label if index == 0 else None, **style)


def _mark_time_failures(axes: Any, series: Series) -> None:
    _vlines(axes, [t for t, _trainer, _step in series.trainer_failures], "failed step", FAILED)
    _vlines(axes, [t for t, _stage in series.replica_losses], "replica lost", LOST)
    _vlines(axes, [t for t, _trainer, _step in series.restarts], "trainer restarted", RESTARTED)


def _save(figure: Any, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def plot_run(log_dir: Path, metrics_file: str = "metrics.jsonl") -> list[Path]:
    """Draw every plot of the run in `log_dir`; returns the files written (none when there is nothing to draw)."""
    metrics_path = log_dir / metrics_file
    if not metrics_path.is_file():
        logger.info("no plots: %s does not exist", metrics_path)
        return []
    series = extract(read_rows(metrics_path))
    if not series.rate:
        logger.info("no plots: %s holds no rows", metrics_path)
        return []
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    out_dir = log_dir / PLOTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    figure, axes = plt.subplots(figsize=(8, 4.5))
    for trainer_id, points in sorted(series.train.items()):
        axes.plot([p[1] for p in points], [p[2] for p in points], label=f"{trainer_id} train")
    for trainer_id, points in sorted(series.eval.items()):
        axes.plot([p[1] for p in points], [p[2] for p in points], "o--", label=f"{trainer_id} eval")
    _vlines(axes, [step for _t, _trainer, step in series.trainer_failures], "failed step", FAILED)
    _vlines(axes, [step for _t, _trainer, step in series.restarts], "trainer restarted", RESTARTED)
    axes.set(xlabel="trainer step (over restarts)", ylabel="loss", title="loss against step")
    axes.legend(loc="upper right", fontsize="small")
    written.append(_save(figure, out_dir / "loss_vs_step.png"))
    plt.close(figure)

    figure, axes = plt.subplots(figsize=(8, 4.5))
    for trainer_id, points in sorted(series.train.items()):
        axes.plot([p[0] for p in points], [p[2] for p in points], label=f"{trainer_id} train")
    for trainer_id, points in sorted(series.eval.items()):
        axes.plot([p[0] for p in points], [p[2] for p in points], "o--", label=f"{trainer_id} eval")
    _mark_time_failures(axes, series)
    axes.set(xlabel="wall time (s)", ylabel="loss", title="loss against wall time")
    axes.legend(loc="upper right", fontsize="small")
    written.append(_save(figure, out_dir / "loss_vs_time.png"))
    plt.close(figure)

    figure, axes = plt.subplots(figsize=(8, 4.5))
    for name, points in sorted(series.rate.items(), key=lambda item: (item[0] != "fleet", item[0])):
        style = {"linewidth": 2.0} if name == "fleet" else {"linewidth": 1.0, "alpha": 0.8}
        axes.plot([p[0] for p in points], [p[1] for p in points], label=name, **style)
    _mark_time_failures(axes, series)
    axes.set(xlabel="wall time (s)", ylabel="samples/s", title="throughput")
    axes.legend(loc="lower right", fontsize="small")
    written.append(_save(figure, out_dir / "samples_per_s.png"))
    plt.close(figure)

    figure, axes = plt.subplots(figsize=(8, 4.5))
    styles = ("-", "--", ":", "-.")
    for index, (stage, points) in enumerate(series.replicas.items()):  # in pipeline order
        # Stages often have the same count: a thinner, dashed line on top keeps each one visible.
        width = max(1.0, 4.0 - 1.2 * index)
        axes.step(
            [p[0] for p in points], [p[1] for p in points], styles[index % 4], where="post", label=stage, lw=width
        )
    _mark_time_failures(axes, series)
    axes.set(xlabel="wall time (s)", ylabel="live replicas", title="live replicas per stage")
    axes.yaxis.get_major_locator().set_params(integer=True)
    axes.legend(loc="lower right", fontsize="small")
    written.append(_save(figure, out_dir / "replicas.png"))
    plt.close(figure)
    return written
