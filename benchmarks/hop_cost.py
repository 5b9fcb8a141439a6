"""Per-hop cost of the stage RPC against raw loopback TCP moving the same bytes (used by throughput.py).

One hop = the trainer sends a tensor to a stage server and gets a tensor of the same size back, the way a
forward sends activations and gets outputs. Measured with an echo service that computes nothing, through
the real stage RPC (`swarm/rpc.py`) on each transport: the direct TCP channel (`swarm/direct.py`, the
default: framing, the server's handler, an asyncio event loop at each end) and p2p (wire encoding, two
p2pd daemons, the handler); against the same bytes sent and echoed back over a plain TCP socket on
127.0.0.1 by two blocking threads. A fourth figure, the p2p transport floor, sends the same pre-built
protobuf messages through hivemind's P2P and back with no stage code at all: the gap between it and raw
TCP is the daemon's (p2pd: two Go daemons, encryption and multiplexing between them, a unix socket to each
Python process).

`hop_ms`/`hop_overhead_ratio` are the direct channel's (what a swarm uses by default); `p2p_hop_ms` and
`p2p_hop_overhead_ratio` the p2p path's.

    python benchmarks/hop_cost.py [--mib 3.06] [--repeats 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch
from hivemind.p2p import P2P
from hivemind.utils.multiaddr import Multiaddr

from distqat.swarm.direct import start_direct_server
from distqat.swarm.records import ServerInfo
from distqat.swarm.rpc import StageClient, register_stage_service


class Echo:
    async def forward(self, tensors: list[torch.Tensor], metadata: dict[str, Any], caller: str):
        return tensors, {}

    backward = forward


async def rpc_hop_ms(nbytes: int, repeats: int, transport: str = "auto") -> list[float]:
    """Echo calls through StageClient; `transport` 'auto' uses the direct channel, 'p2p' the daemons."""
    server, client = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"]), await P2P.create()
    channel = None
    try:
        await register_stage_service(server, Echo())
        channel, tensor_addr = await start_direct_server(
            server, Echo(), server.peer_id.to_base58(), "127.0.0.1", 0, "127.0.0.1", 2**31
        )
        maddrs = [str(maddr) for maddr in await server.get_visible_maddrs()]
        info = ServerInfo(
            uid="echo.0", peer_id=server.peer_id.to_base58(), maddrs=maddrs, stage="echo", stage_index=0,
            expert_index=0, device="cpu", tensor_addr=tensor_addr,
        )  # fmt: skip
        stage_client = StageClient(client, transport)  # type: ignore[arg-type]
        tensor = torch.randn(nbytes // 4)
        times = []
        for attempt in range(repeats + 2):  # two warm-up calls: connection set-up is not per hop
            began = time.perf_counter()
            result = await stage_client.call(info, "forward", [tensor], {"mb": str(attempt)}, timeout=60.0)
            elapsed = time.perf_counter() - began
            assert result.tensors[0].numel() == tensor.numel()
            if attempt >= 2:
                times.append(1000 * elapsed)
        if transport == "auto":
            assert stage_client.direct is not None and stage_client.direct.fallbacks == 0, "the direct channel failed"
        stage_client.close()
        return times
    finally:
        if channel is not None:
            await channel.close()
        await client.shutdown()
        await server.shutdown()


async def p2p_floor_ms(nbytes: int, repeats: int) -> list[float]:
    from hivemind.proto import runtime_pb2

    from distqat.swarm import wire

    server, client = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"]), await P2P.create()

    async def echo(requests, context):
        replies = []
        async for message in requests:  # the caller's messages, up to its end marker
            replies.append(runtime_pb2.ExpertResponse(tensors=message.tensors, metadata=message.metadata))
            if wire.is_end_marker(message):
                break
        for message in replies:
            yield message
        await asyncio.sleep(60)  # the caller closes first (see swarm/rpc.py)

    try:
        await server.add_protobuf_handler(
            "floor", echo, runtime_pb2.ExpertRequest, stream_input=True, stream_output=True
        )
        maddrs = [Multiaddr(str(maddr).split("/p2p/")[0]) for maddr in await server.get_visible_maddrs()]
        await client._client.connect(server.peer_id, maddrs)  # as StageClient does
        messages, _ = wire.encode(runtime_pb2.ExpertRequest, [torch.randn(nbytes // 4)], {"mb": "0"})
        times = []
        for attempt in range(repeats + 2):
            began = time.perf_counter()
            replies = await client.iterate_protobuf_handler(
                server.peer_id, "floor", wire.iterate(messages), runtime_pb2.ExpertResponse
            )
            got = 0
            async for _ in replies:
                got += 1
                if got == len(messages):
                    break
            await replies.aclose()
            if attempt >= 2:
                times.append(1000 * (time.perf_counter() - began))
        return times
    finally:
        await client.shutdown()
        await server.shutdown()


def _recv_exactly(sock: socket.socket, buffer: memoryview) -> None:
    got = 0
    while got < len(buffer):
        count = sock.recv_into(buffer[got:])
        if count == 0:
            raise ConnectionError("peer closed")
        got += count


def raw_tcp_ms(nbytes: int, repeats: int) -> list[float]:
    """The same bytes to a loopback echo and back: the floor any transport on this machine pays."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def echo() -> None:
        connection, _ = listener.accept()
        buffer = memoryview(bytearray(nbytes))
        with connection:
            for _ in range(repeats + 2):
                _recv_exactly(connection, buffer)
                connection.sendall(buffer)

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    payload = torch.randn(nbytes // 4).numpy().tobytes()
    reply = memoryview(bytearray(len(payload)))
    times = []
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for attempt in range(repeats + 2):
            began = time.perf_counter()
            sock.sendall(payload)
            _recv_exactly(sock, reply)
            if attempt >= 2:
                times.append(1000 * (time.perf_counter() - began))
    thread.join()
    listener.close()
    return times


def measure(nbytes: int, repeats: int = 20) -> dict[str, float]:
    # Interleaved rounds, so that a load change on a shared machine hits every transport alike.
    rounds = 2
    direct, p2p, floor, raw = [], [], [], []
    for _ in range(rounds):
        direct += asyncio.run(rpc_hop_ms(nbytes, repeats // rounds or 1, "auto"))
        raw += raw_tcp_ms(nbytes, repeats // rounds or 1)
        p2p += asyncio.run(rpc_hop_ms(nbytes, repeats // rounds or 1, "p2p"))
        floor += asyncio.run(p2p_floor_ms(nbytes, repeats // rounds or 1))
    hop_ms, p2p_ms = statistics.median(direct), statistics.median(p2p)
    floor_ms, raw_ms = statistics.median(floor), statistics.median(raw)
    return {
        "hop_bytes": nbytes,
        "hop_transport": "direct",
        "hop_ms": hop_ms,
        "raw_tcp_ms": raw_ms,
        "hop_overhead_ratio": hop_ms / raw_ms,
        "p2p_hop_ms": p2p_ms,
        "p2p_hop_overhead_ratio": p2p_ms / raw_ms,
        "p2p_floor_ms": floor_ms,
        "p2p_hop_over_p2p_floor": p2p_ms / floor_ms,
    }


def print_table(result: dict[str, float]) -> None:
    from rich.console import Console
    from rich.table import Table

    raw = result["raw_tcp_ms"]
    table = Table(title=f"one hop: {result['hop_bytes'] / 2**20:.2f} MiB each way, echo, medians")
    for column in ("path", "ms", "x raw TCP"):
        table.add_column(column)
    for name, key in (
        ("stage RPC, direct TCP channel", "hop_ms"),
        ("stage RPC, p2p (p2pd)", "p2p_hop_ms"),
        ("hivemind P2P, same messages, no stage code", "p2p_floor_ms"),
        ("raw loopback TCP, blocking threads", "raw_tcp_ms"),
    ):
        table.add_row(name, f"{result[key]:.2f}", f"{result[key] / raw:.1f}")
    Console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=float, default=3.06, help="tensor size each way (the demo boundary: 3.06)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    result = measure(int(args.mib * 2**20) // 4 * 4, args.repeats)
    result["load_average"] = os.getloadavg()  # type: ignore[assignment]
    print_table(result)
    print(json.dumps(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
