"""A real 2-stage swarm (`distqat local`, tiny config) trains with quantisation on (4-bit LSQ weights and
activations, the head's output sent as 4-bit codes, gradients as int8) and off (`--disable-quant`)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
QUANT_ON = [
    "--quant.enable", "true", "--quant.weight-bits", "4", "--quant.activation-bits", "4",
    "--quant.boundaries", "{head: {activations: codes, bits: 4, gradients: int8}}",
]  # fmt: skip


def check_export_of_the_swarms_checkpoints(log_dir: Path, out: Path) -> None:
    """`distqat export` of the servers' own checkpoints gives integer stages that compute what they computed."""
    import torch

    from distqat.quant.export import load_exported

    run = subprocess.run(
        [sys.executable, "-m", "distqat", "export", "--checkpoint", str(log_dir / "checkpoints"), "--out", str(out),
         "--config", str(TINY), *QUANT_ON],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    config, integer_stages = load_exported(out)
    assert config.quant.enable
    inputs = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        outputs = integer_stages[1](integer_stages[0](inputs))
    assert outputs.shape == (4, 10) and torch.isfinite(outputs).all()
    manifest = json.loads((out / "manifest.json").read_text())
    assert all("ckpt-" in stage["checkpoint"] for stage in manifest["stages"])
    assert manifest["stages"][0]["output"]["bits"] == 4  # the head's 4-bit boundary


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="needs Debian's dataset-fashion-mnist"
)
@pytest.mark.parametrize("quant", ["on", "off"])
def test_two_stage_swarm_trains_with_quantisation_on_and_off(tmp_path: Path, quant: str) -> None:
    log_dir, summary_path = tmp_path / "logs", tmp_path / "summary.json"
    extra = QUANT_ON if quant == "on" else [*QUANT_ON, "--disable-quant"]
    run = subprocess.run(
        [sys.executable, "-m", "distqat", "local", "--config", str(TINY), "--log-dir", str(log_dir),
         "--max-steps", "15", "--summary", str(summary_path), *extra],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads(summary_path.read_text())
    assert summary["steps"] >= 15
    assert summary["last_loss"] < summary["first_loss"] - 0.1, summary
    servers_log = (log_dir / "server_0.log").read_text() + (log_dir / "server_1.log").read_text()
    # Every server trained. From its own last log line: 15 tiny steps can all fall between two heartbeats,
    # so the monitor's last record of a server may still show 0 steps.
    trained = [int(steps) for steps in re.findall(r"stopping \S+ after (\d+) steps", servers_log)]
    assert len(trained) == 2 and min(trained) > 0, servers_log[-2000:]
    # trainer -> head: fp32 images both ways; head -> trainer -> tail: 64 values a sample as 4-bit codes
    # (32 bytes) against float32 (256 bytes); tail -> trainer -> head: the gradient as int8 against float32
    per_sample = summary["bytes_sent"] / summary["samples"]
    if quant == "on":
        assert "stage tail: 1 quantised layers" in servers_log
        assert per_sample < 28 * 28 * 4 + 200
        check_export_of_the_swarms_checkpoints(log_dir, tmp_path / "export")
    else:
        assert "quantised layers" not in servers_log
        assert per_sample > 28 * 28 * 4 + 300  # records lag the last steps a little: not the full 512
