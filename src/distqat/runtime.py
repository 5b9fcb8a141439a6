"""Per-process set-up shared by every role: logging to stderr, thread count, device choice."""

from __future__ import annotations

import logging
import os

import torch

from distqat.errors import ConfigError
from distqat.observability.logs import setup_logging


def setup_role_process(role: str) -> logging.Logger:
    """Log to stderr (the launcher sends it to the role's file; each line names the role and, once its DHT is
    up, the peer; DISTQAT_LOGLEVEL sets the level) and use the threads the launcher gave us."""
    try:
        setup_logging(role)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    threads = os.environ.get("DISTQAT_NUM_THREADS")
    if threads:
        torch.set_num_threads(max(1, int(threads)))
    return logging.getLogger(f"distqat.{role}")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: '{device}' requested but no CUDA device is visible (use --device cpu)")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device: 'mps' requested but MPS is not available (use --device cpu)")
    return torch.device(device)


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """The autocast context of a precision setting; fp32 (and fp16 on CPU, which it cannot run fast) disable it."""
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16
    enabled = not (device.type == "cpu" and dtype == torch.float16)
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)
