"""A trainer's side of the data server: connect with the run's secret, take batches from shared memory.

Each `next()` returns the slot taken last time and takes a new one; the batch is copied out of the slot
(a memcpy, no socket), so the tensors stay valid after the slot is refilled. Every request is bounded by
`timeout`: a data server that died or hangs is a DataError, never a trainer waiting forever.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from multiprocessing.connection import Client, Connection
from typing import Any

import torch

from distqat.data.shm import attach, slot_views
from distqat.errors import DataError

ADDRESS_ENV = "DISTQAT_DATA_SERVER"  # host:port of the client's data server
SECRET_ENV = "DISTQAT_DATA_SECRET"  # the run's secret, hex


def parse_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise DataError(f"{ADDRESS_ENV}='{text}': expected HOST:PORT")
    return host, int(port)


def _connect(address: tuple[str, int], secret: bytes, timeout: float) -> Connection:
    """Client() with a deadline: its connect and handshake have none (a daemon thread is left to hang)."""
    result: queue.Queue[Connection | BaseException] = queue.Queue()

    def connect() -> None:
        try:
            result.put(Client(address, authkey=secret))
        except BaseException as error:
            result.put(error)

    threading.Thread(target=connect, name="data-connect", daemon=True).start()
    try:
        outcome = result.get(timeout=timeout)
    except queue.Empty:
        raise DataError(f"data server at {address[0]}:{address[1]}: no answer within {timeout:.0f} s") from None
    if isinstance(outcome, BaseException):
        raise DataError(f"data server at {address[0]}:{address[1]}: cannot connect ({outcome})") from None
    return outcome


class SharedBatches:
    """Batches from the client's data server; same interface as BatchStream (`next`, `close`)."""

    def __init__(self, address: tuple[str, int], secret: bytes, name: str, timeout: float):
        self._where = f"data server at {address[0]}:{address[1]}"
        self._timeout = timeout
        self._conn = _connect(address, secret, timeout)
        self._held: int | None = None
        self.last: tuple[int, int] | None = None  # (epoch, batch number) of the last batch
        hello = self._ask({"op": "hello", "name": name})
        self._layout = hello["layout"]
        self._buffer = attach(hello["path"], self._layout)

    @classmethod
    def from_env(cls, name: str, timeout: float) -> SharedBatches | None:
        """The client's data server named in the environment, or None if this trainer runs without one."""
        address = os.environ.get(ADDRESS_ENV)
        if not address:
            return None
        secret = os.environ.get(SECRET_ENV)
        if not secret:
            raise DataError(f"{ADDRESS_ENV} is set but {SECRET_ENV} is not (the client passes both)")
        return cls(parse_address(address), bytes.fromhex(secret), name, timeout)

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            self._conn.send(request)
            if not self._conn.poll(self._timeout):
                raise DataError(f"{self._where}: no batch within {self._timeout:.0f} s")
            reply = self._conn.recv()
        except (EOFError, OSError) as error:
            raise DataError(f"{self._where}: connection lost ({type(error).__name__})") from None
        if "error" in reply:
            raise DataError(f"{self._where}: {reply['error']}")
        return reply

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        reply = self._ask({"op": "next", "release": self._held})
        self._held = reply["slot"]
        self.last = (reply["epoch"], reply["batch"])
        inputs, labels = slot_views(self._buffer, self._layout, self._held)
        return inputs.clone(), labels.clone()

    def close(self) -> None:
        with contextlib.suppress(OSError, EOFError):
            self._conn.send({"op": "bye", "release": self._held})
        self._conn.close()
        with contextlib.suppress(BufferError):
            self._buffer.close()
