"""A stage server's view of its own calls: recent forward and backward latency.

Latency is a moving average (each new call weighs ALPHA), measured from the call's arrival to its
answer, so time spent waiting for the compute thread (behind other calls or an averaging round) counts:
that is what a trainer waits for, and what makes a replica a straggler.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

Kind = Literal["forward", "backward"]
ALPHA = 0.2


class CallStats:
    def __init__(self) -> None:
        self.mean_ms: dict[str, float] = {"forward": 0.0, "backward": 0.0}

    @contextmanager
    def track(self, kind: Kind) -> Iterator[None]:
        began = time.monotonic()
        try:
            yield
        finally:
            self.observe(kind, (time.monotonic() - began) * 1000.0)

    def observe(self, kind: Kind, elapsed_ms: float) -> None:
        previous = self.mean_ms[kind]
        self.mean_ms[kind] = elapsed_ms if previous == 0.0 else (1 - ALPHA) * previous + ALPHA * elapsed_ms
