"""The data server: preloads a dataset once and hands its batches to every local trainer through shared memory.

Worker threads fill free slots of a /dev/shm segment with prepared batches in the order of one seeded,
buffered shuffle per epoch (handed out in that order); trainers connect over an authenticated local
socket (127.0.0.1, a port picked by the OS, a random per-run secret from the client), and each request
hands out the next ready slot to exactly one trainer, so no two trainers get the same batch of an epoch.
A trainer holds one slot at a time and returns it with its next request; a trainer whose connection
drops (it died) has its slot returned.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import threading
import time
from multiprocessing.connection import Connection, Listener
from multiprocessing.context import AuthenticationError
from pathlib import Path
from typing import Any

from distqat.config import DataConfig, DataServerConfig
from distqat.data.datasets import Dataset
from distqat.data.shm import SharedSlots, SlotLayout, clean_stale_segments
from distqat.data.shuffle import BatchPlan, epoch_batches
from distqat.errors import DataError

logger = logging.getLogger(__name__)

_TICK_S = 0.2


class DataServer:
    def __init__(
        self,
        dataset: Dataset,
        data: DataConfig,
        settings: DataServerConfig,
        batch_size: int,
        seed: int,
        log_dir: Path,
        secret: bytes,
        host: str = "127.0.0.1",
    ):
        if len(dataset) < batch_size:
            raise DataError(f"diloco.batch_size_per_step {batch_size} is larger than the dataset ({len(dataset)})")
        for path in clean_stale_segments(log_dir):
            logger.warning("removed shared memory %s that a killed run left (listed in its record)", path)
        self._dataset, self._data, self._settings = dataset, data, settings
        inputs, labels = dataset.batch_spec(batch_size, data)
        self.layout = SlotLayout(inputs, labels, settings.pool_size)
        self._plans = epoch_batches(len(dataset), batch_size, settings.shuffle_buffer, seed)
        self._plan_lock = threading.Lock()
        self._free: queue.Queue[int] = queue.Queue()
        # Filled slots by plan sequence number; handed out strictly in plan order, so batches of two
        # epochs never interleave even when several workers finish out of order.
        self._filled: dict[int, tuple[int, BatchPlan]] = {}
        self._filled_cv = threading.Condition()
        self._plan_seq = 0
        self._next_seq = 0
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self.served = 0
        self._secret = secret
        self.slots = SharedSlots(log_dir, self.layout)
        try:
            self._listener = Listener((host, 0), authkey=secret)
        except BaseException:
            self.slots.close()
            raise
        self.address: tuple[str, int] = self._listener.address
        for slot in range(settings.pool_size):
            self._free.put(slot)
        self._threads = [
            threading.Thread(target=self._fill, name=f"data-fill-{i}", daemon=True) for i in range(settings.num_workers)
        ]
        self._threads.append(threading.Thread(target=self._accept, name="data-accept", daemon=True))
        for thread in self._threads:
            thread.start()

    # --- producing ---

    def _fill(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    slot = self._free.get(timeout=_TICK_S)
                except queue.Empty:
                    continue
                with self._plan_lock:
                    plan, seq = next(self._plans), self._plan_seq
                    self._plan_seq += 1
                inputs, labels = self._dataset.batch(plan.index, self._data)
                views = self.slots.views(slot)
                views[0].copy_(inputs)
                views[1].copy_(labels)
                with self._filled_cv:
                    self._filled[seq] = (slot, plan)
                    self._filled_cv.notify_all()
        except BaseException as error:  # fatal: trainers are told, and `serve` raises it
            logger.exception("preparing a batch failed")
            self.error = error
            self._stop.set()

    # --- serving ---

    def _accept(self) -> None:
        for number in itertools.count():
            try:
                conn = self._listener.accept()
            except AuthenticationError:
                logger.warning("refused a connection with a wrong secret")
                continue
            except OSError:
                return  # the listener was closed
            if self._stop.is_set():
                conn.close()
                return
            threading.Thread(
                target=self._serve_one, args=(conn, number), name=f"data-conn-{number}", daemon=True
            ).start()

    def _serve_one(self, conn: Connection, number: int) -> None:
        held: int | None = None
        name = f"connection {number}"
        try:
            while True:
                request: dict[str, Any] = conn.recv()
                op = request.get("op")
                if request.get("release") is not None and request["release"] == held:
                    self._free.put(held)
                    held = None
                if op == "hello":
                    name = str(request.get("name", name))
                    conn.send({"path": str(self.slots.path), "layout": self.layout})
                elif op == "next":
                    reply = self._next_ready()
                    if "slot" in reply:
                        held = reply["slot"]
                    conn.send(reply)
                elif op == "bye":
                    return
                else:
                    conn.send({"error": f"unknown request {op!r}"})
        except (EOFError, OSError):
            if held is not None:
                logger.info("%s went away holding slot %d; the slot is free again", name, held)
        finally:
            if held is not None:
                self._free.put(held)
            conn.close()

    def _next_ready(self) -> dict[str, Any]:
        while True:
            if self.error is not None:
                return {"error": f"the data server failed: {self.error}"}
            if self._stop.is_set():
                return {"error": "the data server is stopping"}
            with self._filled_cv:
                if self._next_seq not in self._filled:
                    self._filled_cv.wait(_TICK_S)
                    continue
                slot, plan = self._filled.pop(self._next_seq)
                self._next_seq += 1
            self.served += 1
            return {"slot": slot, "epoch": plan.epoch, "batch": plan.number}

    # --- lifecycle ---

    def wait_ready(self, timeout: float) -> None:
        """Until the first batch is prepared (the dataset is usable), or raise its error."""
        deadline = time.monotonic() + timeout
        while not self._filled and self.error is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.error is not None:
            raise DataError(f"preparing a batch failed: {self.error}") from self.error

    def serve(self, stop: threading.Event, report_every: float = 60.0) -> None:
        """Serve until `stop` (or a fatal error, raised as DataError); always cleans up."""
        try:
            last = time.monotonic()
            while not stop.is_set() and not self._stop.is_set():
                stop.wait(_TICK_S)
                if time.monotonic() - last >= report_every:
                    logger.info("served %d batches", self.served)
                    last = time.monotonic()
            if self.error is not None:
                raise DataError(f"preparing a batch failed: {self.error}") from self.error
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        # Wake the accept thread: Listener.accept has no timeout and closing its socket does not wake it.
        with contextlib.suppress(OSError, EOFError, AuthenticationError):
            from multiprocessing.connection import Client

            Client(self.address, authkey=self._secret).close()
        self._listener.close()
        for thread in self._threads:
            if thread.name.startswith("data-fill"):
                thread.join(timeout=5.0)
        self.slots.close()
        logger.info("data server stopped after %d batches; shared memory removed", self.served)
