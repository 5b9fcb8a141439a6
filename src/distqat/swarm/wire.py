"""Wire format of the stage RPC: tensors plus a msgpack metadata dict, split into stream messages.

A call is a stream of hivemind `ExpertRequest`/`ExpertResponse` protobufs. The first message carries the
metadata; every message carries at most one chunk of one serialized tensor, so no message exceeds the
daemon's frame limit (4 MiB) whatever the activation size; an empty message ends the stream. hivemind
ends a stream silently when the connection drops, so only the end marker tells a whole reply from a cut
one. The byte counts returned are what really crossed the wire (tensor buffers plus metadata).

Uncompressed tensors (all stage traffic: the boundary codecs compress before the wire) take a short path
with as few copies as protobuf allows: each chunk is cut straight from the tensor's memory, and a reply is
reassembled once into the buffer the received tensor then uses (hivemind's path copies each 3 MB
activation 3-5 times more). The messages are the same as hivemind's, so either side may use either path.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, TypeVar

import msgpack
import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2
from hivemind.utils.streaming import combine_from_streaming, split_for_streaming

CHUNK_BYTES = 2 * 1024**2  # half the daemon's 4 MiB frame limit, leaving room for protobuf framing

Message = TypeVar("Message", runtime_pb2.ExpertRequest, runtime_pb2.ExpertResponse)


def encode(
    message_type: type[Message],
    tensors: Sequence[torch.Tensor],
    metadata: dict[str, Any],
    compression: runtime_pb2.CompressionType = runtime_pb2.CompressionType.NONE,
) -> tuple[list[Message], int]:
    """Split tensors and metadata into stream messages; returns (messages, bytes on the wire)."""
    packed_metadata = msgpack.packb(metadata, use_bin_type=True)
    # A part is a Tensor message (hivemind's codecs) or the fields of one (ours: built in place, one copy less).
    parts: Iterator[runtime_pb2.Tensor | dict[str, Any]] = (
        part
        for tensor in tensors
        for part in (
            _raw_parts(tensor.detach().cpu())
            if compression == runtime_pb2.CompressionType.NONE
            else split_for_streaming(serialize_torch_tensor(tensor.detach().cpu(), compression), CHUNK_BYTES)
        )
    )
    messages = [message_type(metadata=packed_metadata)]
    nbytes = len(packed_metadata)
    for part in parts:
        if len(messages) == 1 and not messages[0].tensors:
            target = messages[0]
        else:
            target = message_type()
            messages.append(target)
        if isinstance(part, dict):
            nbytes += len(part["buffer"])
            target.tensors.add(**part)
        else:
            nbytes += len(part.buffer)
            target.tensors.append(part)
    messages.append(message_type())  # end marker: the stream's last message, with no metadata and no tensors
    return messages, nbytes


def _raw_parts(tensor: torch.Tensor) -> Iterator[dict[str, Any]]:
    """Fields of hivemind's NONE encoding of `tensor` in CHUNK_BYTES chunks, cut from the tensor's memory."""
    data = memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
    chunks = max(1, -(-len(data) // CHUNK_BYTES))
    yield dict(
        compression=runtime_pb2.CompressionType.NONE,
        buffer=bytes(data[:CHUNK_BYTES]),
        chunks=chunks,
        size=tensor.shape,
        dtype=str(tensor.dtype).removeprefix("torch."),
        requires_grad=tensor.requires_grad,
    )
    for start in range(CHUNK_BYTES, len(data), CHUNK_BYTES):
        yield {"buffer": bytes(data[start : start + CHUNK_BYTES])}


def _tensor_from_parts(parts: list[runtime_pb2.Tensor], buffers: list[bytes]) -> torch.Tensor:
    """The tensor of one group of chunks; `buffers` are their payloads, read once from protobuf."""
    head = parts[0]
    dtype = getattr(torch, head.dtype, None) if head.dtype else None
    shape = torch.Size(head.size)
    nbytes = sum(len(buffer) for buffer in buffers)
    if (
        head.compression != runtime_pb2.CompressionType.NONE
        or not isinstance(dtype, torch.dtype)
        or nbytes != shape.numel() * dtype.itemsize  # e.g. hivemind's legacy bfloat16-as-float32
    ):
        return deserialize_torch_tensor(combine_from_streaming(parts))
    joined = bytearray().join(buffers)  # the one copy: the tensor owns this buffer
    tensor = torch.frombuffer(joined, dtype=dtype) if nbytes else torch.empty(0, dtype=dtype)
    return tensor.reshape(shape).requires_grad_(head.requires_grad)


def is_end_marker(message: Message) -> bool:
    # The first message always has metadata (msgpack of a dict is >= 1 byte), later ones always a tensor chunk.
    return not message.metadata and not message.tensors


class TruncatedStream(Exception):
    """The stream ended before its end marker: the peer or the connection dropped (part of) the reply."""


async def decode(stream: AsyncIterator[Message]) -> tuple[list[torch.Tensor], dict[str, Any], int]:
    """Reassemble (tensors, metadata, bytes on the wire) from a stream made by `encode`; a stream that ends
    before its end marker raises TruncatedStream."""
    metadata: dict[str, Any] | None = None
    groups: list[list[runtime_pb2.Tensor]] = []
    payloads: list[list[bytes]] = []
    nbytes = 0
    complete = False
    async for message in stream:
        if is_end_marker(message):
            complete = True
            break
        if metadata is None:
            metadata = msgpack.unpackb(message.metadata, raw=False) if message.metadata else {}
            nbytes += len(message.metadata)
        for part in message.tensors:
            buffer = part.buffer  # protobuf hands out a copy on every read: read it once
            nbytes += len(buffer)
            # The first chunk of a tensor carries its dtype; continuation chunks carry only bytes.
            if part.dtype or not groups:
                groups.append([part])
                payloads.append([buffer])
            else:
                groups[-1].append(part)
                payloads[-1].append(buffer)
    if metadata is None or not complete:
        raise TruncatedStream("the stream ended before its end marker")
    tensors = [_tensor_from_parts(group, buffers) for group, buffers in zip(groups, payloads, strict=True)]
    return tensors, metadata, nbytes


async def iterate(messages: Sequence[Message]) -> AsyncIterator[Message]:
    for message in messages:
        yield message
