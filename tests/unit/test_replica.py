"""A stage replica's gradients equal a local reference, with graphs kept between forward and backward."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

from distqat.distributed.replica import StageReplica
from distqat.errors import StageCallError


def make_replica(module: nn.Module, lr: float = 0.1, inputs_need_grad: bool = True) -> StageReplica:
    return StageReplica(
        module,
        torch.optim.SGD(module.parameters(), lr=lr),
        torch.device("cpu"),
        autocast=contextlib.nullcontext,
        inputs_need_grad=inputs_need_grad,
    )


def test_forward_backward_matches_local_autograd_and_steps() -> None:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    reference = copy.deepcopy(module)
    replica = make_replica(module)
    inputs, grad_out = torch.randn(4, 6), torch.randn(4, 3)

    outputs = replica.forward("trainer", "0", inputs)
    grad_in = replica.backward("trainer", "0", grad_out)

    ref_inputs = inputs.clone().requires_grad_(True)
    ref_out = reference(ref_inputs)
    ref_out.backward(grad_out)
    assert torch.allclose(outputs, ref_out.detach())
    assert torch.allclose(grad_in, ref_inputs.grad)
    for param, ref_param in zip(module.parameters(), reference.parameters(), strict=True):
        assert torch.allclose(param, ref_param - 0.1 * ref_param.grad)
    assert replica.weights_version == 1
    assert replica.samples == 4
    assert replica.in_flight == 0


def test_backward_after_weights_moved_recomputes_with_current_weights() -> None:
    torch.manual_seed(1)
    module = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    replica = make_replica(module)
    x1, x2 = torch.randn(2, 3), torch.randn(2, 3)
    g1, g2 = torch.randn(2, 2), torch.randn(2, 2)
    replica.forward("a", "1", x1)
    replica.forward("b", "1", x2)  # same id, other caller: a separate micro-batch
    replica.backward("a", "1", g1)  # steps the optimiser: b's kept graph is now stale

    reference = copy.deepcopy(module)
    ref_x2 = x2.clone().requires_grad_(True)
    reference(ref_x2).backward(g2)
    grad_in = replica.backward("b", "1", g2)  # must not raise autograd's in-place error
    assert replica.recomputed_forwards == 1
    assert torch.allclose(grad_in, ref_x2.grad)


def test_first_stage_returns_no_input_gradient() -> None:
    replica = make_replica(nn.Linear(2, 2), inputs_need_grad=False)
    replica.forward("t", "0", torch.randn(1, 2))
    assert replica.backward("t", "0", torch.ones(1, 2)) is None


def test_unknown_or_expired_micro_batch_is_a_clear_error() -> None:
    replica = make_replica(nn.Linear(2, 2))
    with pytest.raises(StageCallError, match="unknown micro-batch '9'"):
        replica.backward("t", "9", torch.ones(1, 2))
    replica.forward("t", "1", torch.randn(1, 2))
    assert replica.drop_expired(max_age_s=-1.0) == 1
    with pytest.raises(StageCallError):
        replica.backward("t", "1", torch.ones(1, 2))


def test_gradient_shape_mismatch_is_rejected() -> None:
    replica = make_replica(nn.Linear(2, 2))
    replica.forward("t", "0", torch.randn(3, 2))
    with pytest.raises(StageCallError, match="gradient of shape"):
        replica.backward("t", "0", torch.ones(2, 2))
