"""A fixed-rate schedule on the monotonic clock, for control loops that must not drift.

Deadlines are absolute (start + n * period), so a slow tick does not shift every later one.
When a tick starts a whole period late the missed deadlines are skipped, not burst through.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Ticker:
    def __init__(self, rate_hz: float, clock: Callable[[], float] = time.monotonic) -> None:
        if rate_hz <= 0:
            raise ValueError("rate_hz must be positive")
        self.period_s = 1.0 / rate_hz
        self._clock = clock
        self._next = clock()
        self.overruns = 0

    def remaining_s(self) -> float:
        """Seconds until the next deadline (0 when it has passed)."""
        return max(0.0, self._next - self._clock())

    def budget_s(self) -> float:
        """Seconds left for work in the current tick: until the next deadline, or, once a
        deadline is due and not yet advanced past, until the one after it."""
        now = self._clock()
        end = self._next + self.period_s if now >= self._next else self._next
        return max(0.0, end - now)

    def due(self) -> bool:
        return self._clock() >= self._next

    def advance(self) -> None:
        """Move to the next deadline; count and skip deadlines missed by a whole period."""
        self._next += self.period_s
        behind = self._clock() - self._next
        if behind >= self.period_s:
            skipped = int(behind // self.period_s)
            self.overruns += skipped
            self._next += skipped * self.period_s

    def sleep(self) -> None:
        """Sleep until the next deadline, then advance to the one after it."""
        delay = self.remaining_s()
        if delay > 0:
            time.sleep(delay)
        self.advance()
