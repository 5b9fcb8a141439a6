"""The stage RPC on hivemind's P2P layer: `forward` and `backward` handlers and a caller with timeouts.

We write this instead of using `hivemind.moe`: moe has no call timeout (a call to a killed server hangs),
re-sends inputs on backward and re-runs forward there. Here the server keeps the caller's inputs
between forward and backward, and every call is bounded by a timeout and fails with a typed error.

Tensors go over the direct TCP channel (`swarm/direct.py`) to a replica that announces a `tensor_addr`,
and over p2p otherwise, or when the channel cannot be reached (`network.tensor_transport`); both paths
carry the same messages to the same service object and fail with the same typed errors.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from hivemind.p2p import P2P, P2PContext, P2PDaemonError, P2PHandlerError, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils.multiaddr import Multiaddr

from distqat.config import NetworkConfig
from distqat.errors import StageCallError, StageTimeoutError, last_line
from distqat.swarm import direct, frames, tickets, wire
from distqat.swarm.records import ServerInfo

Method = Literal["forward", "backward"]
REPLY_LINGER = 60.0  # seconds a handler keeps its stream open for the caller to read the reply and close
HANDLER_NAMES: dict[Method, str] = {"forward": "distqat.stage.forward", "backward": "distqat.stage.backward"}


class StageService(Protocol):
    """What a stage server implements; `caller` is the authenticated peer id of the calling trainer."""

    async def forward(
        self, tensors: list[torch.Tensor], metadata: dict[str, Any], caller: str
    ) -> tuple[list[torch.Tensor], dict[str, Any]]: ...

    async def backward(
        self, tensors: list[torch.Tensor], metadata: dict[str, Any], caller: str
    ) -> tuple[list[torch.Tensor], dict[str, Any]]: ...


async def register_stage_service(
    p2p: P2P, service: StageService, count_traffic: Callable[[int, int], None] | None = None
) -> None:
    """Expose `service` on this peer. Exceptions it raises reach the caller as a StageCallError.

    `count_traffic(received, sent)` is told the payload bytes of every answered call.
    """
    for method, name in HANDLER_NAMES.items():
        implementation = getattr(service, method)

        async def handle(
            requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext, implementation=implementation
        ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
            tensors, metadata, received = await wire.decode(requests)
            outputs, out_metadata = await implementation(tensors, metadata, context.remote_id.to_base58())
            messages, sent = wire.encode(runtime_pb2.ExpertResponse, outputs, out_metadata)
            if count_traffic is not None:
                count_traffic(received, sent)
            for message in messages:
                yield message
            # Do not close our end first: p2pd (stream.go doStreamPipe) may then reset the libp2p stream and the
            # caller's daemon drops the reply it has not read yet. The caller closes after the end marker;
            # hivemind then cancels this generator.
            await asyncio.sleep(REPLY_LINGER)

        await p2p.add_protobuf_handler(name, handle, runtime_pb2.ExpertRequest, stream_input=True, stream_output=True)


@dataclass
class CallResult:
    tensors: list[torch.Tensor]
    metadata: dict[str, Any]
    bytes_sent: int
    bytes_received: int


class StageClient:
    """Calls stage replicas; every call ends within its timeout, with a result or a StageCallError."""

    def __init__(
        self,
        p2p: P2P,
        tensor_transport: Literal["auto", "p2p"] = "auto",
        *,
        connect_timeout: float = 2.0,
        fallback_time: float = 60.0,
        max_message_bytes: int = 2**30,
    ):
        self._p2p = p2p
        self._connected: set[str] = set()
        self.direct = (
            direct.DirectClient(self._ticket, connect_timeout, fallback_time, max_message_bytes)
            if tensor_transport == "auto"
            else None
        )

    @classmethod
    def for_network(cls, p2p: P2P, network: NetworkConfig) -> StageClient:
        return cls(
            p2p,
            network.tensor_transport,
            connect_timeout=network.tensor_connect_timeout,
            fallback_time=network.tensor_fallback_time,
            max_message_bytes=int(network.tensor_max_message_mib * 2**20),
        )

    def close(self) -> None:
        """Close every direct connection; calls in progress fail with a StageCallError."""
        if self.direct is not None:
            self.direct.close()

    async def call(
        self,
        replica: ServerInfo,
        method: Method,
        tensors: list[torch.Tensor],
        metadata: dict[str, Any],
        timeout: float,
    ) -> CallResult:
        where = f"{method} to {replica.uid} (peer {replica.peer_id[-8:]})"
        try:
            return await asyncio.wait_for(self._call(replica, method, tensors, metadata), timeout)
        except asyncio.TimeoutError:
            raise StageTimeoutError(f"{where} timed out after {timeout:.1f} s") from None
        except (P2PHandlerError, direct.RemoteError) as error:
            raise StageCallError(f"{where} failed on the server: {last_line(error)}") from None
        except wire.TruncatedStream:
            raise StageCallError(f"{where} failed: the connection closed before the reply") from None
        except frames.ProtocolError as error:
            raise StageCallError(f"{where} failed: malformed reply: {last_line(error)}") from None
        except (P2PDaemonError, ConnectionError, OSError, asyncio.IncompleteReadError) as error:
            self._connected.discard(replica.peer_id)
            raise StageCallError(f"{where} failed: {last_line(error)}") from None

    async def prepare(self, replica: ServerInfo, timeout: float) -> bool:
        """Dial `replica` ahead of its first call, so that the micro-batch that first reaches a new replica does
        not also wait for the connection set-up (about a second on a busy machine). False if it failed: the
        first call then dials again and reports the error."""
        try:
            await asyncio.wait_for(self._connect(replica), timeout)
            if self.direct is not None:  # and one connection of the direct channel, ticket included
                await asyncio.wait_for(self.direct.prepare(replica), timeout)
            return True
        except (asyncio.TimeoutError, P2PDaemonError, ConnectionError, OSError):
            return False

    async def _connect(self, replica: ServerInfo) -> None:
        if replica.peer_id in self._connected:
            return
        # The daemon may not know this peer's addresses yet: hand them over from its DHT record.
        # The daemon wants transport addresses: without the trailing /p2p/<peer id> part.
        maddrs = [Multiaddr(maddr.split("/p2p/")[0]) for maddr in replica.maddrs]
        await self._p2p._client.connect(PeerID.from_base58(replica.peer_id), maddrs)
        self._connected.add(replica.peer_id)

    async def _call(
        self, replica: ServerInfo, method: Method, tensors: list[torch.Tensor], metadata: dict[str, Any]
    ) -> CallResult:
        if self.direct is not None and self.direct.usable(replica):
            try:
                return CallResult(*await self.direct.call(replica, method, tensors, metadata))
            except direct.ChannelUnavailable:
                pass  # nothing was sent; logged and remembered by the DirectClient: this call goes over p2p
        peer_id = PeerID.from_base58(replica.peer_id)
        await self._connect(replica)
        messages, sent = wire.encode(runtime_pb2.ExpertRequest, tensors, metadata)
        responses = await self._p2p.iterate_protobuf_handler(
            peer_id, HANDLER_NAMES[method], wire.iterate(messages), runtime_pb2.ExpertResponse
        )
        try:
            outputs, out_metadata, received = await wire.decode(responses)
        finally:
            await responses.aclose()  # close our end: the server's handler is waiting for it
        return CallResult(outputs, out_metadata, sent, received)

    async def _ticket(self, replica: ServerInfo) -> tickets.Ticket:
        """A ticket for the direct channel, asked over p2p: the server binds it to our authenticated peer id."""
        await self._connect(replica)
        return await tickets.request_ticket(self._p2p, replica.peer_id)


def expect_tensors(result: CallResult, count: int, where: str) -> list[torch.Tensor]:
    """The reply's tensors, or a StageCallError if a (buggy or hostile) peer sent another number."""
    if len(result.tensors) != count:
        raise StageCallError(f"{where}: expected {count} tensors in the reply, got {len(result.tensors)}")
    return result.tensors
