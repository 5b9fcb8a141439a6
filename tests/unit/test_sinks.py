"""W&B is optional: off without a project or a login, offline mode works with no login."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from distqat.distributed.sinks import JsonlSink, WandbSink


def test_no_project_means_no_wandb() -> None:
    assert WandbSink.open(None, None, "run", {}) is None


def test_no_login_turns_wandb_off_with_one_line(monkeypatch, tmp_path: Path, caplog) -> None:
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with caplog.at_level(logging.INFO):
        assert WandbSink.open("distqat", None, "run", {}) is None
    assert "W&B off: no login" in caplog.text


def test_offline_mode_logs_locally_without_login(monkeypatch, tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    sink = WandbSink.open("distqat-test", None, "unit", {"lr": 0.1})
    assert sink is not None
    sink.log({"steps": 1, "loss": 2.0})
    sink.close()
    assert list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))


def test_jsonl_sink_appends_rows(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path / "m" / "metrics.jsonl")
    sink.log({"steps": 1})
    sink.log({"steps": 2})
    sink.close()
    rows = [json.loads(line) for line in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"steps": 1}, {"steps": 2}]
