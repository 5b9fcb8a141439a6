"""Joining the swarm: a hivemind DHT node bound to port 0 (or the configured port), announcing what it bound."""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import socket
import time

from hivemind import DHT

from distqat.config import NetworkConfig
from distqat.errors import SwarmError
from distqat.observability.logs import set_log_peer

logger = logging.getLogger(__name__)

P2PD_SOCKETS = "/tmp/hivemind-p2pd-*.sock"
DHT_START_TIMEOUT = 60.0  # seconds: a DHT node starts in ~1 s, joining peers over the internet takes longer


def _free_tcp_port(host: str) -> int:
    # Only used when a public address must be announced: p2pd fixes its announced addresses at start,
    # so the port has to be known before the daemon binds it.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _refused(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            return True
        except OSError:
            return False
    return False


def _remove_dead_sockets(paths: set[str]) -> None:
    """A p2pd that failed to join (unreachable peers) leaves its socket file; nothing else will remove it.

    Only files that appeared during our attempt and refuse connections twice are removed: a daemon that
    another process just started answers by then.
    """
    dead = {path for path in paths if _refused(path)}
    if dead:
        time.sleep(0.3)
    for path in dead:
        if _refused(path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def start_dht(network: NetworkConfig, *, client_mode: bool = False, timeout: float = DHT_START_TIMEOUT) -> DHT:
    """Start a DHT node joining `network.initial_peers`; raise SwarmError naming them when it cannot."""
    initial_peers = network.initial_peers
    host_maddrs: list[str] = []
    announce_maddrs: list[str] = []
    if not client_mode:
        if network.public_ip:
            port = network.port or _free_tcp_port("0.0.0.0")
            host_maddrs = [f"/ip4/0.0.0.0/tcp/{port}"]
            announce_maddrs = [f"/ip4/{network.public_ip}/tcp/{port}"]
        else:
            host_maddrs = [f"/ip4/{network.host}/tcp/{network.port}"]
    else:
        host_maddrs = [f"/ip4/{network.host}/tcp/0"]
    dht = DHT(
        initial_peers=list(initial_peers),
        host_maddrs=host_maddrs,
        announce_maddrs=announce_maddrs or None,
        client_mode=client_mode,
        start=False,
    )
    sockets_before = set(glob.glob(P2PD_SOCKETS))
    try:
        dht.run_in_background(await_ready=True, timeout=timeout)
    except Exception as error:  # hivemind raises bare Exceptions, TimeoutError or P2PDaemonError here
        dht.shutdown()
        _remove_dead_sockets(set(glob.glob(P2PD_SOCKETS)) - sockets_before)
        peers = ", ".join(initial_peers) or "no initial peers"
        raise SwarmError(f"could not start a DHT node joining {peers}: {error}") from error
    set_log_peer(dht.peer_id.to_base58())
    return dht


def visible_maddrs(dht: DHT) -> list[str]:
    return [str(maddr) for maddr in dht.get_visible_maddrs()]
