"""Tickets: how a trainer proves, on a plain TCP connection, the peer id that p2p authenticated.

A stage server keys per-trainer admission and each trainer's kept forward graphs by the caller's peer id,
so a caller on the direct channel (`swarm/direct.py`) must not be able to claim another id. A trainer
first asks the server over p2p, whose transport authenticates peer ids, for a ticket (the handler
`distqat.stage.open_channel`): a random token id and a 32-byte secret that the server binds to the asking
peer id, valid for TICKET_TTL seconds, at most TICKETS_PER_PEER live per peer. p2p carries the secret
encrypted. On a new TCP connection the server sends a fresh random nonce; the trainer answers with the
token id, the server peer id it means to reach, and HMAC-SHA256(secret, "client" + nonce); the server
answers HMAC(secret, "server" + nonce). So each side knows the other holds the secret, the secret never
crosses TCP, and a recorded hello cannot be replayed on another connection. The connection then carries
that peer id's calls until it closes.

What this does not give: the tensors themselves cross TCP unencrypted and unauthenticated per message,
so an on-path attacker could read or alter them (or hijack the connection).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import msgpack
from hivemind.p2p import P2P, P2PContext, P2PHandlerError, PeerID
from hivemind.proto import runtime_pb2

from distqat.errors import last_line

OPEN_CHANNEL = "distqat.stage.open_channel"
TICKET_TTL = 600.0  # seconds a ticket opens connections (open ones stay authenticated)
TICKETS_PER_PEER = 4
MAX_TICKETS = 4096


class ChannelUnavailable(Exception):
    """The direct channel to this replica cannot be used now (no address, unreachable, refused): use p2p."""


class TicketRefused(Exception):
    """The server did not accept our ticket in the hello (expired, revoked, or another server now)."""


@dataclass
class Ticket:
    token: str
    secret: bytes
    expires_at: float  # time.monotonic() on the side that holds it
    peer_id: str = ""  # server side: the peer the ticket was issued to


def mac(secret: bytes, role: bytes, nonce: bytes) -> bytes:
    return hmac.new(secret, role + nonce, hashlib.sha256).digest()


class TicketBook:
    """The server's tickets: token id -> (caller peer id, secret, expiry); bounded per peer and in all."""

    def __init__(self, ttl: float = TICKET_TTL):
        self.ttl = ttl
        self._tickets: OrderedDict[str, Ticket] = OrderedDict()  # oldest first

    def issue(self, peer_id: str) -> Ticket:
        now = time.monotonic()
        for token in [token for token, ticket in self._tickets.items() if ticket.expires_at <= now]:
            del self._tickets[token]
        held = [token for token, ticket in self._tickets.items() if ticket.peer_id == peer_id]
        for token in held[: max(0, len(held) - TICKETS_PER_PEER + 1)]:
            del self._tickets[token]
        while len(self._tickets) >= MAX_TICKETS:
            self._tickets.popitem(last=False)
        ticket = Ticket(secrets.token_hex(16), secrets.token_bytes(32), now + self.ttl, peer_id)
        self._tickets[ticket.token] = ticket
        return ticket

    def lookup(self, token: Any) -> Ticket | None:
        ticket = self._tickets.get(token) if isinstance(token, str) else None
        return ticket if ticket is not None and ticket.expires_at > time.monotonic() else None


async def register_channel_opener(p2p: P2P, tickets: TicketBook) -> None:
    """The p2p handler that hands a calling peer a ticket bound to its (transport-authenticated) peer id."""

    async def open_channel(request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        ticket = tickets.issue(context.remote_id.to_base58())
        reply = {"token": ticket.token, "secret": ticket.secret, "ttl": tickets.ttl}
        return runtime_pb2.ExpertResponse(metadata=msgpack.packb(reply, use_bin_type=True))

    await p2p.add_protobuf_handler(OPEN_CHANNEL, open_channel, runtime_pb2.ExpertRequest)


async def request_ticket(p2p: P2P, peer_id: str) -> Ticket:
    """A ticket from the server `peer_id` over p2p. A server without the handler (an older version) or with a
    bad answer raises ChannelUnavailable; daemon errors (the peer is unreachable) propagate."""
    try:
        response = await p2p.call_protobuf_handler(
            PeerID.from_base58(peer_id), OPEN_CHANNEL, runtime_pb2.ExpertRequest(), runtime_pb2.ExpertResponse
        )
    except P2PHandlerError as error:
        raise ChannelUnavailable(f"the server gave no ticket: {last_line(error)}") from None
    try:
        reply = msgpack.unpackb(response.metadata, raw=False)
        token, secret, ttl = reply["token"], reply["secret"], float(reply["ttl"])
        if not isinstance(token, str) or not isinstance(secret, bytes) or len(secret) < 16:
            raise ValueError("token or secret of the wrong type")
    except Exception as error:  # whatever a buggy or hostile peer sent
        raise ChannelUnavailable(f"malformed ticket: {type(error).__name__}: {error}") from None
    return Ticket(token, secret, time.monotonic() + ttl)
