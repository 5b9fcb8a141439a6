"""Typed errors: one class per failure a caller can act on.

Every message is meant to be shown to a user as one line that names the file, field or peer at fault.
"""

from __future__ import annotations


class DistQatError(Exception):
    """Base class of every error DistQat raises on purpose."""


class ConfigError(DistQatError):
    """A config file or override is missing, malformed or invalid."""


class DataError(DistQatError):
    """A dataset cannot be found or read."""


class ModelError(DistQatError):
    """A model or stage name is unknown, or a stage cannot be built."""


class SwarmError(DistQatError):
    """Something went wrong talking to the swarm (DHT or a peer)."""


class StageCallError(SwarmError):
    """A remote stage call failed: the micro-batch may be retried on another replica."""


class StageTimeoutError(StageCallError):
    """A remote stage call did not answer within its timeout (the peer is dead, frozen or overloaded)."""


class StageBusyError(SwarmError):
    """A stage server refused a forward because its queue is full: back off and retry (the replica is healthy)."""


class NoReplicaError(SwarmError):
    """A stage has no live replica to route to."""


def last_line(error: BaseException | str) -> str:
    """The last line of an error's text (hivemind and libp2p put the cause there, under a traceback)."""
    lines = str(error).strip().splitlines()
    return lines[-1] if lines else type(error).__name__
