"""A real stage server (in this process, on real hivemind P2P) under concurrent trainers (issue 7): each
trainer gets its own outputs and gradients, the queue bound answers busy and recovers, and a trainer that
dies with requests in flight blocks nobody."""

from __future__ import annotations

import asyncio
import copy
import json
import re
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import torch
from hivemind.p2p import P2P

from distqat.config import Config, load_config
from distqat.distributed.compute_queue import Kind
from distqat.distributed.server import StageEndpoint, StageServer
from distqat.swarm import direct
from distqat.swarm.node import start_dht
from distqat.swarm.rpc import StageClient, register_stage_service

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(300)


def tiny_config(tmp_path: Path, *overrides: str) -> Config:
    return load_config(
        REPO / "configs" / "tiny.yaml",
        [
            "--diloco.enable", "false",
            "--checkpoint.enable", "false",
            "--log-dir", str(tmp_path / "logs"),
            "--network.dht-timeout", "5",
            *overrides,
        ],
    )  # fmt: skip


@asynccontextmanager
async def tail_server(config: Config) -> AsyncIterator[StageServer]:
    """The tail stage (its inputs need gradients) served over the stage RPC, without heartbeats: on p2p and,
    unless `network.tensor_transport` is p2p, on the direct channel, which clients then use."""
    dht = start_dht(config.network)
    server = StageServer(config, dht, "tail", 0)
    p2p = await dht.replicate_p2p()
    channel = None
    try:
        endpoint = StageEndpoint()
        endpoint.server = server
        await register_stage_service(p2p, endpoint)
        channel, server.info.tensor_addr = await direct.start_for_network(
            p2p, endpoint, server.info.peer_id, config.network, server.info.maddrs
        )
        yield server
    finally:
        if channel is not None:
            await channel.close()
        server._compute.shutdown(wait=True)
        await p2p.shutdown()
        dht.shutdown()


@asynccontextmanager
async def trainer_peers(count: int) -> AsyncIterator[list[P2P]]:
    """`count` trainers' P2P nodes, all shut down at the end (one shut down earlier by the test is fine)."""
    peers = [await P2P.create() for _ in range(count)]
    try:
        yield peers
    finally:
        for p2p in peers:
            await p2p.shutdown()


async def call(client: StageClient, server: StageServer, method, tensor: torch.Tensor, mb: str):
    return await client.call(server.info, method, [tensor], {"mb": mb, "uid": server.info.uid}, timeout=20.0)


def test_two_trainers_get_their_own_outputs_and_gradients(tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    x = {"a": torch.randn(4, 64), "b": torch.randn(6, 64)}
    g = {"a": torch.randn(4, 10), "b": torch.randn(6, 10)}

    async def scenario() -> None:
        async with tail_server(config) as server:
            reference = copy.deepcopy(server.replica.module)
            async with trainer_peers(len(x)) as peers:
                clients = {name: StageClient(p2p) for name, p2p in zip(x, peers, strict=True)}
                # Same micro-batch id from both trainers, both forwards at once, then both backwards at once.
                outs = await asyncio.gather(*(call(clients[n], server, "forward", x[n], "0") for n in x))
                assert server.replica.in_flight == 2
                grads = await asyncio.gather(*(call(clients[n], server, "backward", g[n], "0") for n in x))
            for name, out, grad in zip(x, outs, grads, strict=True):
                ref_in = x[name].clone().requires_grad_(True)
                ref_out = reference(ref_in)
                ref_out.backward(g[name])
                assert torch.allclose(out.tensors[0], ref_out.detach(), atol=1e-6), name
                # Both forwards ran on the same weights: each gradient is that of those weights (stashed).
                assert torch.allclose(grad.tensors[0], ref_in.grad, atol=1e-6), name
            assert server.replica.weights_version == 2 and server.replica.in_flight == 0

    asyncio.run(scenario())


def test_queue_bound_answers_busy_and_admits_again_after_a_backward(tmp_path: Path) -> None:
    config = tiny_config(
        tmp_path, "--pipelining.server-max-in-flight", "3", "--pipelining.server-max-in-flight-per-trainer", "2"
    )

    async def scenario() -> None:
        async with tail_server(config) as server, trainer_peers(2) as (a, b):
            ca, cb = StageClient(a), StageClient(b)
            x = torch.randn(2, 64)
            for mb in ("0", "1"):
                assert (await call(ca, server, "forward", x, mb)).tensors
            refused = await call(ca, server, "forward", x, "2")  # over its own bound
            assert refused.metadata.get("busy") and not refused.tensors
            assert (await call(cb, server, "forward", x, "0")).tensors
            refused = await call(cb, server, "forward", x, "1")  # over the server's bound
            assert refused.metadata.get("busy")
            assert server.replica.in_flight == 3 and server._compute.refused == 2
            await call(ca, server, "backward", torch.randn(2, 10), "0")  # frees one of a's slots
            assert (await call(ca, server, "forward", x, "2")).tensors

    asyncio.run(scenario())


@pytest.mark.parametrize("transport", ["auto", "p2p"])
def test_a_trainer_dying_with_requests_in_flight_blocks_nobody(tmp_path: Path, transport: str) -> None:
    config = tiny_config(
        tmp_path,
        "--pipelining.server-max-in-flight", "4",
        "--pipelining.server-max-in-flight-per-trainer", "3",
        "--network.tensor-transport", transport,
    )  # fmt: skip

    async def scenario() -> None:
        async with tail_server(config) as server, trainer_peers(2) as (doomed, survivor):
            assert bool(server.info.tensor_addr) == (transport == "auto")
            cd, cs = StageClient(doomed, transport), StageClient(survivor, transport)
            x = torch.randn(2, 64)
            for mb in ("0", "1"):  # kept by the server, their backward never comes
                await call(cd, server, "forward", x, mb)
            gate = threading.Event()
            server._compute.submit(Kind.OTHER, gate.wait, 30.0)  # hold the compute thread
            pending = asyncio.ensure_future(call(cd, server, "forward", x, "2"))
            await asyncio.sleep(1.0)  # the request is queued on the server
            await doomed.shutdown()  # the trainer dies with it in flight
            cd.close()  # and with it every socket of its direct channel
            gate.set()
            with pytest.raises(Exception):  # noqa: B017 (whatever the dead trainer's call raises)
                await pending
            # The survivor is served: forward and backward, within their timeouts.
            out = await call(cs, server, "forward", x, "0")
            assert out.tensors
            grad = await call(cs, server, "backward", torch.randn(2, 10), "0")
            assert grad.tensors[0].shape == x.shape
            # The dead trainer's micro-batches expire like any whose backward never came.
            dropped = await asyncio.wrap_future(server._compute.submit(Kind.READ, server.replica.drop_expired, -1.0))
            assert dropped == 3 or dropped == 2  # the queued forward ran, or was dropped with its caller
            assert server.replica.in_flight == 0 and server._compute.pending == 0

    asyncio.run(scenario())


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="needs Debian's dataset-fashion-mnist"
)
def test_local_swarm_trains_with_three_micro_batches_in_flight(tmp_path: Path) -> None:
    summary_path = tmp_path / "summary.json"
    run = subprocess.run(
        [
            sys.executable, "-m", "distqat", "local", "--config", str(REPO / "configs" / "tiny.yaml"),
            "--log-dir", str(tmp_path / "logs"), "--max-steps", "30", "--summary", str(summary_path),
            "--pipelining.in-flight", "3",
        ],
        cwd=REPO, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    assert summary["steps"] == 30 and summary["failed_steps"] == 0
    assert summary["last_loss"] < summary["first_loss"] - 0.3, summary  # stale-by-two updates still learn
    assert set(summary["servers_seen"]) == {"head.0.0.0", "tail.0.0.0"}
    # The monitor's last view can be a heartbeat old (over the direct channel 30 tiny steps may all fit in one
    # heartbeat), so each server's own closing line is the record of the steps it trained.
    for log in ("server_0.log", "server_1.log"):
        stopped = re.search(r"stopping \S+ after (\d+) steps", (tmp_path / "logs" / log).read_text())
        assert stopped and int(stopped.group(1)) > 0, log
    trainer_log = (tmp_path / "logs" / "trainer_0.log").read_text()
    assert "Traceback" not in trainer_log
