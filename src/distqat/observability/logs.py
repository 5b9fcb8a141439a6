"""Log lines that say who wrote them: every record carries the role and (once its DHT is up) the peer.

`DISTQAT_LOGLEVEL` (DEBUG, INFO, WARNING, ERROR; default INFO) sets the verbosity of every role a
launcher starts, since they inherit the launcher's environment.
"""

from __future__ import annotations

import logging
import os
import sys

LOG_FORMAT = "%(asctime)s %(levelname)s [%(role)s %(peer)s] %(name)s: %(message)s"
LEVEL_VARIABLE = "DISTQAT_LOGLEVEL"
PEER_CHARS = 8  # the tail of a base58 peer id: what the live view and the status table show too

_context = {"role": "-", "peer": "-"}


def short_peer(peer_id: str) -> str:
    return peer_id[-PEER_CHARS:] if peer_id else "-"


class _ContextFilter(logging.Filter):
    """Adds `role` and `peer` to every record that passes through a handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.role = _context["role"]
        record.peer = _context["peer"]
        return True


def log_level() -> int:
    """The level named by DISTQAT_LOGLEVEL; an unknown name is a one-line error, not a silent default."""
    name = os.environ.get(LEVEL_VARIABLE, "INFO").strip().upper() or "INFO"
    level = logging.getLevelName(name)
    if not isinstance(level, int):
        raise ValueError(f"{LEVEL_VARIABLE}={name!r} is not a log level (use DEBUG, INFO, WARNING or ERROR)")
    return level


def setup_logging(role: str) -> None:
    """Log to stderr (a launcher sends it to the role's file) with the role and peer in every line."""
    _context["role"], _context["peer"] = role, "-"  # no DHT node yet in this role
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(_ContextFilter())
    logging.basicConfig(level=log_level(), handlers=[handler], force=True)


def set_log_peer(peer_id: str) -> None:
    """Called once the process has a DHT node: from then on its lines name the peer."""
    _context["peer"] = short_peer(peer_id)
