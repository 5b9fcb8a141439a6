"""LSQ golden values: forward, the straight-through input gradient and the step gradient, by hand."""

from __future__ import annotations

import math

import pytest
import torch

from distqat.quant.lsq import LSQQuantizer, quant_range


def run(quantizer: LSQQuantizer, values: list, step: list[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        quantizer.step.copy_(torch.tensor(step))
    x = torch.tensor(values, requires_grad=True)
    y = quantizer(x)
    y.sum().backward()
    return y.detach(), x.grad, quantizer.step.grad


def test_ranges() -> None:
    assert quant_range(2, signed=False) == (0, 3)
    assert quant_range(4, signed=True) == (8, 7)
    assert quant_range(8, signed=False) == (0, 255)
    with pytest.raises(ValueError, match=r"2\.\.8"):
        quant_range(9, signed=True)


def test_unsigned_2_bit_forward_and_gradients_by_hand() -> None:
    # s = 0.5, Qn = 0, Qp = 3. v/s = [-0.6, 0.4, 1.4, 2.4, 4.0]
    y, grad_x, grad_s = run(LSQQuantizer(2, signed=False), [-0.3, 0.2, 0.7, 1.2, 2.0], [0.5])
    assert y.tolist() == [0.0, 0.0, 0.5, 1.0, 1.5]
    assert grad_x.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]  # STE inside the range, zero outside
    # ds: below -> -Qn = 0; inside -> -v/s + round(v/s) = -0.4 (three times); above -> Qp = 3; times 1/sqrt(5 * 3)
    assert grad_s.item() == pytest.approx((0 - 0.4 - 0.4 - 0.4 + 3) / math.sqrt(5 * 3), abs=1e-6)


def test_signed_3_bit_forward_and_gradients_by_hand() -> None:
    # s = 0.25, Qn = 4, Qp = 3. v/s = [-6, -2.4, 0.4, 3.2, 4]
    y, grad_x, grad_s = run(LSQQuantizer(3, signed=True), [-1.5, -0.6, 0.1, 0.8, 1.0], [0.25])
    assert y.tolist() == [-1.0, -0.5, 0.0, 0.75, 0.75]
    assert grad_x.tolist() == [0.0, 1.0, 1.0, 0.0, 0.0]
    # -Qn + (2.4 - 2) + (-0.4 + 0) + Qp + Qp = 2.0
    assert grad_s.item() == pytest.approx(2.0 / math.sqrt(5 * 3), abs=1e-6)


def test_per_channel_steps_and_gradient_scale() -> None:
    quantizer = LSQQuantizer(2, signed=True, channel_dim=0, channels=2)  # Qn = 2, Qp = 1
    y, grad_x, grad_s = run(quantizer, [[0.3, -0.9], [0.06, 0.2]], [0.5, 0.1])
    # row 0: v/s = [0.6, -1.8] -> [1, -2]; row 1: [0.6, 2.0 (clamped to 1)] -> [1, 1]
    assert torch.allclose(y, torch.tensor([[0.5, -1.0], [0.1, 0.1]]))
    assert grad_x.tolist() == [[1.0, 1.0], [1.0, 0.0]]
    # row 0: (-0.6 + 1) + (1.8 - 2) = 0.2; row 1: (-0.6 + 1) + Qp = 1.4; N = 2 weights per channel
    assert torch.allclose(grad_s, torch.tensor([0.2, 1.4]) / math.sqrt(2 * 1), atol=1e-6)


def test_activation_gradient_scale_counts_one_samples_features() -> None:
    quantizer = LSQQuantizer(4, signed=False, activation=True)
    assert quantizer.grad_scale(torch.ones(8, 3, 5)) == pytest.approx(1 / math.sqrt(15 * 15))
    weight = LSQQuantizer(4, signed=True)
    assert weight.grad_scale(torch.ones(8, 3, 5)) == pytest.approx(1 / math.sqrt(120 * 7))


def test_initialisation_is_the_papers() -> None:
    x = torch.tensor([[1.0, -3.0], [0.5, 0.5]])
    per_tensor = LSQQuantizer(4, signed=True)
    per_tensor.initialise(x)
    assert per_tensor.step.item() == pytest.approx(2 * 1.25 / math.sqrt(7))
    assert bool(per_tensor.initialised)
    per_channel = LSQQuantizer(4, signed=True, channel_dim=0, channels=2)
    per_channel.initialise(x)
    assert torch.allclose(per_channel.step, torch.tensor([2 * 2.0, 2 * 0.5]) / math.sqrt(7))


def test_outputs_are_exactly_codes_times_step() -> None:
    quantizer = LSQQuantizer(4, signed=True)
    x = torch.randn(1000) * 3
    quantizer.initialise(x)
    y = quantizer(x)
    codes = quantizer.codes(x)
    assert torch.equal(y, codes * quantizer.effective_step())
    assert codes.min() >= -8 and codes.max() <= 7
    assert len(torch.unique(y)) <= 16
