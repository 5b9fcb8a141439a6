"""Frames of the direct tensor channel (`swarm/direct.py`): a length-prefixed msgpack header, then raw tensor bytes.

A frame is a 4-byte big-endian header length, a msgpack map, then the bytes of each tensor the map lists
under "tensors" (one {dtype, shape, nbytes, requires_grad} entry per tensor), back to back. Tensors leave
from their own memory (a memoryview of the contiguous CPU tensor goes to `sock_sendall`) and arrive with
`sock_recv_into` straight into the memory the received tensor then uses: no copy beyond the kernel's.

Everything read from the network is checked before memory is committed to it: the header's size, that it
is a map, the number of tensors, each dtype against a fixed list, shape x itemsize == nbytes, and the
whole frame against the channel's size limit. A violation raises ProtocolError with one line naming it.
"""

from __future__ import annotations

import asyncio
import math
import socket
import struct
from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np
import torch

PREFIX = struct.Struct(">I")
DTYPES: dict[str, torch.dtype] = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (
        torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.complex64, torch.complex128,
        torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool,
    )
}  # fmt: skip
MAX_TENSORS = 256
MAX_DIMS = 32


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame (a bug or a hostile peer); the connection is dropped."""


class TooLarge(ProtocolError):
    """A well-formed header announcing more tensor bytes than the channel accepts; `following` bytes follow it."""

    def __init__(self, message: str, following: int):
        super().__init__(message)
        self.following = following


class ConnectionClosed(ConnectionError):
    """The peer closed the connection (before or in the middle of a frame)."""


def describe(tensors: Sequence[torch.Tensor]) -> tuple[list[dict[str, Any]], list[memoryview]]:
    """Each tensor's header entry and its bytes, taken from its memory (a copy only when not contiguous)."""
    specs, buffers = [], []
    for original in tensors:
        tensor = original.detach().cpu().contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        specs.append(
            {
                "dtype": str(tensor.dtype).removeprefix("torch."),
                "shape": list(tensor.shape),
                "nbytes": nbytes,
                "requires_grad": original.requires_grad,
            }
        )
        if nbytes:
            # Byte view of the same storage; `.numpy()` refuses bfloat16, its uint8 view is fine.
            buffers.append(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return specs, buffers


def pack(header: dict[str, Any]) -> bytes:
    packed = msgpack.packb(header, use_bin_type=True)
    return PREFIX.pack(len(packed)) + packed


async def send(sock: socket.socket, header: dict[str, Any], tensors: Sequence[torch.Tensor] = ()) -> int:
    """Send one frame; returns its size in bytes."""
    loop = asyncio.get_running_loop()
    specs, buffers = describe(tensors)
    head = pack({**header, "tensors": specs})
    await loop.sock_sendall(sock, head)
    for buffer in buffers:
        await loop.sock_sendall(sock, buffer)
    return len(head) + sum(len(buffer) for buffer in buffers)


async def recv_exactly(sock: socket.socket, view: memoryview) -> None:
    loop = asyncio.get_running_loop()
    got = 0
    while got < len(view):
        count = await loop.sock_recv_into(sock, view[got:])
        if count == 0:
            raise ConnectionClosed(f"connection closed by the peer after {got} of {len(view)} bytes")
        got += count


def parse_specs(raw: Any, budget: int) -> list[tuple[torch.dtype, list[int], int, bool]]:
    """(dtype, shape, nbytes, requires_grad) of each tensor a header lists, or ProtocolError."""
    if not isinstance(raw, list) or len(raw) > MAX_TENSORS:
        raise ProtocolError(f"'tensors' must be a list of at most {MAX_TENSORS} entries")
    specs, total = [], 0
    for index, entry in enumerate(raw):
        where = f"tensor {index}"
        if not isinstance(entry, dict):
            raise ProtocolError(f"{where}: not a map")
        dtype = DTYPES.get(entry.get("dtype")) if isinstance(entry.get("dtype"), str) else None
        if dtype is None:
            raise ProtocolError(f"{where}: unknown dtype {entry.get('dtype')!r} (known: {', '.join(DTYPES)})")
        shape, nbytes = entry.get("shape"), entry.get("nbytes")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_DIMS
            or not all(isinstance(size, int) and not isinstance(size, bool) and size >= 0 for size in shape)
        ):
            raise ProtocolError(f"{where}: shape must be a list of at most {MAX_DIMS} non-negative integers")
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes != math.prod(shape) * dtype.itemsize:
            raise ProtocolError(f"{where}: nbytes {nbytes!r} does not match shape {shape} of {dtype}")
        total += nbytes
        specs.append((dtype, shape, nbytes, bool(entry.get("requires_grad", False))))
    if total > budget:
        raise TooLarge(f"{total} bytes of tensors exceed the channel's limit of {budget} bytes", total)
    return specs


async def discard(sock: socket.socket, count: int) -> None:
    """Read and drop `count` bytes (the payload of a refused frame) in constant memory."""
    loop = asyncio.get_running_loop()
    scratch = memoryview(bytearray(min(count, 1 << 16) or 1))
    while count > 0:
        got = await loop.sock_recv_into(sock, scratch[: min(count, len(scratch))])
        if got == 0:
            raise ConnectionClosed("connection closed by the peer while its refused payload was skipped")
        count -= got


async def receive(
    sock: socket.socket, max_bytes: int, *, eof_ok: bool = False
) -> tuple[dict[str, Any], list[torch.Tensor], int] | None:
    """One frame: (header without its tensor list, tensors, bytes on the wire). None when `eof_ok` and the
    peer closed cleanly between frames."""
    loop = asyncio.get_running_loop()
    prefix = bytearray(PREFIX.size)
    first = await loop.sock_recv_into(sock, prefix)
    if first == 0:
        if eof_ok:
            return None
        raise ConnectionClosed("connection closed by the peer before a reply")
    await recv_exactly(sock, memoryview(prefix)[first:])
    (length,) = PREFIX.unpack(prefix)
    if length > max_bytes:
        raise ProtocolError(f"header of {length} bytes exceeds the channel's limit of {max_bytes} bytes")
    packed = bytearray(length)
    await recv_exactly(sock, memoryview(packed))
    try:
        header = msgpack.unpackb(packed, raw=False)
    except Exception as error:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"header is not msgpack: {type(error).__name__}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header is not a map")
    specs = parse_specs(header.pop("tensors", []), max_bytes - length)
    tensors = []
    for dtype, shape, nbytes, requires_grad in specs:
        if nbytes == 0:
            tensor = torch.empty(shape, dtype=dtype)
        else:
            # Uninitialised (no memset of a buffer about to be overwritten), from numpy: glibc hands freed blocks
            # of this size back (measured: as cheap as reusing one buffer; torch.empty and bytearray are not).
            buffer = np.empty(nbytes, dtype=np.uint8)
            await recv_exactly(sock, memoryview(buffer))
            tensor = torch.from_numpy(buffer).view(dtype).reshape(shape)  # the tensor keeps the array alive
        if requires_grad and (tensor.is_floating_point() or tensor.is_complex()):
            tensor.requires_grad_(True)
        tensors.append(tensor)
    return header, tensors, PREFIX.size + length + sum(spec[2] for spec in specs)
