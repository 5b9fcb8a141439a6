"""Held-out evaluation: the configured eval split, run through a pipeline without training it.

Every `data.eval_every` steps a trainer pushes the same `data.eval_samples` held-out samples through its
pipeline (the servers run them in eval mode and keep nothing) and reports mean loss and accuracy (cv and
speech: utterances or images classified right; llm: next tokens predicted right, ignoring -100 labels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distqat.config import Config
from distqat.data import load_dataset
from distqat.data.datasets import IGNORE_INDEX
from distqat.distributed.pipeline import Pipeline, loss_fn


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    samples: int


class HeldOut:
    """The fixed held-out batches of a run (same samples at every evaluation, so results compare)."""

    def __init__(self, config: Config):
        data = config.data
        dataset = load_dataset(data, split=data.eval_split, limit=data.eval_samples)
        size = config.diloco.batch_size_per_step
        self.batches = [
            dataset.batch(torch.arange(start, min(start + size, len(dataset))), data)
            for start in range(0, len(dataset), size)
        ]
        self.samples = len(dataset)

    async def evaluate(self, pipeline: Pipeline) -> EvalResult:
        loss_sum, correct, counted = 0.0, 0, 0
        for inputs, labels in self.batches:
            logits = await pipeline.infer(inputs)
            valid = labels != IGNORE_INDEX
            weight = int(valid.sum())
            loss_sum += float(loss_fn(logits, labels)) * weight
            correct += int((logits.argmax(dim=-1) == labels)[valid].sum())
            counted += weight
        return EvalResult(loss_sum / max(counted, 1), correct / max(counted, 1), self.samples)
