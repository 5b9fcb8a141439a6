"""Log lines name the role and peer, DISTQAT_LOGLEVEL sets the level; the TensorBoard sink writes real events."""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import pytest

from distqat.observability import logs
from distqat.observability.tensorboard import TensorBoardSink


@pytest.fixture(autouse=True)
def restore_logging():
    root = logging.getLogger()
    handlers, level, context = root.handlers[:], root.level, dict(logs._context)
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logs._context.update(context)


def test_lines_carry_role_and_peer(monkeypatch, capsys) -> None:
    monkeypatch.delenv(logs.LEVEL_VARIABLE, raising=False)
    logs.set_log_peer("12D3KooWSomeEarlierNodeInThisProcess")  # set-up starts afresh: no peer until the DHT
    logs.setup_logging("server")
    logging.getLogger("distqat.test").info("before the DHT")
    logs.set_log_peer("12D3KooWNyMzicdJHmzczLk2UNr5reyz6PGypReiUT2vPMAmMnKv")
    logging.getLogger("distqat.test").info("after")
    logging.getLogger("distqat.test").debug("hidden at INFO")
    lines = capsys.readouterr().err.splitlines()
    assert "[server -] distqat.test: before the DHT" in lines[0]
    assert "[server PMAmMnKv] distqat.test: after" in lines[1]
    assert len(lines) == 2


def test_loglevel_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv(logs.LEVEL_VARIABLE, "debug")
    assert logs.log_level() == logging.DEBUG
    monkeypatch.setenv(logs.LEVEL_VARIABLE, "WARNING")
    logs.setup_logging("client")
    assert logging.getLogger().level == logging.WARNING
    monkeypatch.setenv(logs.LEVEL_VARIABLE, "loud")
    with pytest.raises(ValueError, match="DISTQAT_LOGLEVEL='LOUD' is not a log level"):
        logs.log_level()


def read_scalars(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Decode a TensorBoard event file (TFRecord framing around Event protos)."""
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, list[tuple[int, float]]] = {}
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset : offset + 8])
        event = Event.FromString(data[offset + 12 : offset + 12 + length])
        offset += 12 + length + 4
        for value in event.summary.value:
            scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_tensorboard_sink_writes_the_fleet_scalars(tmp_path: Path) -> None:
    pytest.importorskip("tensorboardX")
    sink = TensorBoardSink.open(tmp_path / "tb")
    assert sink is not None
    for steps in (1, 2):
        trainers = {"trainer_0": {"step": steps, "loss": 2.5, "samples_per_s": 9.0, "failures": 0}}
        sink.log(
            {"time": 100 + steps, "steps": steps, "loss": 3 - steps, "replicas": {"tail": 2}, "trainers": trainers}
        )
    sink.close()
    (events,) = (tmp_path / "tb").glob("events.out.tfevents.*")
    scalars = read_scalars(events)
    assert scalars["fleet/loss"] == [(1, 2.0), (2, 1.0)]
    assert scalars["replicas/tail"] == [(1, 2.0), (2, 2.0)]
    assert scalars["loss/trainer_0"][-1] == (2, 2.5)


def test_progress_lines_of_a_long_wait(caplog) -> None:
    from distqat.observability.progress import track

    with caplog.at_level(logging.INFO):
        assert list(track(range(4), 4, "preparing", logging.getLogger("distqat.test"), every_s=0.0)) == [0, 1, 2, 3]
    lines = caplog.messages
    assert lines[0].startswith("preparing: 1/4 (25%), ") and lines[0].endswith(" s left")
    assert lines[-1].startswith("preparing: 4/4 (100%), ")
    assert len(lines) == 4  # one per item at every_s=0 (the last item only once, as the final line)
