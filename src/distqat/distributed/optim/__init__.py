"""Optimisers of the roles: the inner optimiser of a stage replica (DiLoCo's outer loop builds on it)."""

from distqat.distributed.optim.factory import build_optimizer

__all__ = ["build_optimizer"]
