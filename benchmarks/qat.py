"""Quantization-aware training and quantised boundary traffic, against full precision, in one invocation.

A small ResNet (16/32/64 channels, two BasicBlocks per group, cut after the second group) trains on
Fashion-MNIST with the local pipeline (the same stages, quantisers and boundary codecs as the servers),
for the same steps, seed and data order in every run:

- accuracy table: fp32, W8A8, W4A4, W2A2 (LSQ on every conv/linear but the first and last), test accuracy
  on the held-out split and final training loss;
- boundary table: the stage boundary's activations sent as fp32, fp16, int8 and 4-bit LSQ codes (the rest
  of the model in fp32; gradients in fp32 in every run), with the bytes per sample that the wire codec
  really produced for the real activations of every step (`LocalBoundary`: the stage RPC's own
  `wire.encode` of the encoded tensor), and the final loss.

Final loss: mean training loss over the last tenth of the steps.

    python benchmarks/qat.py [--quick] [--steps N] [--device cpu|cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from torchvision.models.resnet import BasicBlock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from distqat.config import Config, load_config  # noqa: E402
from distqat.data import BatchStream, load_dataset  # noqa: E402
from distqat.distributed.evaluation import HeldOut  # noqa: E402
from distqat.distributed.pipeline import LocalPipeline  # noqa: E402
from distqat.models import register_expert_class  # noqa: E402

WIDTHS = (16, 32, 64)
BOUNDARY_CHANNELS, BOUNDARY_SIDE = WIDTHS[1], 14  # the head's output: 32 x 14 x 14 per 28 x 28 image


def _group(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    downsample = None
    if stride != 1 or in_channels != out_channels:
        downsample = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
        )
    return nn.Sequential(
        BasicBlock(in_channels, out_channels, stride, downsample), BasicBlock(out_channels, out_channels)
    )


def image_batch(batch_size: int, data) -> torch.Tensor:
    return torch.randn(batch_size, data.num_channels, data.img_size, data.img_size)


def boundary_batch(batch_size: int, data) -> torch.Tensor:
    return torch.randn(batch_size, BOUNDARY_CHANNELS, BOUNDARY_SIDE, BOUNDARY_SIDE).relu()


@register_expert_class("qatresnet.head", image_batch)
def head(num_channels: int = 1, **_: object) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(num_channels, WIDTHS[0], 3, padding=1, bias=False),
        nn.BatchNorm2d(WIDTHS[0]),
        nn.ReLU(inplace=True),
        _group(WIDTHS[0], WIDTHS[0], 1),
        _group(WIDTHS[0], WIDTHS[1], 2),
    )


@register_expert_class("qatresnet.tail", boundary_batch)
def tail(num_classes: int = 10, **_: object) -> nn.Module:
    return nn.Sequential(
        _group(WIDTHS[1], WIDTHS[2], 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(WIDTHS[2], num_classes)
    )


def base_overrides(args: argparse.Namespace) -> list[str]:
    return [
        "--model-pipeline.pipeline",
        "[{model_name: qatresnet.head}, {model_name: qatresnet.tail}]",
        "--diloco.batch-size-per-step",
        str(args.batch),
        "--diloco.inner-optim.adam-lr",
        str(args.lr),
        "--data.eval-samples",
        str(args.eval_samples),
        "--seed",
        "0",
    ]


ACCURACY_RUNS = {
    "fp32": [],
    "w8a8": ["--quant.enable", "true", "--quant.weight-bits", "8", "--quant.activation-bits", "8"],
    "w4a4": ["--quant.enable", "true", "--quant.weight-bits", "4", "--quant.activation-bits", "4"],
    "w2a2": ["--quant.enable", "true", "--quant.weight-bits", "2", "--quant.activation-bits", "2"],
}
BOUNDARY_RUNS = {
    "fp32": [],  # the fp32 accuracy run
    "fp16": ["--quant.boundary.activations", "fp16"],
    "int8": ["--quant.boundary.activations", "int8"],
    # quant on for the boundary's output quantiser only: every layer skipped, so the model stays fp32
    "codes4": [
        "--quant.enable", "true", "--quant.skip", "['*']",
        "--quant.boundary.activations", "codes", "--quant.boundary.bits", "4",
    ],
}  # fmt: skip


class Data:
    """The training set and the held-out batches, loaded once for every run (the data config is shared)."""

    def __init__(self, config: Config):
        self.train = load_dataset(config.data)
        self.held_out = HeldOut(config)


def train_and_evaluate(config: Config, data: Data, steps: int, device: torch.device) -> dict:
    torch.manual_seed(config.seed)
    pipeline = LocalPipeline(config)
    for stage in pipeline.stages:
        stage.to(device)
    batches = BatchStream(data.train, config.data, config.diloco.batch_size_per_step, seed=config.seed * 1000)
    losses = []
    started = time.monotonic()
    try:
        for _ in range(steps):
            inputs, labels = batches.next()
            losses.append(asyncio.run(pipeline.train_step(inputs.to(device), labels.to(device))))
    finally:
        batches.close()
    train_s = time.monotonic() - started
    correct = total = 0
    for inputs, labels in data.held_out.batches:
        logits = asyncio.run(pipeline.infer(inputs.to(device))).cpu()
        correct += int((logits.argmax(dim=-1) == labels).sum())
        total += len(labels)
    traffic = pipeline.boundaries[0].traffic
    tail = losses[-max(1, steps // 10) :]
    return {
        "accuracy": correct / total,
        "final_loss": statistics.fmean(tail),
        "boundary_bytes_per_sample": traffic.activation_bytes / traffic.samples,
        "boundary_gradient_bytes_per_sample": traffic.gradient_bytes / traffic.samples,
        "train_s": train_s,
        "eval_samples": total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and test samples (under 15 min on 2 cores)")
    parser.add_argument("--steps", type=int, help="training steps of every run (default 1500, --quick 150)")
    parser.add_argument("--batch", type=int, default=64, help="samples per step")
    parser.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (weights and steps)")
    parser.add_argument("--eval-samples", type=int, default=10000, help="held-out test images (all 10000)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    args.steps = args.steps or (150 if args.quick else 1500)
    device = torch.device(args.device)

    console = Console()
    tiny = REPO / "configs" / "tiny.yaml"
    data = Data(load_config(tiny, base_overrides(args)))
    results: dict[str, dict] = {}
    for name, overrides in ACCURACY_RUNS.items():
        console.print(f"[bold]{name}[/]: {args.steps} steps of {args.batch}")
        config = load_config(tiny, [*base_overrides(args), *overrides])
        results[name] = train_and_evaluate(config, data, args.steps, device)
    boundary: dict[str, dict] = {"fp32": results["fp32"]}
    for name, overrides in BOUNDARY_RUNS.items():
        if name == "fp32":
            continue
        console.print(f"[bold]boundary {name}[/]: {args.steps} steps of {args.batch}")
        config = load_config(tiny, [*base_overrides(args), *overrides])
        boundary[name] = train_and_evaluate(config, data, args.steps, device)

    table = Table(title=f"QAT on Fashion-MNIST, small ResNet, {args.steps} steps x {args.batch}, {device}")
    for column in ("run", "test accuracy", "vs fp32 (points)", "final loss", "train s"):
        table.add_column(column, justify="right")
    for name, row in results.items():
        delta = 100 * (row["accuracy"] - results["fp32"]["accuracy"])
        table.add_row(
            name, f"{row['accuracy']:.4f}", f"{delta:+.2f}", f"{row['final_loss']:.4f}", f"{row['train_s']:.0f}"
        )
    console.print(table)
    table = Table(title="stage boundary (head -> tail), bytes per sample really produced by the wire codec")
    for column in ("activations", "bytes/sample", "fp32 / this", "final loss", "vs fp32", "grad bytes/sample"):
        table.add_column(column, justify="right")
    fp32_bytes, fp32_loss = boundary["fp32"]["boundary_bytes_per_sample"], boundary["fp32"]["final_loss"]
    for name, row in boundary.items():
        table.add_row(
            name,
            f"{row['boundary_bytes_per_sample']:.1f}",
            f"{fp32_bytes / row['boundary_bytes_per_sample']:.2f}x",
            f"{row['final_loss']:.4f}",
            f"{100 * (row['final_loss'] / fp32_loss - 1):+.2f} %",
            f"{row['boundary_gradient_bytes_per_sample']:.1f}",
        )
    console.print(table)

    if args.json:
        report = {
            "steps": args.steps,
            "batch": args.batch,
            "device": str(device),
            "eval_samples": results["fp32"]["eval_samples"],
            "accuracy": {name: row["accuracy"] for name, row in results.items()},
            "final_loss": {name: row["final_loss"] for name, row in results.items()},
            "boundary_bytes_per_sample": {name: row["boundary_bytes_per_sample"] for name, row in boundary.items()},
            "boundary_final_loss": {name: row["final_loss"] for name, row in boundary.items()},
            "boundary_gradient_bytes_per_sample": {
                name: row["boundary_gradient_bytes_per_sample"] for name, row in boundary.items()
            },
            "train_s": {
                **{n: r["train_s"] for n, r in results.items()},
                **{f"boundary_{n}": r["train_s"] for n, r in boundary.items()},
            },
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
