"""Swarm throughput against the local baseline, side by side in one invocation.

Runs `distqat baseline` (the same stages, data, batch size and optimiser in one process) and
`distqat local` (monitor, one server per stage, client, trainer) at each in-flight depth
(`pipelining.in_flight`, default 1, 2, 4) for the same number of steps, on the same cores, and prints a
table: samples/s of each and their ratio to the baseline, each server's utilisation (compute-busy time
over the training time), the cost of one hop of the stage RPC against raw loopback TCP moving the same
bytes (`hop_cost.py`; `hop_overhead_ratio` is that of the transport the swarm runs used, read from the
trainers' logs, and `p2p_hop_*` the p2p path's), the time from starting `distqat local` to its first
training step, the bytes through the trainer's link per step, and the load average (the machine may be
shared: read the ratios).

    python benchmarks/throughput.py [--config configs/demo.yaml] [--steps 40] [--depths 1 2 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hop_cost  # a sibling script

REPO = Path(__file__).resolve().parents[1]


def run(command: list[str], summary: Path) -> tuple[dict, float]:
    started = time.time()
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if completed.returncode != 0:
        output = completed.stdout[-3000:] + completed.stderr[-3000:]
        sys.exit(f"{' '.join(command)} failed with {completed.returncode}:\n{output}")
    return json.loads(summary.read_text()), started


def utilisation(summary: dict) -> dict[str, float]:
    """Each server's busy seconds over the trainer's training time (busy_s counts from the server's start,
    so joining adds a little; the trainer's train time is samples / samples_per_s)."""
    train_time = summary["samples"] / summary["samples_per_s"] if summary.get("samples_per_s") else 0.0
    return {
        uid: min(1.0, seen.get("busy_s", 0.0) / train_time) if train_time else 0.0
        for uid, seen in sorted(summary.get("servers_seen", {}).items())
    }


def transport_used(log_dir: Path) -> str:
    """'direct', 'p2p' or 'mixed', from the trainers' logs: which path their stage calls took."""
    logs = "".join(path.read_text(errors="replace") for path in log_dir.glob("trainer_*.log"))
    direct, fallback = "go over the direct channel" in logs, "unusable" in logs
    return "mixed" if direct and fallback else "direct" if direct else "p2p"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--steps", type=int, default=40, help="training steps of each run")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each kind, alternating")
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2, 4], help="pipelining.in_flight values")
    parser.add_argument("--hop-repeats", type=int, default=20, help="calls timed for the per-hop cost")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("overrides", nargs="*", help="config overrides passed to every run, after --")
    args = parser.parse_args()

    load = os.getloadavg()
    rows: dict[str, list] = {"local": [], "startup": [], "bytes_per_step": []}
    swarm: dict[int, list[float]] = {depth: [] for depth in args.depths}
    busy: dict[int, list[dict[str, float]]] = {depth: [] for depth in args.depths}
    with tempfile.TemporaryDirectory(prefix="distqat-bench-") as scratch:
        work = Path(scratch)
        base_cmd = [sys.executable, "-m", "distqat"]
        common = ["--config", args.config, "--max-steps", str(args.steps), "--wandb-project", "None", *args.overrides]
        for repeat in range(args.repeats):
            local, _ = run(
                [*base_cmd, "baseline", *common, "--summary", str(work / f"local{repeat}.json")],
                work / f"local{repeat}.json",
            )
            rows["local"].append(local["samples_per_s"])
            for depth in args.depths:
                name = f"swarm{repeat}-{depth}"
                summary, started = run(
                    [
                        *base_cmd,
                        "local",
                        *common,
                        "--pipelining.in_flight",
                        str(depth),
                        "--summary",
                        str(work / f"{name}.json"),
                        "--log-dir",
                        str(work / f"logs-{name}"),
                    ],
                    work / f"{name}.json",
                )
                swarm[depth].append(summary["samples_per_s"])
                rows.setdefault("transport", []).append(transport_used(work / f"logs-{name}"))
                busy[depth].append(utilisation(summary))
                if depth == args.depths[0]:
                    rows["startup"].append(summary["first_step_at"] - started)
                    per_step = (summary["bytes_sent"] + summary["bytes_received"]) / max(1, summary["steps"])
                    rows["bytes_per_step"].append(per_step)
    # A hop carries one boundary tensor each way: a quarter of the trainer's traffic per step.
    hop_bytes = int(statistics.median(rows["bytes_per_step"]) / 4) // 4 * 4
    hop = hop_cost.measure(hop_bytes, args.hop_repeats)
    # The headline hop figure is that of the path the swarm runs took (the other stays, under its own keys).
    used = sorted(set(rows["transport"]))
    hop["direct_hop_ms"], hop["direct_hop_overhead_ratio"] = hop["hop_ms"], hop["hop_overhead_ratio"]
    if used == ["p2p"]:
        hop["hop_transport"], hop["hop_ms"] = "p2p", hop["p2p_hop_ms"]
        hop["hop_overhead_ratio"] = hop["p2p_hop_overhead_ratio"]

    local_rate = statistics.median(rows["local"])
    swarm_rates = {depth: statistics.median(rates) for depth, rates in swarm.items()}
    best = max(swarm_rates, key=swarm_rates.__getitem__)
    server_utilisation = {
        depth: {uid: statistics.median(run[uid] for run in runs) for uid in runs[0]} for depth, runs in busy.items()
    }
    result = {
        "config": args.config,
        "swarm_transport": used[0] if len(used) == 1 else "mixed",
        "steps": args.steps,
        "repeats": args.repeats,
        "load_average_at_start": load,
        "load_average_at_end": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "local_samples_per_s": local_rate,
        "swarm_samples_per_s": swarm_rates,
        "ratio": swarm_rates[best] / local_rate,
        "ratio_by_depth": {depth: rate / local_rate for depth, rate in swarm_rates.items()},
        "best_depth": best,
        "server_utilisation": server_utilisation,
        **hop,
        "startup_s": statistics.median(rows["startup"]),
        "trainer_bytes_per_step": statistics.median(rows["bytes_per_step"]),
        "runs": {**rows, "swarm": swarm},
    }
    table = Table(title=f"throughput: {Path(args.config).name}, {args.steps} steps x {args.repeats}")
    for column in ("measure", "value"):
        table.add_column(column)
    table.add_row("local baseline samples/s", f"{local_rate:.1f}")
    for depth, rate in swarm_rates.items():
        used = ", ".join(f"{value:.0%}" for value in server_utilisation[depth].values())
        table.add_row(
            f"2-stage swarm, {depth} in flight: samples/s", f"{rate:.1f} (x{rate / local_rate:.2f}; busy {used})"
        )
    table.add_row("ratio best swarm/local", f"{result['ratio']:.2f} (in flight {best})")
    table.add_row(
        f"one hop, {hop_bytes / 2**20:.2f} MiB each way, {hop['hop_transport']} (swarm used: "
        f"{result['swarm_transport']}) (ms)",
        f"{hop['hop_ms']:.1f} vs raw TCP {hop['raw_tcp_ms']:.1f} (x{hop['hop_overhead_ratio']:.1f})",
    )
    table.add_row(
        "same hop through p2p (ms)", f"{hop['p2p_hop_ms']:.1f} (x{hop['p2p_hop_overhead_ratio']:.1f} raw TCP)"
    )
    table.add_row("distqat local start -> first step (s)", f"{result['startup_s']:.1f}")
    table.add_row("trainer link bytes/step (MiB)", f"{result['trainer_bytes_per_step'] / 2**20:.2f}")
    table.add_row("load average (1, 5, 15 min) at start / end", f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} / "
                  + " ".join(f"{x:.2f}" for x in result["load_average_at_end"]))  # fmt: skip
    Console().print(table)
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
