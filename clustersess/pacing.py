"""Long passes in short slices, so that a node holding 200,000 sessions keeps serving.

A pass over every session (sweep, resync, rebalance, adoption, the access flush) costs
from a fraction of a microsecond to tens of microseconds per session: at 200,000
sessions, from tens of milliseconds to seconds of work. Run in one piece it stalls every
request on the node for that long. A pass instead asks a :class:`Slicer` after each item
whether its slice is used up, and gives the event loop back when it is: requests wait at
most about one slice per step of theirs.

A slice ends after ``budget`` seconds by the given clock, or after ``cap`` items whatever
the clock says. The clock is the caller's injected monotonic clock: on a real node that
is real time; under the simulator's fake clock (which stands still while code runs)
only ``cap`` ends slices, so a seeded schedule yields at the same points every run.

Passes also share the loop among themselves: after any pass's slice ends, no pass
starts another for ``GAP`` seconds. Without that, a rebalance, an adoption and the
outbox's resends each ran a slice in the same turn of the loop, and a sync write, which
needs about ten turns on two nodes (request, flush, the backup's read and ACK, our read,
response), waited for all of them in every turn: 100 ms during an adoption of 100,000
sessions, where reads took 1 ms. (A slicer made with ``shared=False``, such as the
receiver's, yields for one turn only: it is not background work.)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TypeVar

T = TypeVar("T")

#: seconds of work before a pass gives the event loop back
SLICE = 0.001
#: items before a pass gives the loop back, however fast they went
CAP = 1000
#: after a pass's slice, no pass starts another for this long (seconds)
GAP = 0.002

#: when the next pass's slice may start: GAP after the last slice ended, or after the
#: one running is due to end (by the clock of the slicer that set it)
_quiet_until = float("-inf")
#: sessions a second an adoption or a rebalance hands to other nodes (see Rate)
BULK_RATE = 12_500.0
#: by default the clock is read once per this many items (a clock call costs about as
#: much as a cheap item)
CHECK = 16


class Slicer:
    """Tells a long pass when to give the event loop back: ``if s.due(): await s.pause()``."""

    __slots__ = ("_budget", "_cap", "_check", "_clock", "_n", "_shared", "_until")

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        budget: float = SLICE,
        cap: int = CAP,
        check: int = CHECK,
        shared: bool = True,
    ) -> None:
        """``check``: read the clock every this many items (1 for items that cost more
        than a clock call, such as whole messages). ``shared``: a background pass, which
        leaves ``GAP`` after any pass's slice (see above)."""
        self._clock = clock
        self._budget = budget
        self._cap = cap
        self._check = check
        self._shared = shared
        self._n = 0
        self._until = clock() + budget

    def due(self) -> bool:
        """One more item done: is the slice used up?"""
        self._n += 1
        return self._n >= self._cap or (self._n % self._check == 0 and self._clock() >= self._until)

    async def pause(self) -> None:
        """Give the event loop back (one turn; a shared slicer also until ``GAP`` after
        the last pass's slice), then start a new slice."""
        global _quiet_until
        if not self._shared:
            await asyncio.sleep(0)
        else:
            _quiet_until = self._clock() + GAP
            await asyncio.sleep(0)
            # Once only, and never longer than a slice and its gap: under a clock that
            # stands still (a test's fake clock) the quiet time would never pass, and
            # passes with different clocks (an injected one) share the marker.
            wait = min(_quiet_until - self._clock(), self._budget + GAP)
            if wait > 0:
                await asyncio.sleep(wait)
            # Our slice starts: a pass waking meanwhile waits until it is over.
            _quiet_until = self._clock() + self._budget + GAP
        self._n = 0
        self._until = self._clock() + self._budget


class Rate:
    """Keeps a pass that hands sessions to other nodes to ``per_second`` of them.

    Slices bound how long a pass holds the loop, not how much work it makes elsewhere:
    each session an adoption takes over is also resent to a new backup (encoded,
    published, decoded and stored there) and announced to every member, several times
    the pass's own cost, on both nodes at once. On 2 cores shared with Redis, an
    adoption of 100,000 sessions as fast as the slices allowed (90,000 a second) kept
    every process busy, and sync writes, which cross both nodes and Redis, waited
    25-100 ms (p99); at 25,000 a second 15-21 ms, at 12,500 about 12 ms, and the
    survivors then own everything 13 s after the death instead of 5 (a request for a
    session not taken over yet takes it over at once; the new backups are acknowledged
    right behind the pass instead of 7 s after it).
    """

    __slots__ = ("_last", "_loop", "_rate")

    def __init__(self, per_second: float) -> None:
        # (the loop's own clock, the one its sleeps run on: a test's fake clock that
        # stands still would make every wait the sum of all before it)
        self._loop = asyncio.get_running_loop()
        self._rate = per_second
        self._last = self._loop.time()

    async def spend(self, items: int) -> None:
        """``items`` more were handed on since the last call: wait for what is left of
        the time they take at the rate. Per interval, neither saved up (no burst after
        a slow spell) nor owed (a pass slowed down by other work is not held back
        further)."""
        wait = items / self._rate - (self._loop.time() - self._last)
        if wait > 0:
            await asyncio.sleep(wait)
        self._last = self._loop.time()


async def paced(items: Iterable[T], clock: Callable[[], float]) -> AsyncIterator[T]:
    """``items``, with the event loop given back between slices (see :class:`Slicer`).

    The time a consumer spends on an item counts towards its slice. Iterate it to the
    end (no ``break``): an abandoned async generator is finalized only later.
    """
    s = Slicer(clock)
    for item in items:
        yield item
        if s.due():
            await s.pause()


async def select(items: Iterable[T], keep: Callable[[T], bool], clock: Callable[[], float]) -> list[T]:
    """``[x for x in items if keep(x)]``, in slices."""
    out: list[T] = []
    s = Slicer(clock)
    for item in items:
        if keep(item):
            out.append(item)
        if s.due():
            await s.pause()
    return out
