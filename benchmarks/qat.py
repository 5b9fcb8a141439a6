"""Quantization-aware training and quantised boundary traffic, against full precision, in one invocation.

A small ResNet (16/32/64 channels, two BasicBlocks per group, cut after the second group) is first trained
in fp32 (`--pretrain` steps). Every run then starts from those weights and trains `--steps` more steps
with the same seed, data order and learning rate, through the local pipeline (the same stages, quantisers
and boundary codecs as the servers). This is the LSQ paper's recipe (quantised networks fine-tuned from a
trained full-precision one), and it compares the runs at the same point of training rather than through
the run-to-run noise of early training from scratch:

- accuracy table: fp32 (the pretrained net trained on in fp32), W8A8, W4A4, W2A2 (LSQ on every
  conv/linear but the first and last), test accuracy on the held-out split and final training loss;
- boundary table: the stage boundary's activations sent as fp32, fp16, int8 and 4-bit LSQ codes (the rest
  of the model in fp32; gradients in fp32 in every run), with the bytes per sample that the wire codec
  really produced for the real activations of every step (`LocalBoundary`: the stage RPC's own
  `wire.encode` of the encoded tensor), and the final loss.

Final loss: mean training loss over the last tenth of the steps.

    python benchmarks/qat.py [--quick] [--pretrain N] [--steps N] [--device cpu|cuda] [--json out.json]
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

# The fp32 pretrained state of each stage, by stage; empty while pretraining (the stages start from the seed).
PRETRAINED: dict[str, dict[str, torch.Tensor]] = {}


def _from_pretrained(stage: str, module: nn.Module) -> nn.Module:
    # Loaded before the quantisers are attached, so LSQ initialises every step from the trained weights.
    if stage in PRETRAINED:
        module.load_state_dict(PRETRAINED[stage])
    return module


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
    module = nn.Sequential(
        nn.Conv2d(num_channels, WIDTHS[0], 3, padding=1, bias=False),
        nn.BatchNorm2d(WIDTHS[0]),
        nn.ReLU(inplace=True),
        _group(WIDTHS[0], WIDTHS[0], 1),
        _group(WIDTHS[0], WIDTHS[1], 2),
    )
    return _from_pretrained("head", module)


@register_expert_class("qatresnet.tail", boundary_batch)
def tail(num_classes: int = 10, **_: object) -> nn.Module:
    module = nn.Sequential(
        _group(WIDTHS[1], WIDTHS[2], 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(WIDTHS[2], num_classes)
    )
    return _from_pretrained("tail", module)


def base_overrides(args: argparse.Namespace, lr: float) -> list[str]:
    return [
        "--model-pipeline.pipeline",
        "[{model_name: qatresnet.head}, {model_name: qatresnet.tail}]",
        "--diloco.batch-size-per-step",
        str(args.batch),
        "--diloco.inner-optim.adam-lr",
        str(lr),
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


def train_and_evaluate(
    config: Config, data: Data, steps: int, device: torch.device, data_seed: int, keep: dict | None = None
) -> dict:
    """Train `steps` steps from the stages' initial (or pretrained) weights and test; `keep` receives the
    trained stages' state by stage name."""
    torch.manual_seed(config.seed)
    pipeline = LocalPipeline(config)
    for stage in pipeline.stages:
        stage.to(device)
    batches = BatchStream(data.train, config.data, config.diloco.batch_size_per_step, seed=data_seed)
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
    if keep is not None:
        for name, stage in zip(("head", "tail"), pipeline.stages, strict=True):
            keep[name] = {key: value.detach().cpu().clone() for key, value in stage.state_dict().items()}
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


def report_run(console: Console, row: dict) -> None:
    console.print(f"  test accuracy {row['accuracy']:.4f}, final loss {row['final_loss']:.4f}, {row['train_s']:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and test samples (under 15 min on 2 cores)")
    parser.add_argument("--pretrain", type=int, help="fp32 steps every run starts from (default 1500, --quick 300)")
    parser.add_argument("--steps", type=int, help="training steps of every run (default 300, --quick 100)")
    parser.add_argument("--batch", type=int, default=64, help="samples per step")
    parser.add_argument("--pretrain-lr", type=float, default=2e-3, help="Adam learning rate of the fp32 pretraining")
    parser.add_argument("--lr", type=float, default=5e-4, help="Adam learning rate of every run (weights and steps)")
    parser.add_argument("--eval-samples", type=int, default=10000, help="held-out test images (all 10000)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: torch's); 1 on a busy machine, where two threads "
        "spinning at every op's barrier while other processes hold the cores make small convolutions many times slower",
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    started = time.monotonic()
    args.pretrain = args.pretrain if args.pretrain is not None else (300 if args.quick else 1500)
    args.steps = args.steps or (100 if args.quick else 300)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    console = Console()
    tiny = REPO / "configs" / "tiny.yaml"
    data = Data(load_config(tiny, base_overrides(args, args.lr)))
    pretrained: dict | None = None
    if args.pretrain:
        console.print(f"[bold]fp32 pretraining[/]: {args.pretrain} steps of {args.batch}")
        pretrained = train_and_evaluate(
            load_config(tiny, base_overrides(args, args.pretrain_lr)), data, args.pretrain, device, 0, PRETRAINED
        )
        report_run(console, pretrained)
    run_data_seed = 1  # every run sees the same batches, not those of the pretraining
    results: dict[str, dict] = {}
    for name, overrides in ACCURACY_RUNS.items():
        console.print(f"[bold]{name}[/]: {args.steps} steps of {args.batch}")
        config = load_config(tiny, [*base_overrides(args, args.lr), *overrides])
        results[name] = train_and_evaluate(config, data, args.steps, device, run_data_seed)
        report_run(console, results[name])
    boundary: dict[str, dict] = {"fp32": results["fp32"]}
    for name, overrides in BOUNDARY_RUNS.items():
        if name == "fp32":
            continue
        console.print(f"[bold]boundary {name}[/]: {args.steps} steps of {args.batch}")
        config = load_config(tiny, [*base_overrides(args, args.lr), *overrides])
        boundary[name] = train_and_evaluate(config, data, args.steps, device, run_data_seed)
        report_run(console, boundary[name])

    title = f"QAT on Fashion-MNIST, small ResNet, {args.pretrain} fp32 steps then {args.steps} x {args.batch}, {device}"
    table = Table(title=title)
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
    console.print(f"wall time {time.monotonic() - started:.0f} s ({torch.get_num_threads()} torch threads)")

    if args.json:
        report = {
            "wall_s": time.monotonic() - started,
            "pretrain_steps": args.pretrain,
            "pretrained_accuracy": pretrained["accuracy"] if pretrained else None,
            "steps": args.steps,
            "batch": args.batch,
            "lr": args.lr,
            "device": str(device),
            "threads": torch.get_num_threads(),
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
