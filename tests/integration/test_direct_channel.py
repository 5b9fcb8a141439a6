"""The direct tensor channel between real hivemind peers on 127.0.0.1: calls go over TCP with the caller's
authenticated peer id, bad input is refused with one clear line while the server goes on, a dead server is a
StageCallError within the timeout, and an unreachable channel falls back to p2p."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from hivemind.p2p import P2P

from distqat.errors import StageCallError, StageTimeoutError
from distqat.swarm import direct, frames, tickets
from distqat.swarm.records import ServerInfo
from distqat.swarm.rpc import StageClient, register_stage_service

pytestmark = pytest.mark.timeout(180)


@dataclass
class Echo:
    """Answers a forward with its tensors doubled (bool/int ones as they came) and who called."""

    callers: list[str] = field(default_factory=list)
    gate: asyncio.Event | None = None  # when set up, calls wait for it (a frozen server)

    async def forward(self, tensors: list[torch.Tensor], metadata: dict[str, Any], caller: str):
        self.callers.append(caller)
        if self.gate is not None:
            await self.gate.wait()
        if metadata.get("fail"):
            raise ValueError(f"asked to fail on {metadata['mb']}")
        await asyncio.sleep(0.01 * int(metadata.get("delay", 0)))  # lets concurrent calls interleave
        doubled = [t * 2 if t.is_floating_point() else t for t in tensors]
        return doubled, {"caller": caller, "mb": metadata.get("mb")}

    backward = forward


@dataclass
class Served:
    p2p: P2P
    info: ServerInfo
    echo: Echo
    channel: direct.DirectServer
    traffic: dict[str, list[tuple[int, int]]]


@asynccontextmanager
async def echo_server(max_bytes: int = 2**30, tensor_addr: str | None = None) -> AsyncIterator[Served]:
    """An echo stage on p2p and on the direct channel; `tensor_addr` overrides the announced address."""
    p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    echo = Echo()
    traffic: dict[str, list[tuple[int, int]]] = {"p2p": [], "direct": []}
    channel = None
    try:
        await register_stage_service(p2p, echo, count_traffic=lambda r, s: traffic["p2p"].append((r, s)))
        channel, address = await direct.start_direct_server(
            p2p, echo, p2p.peer_id.to_base58(), "127.0.0.1", 0, "127.0.0.1", max_bytes,
            lambda r, s: traffic["direct"].append((r, s)),
        )  # fmt: skip
        maddrs = [str(maddr) for maddr in await p2p.get_visible_maddrs()]
        info = ServerInfo(
            uid="echo.0", peer_id=p2p.peer_id.to_base58(), maddrs=maddrs, stage="echo", stage_index=0,
            expert_index=0, device="cpu", tensor_addr=address if tensor_addr is None else tensor_addr,
        )  # fmt: skip
        yield Served(p2p, info, echo, channel, traffic)
    finally:
        if channel is not None:
            await channel.close()
        await p2p.shutdown()


@asynccontextmanager
async def trainers(count: int, **options: Any) -> AsyncIterator[list[StageClient]]:
    peers = [await P2P.create() for _ in range(count)]
    clients = [StageClient(p2p, **options) for p2p in peers]
    try:
        yield clients
    finally:
        for client in clients:
            client.close()
        for p2p in peers:
            await p2p.shutdown()


def test_calls_go_over_the_channel_with_the_callers_peer_id_and_traffic_counted() -> None:
    tensors = [
        torch.randn(32, 128, 14, 14),
        torch.randn(5, 6).t(),
        torch.randn(3, dtype=torch.float16),
        torch.randint(0, 255, (99,), dtype=torch.uint8),
        torch.zeros(0),
    ]

    async def scenario() -> None:
        async with echo_server() as served, trainers(1) as (client,):
            for mb in range(3):
                result = await client.call(served.info, "forward", tensors, {"mb": str(mb)}, timeout=30.0)
                for sent, got in zip(tensors, result.tensors, strict=True):
                    expected = sent * 2 if sent.is_floating_point() else sent
                    assert got.dtype == sent.dtype and torch.equal(got, expected)
                assert result.metadata == {"caller": client._p2p.peer_id.to_base58(), "mb": str(mb)}
                # The server counts (received, sent): our sent bytes are its received ones.
                assert (result.bytes_sent, result.bytes_received) == served.traffic["direct"][-1]
            assert len(served.traffic["direct"]) == 3 and not served.traffic["p2p"]  # all three went direct
            assert client.direct is not None and client.direct.fallbacks == 0
            assert len(client.direct._idle[client.direct._key(served.info)]) == 1  # one connection, reused

    asyncio.run(scenario())


def test_concurrent_calls_from_two_trainers_get_their_own_results() -> None:
    async def scenario() -> None:
        async with echo_server() as served, trainers(2) as clients:
            inputs = {(c, i): torch.full((1000,), float(10 * c + i)) for c in range(2) for i in range(6)}
            results = await asyncio.gather(
                *(
                    clients[c].call(served.info, "forward", [x], {"mb": f"{c}-{i}", "delay": 6 - i}, timeout=30.0)
                    for (c, i), x in inputs.items()
                )
            )
            for ((c, i), x), result in zip(inputs.items(), results, strict=True):
                assert torch.equal(result.tensors[0], x * 2)
                assert result.metadata == {"caller": clients[c]._p2p.peer_id.to_base58(), "mb": f"{c}-{i}"}
            assert len(served.traffic["direct"]) == 12 and not served.traffic["p2p"]

    asyncio.run(scenario())


def test_tensor_transport_p2p_never_uses_the_channel() -> None:
    async def scenario() -> None:
        async with echo_server() as served, trainers(1, tensor_transport="p2p") as (client,):
            result = await client.call(served.info, "forward", [torch.ones(3)], {"mb": "0"}, timeout=30.0)
            assert torch.equal(result.tensors[0], torch.full((3,), 2.0))
            assert len(served.traffic["p2p"]) == 1 and not served.traffic["direct"]

    asyncio.run(scenario())


def test_a_failing_call_is_reported_and_the_connection_serves_the_next() -> None:
    async def scenario() -> None:
        async with echo_server() as served, trainers(1) as (client,):
            with pytest.raises(StageCallError, match=r"failed on the server: .*asked to fail on 1"):
                await client.call(served.info, "forward", [torch.ones(2)], {"mb": "1", "fail": True}, timeout=30.0)
            result = await client.call(served.info, "forward", [torch.ones(2)], {"mb": "2"}, timeout=30.0)
            assert result.metadata["mb"] == "2"
            assert len(served.traffic["direct"]) == 1 and client.direct.fallbacks == 0

    asyncio.run(scenario())


async def raw_connection(served: Served, ticket: tickets.Ticket | None, peer: str | None = None) -> socket.socket:
    """A hand-made client connection: greeting read, hello sent (with `ticket`'s proof, or a forged one)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    host, port = direct.parse_address(served.info.tensor_addr)
    await loop.sock_connect(sock, (host, port))
    greeting = bytearray(len(direct.GREETING) + direct.NONCE_BYTES)
    await frames.recv_exactly(sock, memoryview(greeting))
    nonce = bytes(greeting[len(direct.GREETING) :])
    token, secret = (ticket.token, ticket.secret) if ticket else ("forged", b"x" * 32)
    hello = {"token": token, "peer": peer or served.info.peer_id, "mac": tickets.mac(secret, b"client", nonce)}
    await frames.send(sock, hello)
    return sock


async def still_serves(served: Served, client: StageClient) -> None:
    result = await client.call(served.info, "forward", [torch.ones(4)], {"mb": "after"}, timeout=30.0)
    assert torch.equal(result.tensors[0], torch.full((4,), 2.0))


def test_bad_tickets_malformed_and_oversize_requests_are_refused_and_the_server_goes_on() -> None:
    async def scenario() -> None:
        async with echo_server(max_bytes=2**20) as served, trainers(1) as (client,):
            answers = []
            for ticket, peer in ((None, None), (None, "someone-else")):
                sock = await raw_connection(served, ticket, peer)
                header, _, _ = await frames.receive(sock, 4096)
                answers.append(header["error"])
                assert await asyncio.get_running_loop().sock_recv(sock, 1) == b""  # then closed
                sock.close()
            assert answers[0] == "unknown or expired ticket"
            assert answers[1].startswith("this is peer ") and "someone-else" in answers[1]
            await still_serves(served, client)

            # A real ticket, then garbage: a clear line, the connection closed, the server still serving.
            ticket = await tickets.request_ticket(client._p2p, served.info.peer_id)
            sock = await raw_connection(served, ticket)
            assert (await frames.receive(sock, 4096))[0]["ok"] is True
            bad = {"method": "forward", "metadata": {}, "tensors": [{"dtype": "float99", "shape": [1], "nbytes": 4}]}
            await asyncio.get_running_loop().sock_sendall(sock, frames.pack(bad))
            header, _, _ = await frames.receive(sock, 4096)
            assert header["error"].startswith("malformed request: tensor 0: unknown dtype 'float99'")
            sock.close()
            await still_serves(served, client)

            # Over the server's 1 MiB limit through the real client: refused in one line; the stream stays in step.
            with pytest.raises(StageCallError, match=r"failed on the server: request refused: .* exceed the channel"):
                await client.call(served.info, "forward", [torch.zeros(2**19)], {"mb": "big"}, timeout=30.0)
            await still_serves(served, client)
            assert served.channel.refused == 4 and client.direct.fallbacks == 0
            assert all(caller == client._p2p.peer_id.to_base58() for caller in served.echo.callers)

    asyncio.run(scenario())


def test_a_server_that_dies_mid_call_is_a_stage_call_error_within_the_timeout() -> None:
    async def scenario() -> None:
        async with trainers(1) as (client,), echo_server() as served:
            await still_serves(served, client)
            served.echo.gate = asyncio.Event()  # the next call hangs on the server
            pending = asyncio.ensure_future(
                client.call(served.info, "forward", [torch.ones(4)], {"mb": "0"}, timeout=60.0)
            )
            await asyncio.sleep(0.5)
            await served.channel.close()  # the server dies: its connections close under the call
            await served.p2p.shutdown()
            with pytest.raises(StageCallError) as caught:
                await pending
            # Noticed from the closed connection, not from the call's 60 s timeout running out.
            assert not isinstance(caught.value, StageTimeoutError), caught.value
            # The next call meets a dead address and a dead peer: an error, bounded by its timeout.
            with pytest.raises(StageCallError):
                await client.call(served.info, "forward", [torch.ones(4)], {"mb": "1"}, timeout=8.0)

    asyncio.run(scenario())


def test_an_unreachable_channel_falls_back_to_p2p_and_is_remembered() -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_address = f"127.0.0.1:{closed.getsockname()[1]}"
    closed.close()  # nothing listens there: connections are refused
    silent = socket.create_server(("127.0.0.1", 0))  # accepts (kernel backlog) but never greets

    async def scenario() -> None:
        for address in (dead_address, f"127.0.0.1:{silent.getsockname()[1]}"):
            async with echo_server(tensor_addr=address) as served, trainers(1, connect_timeout=0.5) as (client,):
                for mb in range(3):
                    result = await client.call(served.info, "forward", [torch.ones(3)], {"mb": str(mb)}, timeout=30.0)
                    assert torch.equal(result.tensors[0], torch.full((3,), 2.0))
                assert len(served.traffic["p2p"]) == 3 and not served.traffic["direct"]
                assert client.direct.fallbacks == 1  # tried once, then remembered

    try:
        asyncio.run(scenario())
    finally:
        silent.close()


def test_prepare_opens_a_direct_connection_ahead_of_the_first_call() -> None:
    async def scenario() -> None:
        async with echo_server() as served, trainers(1) as (client,):
            assert await client.prepare(served.info, timeout=20.0)
            key = client.direct._key(served.info)
            assert len(client.direct._idle[key]) == 1  # authenticated, waiting in the pool
            opened = client.direct._idle[key][0]
            await still_serves(served, client)
            assert client.direct._idle[key] == [opened] and len(served.traffic["direct"]) == 1

    asyncio.run(scenario())
