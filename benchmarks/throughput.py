"""Swarm throughput against the local baseline, side by side in one invocation.

Runs `distqat baseline` (the same stages, data, batch size and optimiser in one process) and
`distqat local` (monitor, one server per stage, client, trainer) one after the other for the same
number of steps, and prints a table: samples/s of each and their ratio, the time from starting
`distqat local` to its first training step, and the bytes through the trainer's link per step.

    python benchmarks/throughput.py [--config configs/demo.yaml] [--steps 40] [--repeats 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]


def run(command: list[str], summary: Path) -> tuple[dict, float]:
    started = time.time()
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if completed.returncode != 0:
        output = completed.stdout[-3000:] + completed.stderr[-3000:]
        sys.exit(f"{' '.join(command)} failed with {completed.returncode}:\n{output}")
    return json.loads(summary.read_text()), started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--steps", type=int, default=40, help="training steps of each run")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each kind, alternating")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("overrides", nargs="*", help="config overrides passed to both runs, after --")
    args = parser.parse_args()

    rows: dict[str, list[float]] = {"local": [], "swarm": [], "startup": [], "bytes_per_step": []}
    with tempfile.TemporaryDirectory(prefix="distqat-bench-") as scratch:
        work = Path(scratch)
        for repeat in range(args.repeats):
            base_cmd = [sys.executable, "-m", "distqat"]
            common = [
                "--config",
                args.config,
                "--max-steps",
                str(args.steps),
                "--wandb-project",
                "None",
                *args.overrides,
            ]
            local, _ = run(
                [*base_cmd, "baseline", *common, "--summary", str(work / f"local{repeat}.json")],
                work / f"local{repeat}.json",
            )
            swarm, started = run(
                [
                    *base_cmd,
                    "local",
                    *common,
                    "--summary",
                    str(work / f"swarm{repeat}.json"),
                    "--log-dir",
                    str(work / f"logs{repeat}"),
                ],
                work / f"swarm{repeat}.json",
            )
            rows["local"].append(local["samples_per_s"])
            rows["swarm"].append(swarm["samples_per_s"])
            rows["startup"].append(swarm["first_step_at"] - started)
            rows["bytes_per_step"].append((swarm["bytes_sent"] + swarm["bytes_received"]) / max(1, swarm["steps"]))

    result = {
        "config": args.config,
        "steps": args.steps,
        "repeats": args.repeats,
        "local_samples_per_s": statistics.median(rows["local"]),
        "swarm_samples_per_s": statistics.median(rows["swarm"]),
        "ratio": statistics.median(s / b for s, b in zip(rows["swarm"], rows["local"], strict=True)),
        "startup_s": statistics.median(rows["startup"]),
        "trainer_bytes_per_step": statistics.median(rows["bytes_per_step"]),
        "runs": rows,
    }
    table = Table(title=f"throughput: {Path(args.config).name}, {args.steps} steps x {args.repeats}")
    for column in ("measure", "value"):
        table.add_column(column)
    table.add_row("local baseline samples/s", f"{result['local_samples_per_s']:.1f}")
    table.add_row("2-stage swarm samples/s", f"{result['swarm_samples_per_s']:.1f}")
    table.add_row("ratio swarm/local", f"{result['ratio']:.2f}")
    table.add_row("distqat local start -> first step (s)", f"{result['startup_s']:.1f}")
    table.add_row("trainer link bytes/step (MiB)", f"{result['trainer_bytes_per_step'] / 2**20:.2f}")
    Console().print(table)
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
