"""Rate-limited logging for per-datagram errors: a flood of bad packets must not flood the log."""

from __future__ import annotations

import logging
from collections.abc import Callable


class RateLimitedLog:
    """At most `burst` records per key every `interval` seconds; the rest are counted and reported once
    the window ends. Time comes from `clock`, so tests can drive it."""

    def __init__(
        self, logger: logging.Logger, *, clock: Callable[[], float], interval: float = 10.0, burst: int = 5
    ) -> None:
        self.logger = logger
        self.clock = clock
        self.interval = interval
        self.burst = burst
        self._windows: dict[str, tuple[float, int, int]] = {}  # key -> (window start, logged, suppressed)

    def _allow(self, key: str) -> bool:
        now = self.clock()
        start, logged, suppressed = self._windows.get(key, (now, 0, 0))
        if now - start >= self.interval:
            if suppressed:
                self.logger.warning("%d more %r messages suppressed in the last %.0f s", suppressed, key,
                                    now - start)
            start, logged, suppressed = now, 0, 0
        if logged < self.burst:
            self._windows[key] = (start, logged + 1, suppressed)
            return True
        self._windows[key] = (start, logged, suppressed + 1)
        return False

    def warning(self, key: str, msg: str, *args: object) -> None:
        if self._allow(key):
            self.logger.warning(msg, *args)

    def exception(self, key: str, msg: str, *args: object) -> None:
        if self._allow(key):
            self.logger.exception(msg, *args)
