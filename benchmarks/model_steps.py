"""Time of one training step of every built-in family, reduced variant and full size side by side.

Each row builds a config's stages in this process (`distqat baseline`'s LocalPipeline: forward through the
stages, the trainer's loss, backward, every stage's inner optimiser step) and times `--steps` steps on a
synthetic batch of the batch contract's shapes, after one warm-up step. Reduced variants are the
`distqat.models.presets.REDUCED` architectures; `--full` adds the real sizes (slow on a CPU).

    python benchmarks/model_steps.py [--batch-size 8] [--steps 3] [--full] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from distqat.config import load_config
from distqat.distributed.pipeline import LocalPipeline
from distqat.models.presets import REDUCED

REPO = Path(__file__).resolve().parents[1]
# family -> (config, overrides that keep the step CPU-sized: small images and short sequences)
CONFIGS = {
    "resnet18": ("resnet18.yaml", ["--data.img-size", "32"]),
    "resnet50": ("resnet50.yaml", ["--data.img-size", "64", "--data.precision", "fp32"]),
    "resnet101": ("resnet101.yaml", ["--data.img-size", "64", "--data.precision", "fp32"]),
    "distilgpt2": ("distilgpt2.yaml", ["--data.seq-len", "64"]),
    "gptneo": ("gptneo.yaml", ["--data.seq-len", "64"]),
    "wav2vec2": ("wav2vec2.yaml", []),
}


def batch(task: str, config, batch_size: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = config.data
    if task == "llm":
        window = torch.randint(0, vocab, (batch_size, data.seq_len + 1))
        return window[:, :-1], window[:, 1:]
    if task == "speech":
        return torch.randn(batch_size, 16_000), torch.randint(0, 10, (batch_size,))
    images = torch.randn(batch_size, data.num_channels, data.img_size, data.img_size)
    return images, torch.randint(0, config.model_pipeline.pipeline[-1].num_classes, (batch_size,))


def time_steps(family: str, reduced: bool, batch_size: int, steps: int) -> dict:
    name, overrides = CONFIGS[family]
    extra = ["--model-pipeline.architecture", json.dumps(REDUCED[family])] if reduced else []
    config = load_config(REPO / "configs" / name, [*overrides, *extra, "--device", "cpu"])
    torch.manual_seed(0)
    pipeline = LocalPipeline(config)
    params = sum(p.numel() for stage in pipeline.stages for p in stage.parameters())
    vocab = REDUCED[family].get("vocab_size", 50257) if reduced else 50257
    inputs, labels = batch(config.data.task_type, config, batch_size, vocab)
    asyncio.run(pipeline.train_step(inputs, labels))  # warm-up: allocator, kernels
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        asyncio.run(pipeline.train_step(inputs, labels))
        times.append(time.perf_counter() - started)
    step_s = statistics.median(times)
    return {
        "family": family,
        "variant": "reduced" if reduced else "full",
        "stages": len(pipeline.stages),
        "params": params,
        "input_shape": list(inputs.shape),
        "step_s": step_s,
        "samples_per_s": batch_size / step_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per row (median reported)")
    parser.add_argument("--full", action="store_true", help="also time the full-size models")
    parser.add_argument("--families", nargs="*", default=list(CONFIGS))
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    for family in args.families:
        for reduced in (True, False) if args.full else (True,):
            rows.append(time_steps(family, reduced, args.batch_size, args.steps))
    table = Table(title=f"one training step on CPU ({torch.get_num_threads()} threads), batch {args.batch_size}")
    for column in ("family", "variant", "stages", "params", "input", "step s", "samples/s"):
        table.add_column(column, justify="right" if column in ("params", "step s", "samples/s") else "left")
    for row in rows:
        table.add_row(
            row["family"],
            row["variant"],
            str(row["stages"]),
            f"{row['params']:,}",
            "x".join(map(str, row["input_shape"])),
            f"{row['step_s']:.3f}",
            f"{row['samples_per_s']:.1f}",
        )
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
