"""A stage server's compute thread, fed by a bounded priority queue, with admission and utilisation.

Requests from any number of trainers arrive concurrently on the event loop; their compute runs one at a
time on one thread (the weights, the optimiser and the kept graphs are shared, and torch already spreads
one call over the process's threads). Order: backward, internal work, forward, FIFO within a
kind. A backward frees a kept graph and lets its trainer send the next micro-batch (1F1B): serving it first
keeps memory and weight staleness low.

Admission bounds memory: a forward is admitted only while the server holds fewer than `max_in_flight`
forwards (queued, or done and waiting for their backward) over all trainers and `max_per_caller` of this
caller; otherwise the caller gets a busy reply and retries later. Backward and internal work are never
refused: they free memory, or are few.

Utilisation: the seconds the thread spent computing, against wall time, over a window.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from enum import IntEnum
from typing import Any


class Kind(IntEnum):
    """Priority of a call: lower runs first."""

    BACKWARD = 0
    OTHER = 1  # internal work that may write the weights (DiLoCo round, state load): `before_other` first
    READ = 2  # internal work that only reads (weights digest, checkpoint snapshot, expiry)
    FORWARD = 3


class ComputeQueue:
    def __init__(
        self,
        max_in_flight: int,
        max_per_caller: int,
        held: Callable[[str | None], int] = lambda caller: 0,
        before_other: Callable[[], None] | None = None,
        name: str = "stage-compute",
    ):
        """`held(caller)`: forwards done and waiting for their backward (of `caller`, or of all when None).
        `before_other`: run on the compute thread before each OTHER call (it may write the weights)."""
        self.max_in_flight, self.max_per_caller = max_in_flight, max_per_caller
        self._held = held
        self._before_other = before_other
        self._heap: list[tuple[int, int, Future, Callable[..., Any], tuple, Callable[[], None] | None]] = []
        self._order = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        self._forwards: Counter[str] = Counter()  # admitted forwards not computed yet, by caller
        self.pending = 0  # calls queued or running
        self.refused = 0  # forwards refused with a busy reply
        self._busy_s = 0.0
        self._running_since: float | None = None
        self._window = (time.monotonic(), 0.0)  # (wall, busy seconds) at the start of the utilisation window
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    # --- admission ---

    def admit(self, caller: str) -> bool:
        """Reserve room for one forward of `caller`; False: refuse it (the caller backs off and retries)."""
        with self._cv:
            queued = sum(self._forwards.values())
            if (
                queued + self._held(None) >= self.max_in_flight
                or self._forwards[caller] + self._held(caller) >= self.max_per_caller
            ):
                self.refused += 1
                return False
            self._forwards[caller] += 1
            return True

    def _release(self, caller: str) -> None:
        with self._cv:
            self._forwards[caller] -= 1
            if self._forwards[caller] <= 0:
                del self._forwards[caller]

    # --- running calls ---

    def submit(
        self, kind: Kind, function: Callable[..., Any], *args: Any, done: Callable[[], None] | None = None
    ) -> Future:
        """Queue a call; the future has its result. A call cancelled while queued (its caller went away) is
        skipped; after `shutdown` the future is cancelled at once. `done` runs after the call, run or not."""
        future: Future = Future()
        with self._cv:
            if not self._closed:
                heapq.heappush(self._heap, (int(kind), next(self._order), future, function, args, done))
                self.pending += 1
                self._cv.notify()
                return future
        future.cancel()
        if done is not None:
            done()
        return future

    def submit_forward(self, caller: str, function: Callable[..., Any], *args: Any) -> Future:
        """A forward admitted by `admit(caller)`: its reservation ends when it has run (the replica then holds
        it) or was dropped."""
        return self.submit(Kind.FORWARD, function, *args, done=lambda: self._release(caller))

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._heap and not self._closed:
                    self._cv.wait()
                if not self._heap:
                    return
                kind, _, future, function, args, done = heapq.heappop(self._heap)
                self._running_since = time.monotonic()
            outcome: tuple[bool, Any] | None = None
            try:
                if future.set_running_or_notify_cancel():
                    try:
                        if kind == Kind.OTHER and self._before_other is not None:
                            self._before_other()
                        outcome = (True, function(*args))
                    except BaseException as error:  # handed to the awaiting caller
                        outcome = (False, error)
            finally:
                with self._cv:
                    self._busy_s += time.monotonic() - self._running_since
                    self._running_since = None
                    self.pending -= 1
                if done is not None:
                    done()
            # Only now hand over the result: a caller that reacts at once (a fast transport's next forward) must
            # find this call's admission slot released and the counts settled, or it is refused as busy.
            if outcome is not None:
                if outcome[0]:
                    future.set_result(outcome[1])
                else:
                    future.set_exception(outcome[1])

    def shutdown(self, wait: bool = True) -> None:
        """Cancel what is queued, let the running call finish (when `wait`), stop the thread."""
        with self._cv:
            self._closed = True
            dropped, self._heap = self._heap, []
            self.pending -= len(dropped)
            self._cv.notify_all()
        for _, _, future, _, _, done in dropped:
            future.cancel()
            if done is not None:
                done()
        if wait and threading.current_thread() is not self._thread:
            self._thread.join()

    # --- utilisation ---

    def busy_seconds(self) -> float:
        """Seconds spent computing since the start, the running call included."""
        with self._cv:
            running = 0.0 if self._running_since is None else time.monotonic() - self._running_since
            return self._busy_s + running

    def utilisation(self) -> float:
        """Busy time / wall time since the previous call (the first call: since the start), in [0, 1]."""
        now, busy = time.monotonic(), self.busy_seconds()
        (then, busy_then), self._window = self._window, (now, busy)
        return min(1.0, max(0.0, (busy - busy_then) / (now - then))) if now > then else 0.0
