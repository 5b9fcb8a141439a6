"""Encodings of a stage boundary's traffic (activations forward, gradients back): none, fp16, int8, codes.

An encoded tensor travels as one payload tensor plus a small header that rides in the call's msgpack
metadata under "codec", so the stage RPC's wire format is unchanged and its byte counts stay exact.

- `none`: float32 as is. `fp16`: half precision (relative error <= 2^-11 in the normal range).
- `int8`: the blockwise absmax code of `distqat.swarm.codecs` (one byte per value plus one float32 scale per
  1024 values; error <= absmax(block) / 254).
- `codes`: for a stage whose output is LSQ-quantised to k bits, the integer codes themselves, bit-packed
  (8 / k values per byte when k divides 8, a continuous bit stream otherwise), plus the step. Decoding
  computes code * step in float32, the same product the quantiser computed: the values are bit-exact.

The trainer relays a payload to the next stage as it came, without decoding it, so no hop adds error.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from hivemind.proto import runtime_pb2

from distqat.quant.lsq import MAX_BITS, MIN_BITS, LSQQuantizer, quant_range
from distqat.swarm.codecs import BlockwiseInt8

Header = dict[str, Any]
CODECS = ("none", "fp16", "int8", "codes")
_INT8 = BlockwiseInt8()


class CodecError(ValueError):
    """A payload and its header do not fit together (a buggy or hostile peer)."""


def encode(x: torch.Tensor, codec: str, quantizer: LSQQuantizer | None = None) -> tuple[torch.Tensor, Header]:
    """(payload, header) of a float tensor; `codes` needs the per-tensor quantiser whose output x is."""
    x = x.detach().to("cpu", torch.float32)
    shape = list(x.shape)
    if codec == "none":
        return x, {"codec": "none"}
    if codec == "fp16":
        return x.half(), {"codec": "fp16"}
    if codec == "int8":
        serialized = _INT8.compress(x, info=None)  # type: ignore[arg-type]  (ours ignores `info`)
        payload = torch.frombuffer(bytearray(serialized.buffer), dtype=torch.uint8)
        return payload, {"codec": "int8", "shape": shape}
    if codec == "codes":
        if quantizer is None or quantizer.channel_dim is not None:
            raise ValueError("the codes encoding needs the stage's per-tensor output quantiser")
        step = quantizer.effective_step().to("cpu", torch.float32).reshape(())
        codes = torch.clamp(torch.round(x / step), -quantizer.qn, quantizer.qp).to(torch.int32)
        unsigned = (codes + quantizer.qn).to(torch.uint8).reshape(-1)
        header = {
            "codec": "codes",
            "bits": quantizer.bits,
            "signed": quantizer.signed,
            "step": float(step),  # float32 -> float64 -> float32 is exact
            "shape": shape,
        }
        return pack(unsigned, quantizer.bits), header
    raise ValueError(f"unknown boundary codec '{codec}' (known: {', '.join(CODECS)})")


def decode(payload: torch.Tensor, header: Header | None) -> torch.Tensor:
    """The float32 tensor a (payload, header) stands for; no header: the tensor as sent (e.g. token ids)."""
    if header is None:
        return payload
    codec = header.get("codec")
    if codec == "none":
        if not payload.is_floating_point():
            raise CodecError(f"codec 'none' expects a float tensor, got {payload.dtype}")
        return payload.float()
    if codec == "fp16":
        if payload.dtype != torch.float16:
            raise CodecError(f"codec 'fp16' expects a float16 tensor, got {payload.dtype}")
        return payload.float()
    if codec not in CODECS:
        raise CodecError(f"unknown boundary codec '{codec}' (known: {', '.join(CODECS)})")
    shape = _shape(header)
    count = math.prod(shape)
    if codec == "int8":
        blocks = max(1, math.ceil(count / 1024))
        if payload.dtype != torch.uint8 or payload.numel() != blocks * (4 + 1024):
            raise CodecError(f"codec 'int8': {payload.numel()} bytes do not hold shape {shape}")
        serialized = runtime_pb2.Tensor(
            compression=_INT8.compression_type, buffer=payload.numpy().tobytes(), size=shape, dtype="float32"
        )
        return _INT8.extract(serialized)
    # codes
    bits, signed, step = header.get("bits"), header.get("signed"), header.get("step")
    if not (isinstance(bits, int) and MIN_BITS <= bits <= MAX_BITS and isinstance(signed, bool)):
        raise CodecError(f"codec 'codes': bad bits/signed in header {header}")
    if not (isinstance(step, float) and step > 0):
        raise CodecError(f"codec 'codes': bad step in header {header}")
    if payload.dtype != torch.uint8 or payload.numel() != packed_size(count, bits):
        raise CodecError(f"codec 'codes': {payload.numel()} bytes do not hold {count} {bits}-bit codes")
    qn, _ = quant_range(bits, signed)
    codes = unpack(payload, bits, count).to(torch.float32) - qn
    return (codes * torch.tensor(step, dtype=torch.float32)).reshape(shape)


def _shape(header: Header | None) -> list[int]:
    shape = None if header is None else header.get("shape")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise CodecError(f"bad shape in codec header {header}")
    return shape


# --- bit packing: codes are unsigned integers below 2^bits ---------------------------------------------


def packed_size(count: int, bits: int) -> int:
    return math.ceil(count * bits / 8)


def pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned `bits`-bit values (uint8, flat) into bytes, lowest bits first."""
    values = values.reshape(-1).to(torch.uint8)
    count = values.numel()
    if bits == 8:
        return values.clone()
    if 8 % bits == 0:
        per_byte = 8 // bits
        padded = torch.zeros(packed_size(count, bits) * per_byte, dtype=torch.uint8)
        padded[:count] = values
        lanes = padded.view(-1, per_byte)
        packed = torch.zeros(lanes.shape[0], dtype=torch.uint8)
        for lane in range(per_byte):
            packed |= lanes[:, lane] << (bits * lane)
        return packed
    # 3, 5, 6, 7 bits: a continuous little-endian bit stream
    planes = (values.numpy()[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little"))


def unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The inverse of `pack`: `count` uint8 values."""
    if bits == 8:
        return packed[:count].clone()
    if 8 % bits == 0:
        per_byte = 8 // bits
        mask = (1 << bits) - 1
        lanes = [(packed >> (bits * lane)) & mask for lane in range(per_byte)]
        return torch.stack(lanes, dim=1).reshape(-1)[:count]
    planes = np.unpackbits(packed.numpy(), count=count * bits, bitorder="little").reshape(count, bits)
    values = (planes.astype(np.uint8) << np.arange(bits, dtype=np.uint8)).sum(axis=1, dtype=np.uint8)
    return torch.from_numpy(values)
