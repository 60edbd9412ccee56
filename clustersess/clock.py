"""Time sources.

Everything that expires sessions or detects dead members asks a :class:`Clock`, so tests
can move time forward without sleeping. Wall-clock seconds are used because timestamps
(created, last accessed) travel between machines.
"""

from __future__ import annotations

import time as _time
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float:
        """Seconds since the epoch."""
        ...  # pragma: no cover

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back; for intervals on this node only."""
        ...  # pragma: no cover


class SystemClock:
    """The real clock."""

    time = staticmethod(_time.time)
    monotonic = staticmethod(_time.monotonic)


class FakeClock:
    """A clock that moves only when told to; for tests."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._mono = 1000.0

    def time(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        assert seconds >= 0, "a clock never goes back"
        self._now += seconds
        self._mono += seconds
