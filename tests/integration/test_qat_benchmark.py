"""`benchmarks/qat.py` end to end at a few steps: every run starts from the fp32-pretrained weights and the
JSON holds the keys the issue names (the figures themselves are measured by the full run, not here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RUNS = {"fp32", "w8a8", "w4a4", "w2a2"}
BOUNDARIES = {"fp32", "fp16", "int8", "codes4"}


def test_qat_benchmark_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "qat.json"
    command = [sys.executable, "benchmarks/qat.py", "--pretrain", "4", "--steps", "3", "--eval-samples", "64"]
    result = subprocess.run(
        [*command, "--threads", "1", "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert set(report["accuracy"]) == RUNS and set(report["final_loss"]) == RUNS
    assert set(report["boundary_bytes_per_sample"]) == BOUNDARIES
    assert set(report["boundary_final_loss"]) == BOUNDARIES
    assert report["pretrain_steps"] == 4 and 0.0 <= report["pretrained_accuracy"] <= 1.0
    assert report["eval_samples"] == 64
    bytes_per_sample = report["boundary_bytes_per_sample"]
    # 32 x 14 x 14 float32 activations per sample, 4-bit codes: an eighth of them (plus the step)
    assert bytes_per_sample["fp32"] > 25_000
    assert bytes_per_sample["fp32"] / bytes_per_sample["codes4"] > 7.5
    assert "wall time" in result.stdout
