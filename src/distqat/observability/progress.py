"""Progress of a long wait inside a role (dataset preparation, say), as log lines: roles log to files, so a
redrawn bar would be noise there. One line every `every_s` seconds with the count, percentage, elapsed time
and an estimate of what is left, and one when it is done."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


class ProgressLog:
    def __init__(self, what: str, total: int, logger: logging.Logger, every_s: float = 5.0):
        self.what, self.total, self.done = what, max(0, total), 0
        self._logger, self._every_s = logger, every_s
        self._started = self._last = time.monotonic()

    def line(self) -> str:
        elapsed = time.monotonic() - self._started
        percent = 100.0 * self.done / self.total if self.total else 100.0
        text = f"{self.what}: {self.done}/{self.total} ({percent:.0f}%), {elapsed:.0f} s"
        if 0 < self.done < self.total:
            text += f", ~{elapsed * (self.total - self.done) / self.done:.0f} s left"
        return text

    def advance(self, count: int = 1) -> None:
        self.done += count
        now = time.monotonic()
        if now - self._last >= self._every_s and self.done < self.total:
            self._last = now
            self._logger.info("%s", self.line())

    def finish(self) -> None:
        self._logger.info("%s", self.line())


def track(items: Iterable[T], total: int, what: str, logger: logging.Logger, every_s: float = 5.0) -> Iterator[T]:
    """Yield `items`, logging progress as they come."""
    progress = ProgressLog(what, total, logger, every_s)
    for item in items:
        yield item
        progress.advance()
    progress.finish()
