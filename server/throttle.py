"""Warnings that a client can provoke at will, written at most once per interval.

A hostile client can send thousands of bad frames a second; one log line each would let it
fill the disk and drown every other line. :class:`LogThrottle` writes the first occurrence
of an event, then at most one line per ``interval_s`` carrying how many occurrences it
stands for (``count``), so the rate stays visible while the volume does not.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class LogThrottle:
    def __init__(self, logger: Any, interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log = logger
        self._interval = interval_s
        self._clock = clock
        #: event -> (clock of the last line written, occurrences since then)
        self._seen: dict[str, tuple[float, int]] = {}

    def warning(self, event: str, **fields: Any) -> bool:
        """Count one ``event``; write it as a warning if its interval is over. True when a
        line was written."""
        now = self._clock()
        last, count = self._seen.get(event, (now - self._interval, 0))
        count += 1
        if now - last < self._interval:
            self._seen[event] = (last, count)
            return False
        self._seen[event] = (now, 0)
        self._log.warning(event, count=count, **fields)
        return True
