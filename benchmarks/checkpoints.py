"""Stage checkpoints: write and load time of real stage states, and the steps lost when a whole swarm dies.

Part 1 (`sizes`): the largest stage of a config (ResNet-18 from configs/resnet18.yaml, GPT-Neo-125M from
configs/gptneo.yaml; built from the config with random init, no download) with the state a server
checkpoints: module, inner optimiser state (after one step, so it is populated), DiLoCo's θ₀ and outer
momentum, RNG states. It times our checkpoint (safetensors + manifest, fsynced, digest checked on load)
against `torch.save`/`torch.load` of the same state, side by side.

Part 2 (`lost`): a local swarm on configs/tiny.yaml, checkpointing every T seconds (by the servers, or by
the param mirror with `refresh_every` T and no server checkpoints), is SIGKILLed whole after a random
delay; the progress lost is the trainer step count at the kill minus the run step of the checkpoints a
`--resume` would continue from.

    python benchmarks/checkpoints.py [--parts sizes lost] [--intervals 2 10] [--repeats 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file

from distqat.checkpoints import join_tensors, rng_state, split_tensors
from distqat.config import load_config
from distqat.distributed.optim import build_optimizer
from distqat.distributed.optim.diloco import DiLoCo
from distqat.distributed.stage_sync import load_replica_state
from distqat.models import build_pipeline_stages
from distqat.resume import find_resume_point, stage_manifest, stage_store

REPO = Path(__file__).resolve().parents[1]
console = Console(highlight=False, width=160)
MODELS = {"ResNet-18": "resnet18.yaml", "GPT-Neo-125M": "gptneo.yaml"}
TIMES = ("snapshot_s", "write_s", "verify_s", "read_s", "apply_s", "load_s", "torch_save_s", "torch_load_s")
ROLES = ("server", "trainer", "client", "monitor", "data-server", "mirror")


def _largest_stage(config):
    stages = build_pipeline_stages(config.model_pipeline, config.data, config.seed)
    index = max(range(len(stages)), key=lambda i: sum(p.numel() for p in stages[i].parameters()))
    return index, stages[index]


def _server_state(config, module):
    optimizer = build_optimizer(module.parameters(), config.diloco.inner_optim)
    for parameter in module.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()  # populates the optimiser's per-parameter state, as any trained replica has it
    diloco = DiLoCo(list(module.parameters()), config.diloco.outer_optim)
    state = {
        "module": module.state_dict(),
        "inner_optimizer": optimizer.state_dict(),
        "diloco": diloco.state_dict(),
        "samples": 0,
        "weights_version": 1,
        "rng": rng_state(),
    }
    return state, optimizer, diloco


def measure_size(name: str, config_file: str, work: Path, repeats: int) -> dict:
    """Median times over `repeats` write/load cycles of the largest stage's full server state."""
    config = load_config(REPO / "configs" / config_file, ["--log-dir", str(work / name)])
    index, module = _largest_stage(config)
    state, optimizer, diloco = _server_state(config, module)
    store = stage_store(config, index, module)
    times: dict[str, list[float]] = {key: [] for key in TIMES}

    def timed(key: str, function, *args):
        started = time.perf_counter()
        result = function(*args)
        times[key].append(time.perf_counter() - started)
        return result

    for _ in range(repeats):
        skeleton, tensors = timed("snapshot_s", split_tensors, state)  # what a server copies on its compute thread
        path = timed("write_s", store.write, skeleton, tensors, stage_manifest(config, index, steps=1))
        checkpoint, problem = timed("verify_s", store.newest_valid)  # manifest checks and the file's digest
        assert checkpoint is not None, problem
        loaded = timed(
            "read_s",
            lambda found=checkpoint: join_tensors(found.manifest["state"], load_file(str(found.tensors_path))),
        )
        problem = timed("apply_s", load_replica_state, loaded, module, optimizer, diloco)  # keeps a backup copy
        assert problem is None, problem
        times["load_s"].append(times["verify_s"][-1] + times["read_s"][-1] + times["apply_s"][-1])
        baseline = work / name / "torch_save.pt"
        timed("torch_save_s", _torch_save, state, baseline)
        timed("torch_load_s", lambda file=baseline: torch.load(io.BytesIO(file.read_bytes()), weights_only=True))
    size = path.with_suffix(".safetensors").stat().st_size + path.stat().st_size
    return {
        "model": name,
        "stage": config.model_pipeline.stage_names[index],
        "params_m": sum(p.numel() for p in module.parameters()) / 1e6,
        "mib": size / 2**20,
        "repeats": repeats,
        **{key: statistics.median(values) for key, values in times.items()},
    }


def _torch_save(state: dict, path: Path) -> None:
    with open(path, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())


def _steps(log_dir: Path) -> int:
    try:
        lines = (log_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return max((json.loads(line)["steps"] for line in lines if line.strip()), default=0)


def _kill_swarm(launcher: subprocess.Popen) -> None:
    root = psutil.Process(launcher.pid)
    for proc in root.children(recursive=True):
        try:
            cmdline = proc.cmdline()
        except psutil.Error:
            continue
        if "distqat.guardian" not in cmdline and "distqat" in cmdline and any(role in cmdline for role in ROLES):
            proc.kill()
    launcher.kill()
    launcher.communicate(timeout=60)
    time.sleep(3)  # the guardians clean up after their roles


def measure_lost(source: str, interval: float, seed: int, work: Path) -> dict:
    log_dir = work / f"{source}-{interval}-{seed}"
    overrides = ["--checkpoint.every", str(interval)]
    if source == "mirror":
        overrides = ["--checkpoint.enable", "false", "--param-mirror.enable", "true"]
        overrides += ["--param-mirror.refresh-every", str(interval)]
    tiny = str(REPO / "configs" / "tiny.yaml")
    command = [sys.executable, "-m", "distqat", "local", "--config", tiny, "--log-dir", str(log_dir), *overrides]
    launcher = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while _steps(log_dir) < 20 and time.monotonic() < deadline:
            time.sleep(0.25)
        first = (time.monotonic(), _steps(log_dir))
        time.sleep(interval * 2 + random.Random(seed).uniform(0, interval))  # at a random phase of the interval
        killed_at = time.monotonic()
    finally:
        _kill_swarm(launcher)
    steps_at_kill = _steps(log_dir)  # the monitor's last count: it died with the rest
    step_s = (killed_at - first[0]) / max(1, steps_at_kill - first[1])  # the pace before the kill
    config = load_config(tiny, ["--log-dir", str(log_dir)])
    resumed = find_resume_point(config).first_step
    return {
        "source": source,
        "interval_s": interval,
        "steps_at_kill": steps_at_kill,
        "resume_step": resumed,
        "steps_lost": steps_at_kill - resumed,
        "step_s": step_s,
        "lost_s": (steps_at_kill - resumed) * step_s,  # the training time those steps took
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["sizes", "lost"], choices=["sizes", "lost"])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--intervals", nargs="+", type=float, default=[2.0, 10.0], help="seconds between checkpoints")
    parser.add_argument("--sources", nargs="+", default=["servers", "mirror"], choices=["servers", "mirror"])
    parser.add_argument("--repeats", type=int, default=1, help="kills per source and interval")
    parser.add_argument("--size-repeats", type=int, default=3, help="write/load cycles per model (median)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="distqat-ckpt-bench-") as scratch:
        work = Path(scratch)
        if "sizes" in args.parts:
            results["sizes"] = [measure_size(name, MODELS[name], work, args.size_repeats) for name in args.models]
            table = Table(title="stage checkpoint: ours (safetensors + manifest, fsync, digest) vs torch.save")
            columns = ["model", "stage", "params (M)", "MiB", "snapshot s", "write s"]
            columns += ["verify s", "read s", "apply s", "load s", "torch.save s", "torch.load s"]
            for column in columns:
                table.add_column(column, justify="right")
            for row in results["sizes"]:
                table.add_row(
                    row["model"],
                    row["stage"],
                    f"{row['params_m']:.1f}",
                    f"{row['mib']:.0f}",
                    *(f"{row[key]:.2f}" for key in TIMES),
                )
            console.print(table)
        if "lost" in args.parts:
            runs = [
                measure_lost(source, interval, seed, work)
                for source in args.sources
                for interval in args.intervals
                for seed in range(args.repeats)
            ]
            results["lost"] = runs
            table = Table(title="whole tiny swarm SIGKILLed: steps lost against the checkpoint interval")
            for column in (
                "written by",
                "interval s",
                "runs",
                "steps lost (median)",
                "max",
                "s/step",
                "lost s (median)",
            ):
                table.add_column(column, justify="right")
            for source in args.sources:
                for interval in args.intervals:
                    mine = [run for run in runs if run["source"] == source and run["interval_s"] == interval]
                    lost = [run["steps_lost"] for run in mine]
                    table.add_row(
                        source,
                        f"{interval:g}",
                        str(len(mine)),
                        f"{statistics.median(lost):g}",
                        str(max(lost)),
                        f"{statistics.median(run['step_s'] for run in mine):.3f}",
                        f"{statistics.median(run['lost_s'] for run in mine):.1f}",
                    )
            console.print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
