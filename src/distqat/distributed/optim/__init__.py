"""Optimisers of the roles: the inner optimiser of a stage replica (`factory`), DiLoCo's outer loop
(`diloco`), and when a stage's replicas average (`collaborative`)."""

from distqat.distributed.optim.factory import build_optimizer

__all__ = ["build_optimizer"]
