"""A stage boundary crossed inside one process, encoded exactly as the swarm's wire encodes it.

The local baseline (and `benchmarks/qat.py`) pushes each boundary's activations through the configured
boundary codec on the way forward and its gradient on the way back, so training sees the same rounding
a swarm sees; the bytes are those the stage RPC would put on the wire for the encoded tensors (a stage
server's reply, built by the same `wire.encode`), counted, not estimated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from hivemind.proto import runtime_pb2

from distqat.config import BoundaryConfig
from distqat.quant.lsq import LSQQuantizer
from distqat.swarm import boundary_codecs, wire


@dataclass
class BoundaryTraffic:
    activation_bytes: int = 0
    gradient_bytes: int = 0
    samples: int = 0  # training samples that crossed


@dataclass
class LocalBoundary:
    settings: BoundaryConfig  # as `QuantConfig.boundary_for` gives it
    quantizer: Callable[[], LSQQuantizer | None]  # the sending stage's output quantiser (for `codes`)
    traffic: BoundaryTraffic = field(default_factory=BoundaryTraffic)

    def carry(self, x: torch.Tensor, count: bool = True) -> torch.Tensor:
        if count:
            self.traffic.samples += len(x)
        return _Crossing.apply(x, self, count)

    def transfer(self, x: torch.Tensor, codec: str, count: bool) -> tuple[torch.Tensor, int]:
        payload, header = boundary_codecs.encode(x, codec, self.quantizer())
        nbytes = wire.encode(runtime_pb2.ExpertResponse, [payload], {"codec": header})[1] if count else 0
        return boundary_codecs.decode(payload, header).to(x.device, x.dtype), nbytes


class _Crossing(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, boundary: LocalBoundary, count: bool) -> torch.Tensor:
        ctx.boundary, ctx.count = boundary, count
        decoded, nbytes = boundary.transfer(x, boundary.settings.activations, count)
        boundary.traffic.activation_bytes += nbytes
        return decoded

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        boundary: LocalBoundary = ctx.boundary
        decoded, nbytes = boundary.transfer(grad, boundary.settings.gradients, ctx.count)
        boundary.traffic.gradient_bytes += nbytes
        return decoded, None, None
