"""Boundary codecs: integer codes round-trip exactly at every bit width, int8/fp16 within their bounds,
and the bytes on the wire are what the encoding promises."""

from __future__ import annotations

import pytest
import torch
from hivemind.proto import runtime_pb2

from distqat.quant.lsq import LSQQuantizer
from distqat.swarm import boundary_codecs, wire


def wire_bytes(payload: torch.Tensor, header: dict) -> int:
    return wire.encode(runtime_pb2.ExpertRequest, [payload], {"mb": "0", "codec": header})[1]


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("signed", [False, True])
def test_codes_round_trip_exactly(bits: int, signed: bool) -> None:
    torch.manual_seed(bits)
    quantizer = LSQQuantizer(bits, signed=signed, activation=True)
    x = torch.randn(3, 7, 5) * 2
    x = x if signed else x.relu()
    quantizer.initialise(x)
    quantized = quantizer(x).detach()
    payload, header = boundary_codecs.encode(quantized, "codes", quantizer)
    assert payload.dtype == torch.uint8
    assert payload.numel() == -(-x.numel() * bits // 8)  # ceil(n * bits / 8)
    assert torch.equal(boundary_codecs.decode(payload, header), quantized)  # bit-exact


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_unpack_every_value(bits: int) -> None:
    values = torch.arange(2**bits, dtype=torch.uint8).repeat(3)[:-1]  # a count that does not fill the last byte
    packed = boundary_codecs.pack(values, bits)
    assert torch.equal(boundary_codecs.unpack(packed, bits, values.numel()), values)


def test_fp16_and_int8_errors_are_bounded() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3000) * 5
    payload, header = boundary_codecs.encode(x, "fp16")
    assert payload.dtype == torch.float16
    assert torch.allclose(boundary_codecs.decode(payload, header), x, rtol=2**-11, atol=1e-7)
    payload, header = boundary_codecs.encode(x, "int8")
    decoded = boundary_codecs.decode(payload, header)
    flat = x.reshape(-1)
    bound = torch.cat([block.abs().max().expand(len(block)) for block in flat.split(1024)]) / 254
    assert ((decoded.reshape(-1) - flat).abs() <= bound + 1e-6).all()
    payload, header = boundary_codecs.encode(x, "none")
    assert torch.equal(boundary_codecs.decode(payload, header), x)


def test_wire_bytes_shrink_with_the_encoding() -> None:
    x = torch.rand(64, 32, 7, 7)
    quantizer = LSQQuantizer(4, signed=False, activation=True)
    quantizer.initialise(x)
    sizes = {
        codec: wire_bytes(*boundary_codecs.encode(quantizer(x) if codec == "codes" else x, codec, quantizer))
        for codec in boundary_codecs.CODECS
    }
    assert sizes["none"] > 4 * x.numel()
    assert sizes["fp16"] == pytest.approx(sizes["none"] / 2, rel=0.01)
    assert sizes["int8"] == pytest.approx(sizes["none"] / 4, rel=0.02)
    assert sizes["none"] / sizes["codes"] > 7.9  # 4-bit codes: 8x fewer, less a header


def test_bad_payloads_are_refused() -> None:
    payload, header = boundary_codecs.encode(torch.ones(10), "int8")
    with pytest.raises(boundary_codecs.CodecError, match="do not hold"):
        boundary_codecs.decode(payload[:-1], header)
    with pytest.raises(boundary_codecs.CodecError, match="unknown boundary codec"):
        boundary_codecs.decode(payload, {"codec": "zip"})
    with pytest.raises(boundary_codecs.CodecError, match="bad step"):
        boundary_codecs.decode(
            torch.zeros(5, dtype=torch.uint8),
            {"codec": "codes", "bits": 8, "signed": False, "step": -1.0, "shape": [5]},
        )
