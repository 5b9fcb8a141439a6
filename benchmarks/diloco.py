"""DiLoCo against fully synchronous averaging: final loss and averaging bytes per sample, side by side.

Training: `--replicas` replicas of the tiny Fashion-MNIST pipeline (`tiny.head` + `tiny.tail`, real data)
in this process, each on its own shuffled stream with `--batch` samples per step and the inner optimiser
of the config (Adam, lr 1e-3). DiLoCo averages every `--inner-steps` steps (exact weighted mean, Nesterov
outer step: lr 0.7, momentum 0.9); the synchronous baseline is its data-parallel equivalent, one model
whose every step averages the replicas' gradients (a batch of replicas x batch). Both see the same total
samples; the loss is the held-out loss on Fashion-MNIST's test split.

Bytes: one real all-reduce round of a tensor the size of the model among `--replicas` processes through
`distqat.swarm.averaging` (real hivemind on 127.0.0.1), for fp32 and int8; the bytes every peer really
sent and received, times the rounds each method needs (sync: one per step; DiLoCo: one per inner_steps).

State download: a joiner downloads a ResNet-18 stage's state (`--state-model`, default the `tail`:
params, Adam, θ₀, outer momentum) from a donor process, as a server joining a stage does.

    python benchmarks/diloco.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from distqat.config import DataConfig, OptimConfig, StageConfig
from distqat.data import BatchStream, load_dataset, prepare_images
from distqat.distributed.optim import build_optimizer
from distqat.distributed.optim.diloco import DiLoCo, run_local_round
from distqat.models import build_pipeline_stages

NESTEROV = OptimConfig(type="sgd", sgd_lr=0.7, sgd_momentum=0.9, sgd_nesterov=True)
INNER = OptimConfig(type="adam", adam_lr=1e-3)
STAGES = [StageConfig(model_name="tiny.head"), StageConfig(model_name="tiny.tail")]
PEER = [sys.executable, "-m", "distqat.diagnostics.averaging_peer"]


def build_model(seed: int) -> nn.Module:
    return nn.Sequential(*build_pipeline_stages(STAGES, DataConfig(), seed))


def eval_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(images), labels))


def train_sync(steps: int, replicas: int, batch: int, data: DataConfig, dataset) -> nn.Module:
    model = build_model(seed=0)
    optimizer = build_optimizer(model.parameters(), INNER)
    stream = BatchStream(dataset, data, batch * replicas, seed=1)
    try:
        for _ in range(steps):
            inputs, labels = stream.next()
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(inputs), labels).backward()
            optimizer.step()
    finally:
        stream.close()
    return model


def train_diloco(steps: int, inner_steps: int, replicas: int, batch: int, data: DataConfig, dataset):
    models = [build_model(seed=0) for _ in range(replicas)]  # the same θ₀ on every replica
    optimizers = [build_optimizer(model.parameters(), INNER) for model in models]
    outer = [DiLoCo(list(model.parameters()), NESTEROV) for model in models]
    streams = [BatchStream(dataset, data, batch, seed=100 + index) for index in range(replicas)]
    rounds = 0
    try:
        for step in range(1, steps + 1):
            for model, optimizer, diloco, stream in zip(models, optimizers, outer, streams, strict=True):
                inputs, labels = stream.next()
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(model(inputs), labels).backward()
                optimizer.step()
                diloco.record_inner_step(len(labels))
            if step % inner_steps == 0:
                run_local_round(outer)
                rounds += 1
    finally:
        for stream in streams:
            stream.close()
    return models[0], rounds


class PeerGroup:
    """averaging_peer processes in their own sessions; whatever happens, all are gone on exit."""

    def __init__(self, folder: Path):
        self.folder, self.procs, self.initial_peers = folder, [], ""

    def start(self, *args: str, name: str) -> Path:
        out = self.folder / f"{name}.pt"
        command = [*PEER, "--uid", name, "--out", str(out), "--initial-peers", self.initial_peers, *args]
        maddrs = self.folder / "maddrs.txt"
        if not self.procs:
            command += ["--maddrs-file", str(maddrs)]
        log = open(self.folder / f"{name}.log", "w")  # noqa: SIM115 (closed when the process ends)
        self.procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        if len(self.procs) == 1:
            self._wait(lambda: maddrs.exists() and maddrs.read_text(), "the first peer's DHT", name)
            self.initial_peers = maddrs.read_text()
        return out

    def ready(self, out: Path, name: str) -> None:
        self._wait(lambda: out.with_suffix(".ready").exists(), f"{name} to start", name)

    def _wait(self, condition, what: str, name: str, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if any(proc.poll() not in (None, 0) for proc in self.procs) or time.monotonic() > deadline:
                log = (self.folder / f"{name}.log").read_text()[-2000:]
                raise SystemExit(f"averaging peer failed waiting for {what}:\n{log}")
            time.sleep(0.1)

    def finish(self, timeout: float = 180.0) -> None:
        for proc in self.procs:
            proc.wait(timeout=timeout)
            if proc.returncode != 0:
                raise SystemExit(f"an averaging peer exited with {proc.returncode}: see {self.folder}")

    def __enter__(self) -> PeerGroup:
        return self

    def __exit__(self, *_: object) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=15)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)


def round_bytes(numel: int, replicas: int, compression: str, folder: Path, attempts: int = 3) -> int:
    """Bytes all peers sent and received in one real all-reduce round of `numel` float32 values.

    A round that the peers refused (on a loaded machine a peer can miss a timeout) is measured again.
    """
    for attempt in range(1, attempts + 1):
        try:
            return _one_round_bytes(numel, replicas, compression, folder / f"attempt{attempt}")
        except RoundFailed as failure:
            Console().print(f"[yellow]{compression} measurement round {attempt} was not applied: {failure}")
    raise SystemExit(f"no {compression} measurement round was applied in {attempts} attempts (logs: {folder})")


class RoundFailed(Exception):
    pass


def _one_round_bytes(numel: int, replicas: int, compression: str, folder: Path) -> int:
    folder.mkdir(parents=True)
    go = folder / "go"
    with PeerGroup(folder) as group:
        outs = []
        for index in range(replicas):
            name = f"body.0.{index}.0"
            extra = ["--numel", str(numel), "--seed", str(index + 1), "--weight", "1", "--compression", compression]
            outs.append((group.start(*extra, "--go", str(go), name=name), name))
        for out, name in outs:
            group.ready(out, name)
        go.touch()
        group.finish()
    results = [torch.load(out) for out, _ in outs]
    statuses = {r["status"] for r in results}
    if statuses != {"averaged"}:
        raise RoundFailed("; ".join(sorted({r["detail"] for r in results})))
    return sum(r["bytes_sent"] + r["bytes_received"] for r in results)


def state_download_seconds(folder: Path, model: str) -> tuple[float, int]:
    folder.mkdir()
    stage = model.split(".", 1)[1]
    common = ["--stage-model", model, "--stage", stage]
    done, go = folder / "done", folder / "go"
    go.touch()
    with PeerGroup(folder) as group:
        donor = group.start("--mode", "donor", *common, "--go", str(done), name=f"{stage}.0.0.0")
        group.ready(donor, f"{stage}.0.0.0")
        time.sleep(6.0)  # the donor's offer reaches the DHT on its first declaration
        joiner = group.start("--mode", "joiner", *common, "--go", str(go), name=f"{stage}.0.1.0")
        group.procs[-1].wait(timeout=300)
        done.touch()
        group.finish()
    result = torch.load(joiner)
    return result["seconds"], result["bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds: under 10 minutes on 2 cores")
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--inner-steps", type=int, default=500)
    parser.add_argument("--rounds", type=int, help="DiLoCo rounds (default 16, --quick 8)")
    parser.add_argument("--batch", type=int, default=32, help="samples per step of each replica")
    parser.add_argument("--state-model", default="resnet18.tail", help="stage whose state a joiner downloads")
    parser.add_argument("--only-state", action="store_true", help="measure only the state download")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if args.only_state:
        with tempfile.TemporaryDirectory(prefix="distqat-diloco-bench-") as scratch:
            seconds, size = state_download_seconds(Path(scratch) / "state", args.state_model)
        Console().print(f"joiner downloaded a {args.state_model} state ({size / 2**20:.1f} MiB) in {seconds:.2f} s")
        return
    rounds = args.rounds or (8 if args.quick else 16)
    steps = rounds * args.inner_steps
    torch.set_num_threads(max(1, (os.cpu_count() or 1)))

    data = DataConfig()
    dataset = load_dataset(data)
    test = load_dataset(data.model_copy(update={"dataset_split": "test"}))
    test_images, test_labels = prepare_images(test.images[:5000], data), test.labels[:5000]

    started = time.monotonic()
    sync_model = train_sync(steps, args.replicas, args.batch, data, dataset)
    sync_s = time.monotonic() - started
    started = time.monotonic()
    diloco_model, diloco_rounds = train_diloco(steps, args.inner_steps, args.replicas, args.batch, data, dataset)
    diloco_s = time.monotonic() - started
    loss_sync, loss_diloco = (
        eval_loss(sync_model, test_images, test_labels),
        eval_loss(diloco_model, test_images, test_labels),
    )

    numel = sum(p.numel() for p in sync_model.parameters())
    samples = steps * args.replicas * args.batch
    with tempfile.TemporaryDirectory(prefix="distqat-diloco-bench-") as scratch:
        work = Path(scratch)
        fp32_round = round_bytes(numel, args.replicas, "none", work / "fp32")
        int8_round = round_bytes(numel, args.replicas, "int8", work / "int8")
        download_s, state_bytes = state_download_seconds(work / "state", args.state_model)

    bytes_sync = fp32_round * steps / samples
    bytes_diloco = fp32_round * diloco_rounds / samples
    bytes_diloco_int8 = int8_round * diloco_rounds / samples
    results = {
        "replicas": args.replicas,
        "inner_steps": args.inner_steps,
        "rounds": diloco_rounds,
        "steps_per_replica": steps,
        "samples": samples,
        "params": numel,
        "loss_diloco": loss_diloco,
        "loss_sync": loss_sync,
        "loss_ratio": loss_diloco / loss_sync,
        "train_s_diloco": diloco_s,
        "train_s_sync": sync_s,
        "round_bytes_fp32": fp32_round,
        "round_bytes_int8": int8_round,
        "bytes_per_sample_diloco": bytes_diloco,
        "bytes_per_sample_diloco_int8": bytes_diloco_int8,
        "bytes_per_sample_sync": bytes_sync,
        "bytes_ratio": bytes_sync / bytes_diloco,
        "bytes_ratio_int8": bytes_sync / bytes_diloco_int8,
        "state_download_s": download_s,
        "state_bytes": state_bytes,
        "state_model": args.state_model,
    }

    title = f"DiLoCo vs synchronous averaging ({args.replicas} replicas, {samples} samples in all, each method)"
    table = Table(title=title)
    for column in ("", "synchronous", "DiLoCo fp32", "DiLoCo int8", "ratio"):
        table.add_column(column, justify="right")
    table.add_row("rounds", str(steps), str(diloco_rounds), str(diloco_rounds), f"inner_steps {args.inner_steps}")
    table.add_row("eval loss", f"{loss_sync:.4f}", f"{loss_diloco:.4f}", "-", f"{results['loss_ratio']:.3f}")
    table.add_row(
        "averaging bytes/sample",
        f"{bytes_sync:.1f}",
        f"{bytes_diloco:.3f}",
        f"{bytes_diloco_int8:.3f}",
        f"{results['bytes_ratio']:.0f}x / {results['bytes_ratio_int8']:.0f}x",
    )
    table.add_row("training time (s)", f"{sync_s:.1f}", f"{diloco_s:.1f}", "-", "")
    console = Console(width=120)
    console.print(table)
    console.print(f"joiner downloaded a resnet18.head state ({state_bytes / 2**20:.1f} MiB) in {download_s:.2f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
