"""Frames of the direct tensor channel over a real socket pair: exact round trips and refusal of bad input."""

from __future__ import annotations

import asyncio
import socket
import struct
import time

import msgpack
import pytest
import torch

from distqat.swarm import direct, frames, tickets


def exchange(header: dict, tensors: list[torch.Tensor], max_bytes: int = 2**30, raw: bytes | None = None):
    """Send one frame (or raw bytes) on one end of a socket pair and receive it on the other."""

    async def run():
        left, right = socket.socketpair()
        for end in (left, right):
            end.setblocking(False)
        try:
            if raw is None:
                sending = asyncio.ensure_future(frames.send(left, header, tensors))
            else:
                sending = asyncio.ensure_future(asyncio.get_running_loop().sock_sendall(left, raw))
            received = await frames.receive(right, max_bytes)
            sent = await sending
            return sent, received
        finally:
            left.close()
            right.close()

    return asyncio.run(run())


def test_round_trip_of_dtypes_shapes_empty_and_non_contiguous_tensors() -> None:
    tensors = [
        torch.randn(4, 3),
        torch.randn(6, 5).t(),  # non-contiguous
        torch.randn(2, 3, dtype=torch.float16),
        torch.randn(3, dtype=torch.bfloat16),
        torch.randint(0, 255, (1000,), dtype=torch.uint8),
        torch.randint(-100, 100, (7,), dtype=torch.int8),
        torch.arange(5),
        torch.tensor([True, False, True]),
        torch.tensor(3.5),  # 0-dim
        torch.zeros(0, 4),  # empty
        torch.randn(2, 2).requires_grad_(True),
        torch.randn(3, 1024, 1024),  # 12 MiB: many recv calls
    ]
    sent, (header, received, nbytes) = exchange({"metadata": {"mb": "7", "codec": {"codec": "none"}}}, tensors)
    assert header == {"metadata": {"mb": "7", "codec": {"codec": "none"}}}
    assert sent == nbytes
    assert nbytes >= sum(t.numel() * t.element_size() for t in tensors)
    assert len(received) == len(tensors)
    for original, copy in zip(tensors, received, strict=True):
        assert copy.dtype == original.dtype and copy.shape == original.shape
        assert torch.equal(copy, original.detach())
        assert copy.requires_grad == original.requires_grad
    received[0].add_(1)  # received tensors own writable memory


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"dtype": "float99", "shape": [2], "nbytes": 8}, "unknown dtype"),
        ({"dtype": "float32", "shape": [2], "nbytes": 9}, "does not match shape"),
        ({"dtype": "float32", "shape": [-2], "nbytes": 8}, "non-negative integers"),
        ({"dtype": "float32", "shape": "2", "nbytes": 8}, "non-negative integers"),
        ("float32", "not a map"),
    ],
)
def test_bad_tensor_entries_are_refused_with_a_line_naming_them(entry, message: str) -> None:
    with pytest.raises(frames.ProtocolError, match=message):
        frames.parse_specs([entry], 2**20)


def test_too_many_tensors_and_oversize_frames_are_refused() -> None:
    with pytest.raises(frames.ProtocolError, match="at most"):
        frames.parse_specs([{"dtype": "uint8", "shape": [1], "nbytes": 1}] * (frames.MAX_TENSORS + 1), 2**20)
    entries = [{"dtype": "float32", "shape": [1024], "nbytes": 4096}] * 3
    with pytest.raises(frames.TooLarge, match="exceed the channel's limit") as caught:
        frames.parse_specs(entries, 10000)
    assert caught.value.following == 3 * 4096  # what the server skips to stay in step


def test_receive_refuses_an_oversize_header_and_garbage() -> None:
    with pytest.raises(frames.ProtocolError, match="header of 100000 bytes exceeds"):
        exchange({}, [], max_bytes=1000, raw=struct.pack(">I", 100000))
    with pytest.raises(frames.ProtocolError, match="not msgpack"):
        exchange({}, [], raw=struct.pack(">I", 3) + b"\xc1\xc1\xc1")
    packed = msgpack.packb([1, 2])
    with pytest.raises(frames.ProtocolError, match="not a map"):
        exchange({}, [], raw=struct.pack(">I", len(packed)) + packed)


def test_a_frame_cut_short_is_a_closed_connection() -> None:
    async def run():
        left, right = socket.socketpair()
        right.setblocking(False)
        head = frames.pack({"tensors": [{"dtype": "float32", "shape": [100], "nbytes": 400}]})
        left.sendall(head + b"x" * 10)
        left.close()
        try:
            await frames.receive(right, 2**20)
        finally:
            right.close()

    with pytest.raises(frames.ConnectionClosed, match="after 10 of 400 bytes"):
        asyncio.run(run())


def test_announced_host_and_address_parsing() -> None:
    maddrs = ["/ip4/0.0.0.0/tcp/1", "/ip4/10.1.2.3/tcp/4000/p2p/Qm"]
    assert direct.tensor_host("127.0.0.1", None, maddrs) == "127.0.0.1"
    assert direct.tensor_host("0.0.0.0", "203.0.113.5", maddrs) == "203.0.113.5"
    assert direct.tensor_host("0.0.0.0", None, maddrs) == "10.1.2.3"
    assert direct.tensor_host("0.0.0.0", None, []) == "127.0.0.1"
    assert direct.parse_address("10.1.2.3:4000") == ("10.1.2.3", 4000)
    for bad in ("nohost:1", "10.1.2.3", "10.1.2.3:0", "10.1.2.3:x"):
        with pytest.raises(ValueError, match="tensor address"):
            direct.parse_address(bad)


def test_tickets_are_bound_to_a_peer_bounded_and_expire() -> None:
    book = tickets.TicketBook(ttl=0.2)
    first = book.issue("peer-a")
    assert book.lookup(first.token).peer_id == "peer-a"
    assert book.lookup("forged") is None and book.lookup(None) is None
    later = [book.issue("peer-a") for _ in range(tickets.TICKETS_PER_PEER)]
    assert book.lookup(first.token) is None  # the oldest of a peer's tickets is revoked
    assert all(book.lookup(ticket.token) is not None for ticket in later)
    time.sleep(0.25)
    assert book.lookup(later[-1].token) is None


def test_channel_set_up_from_the_network_config() -> None:
    from distqat.config import NetworkConfig
    from distqat.errors import SwarmError

    with pytest.raises(ValueError, match="'localhost' is not an IPv4 address"):
        NetworkConfig(tensor_host="localhost")
    # tensor_transport p2p: no listener, nothing announced.
    assert asyncio.run(direct.start_for_network(None, None, "me", NetworkConfig(tensor_transport="p2p"), [])) == (
        None,
        "",
    )
    taken = socket.create_server(("127.0.0.1", 0))
    try:
        network = NetworkConfig(tensor_port=taken.getsockname()[1])
        with pytest.raises(SwarmError, match=r"network.tensor_host/tensor_port: cannot listen on 127\.0\.0\.1:\d+: "):
            asyncio.run(direct.start_for_network(None, None, "me", network, []))
    finally:
        taken.close()
