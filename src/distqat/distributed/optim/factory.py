"""Build a torch optimiser from an `OptimConfig` section (`adam`, `adamw`, `sgd` with the documented fields)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from distqat.config import OptimConfig


def build_optimizer(params: Iterable[torch.nn.Parameter], config: OptimConfig) -> torch.optim.Optimizer:
    params = list(params)
    if config.type == "sgd":
        return torch.optim.SGD(params, lr=config.sgd_lr, momentum=config.sgd_momentum, nesterov=config.sgd_nesterov)
    optimizer_class = torch.optim.AdamW if config.type == "adamw" else torch.optim.Adam
    arguments = dict(
        lr=config.adam_lr, betas=(config.adam_betas1, config.adam_betas2), weight_decay=config.adam_weight_decay
    )
    # torch's fused kernel updates every parameter in one pass instead of a dozen elementwise ops each: on one
    # CPU core the step of ResNet-18's tail (10.5 M parameters) takes ~10 ms instead of ~86 ms, and a stage
    # server's step is on its trainers' critical path. The parameters' device or dtype may not have it.
    try:
        return optimizer_class(params, **arguments, fused=True)
    except RuntimeError:
        return optimizer_class(params, **arguments)
