"""Bad input stops a command at once with one line naming what is wrong, exit code 1, nothing left running."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"


def distqat(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "distqat", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("distqat: error:")]


def test_bad_override_value(tmp_path: Path) -> None:
    result = distqat("local", "--config", str(TINY), "--diloco.inner-steps", "-1", "--log-dir", str(tmp_path))
    assert result.returncode == 1
    (line,) = error_lines(result)
    assert str(TINY) in line
    assert "diloco.inner_steps: Input should be greater than or equal to 1" in line


def test_unknown_field_in_file(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(TINY.read_text() + "\ndata_sever:\n  prefetch: 2\n")
    result = distqat("servers", "--config", str(config))
    assert result.returncode == 1
    (line,) = error_lines(result)
    assert line == f"distqat: error: {config}: data_sever: unknown field"


def test_missing_dataset_fails_before_training_starts(tmp_path: Path) -> None:
    result = distqat(
        "local", "--config", str(TINY), "--data.data-dir", str(tmp_path / "nowhere"), "--log-dir", str(tmp_path / "l")
    )
    assert result.returncode == 1
    (line,) = error_lines(result)
    assert f"{tmp_path / 'nowhere' / 'train-images-idx3-ubyte.gz'}: not found" in line
    assert not (tmp_path / "l" / "server_0.log").exists()  # no server was started


def test_servers_need_initial_peers() -> None:
    result = distqat("servers", "--config", str(TINY))
    assert result.returncode == 1
    (line,) = error_lines(result)
    assert "network.initial_peers" in line


def test_unknown_stage() -> None:
    result = distqat(
        "servers",
        "--config",
        str(TINY),
        "--initial-peers",
        "/ip4/127.0.0.1/tcp/9/p2p/x",
        "--model-pipeline.pipeline",
        "[{model_name: tiny.head}, {model_name: nope.tail}]",
    )
    assert result.returncode == 1
    (line,) = error_lines(result)
    assert "unknown model stage 'nope.tail'" in line
