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


def _reference_grads(module: nn.Module, inputs: torch.Tensor, grad_out: torch.Tensor):
    """Gradients w.r.t. the parameters and the inputs of `module` as it is now, computed apart."""
    reference = copy.deepcopy(module)
    ref_inputs = inputs.clone().requires_grad_(True)
    reference(ref_inputs).backward(grad_out)
    return [p.grad.clone() for p in reference.parameters()], ref_inputs.grad


def test_interleaved_micro_batches_get_the_gradient_of_the_weights_their_forward_used() -> None:
    """Weight stashing: two callers' forwards at the same weights; the first backward steps the optimiser;
    the second backward still gets the gradient of the weights its forward ran with, applied to the new ones."""
    torch.manual_seed(1)
    module = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    replica = make_replica(module, lr=0.1)
    x1, x2 = torch.randn(2, 3), torch.randn(2, 3)
    g1, g2 = torch.randn(2, 2), torch.randn(2, 2)
    w0 = copy.deepcopy(module)
    ref_out2 = w0(x2).detach()
    grads1, ref_gin1 = _reference_grads(w0, x1, g1)
    grads2, ref_gin2 = _reference_grads(w0, x2, g2)

    replica.forward("a", "1", x1)
    out2 = replica.forward("b", "1", x2)  # same id, other caller: a separate micro-batch
    gin1 = replica.backward("a", "1", g1)  # steps the optimiser while b's graph is kept
    gin2 = replica.backward("b", "1", g2)  # must not raise autograd's in-place error, nor use stale values

    assert torch.allclose(out2, ref_out2)
    assert torch.allclose(gin1, ref_gin1) and torch.allclose(gin2, ref_gin2)
    for param, ref, d1, d2 in zip(module.parameters(), w0.parameters(), grads1, grads2, strict=True):
        assert torch.allclose(param, ref - 0.1 * d1 - 0.1 * d2, atol=1e-6)
    assert replica.weights_version == 2 and replica.in_flight == 0
    assert replica.stashed_versions == 1  # one copy of the weights, at the step that b's graph outlived


def test_one_micro_batch_in_flight_never_copies_the_weights() -> None:
    replica = make_replica(nn.Linear(4, 2))
    for step in range(3):
        replica.forward("t", str(step), torch.randn(2, 4))
        replica.backward("t", str(step), torch.randn(2, 2))
    assert replica.stashed_versions == 0 and replica.weights_version == 3


def test_weights_written_outside_keep_kept_graphs_valid() -> None:
    """A DiLoCo round or a state load writes the weights in place: `before_weight_change` first keeps the
    graphs of the micro-batches in flight on the weights they ran with (no stale graph, no autograd error)."""
    torch.manual_seed(2)
    module = nn.Linear(3, 2)
    replica = make_replica(module, lr=0.0)
    x, g = torch.randn(4, 3), torch.randn(4, 2)
    w0 = copy.deepcopy(module)
    _, ref_gin = _reference_grads(w0, x, g)
    replica.forward("t", "0", x)
    replica.before_weight_change()
    with torch.no_grad():
        module.weight.mul_(3.0)  # what an outer step does
    assert torch.allclose(replica.backward("t", "0", g), ref_gin)


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
