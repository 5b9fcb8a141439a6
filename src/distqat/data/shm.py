"""The data server's shared memory: one /dev/shm segment of batch slots, and the run's record of it.

Before a segment is created its path is written to a record file in the run's log dir, and the record
goes when the segment is unlinked. A run that was killed before it could clean up (SIGKILL) leaves both
behind; the next data server in that log dir unlinks exactly the segments the record lists (never by
name matching), unless the process that wrote the record is still alive.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from distqat.data.datasets import TensorSpec
from distqat.errors import DataError

SHM_DIR = Path("/dev/shm")
RECORD_FILE = "data_server.shm.json"
_ALIGN = 64  # bytes: every tensor in a slot starts on a cache line


def _aligned(size: int) -> int:
    return (size + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclass(frozen=True)
class SlotLayout:
    """Where a batch's two tensors lie in each slot; sent to consumers so they can map the same views."""

    inputs: TensorSpec
    labels: TensorSpec
    pool_size: int

    @property
    def labels_offset(self) -> int:
        return _aligned(self.inputs.nbytes)

    @property
    def slot_bytes(self) -> int:
        return _aligned(self.labels_offset + self.labels.nbytes)

    @property
    def total_bytes(self) -> int:
        return self.slot_bytes * self.pool_size


def slot_views(buffer: mmap.mmap, layout: SlotLayout, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tensors over a slot's bytes (no copy): writing them writes the shared memory."""
    base = slot * layout.slot_bytes
    views = []
    for spec, offset in ((layout.inputs, 0), (layout.labels, layout.labels_offset)):
        count = spec.nbytes // torch.empty((), dtype=spec.dtype).element_size()
        views.append(torch.frombuffer(buffer, dtype=spec.dtype, count=count, offset=base + offset).view(spec.shape))
    return views[0], views[1]


def _process_alive(pid: int, create_time: float) -> bool:
    try:
        return abs(psutil.Process(pid).create_time() - create_time) < 0.01
    except psutil.Error:
        return False


def clean_stale_segments(log_dir: Path) -> list[str]:
    """Unlink the segments a killed run in this log dir recorded; returns the paths removed."""
    record = log_dir / RECORD_FILE
    try:
        entry = json.loads(record.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError):
        record.unlink(missing_ok=True)  # a torn record from a kill mid-write: its segment was not created yet
        return []
    if _process_alive(int(entry.get("pid", -1)), float(entry.get("create_time", 0.0))):
        raise DataError(f"{record}: a live data server (pid {entry['pid']}) uses this log dir")
    removed = []
    for path in entry.get("segments", []):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            removed.append(path)
    record.unlink(missing_ok=True)
    return removed


class SharedSlots:
    """The server's segment: created on construction, unlinked (with its record) by `close`."""

    def __init__(self, log_dir: Path, layout: SlotLayout):
        self.layout = layout
        self.path = SHM_DIR / f"distqat-data-{secrets.token_hex(8)}"
        self._record = log_dir / RECORD_FILE
        self._write_record()
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        except OSError as error:
            self._record.unlink(missing_ok=True)
            raise DataError(f"{self.path}: cannot create the shared-memory segment: {error}") from None
        try:
            # Reserve the pages now: a full /dev/shm is an error here, not a SIGBUS at the first write.
            os.posix_fallocate(fd, 0, layout.total_bytes)
            self.buffer = mmap.mmap(fd, layout.total_bytes)
        except OSError as error:
            os.close(fd)
            self._unlink()
            raise DataError(
                f"{self.path}: cannot reserve {layout.total_bytes / 2**20:.1f} MiB of shared memory ({error}); "
                "lower data_server.pool_size or free /dev/shm"
            ) from None
        os.close(fd)

    def _write_record(self) -> None:
        me = psutil.Process()
        entry = {"pid": me.pid, "create_time": me.create_time(), "segments": [str(self.path)]}
        partial = self._record.with_name(self._record.name + ".partial")
        partial.write_text(json.dumps(entry))
        partial.replace(self._record)  # atomic: a kill leaves the old record or the new one, never half

    def views(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        return slot_views(self.buffer, self.layout, slot)

    def _unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._record.unlink(missing_ok=True)

    def close(self) -> None:
        self._unlink()
        with contextlib.suppress(BufferError):  # views still alive: the mapping goes with the process
            self.buffer.close()


def attach(path: str, layout: SlotLayout) -> mmap.mmap:
    """A consumer's mapping of the server's segment."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as error:
        raise DataError(f"{path}: cannot open the data server's shared memory: {error}") from None
    try:
        return mmap.mmap(fd, layout.total_bytes)
    finally:
        os.close(fd)
