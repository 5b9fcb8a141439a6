"""The stage RPC's wire format: exact round trips, chunking below the daemon's 4 MiB frame limit."""

from __future__ import annotations

import asyncio

import pytest
import torch
from hivemind.proto import runtime_pb2

from distqat.swarm import wire


def round_trip(tensors, metadata):
    messages, sent = wire.encode(runtime_pb2.ExpertRequest, tensors, metadata)
    decoded, decoded_metadata, received = asyncio.run(wire.decode(wire.iterate(messages)))
    return messages, sent, decoded, decoded_metadata, received


def test_round_trip_is_exact_and_counts_bytes() -> None:
    tensors = [torch.randn(4, 3), torch.arange(5), torch.zeros(0)]
    _, sent, decoded, metadata, received = round_trip(tensors, {"mb": "7", "want_grad": False})
    assert metadata == {"mb": "7", "want_grad": False}
    assert len(decoded) == 3
    for original, copy in zip(tensors, decoded, strict=True):
        assert copy.dtype == original.dtype
        assert torch.equal(copy, original)
    assert sent == received
    assert sent >= 4 * 3 * 4 + 5 * 8


def test_large_tensors_are_split_into_frames_under_the_limit() -> None:
    big = torch.randn(3, 1024, 1024)  # 12 MiB
    messages, sent, decoded, _, _ = round_trip([big, torch.ones(2)], {})
    assert len(messages) >= 6
    assert max(message.ByteSize() for message in messages) < 4 * 1024**2
    assert torch.equal(decoded[0], big)
    assert torch.equal(decoded[1], torch.ones(2))
    assert sent > big.numel() * 4


def test_no_tensors_still_carries_metadata() -> None:
    messages, _, decoded, metadata, _ = round_trip([], {"k": [1, 2]})
    assert len(messages) == 2  # the metadata, then the end marker
    assert decoded == []
    assert metadata == {"k": [1, 2]}


def test_an_empty_stream_is_a_truncated_reply_not_an_empty_one() -> None:
    async def nothing():
        return
        yield

    with pytest.raises(wire.TruncatedStream):
        asyncio.run(wire.decode(nothing()))


def test_a_stream_cut_before_its_end_marker_is_truncated() -> None:
    messages, _ = wire.encode(runtime_pb2.ExpertRequest, [torch.randn(1024, 1024)], {"mb": "1"})
    assert len(messages) >= 3
    with pytest.raises(wire.TruncatedStream):
        asyncio.run(wire.decode(wire.iterate(messages[:-1])))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.bool])
def test_short_path_round_trips_every_boundary_dtype_and_shape(dtype) -> None:
    tensors = [
        (torch.randn(3, 2_000_000) * 50).to(dtype),  # several chunks
        torch.tensor(3).to(dtype),  # 0-dim
        torch.ones(2, 0, 3, dtype=dtype),  # empty
        torch.randn(4, 6).t().to(dtype),  # not contiguous
    ]
    _, sent, decoded, _, received = round_trip(tensors, {})
    for original, copy in zip(tensors, decoded, strict=True):
        assert copy.dtype == original.dtype and copy.shape == original.shape
        assert torch.equal(copy, original)
    assert sent == received


def test_short_path_speaks_hivemind_encoding_both_ways() -> None:
    """Our messages decode with hivemind's codec, and hivemind's (an older peer's) with ours."""
    from hivemind.compression import deserialize_torch_tensor
    from hivemind.utils.streaming import combine_from_streaming

    tensor = torch.randn(700_000)
    ours, _ = wire.encode(runtime_pb2.ExpertResponse, [tensor], {})
    parts = [part for message in ours for part in message.tensors]
    assert len(parts) == 2
    assert torch.equal(deserialize_torch_tensor(combine_from_streaming(parts)), tensor)
    # hivemind's own encoding (taken for any compression other than NONE; FLOAT16 here) decodes with ours
    theirs, _ = wire.encode(runtime_pb2.ExpertResponse, [tensor], {}, compression=runtime_pb2.CompressionType.FLOAT16)
    (decoded,), _, _ = asyncio.run(wire.decode(wire.iterate(theirs)))
    assert torch.allclose(decoded, tensor, atol=1e-2, rtol=1e-3)
