"""Wire format of the stage RPC: tensors plus a msgpack metadata dict, split into stream messages.

A call is a stream of hivemind `ExpertRequest`/`ExpertResponse` protobufs. The first message carries the
metadata; every message carries at most one chunk of one serialized tensor, so no message exceeds the
daemon's frame limit (4 MiB) whatever the activation size; an empty message ends the stream. hivemind
ends a stream silently when the connection drops, so only the end marker tells a whole reply from a cut
one. The byte counts returned are what really crossed the wire (tensor buffers plus metadata).
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
    parts: Iterator[runtime_pb2.Tensor] = (
        part
        for tensor in tensors
        for part in split_for_streaming(serialize_torch_tensor(tensor.detach().cpu(), compression), CHUNK_BYTES)
    )
    messages = [message_type(metadata=packed_metadata)]
    nbytes = len(packed_metadata)
    for part in parts:
        nbytes += len(part.buffer)
        if len(messages) == 1 and not messages[0].tensors:
            messages[0].tensors.append(part)
        else:
            messages.append(message_type(tensors=[part]))
    messages.append(message_type())  # end marker: the stream's last message, with no metadata and no tensors
    return messages, nbytes


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
            nbytes += len(part.buffer)
            # The first chunk of a tensor carries its dtype; continuation chunks carry only bytes.
            if part.dtype or not groups:
                groups.append([part])
            else:
                groups[-1].append(part)
    if metadata is None or not complete:
        raise TruncatedStream("the stream ended before its end marker")
    tensors = [deserialize_torch_tensor(combine_from_streaming(group)) for group in groups]
    return tensors, metadata, nbytes


async def iterate(messages: Sequence[Message]) -> AsyncIterator[Message]:
    for message in messages:
        yield message
