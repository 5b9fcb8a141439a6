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
    return optimizer_class(
        params,
        lr=config.adam_lr,
        betas=(config.adam_betas1, config.adam_betas2),
        weight_decay=config.adam_weight_decay,
    )
