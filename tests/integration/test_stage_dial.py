"""`StageClient.prepare` dials a replica ahead of its first call on real hivemind P2P, and reports a replica
that cannot be reached within its timeout instead of hanging or raising."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import pytest
import torch
from hivemind.p2p import P2P

from distqat.swarm.records import ServerInfo
from distqat.swarm.rpc import StageClient, register_stage_service

pytestmark = pytest.mark.timeout(120)


class Echo:
    async def forward(self, tensors: list[torch.Tensor], metadata: dict[str, Any], caller: str):
        return tensors, {}

    backward = forward


def replica_at(peer_id: str, maddrs: list[str]) -> ServerInfo:
    return ServerInfo(
        uid="echo.0", peer_id=peer_id, maddrs=maddrs, stage="echo", stage_index=0, expert_index=0, device="cpu"
    )  # fmt: skip


def test_prepare_connects_so_the_first_call_needs_no_dial() -> None:
    async def scenario() -> None:
        server, trainer = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"]), await P2P.create()
        try:
            await register_stage_service(server, Echo())
            maddrs = [str(maddr) for maddr in await server.get_visible_maddrs()]
            replica = replica_at(server.peer_id.to_base58(), maddrs)
            client = StageClient(trainer)
            assert await client.prepare(replica, timeout=20.0)
            assert replica.peer_id in {peer.peer_id.to_base58() for peer in await trainer.list_peers()}
            result = await client.call(replica, "forward", [torch.arange(5.0)], {"mb": "0"}, timeout=20.0)
            assert torch.equal(result.tensors[0], torch.arange(5.0))
        finally:
            await trainer.shutdown()
            await server.shutdown()

    asyncio.run(scenario())


def test_prepare_reports_an_unreachable_replica_within_its_timeout() -> None:
    async def scenario() -> tuple[bool, float]:
        with socket.socket() as closed:  # a port nobody listens on once this socket is closed
            closed.bind(("127.0.0.1", 0))
            port = closed.getsockname()[1]
        stranger = await P2P.create()  # a valid peer id whose daemon is not at that address
        trainer = await P2P.create()
        try:
            replica = replica_at(stranger.peer_id.to_base58(), [f"/ip4/127.0.0.1/tcp/{port}"])
            began = time.monotonic()
            ok = await StageClient(trainer).prepare(replica, timeout=3.0)
            return ok, time.monotonic() - began
        finally:
            await trainer.shutdown()
            await stranger.shutdown()

    ok, took = asyncio.run(scenario())
    assert not ok
    assert took < 10.0
