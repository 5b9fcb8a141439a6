"""The trainer dials each replica it learns of once, in the background, and stops its dials on close."""

from __future__ import annotations

import asyncio

from distqat.distributed.trainer import ReplicaDialer
from distqat.swarm.records import ServerInfo


def info(uid: str, peer: str) -> ServerInfo:
    stage, index = uid.split(".")[0], int(uid.split(".")[1])
    return ServerInfo(
        uid=uid, peer_id=peer, maddrs=[], stage=stage, stage_index=0, expert_index=index, device="cpu"
    )  # fmt: skip


class FakeClient:
    def __init__(self, hang: bool = False):
        self.dialled: list[tuple[str, str]] = []
        self.cancelled = 0
        self.hang = hang

    async def prepare(self, replica: ServerInfo, timeout: float) -> bool:
        self.dialled.append((replica.uid, replica.peer_id))
        if self.hang:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        return True


def test_each_replica_is_dialled_once_and_a_new_peer_on_an_old_uid_again() -> None:
    async def scenario() -> list[tuple[str, str]]:
        client = FakeClient()
        dialer = ReplicaDialer(client, timeout=5.0)
        dialer.saw({"head": [info("head.0", "A")], "tail": [info("tail.0", "B")]})
        dialer.saw({"head": [info("head.0", "A")], "tail": [info("tail.0", "B"), info("tail.1", "C")]})
        dialer.saw({"head": [info("head.0", "D")], "tail": []})  # head.0 died; a new server took its index
        await asyncio.sleep(0)
        await dialer.close()
        return client.dialled

    assert sorted(asyncio.run(scenario())) == [("head.0", "A"), ("head.0", "D"), ("tail.0", "B"), ("tail.1", "C")]


def test_close_cancels_dials_still_running() -> None:
    async def scenario() -> FakeClient:
        client = FakeClient(hang=True)
        dialer = ReplicaDialer(client, timeout=5.0)
        dialer.saw({"head": [info("head.0", "A"), info("head.1", "B")]})
        await asyncio.sleep(0.01)
        await asyncio.wait_for(dialer.close(), 2.0)
        return client

    client = asyncio.run(scenario())
    assert client.cancelled == 2
