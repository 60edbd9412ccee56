"""Long passes in slices (clustersess/pacing.py): requests keep being served meanwhile."""

from __future__ import annotations

import asyncio
import time

from clustersess import pacing
from clustersess.clock import FakeClock


async def _ticker(lags: list[float], stop: asyncio.Event) -> None:
    """What a request sees: how late a 1 ms timer fires while a pass runs."""
    while not stop.is_set():
        due = time.monotonic() + 0.001
        await asyncio.sleep(0.001)
        lags.append(time.monotonic() - due)


def _work(n: int) -> int:
    return sum(range(n))


async def test_a_pass_of_real_work_gives_the_loop_back_every_slice() -> None:
    lags: list[float] = []
    stop = asyncio.Event()
    ticker = asyncio.create_task(_ticker(lags, stop))
    await asyncio.sleep(0.005)
    started = time.monotonic()
    done = 0
    async for _ in pacing.paced(range(20_000), time.monotonic):
        _work(200)  # some microseconds per item: the pass takes far longer than a slice
        done += 1
    took = time.monotonic() - started
    stop.set()
    await ticker
    assert done == 20_000
    assert took > 10 * pacing.SLICE, took  # (it was long enough to need slicing)
    # The timer never waited for much more than a slice and its gap (plus the machine's noise).
    assert max(lags) < pacing.SLICE + pacing.GAP + 0.02, max(lags)


async def test_under_a_clock_that_stands_still_slices_end_by_count() -> None:
    clock = FakeClock()
    s = pacing.Slicer(clock.monotonic, cap=10)
    ends = []
    for i in range(1, 35):
        if s.due():
            ends.append(i)
            await s.pause()
    assert ends == [10, 20, 30]  # the same points every run: a seeded simulation stays seeded


async def test_select_keeps_what_it_should_in_order() -> None:
    items = list(range(5_000))
    assert await pacing.select(items, lambda x: x % 7 == 0, time.monotonic) == [x for x in items if x % 7 == 0]


async def test_passes_with_different_clocks_never_wait_longer_than_a_slice() -> None:
    # A pass on a clock far ahead sets the shared marker; one on a clock far behind must
    # not read that as "wait for hours".
    ahead = pacing.Slicer(lambda: 1e9, cap=1)
    behind = pacing.Slicer(FakeClock().monotonic, cap=1)
    assert ahead.due()
    await ahead.pause()
    started = time.monotonic()
    assert behind.due()
    await behind.pause()
    assert time.monotonic() - started < 0.5


async def test_a_rate_spreads_a_pass_and_saves_no_credit_from_slow_spells() -> None:
    rate = pacing.Rate(1_000)
    started = time.monotonic()
    for _ in range(5):
        await rate.spend(20)  # 100 items at 1,000 a second: 0.1 s at least
    took = time.monotonic() - started
    assert 0.09 <= took < 2.0, took
    await asyncio.sleep(0.3)  # a slow spell: 100 items took 0.3 s, no wait for them...
    started = time.monotonic()
    await rate.spend(100)
    assert time.monotonic() - started < 0.05
    await rate.spend(100)  # ...and none saved for the next ones
    assert time.monotonic() - started >= 0.09
