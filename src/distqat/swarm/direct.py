"""The direct tensor channel: stage forward/backward calls over a plain TCP connection instead of through p2pd.

hivemind's P2P moves a 3 MiB activation through two Go daemons, encryption, multiplexing and a unix socket
at each end: 10-30x the time raw loopback TCP takes for the same bytes. Stage tensors therefore go over a
TCP connection straight from the trainer to the server; the DHT, averaging and discovery stay on hivemind,
and p2p stays the fallback (`swarm/rpc.py` picks, per replica).

Server side (`DirectServer`): an asyncio listener on `network.tensor_host`/`tensor_port` (port 0 by
default), announced in `ServerInfo.tensor_addr` as "host:port". Every request is handed to the same
service object the p2p handlers call (`StageEndpoint`), with the same `caller` and the same traffic
counting, so admission, busy replies, weight stashing and stage moves behave the same on both paths.

Who is calling: a TCP caller proves the peer id p2p authenticated with a ticket (`swarm/tickets.py`,
which also says what this does not protect). Use `network.tensor_transport: p2p` where the network
between peers is not trusted.

Connections carry one call at a time; a trainer keeps a pool of idle ones per replica, so micro-batches
in flight use one connection each. A call that fails half-way, times out or is cancelled closes its
connection: no stream is ever left out of step. A caller that goes away mid-call (its connection closes)
cancels its queued work on the server, as on p2p.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import torch
from hivemind.p2p import P2P

from distqat.config import NetworkConfig
from distqat.errors import SwarmError, last_line
from distqat.swarm import frames
from distqat.swarm.records import ServerInfo
from distqat.swarm.tickets import ChannelUnavailable, Ticket, TicketBook, TicketRefused, mac, register_channel_opener

logger = logging.getLogger(__name__)

GREETING = b"DQTC\x01"  # magic and protocol version, then a 32-byte nonce
NONCE_BYTES = 32
HELLO_MAX_BYTES = 4096  # a hello is ~150 bytes: an unauthenticated peer gets no more memory than this
HELLO_TIMEOUT = 10.0  # seconds a new connection may take to prove its ticket
TICKET_MARGIN = 60.0  # a trainer asks for a new ticket when less than this is left of its current one
MAX_CONNECTIONS = 1024  # open connections per server (each holds a task; idle ones cost only a socket)
MAX_IDLE_PER_REPLICA = 16  # idle connections a trainer keeps to one replica
METHODS = ("forward", "backward")
DISCARD_TIMEOUT = 10.0  # seconds the server keeps reading (and dropping) the payload of a refused request

Service = Any  # a StageService (swarm/rpc.py); not imported here to keep rpc -> direct one-way


class RemoteError(Exception):
    """The server ran the call and it failed there; the connection stays usable."""


def _configure(sock: socket.socket) -> None:
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a header and its payload must not wait for an ACK


class DirectServer:
    """Serves `service` on a TCP listener; `close()` ends the listener and every connection."""

    def __init__(
        self,
        service: Service,
        tickets: TicketBook,
        peer_id: str,
        max_bytes: int,
        count_traffic: Callable[[int, int], None] | None = None,
    ):
        self.service, self.tickets, self.peer_id, self.max_bytes = service, tickets, peer_id, max_bytes
        self.count_traffic = count_traffic
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task | None = None
        self._connections: set[asyncio.Task] = set()
        self.refused = 0  # connections or requests refused as malformed or unauthenticated

    async def start(self, host: str, port: int = 0) -> tuple[str, int]:
        """Bind and listen; returns the bound (host, port)."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.bind((host, port))
            listener.listen(128)
            listener.setblocking(False)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        self._accepting = asyncio.create_task(self._accept_loop())
        return listener.getsockname()[:2]

    async def close(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            await asyncio.gather(self._accepting, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while True:
            try:
                sock, address = await loop.sock_accept(self._listener)
            except OSError as error:  # e.g. out of file descriptors: wait rather than spin
                logger.warning("direct channel: accept failed: %s", error)
                await asyncio.sleep(0.5)
                continue
            if len(self._connections) >= MAX_CONNECTIONS:
                logger.warning("direct channel: refusing a connection from %s: %d open", address, MAX_CONNECTIONS)
                sock.close()
                continue
            task = asyncio.create_task(self._serve_connection(sock, address))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def _refuse(self, sock: socket.socket, address: Any, message: str) -> None:
        """Tell the peer why (one line), best effort, and count it; the caller then closes the connection."""
        self.refused += 1
        logger.warning("direct channel: refused %s: %s", address, message)
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            await asyncio.wait_for(frames.send(sock, {"error": message}), 1.0)

    async def _handshake(self, sock: socket.socket, address: Any) -> str | None:
        """The caller's peer id, proven by its ticket; None (after telling it why) when it proves nothing."""
        loop = asyncio.get_running_loop()
        nonce = secrets.token_bytes(NONCE_BYTES)
        await loop.sock_sendall(sock, GREETING + nonce)
        try:
            hello = await frames.receive(sock, HELLO_MAX_BYTES)
        except frames.ProtocolError as error:
            await self._refuse(sock, address, f"malformed hello: {error}")
            return None
        assert hello is not None
        header = hello[0]
        if header.get("peer") != self.peer_id:
            await self._refuse(sock, address, f"this is peer {self.peer_id}, not {header.get('peer')!r}")
            return None
        ticket = self.tickets.lookup(header.get("token"))
        proof = header.get("mac")
        if ticket is None:
            await self._refuse(sock, address, "unknown or expired ticket")
            return None
        if not isinstance(proof, bytes) or not hmac.compare_digest(proof, mac(ticket.secret, b"client", nonce)):
            await self._refuse(sock, address, "the hello does not prove its ticket")
            return None
        await frames.send(sock, {"ok": True, "mac": mac(ticket.secret, b"server", nonce)})
        return ticket.peer_id

    async def _serve_connection(self, sock: socket.socket, address: Any) -> None:
        try:
            _configure(sock)
            caller = await asyncio.wait_for(self._handshake(sock, address), HELLO_TIMEOUT)
            while caller is not None:
                caller = caller if await self._serve_request(sock, address, caller) else None
        except asyncio.TimeoutError:
            logger.debug("direct channel: %s sent no hello within %.0f s", address, HELLO_TIMEOUT)
        except (OSError, frames.ConnectionClosed):  # the peer went away: nothing to answer
            pass
        except Exception as error:  # a bug on our side (say, a reply that is no tensor): this connection only
            logger.warning("direct channel: connection from %s dropped: %s", address, last_line(repr(error)))
        finally:
            sock.close()

    async def _serve_request(self, sock: socket.socket, address: Any, caller: str) -> bool:
        """Answer one call; False when the connection should close (peer closed, or it sent garbage)."""
        try:
            got = await frames.receive(sock, self.max_bytes, eof_ok=True)
            if got is None:
                return False
            header, tensors, received = got
            method, metadata = header.get("method"), header.get("metadata", {})
            if method not in METHODS or not isinstance(metadata, dict):
                raise frames.ProtocolError(f"method must be one of {', '.join(METHODS)} and metadata a map")
        except frames.TooLarge as error:
            # Refuse, then skip its payload (bounded in time, constant memory): the caller reads a clear error
            # instead of a reset, and the connection stays in step.
            await self._refuse(sock, f"{address} (peer {caller})", f"request refused: {error}")
            try:
                await asyncio.wait_for(frames.discard(sock, error.following), DISCARD_TIMEOUT)
            except asyncio.TimeoutError:
                return False
            return True
        except frames.ProtocolError as error:
            await self._refuse(sock, f"{address} (peer {caller})", f"malformed request: {error}")
            return False
        outcome = await self._run_watched(sock, getattr(self.service, method)(tensors, metadata, caller))
        if outcome is None:
            return False  # the caller went away: its work was cancelled, nobody to answer
        outputs, out_metadata, error = outcome
        if error is not None:
            await frames.send(sock, {"error": error})
            return True
        sent = await frames.send(sock, {"metadata": out_metadata}, outputs)
        if self.count_traffic is not None:
            self.count_traffic(received, sent)
        return True

    async def _run_watched(
        self, sock: socket.socket, work: Awaitable[tuple[list[torch.Tensor], dict[str, Any]]]
    ) -> tuple[list[torch.Tensor], dict[str, Any], str | None] | None:
        """Run the service call while watching the connection: a caller that closes it (or breaks the protocol
        by sending mid-call) cancels the call, so queued work of a dead trainer gives its slot back."""
        task = asyncio.ensure_future(work)
        watch = asyncio.ensure_future(asyncio.get_running_loop().sock_recv(sock, 1))
        try:
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
            if watch.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                return None
        finally:
            watch.cancel()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        try:
            outputs, out_metadata = task.result()
        except Exception as error:  # the service's own failure: reported to the caller, the server goes on
            return [], {}, last_line(repr(error))
        return list(outputs), dict(out_metadata), None


def tensor_host(bind_host: str, public_ip: str | None, maddrs: Sequence[str]) -> str:
    """The address others reach the listener at: the public IP if set, else the bound address unless it is a
    wildcard, else the first IPv4 address of the peer's visible multiaddrs (127.0.0.1 if it has none)."""
    if public_ip:
        return public_ip
    if bind_host not in ("0.0.0.0", ""):
        return bind_host
    for maddr in maddrs:
        parts = maddr.split("/")
        if len(parts) > 2 and parts[1] == "ip4" and parts[2] != "0.0.0.0":
            return parts[2]
    return "127.0.0.1"


def parse_address(address: str) -> tuple[str, int]:
    """("host", port) of an announced "host:port"; ValueError naming it when malformed."""
    host, _, port = address.rpartition(":")
    try:
        ipaddress.IPv4Address(host)
        number = int(port)
    except ValueError:
        raise ValueError(f"tensor address {address!r} is not IPv4:port") from None
    if not 0 < number < 65536:
        raise ValueError(f"tensor address {address!r} has no valid port")
    return host, number


class _Connection:
    """One authenticated client connection; carries one call at a time."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def idle_and_open(self) -> bool:
        """An idle connection has nothing to read: readable means the server closed it (or broke protocol)."""
        try:
            self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False

    async def request(
        self, method: str, tensors: Sequence[torch.Tensor], metadata: dict[str, Any], max_bytes: int
    ) -> tuple[list[torch.Tensor], dict[str, Any], int, int]:
        sent = await frames.send(self.sock, {"method": method, "metadata": metadata}, tensors)
        got = await frames.receive(self.sock, max_bytes)
        assert got is not None
        header, outputs, received = got
        if "error" in header:
            raise RemoteError(last_line(str(header["error"])))
        out_metadata = header.get("metadata")
        if not isinstance(out_metadata, dict):
            raise frames.ProtocolError("the reply has no metadata map")
        return outputs, out_metadata, sent, received

    def close(self) -> None:
        self.sock.close()


class DirectClient:
    """A trainer's side: per-replica pools of authenticated connections, tickets, and the p2p fallback memory.

    `issue(replica)` gets a ticket from the replica over p2p (`request_ticket`, through StageClient's
    connected P2P). A replica whose address cannot be reached is used over p2p for `fallback_time` s."""

    def __init__(
        self,
        issue: Callable[[ServerInfo], Awaitable[Ticket]],
        connect_timeout: float,
        fallback_time: float,
        max_bytes: int,
    ):
        self._issue, self.connect_timeout, self.fallback_time, self.max_bytes = (
            issue,
            connect_timeout,
            fallback_time,
            max_bytes,
        )
        self._idle: dict[str, list[_Connection]] = {}
        self._tickets: dict[str, Ticket] = {}
        self._ticket_locks: dict[str, asyncio.Lock] = {}
        self._fallback_until: dict[str, float] = {}
        self._busy: set[_Connection] = set()
        self._reached: set[str] = set()  # replicas already reached directly (logged once)
        self._closed = False
        self.fallbacks = 0  # times a replica was switched to p2p

    @staticmethod
    def _key(replica: ServerInfo) -> str:
        return f"{replica.peer_id}@{replica.tensor_addr}"

    def usable(self, replica: ServerInfo) -> bool:
        return bool(replica.tensor_addr) and time.monotonic() >= self._fallback_until.get(self._key(replica), 0.0)

    async def call(
        self, replica: ServerInfo, method: str, tensors: Sequence[torch.Tensor], metadata: dict[str, Any]
    ) -> tuple[list[torch.Tensor], dict[str, Any], int, int]:
        """One call over the channel. ChannelUnavailable (before anything was sent): use p2p. RemoteError: the
        server's failure. ConnectionError/OSError/ProtocolError: the connection broke (it is dropped)."""
        connection = await self._acquire(replica)
        self._busy.add(connection)
        reusable = False
        try:
            result = await connection.request(method, tensors, metadata, self.max_bytes)
            if self._closed:  # closed under the call: a reply that still came in is not handed out
                raise frames.ConnectionClosed("the stage client was closed during the call")
            reusable = True
            return result
        except RemoteError:
            reusable = True  # a whole error reply: the stream is in step
            raise
        finally:
            self._busy.discard(connection)
            if reusable and not self._closed:
                self._release(replica, connection)
            else:  # broken, timed out or cancelled half-way: its stream may be out of step
                connection.close()

    async def prepare(self, replica: ServerInfo) -> None:
        """Open one connection to `replica` ahead of its first call (no-op when one is idle or the channel is
        unusable: the first call then goes over p2p, as it would have)."""
        if not self.usable(replica) or self._idle.get(self._key(replica)):
            return
        try:
            connection = await self._acquire(replica)
        except ChannelUnavailable:
            return
        self._release(replica, connection)

    def _release(self, replica: ServerInfo, connection: _Connection) -> None:
        idle = self._idle.setdefault(self._key(replica), [])
        if len(idle) < MAX_IDLE_PER_REPLICA:
            idle.append(connection)
        else:
            connection.close()

    async def _acquire(self, replica: ServerInfo) -> _Connection:
        idle = self._idle.get(self._key(replica), [])
        while idle:
            connection = idle.pop()
            if connection.idle_and_open():
                return connection
            connection.close()
        try:
            host, port = parse_address(replica.tensor_addr)
        except ValueError as error:
            raise self._fall_back(replica, str(error)) from None
        for attempt in range(2):
            ticket = await self._ticket(replica)  # over p2p: its errors are the peer's, not the channel's
            try:
                connection = await asyncio.wait_for(
                    self._connect(host, port, ticket, replica.peer_id), self.connect_timeout
                )
            except TicketRefused as error:
                self._tickets.pop(replica.peer_id, None)  # the server forgot it (restarted, moved): ask again
                if attempt:
                    raise self._fall_back(replica, f"ticket refused: {error}") from None
            except asyncio.TimeoutError:
                raise self._fall_back(replica, f"no answer within {self.connect_timeout:.1f} s") from None
            except (OSError, frames.ProtocolError) as error:
                raise self._fall_back(replica, last_line(error)) from None
            if self._key(replica) not in self._reached:
                self._reached.add(self._key(replica))
                logger.info("tensors to %s go over the direct channel at %s", replica.uid, replica.tensor_addr)
            return connection
        raise AssertionError("unreachable")

    def _fall_back(self, replica: ServerInfo, why: str) -> ChannelUnavailable:
        self._fallback_until[self._key(replica)] = time.monotonic() + self.fallback_time
        self.fallbacks += 1
        logger.warning(
            "direct tensor channel to %s at %s unusable (%s): using p2p for it for %.0f s",
            replica.uid,
            replica.tensor_addr,
            why,
            self.fallback_time,
        )
        return ChannelUnavailable(why)

    async def _ticket(self, replica: ServerInfo) -> Ticket:
        lock = self._ticket_locks.setdefault(replica.peer_id, asyncio.Lock())
        async with lock:  # concurrent micro-batches share one ticket request
            ticket = self._tickets.get(replica.peer_id)
            if ticket is None or ticket.expires_at - time.monotonic() < TICKET_MARGIN:
                ticket = await self._issue(replica)
                self._tickets[replica.peer_id] = ticket
            return ticket

    async def _connect(self, host: str, port: int, ticket: Ticket, peer_id: str) -> _Connection:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            _configure(sock)
            await loop.sock_connect(sock, (host, port))
            greeting = bytearray(len(GREETING) + NONCE_BYTES)
            await frames.recv_exactly(sock, memoryview(greeting))
            if bytes(greeting[: len(GREETING)]) != GREETING:
                raise frames.ProtocolError(f"{host}:{port} is not a DistQat tensor channel of this version")
            nonce = bytes(greeting[len(GREETING) :])
            await frames.send(
                sock, {"token": ticket.token, "peer": peer_id, "mac": mac(ticket.secret, b"client", nonce)}
            )
            got = await frames.receive(sock, HELLO_MAX_BYTES)
            assert got is not None
            header = got[0]
            if "error" in header:
                raise TicketRefused(last_line(str(header["error"])))
            proof = header.get("mac")
            if not isinstance(proof, bytes) or not hmac.compare_digest(proof, mac(ticket.secret, b"server", nonce)):
                raise frames.ProtocolError(f"{host}:{port} did not prove it holds the ticket of peer {peer_id}")
        except BaseException:
            sock.close()
            raise
        return _Connection(sock)

    def close(self) -> None:
        """Close every connection; calls in progress end with a ConnectionClosed (their sockets are shut down,
        which wakes their pending reads, and closed by the calls themselves)."""
        self._closed = True
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()
        for connection in self._busy:
            with contextlib.suppress(OSError):
                connection.sock.shutdown(socket.SHUT_RDWR)


async def start_direct_server(
    p2p: P2P,
    service: Service,
    peer_id: str,
    bind_host: str,
    port: int,
    announce_host: str,
    max_bytes: int,
    count_traffic: Callable[[int, int], None] | None = None,
) -> tuple[DirectServer, str]:
    """Listen for direct calls to `service` and hand out tickets over p2p; returns (server, "host:port" to announce)."""
    tickets = TicketBook()
    server = DirectServer(service, tickets, peer_id, max_bytes, count_traffic)
    _, bound_port = await server.start(bind_host, port)
    await register_channel_opener(p2p, tickets)
    address = f"{announce_host}:{bound_port}"
    logger.info("direct tensor channel listening on %s:%d, announced as %s", bind_host, bound_port, address)
    return server, address


async def start_for_network(
    p2p: P2P,
    service: Service,
    peer_id: str,
    network: NetworkConfig,
    maddrs: Sequence[str],
    count_traffic: Callable[[int, int], None] | None = None,
) -> tuple[DirectServer | None, str]:
    """The server's channel as `network` configures it: (server, announced address), or (None, "") with
    `tensor_transport: p2p`."""
    if network.tensor_transport == "p2p":
        return None, ""
    bind_host = network.tensor_host or ("0.0.0.0" if network.public_ip else network.host)
    try:
        return await start_direct_server(
            p2p,
            service,
            peer_id,
            bind_host,
            network.tensor_port,
            tensor_host(bind_host, network.public_ip, maddrs),
            int(network.tensor_max_message_mib * 2**20),
            count_traffic,
        )
    except OSError as error:
        raise SwarmError(
            f"network.tensor_host/tensor_port: cannot listen on {bind_host}:{network.tensor_port}: {error} "
            "(or set network.tensor_transport: p2p)"
        ) from None
