"""Plots of a run: the series drawn come from the monitor's rows, failures are marked, the PNGs are valid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from swarm_records import NOW, STAGES, replica, trainer

from distqat.distributed.monitor import SwarmView
from distqat.observability.plots import FILES, extract, plot_run


def run_rows() -> list[dict]:
    """Two trainers for 6 polls; trainer_1 fails a step at poll 3, the tail loses a replica at poll 4."""
    view = SwarmView()
    rows = []
    for poll in range(6):
        tails = [replica("tail", 0, 30.0)] + ([replica("tail", 1, 30.0)] if poll < 4 else [])
        replicas = {"head": [replica("head", 0, 30.0)], "body": [replica("body", 0, 30.0)], "tail": tails}
        trainers = [
            trainer("trainer_0", 2 * poll, 30.0, loss_avg=2.0 - 0.2 * poll, eval_step=4 if poll >= 2 else 0,
                    eval_loss=1.5 if poll >= 2 else None),
            trainer("trainer_1", poll, 15.0, loss_avg=2.2 - 0.1 * poll, failures=1 if poll >= 3 else 0),
        ]  # fmt: skip
        view.update(trainers, replicas, STAGES)
        rows.append(view.row(NOW + 10 * poll))
    return rows


def test_series_follow_the_rows() -> None:
    series = extract(run_rows())
    assert [step for _t, step, _loss in series.train["trainer_0"]] == [0, 2, 4, 6, 8, 10]
    assert series.train["trainer_1"][-1] == (50.0, 5, pytest.approx(1.7))
    assert series.eval["trainer_0"] == [(20.0, 4, 1.5)]  # once, though every later row repeats it
    assert series.trainer_failures == [(30.0, "trainer_1", 3)]
    assert series.replica_losses == [(40.0, "tail")]
    assert [alive for _t, alive in series.replicas["tail"]] == [2, 2, 2, 2, 1, 1]
    assert list(series.replicas) == STAGES
    assert len(series.rate["fleet"]) == 6


def test_plot_run_writes_valid_pngs(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in run_rows()) + '{"torn')
    written = plot_run(tmp_path)
    assert [path.name for path in written] == list(FILES)
    for path in written:
        with Image.open(path) as image:
            image.verify()  # a complete, uncorrupted PNG
            assert image.format == "PNG"
            assert image.size[0] > 400 and image.size[1] > 300


def test_no_metrics_no_plots(tmp_path: Path) -> None:
    assert plot_run(tmp_path) == []
    (tmp_path / "metrics.jsonl").write_text("")
    assert plot_run(tmp_path) == []
    assert not (tmp_path / "plots").exists()


def test_a_restarted_trainer_is_one_curve_with_the_restart_marked() -> None:
    view = SwarmView()
    rows = []
    for poll, step in enumerate((4, 6, 1, 3)):  # restarted between the 2nd and 3rd look
        view.update([trainer("trainer_0", step, 30.0, updated_at=NOW + poll)], {}, STAGES)
        rows.append(view.row(NOW + 10 * poll))
    series = extract(rows)
    assert [step for _t, step, _loss in series.train["trainer_0"]] == [4, 6, 7, 9]
    assert series.restarts == [(20.0, "trainer_0", 6)]
