"""The outbox's background lane: its window, and how lost answers leave it."""

from __future__ import annotations

import asyncio
import logging
import time

from clustersess import ids
from clustersess.cluster import messages as m
from clustersess.cluster import outbox as ob
from clustersess.cluster.outbox import Outbox, RateLimitedLog
from clustersess.cluster.wire import Codec
from clustersess.session import Entry
from clustersess.stats import Stats
from clustersess.store import LocalStore

CHANNEL = "c:node:b"


class Published:
    """A transport stub: every frame reaches one subscriber."""

    def __init__(self) -> None:
        self.frames: list[tuple[str, bytes]] = []

    async def publish(self, items: list[tuple[str, bytes]]) -> list[int]:
        self.frames.extend(items)
        return [1] * len(items)


def make() -> tuple[Outbox, Published, LocalStore]:
    transport = Published()
    store = LocalStore()
    box = Outbox(
        "a", "inc1", Codec(("s" * 32,), "c"), transport,  # type: ignore[arg-type]
        stats=Stats(), store=store, warn=RateLimitedLog(logging.getLogger("test")),
        wall=time.time, mono=time.monotonic, on_unreachable=lambda channel: None,
    )  # fmt: skip
    return box, transport, store


def owned(store: LocalStore, n: int) -> list[Entry]:
    entries = []
    for _ in range(n):
        e = Entry(token=ids.new_token(), owner="a", created=0.0, last_accessed=0.0, epoch=1, version=1)
        e.payload, e.vv = b'{"x": "' + b"y" * 4000 + b'"}', ("a", 1)
        store.owned[e.token] = e
        entries.append(e)
    return entries


def background_seqs(box: Outbox) -> list[int]:
    """Messages whose bytes count in the window now."""
    return sorted(seq for (ch, seq), w in box._acks.items() if w.background)


def unanswered(box: Outbox) -> list[int]:
    return sorted(seq for _, seq in box._acks)


async def test_unanswered_resends_hold_the_window_until_a_later_answer_shows_them_lost() -> None:
    """A backup answers in order. While it is merely slow, unanswered resends keep their
    place in the window (no more is sent: opening it under a busy backup deepened its
    backlog until everything expired and went twice); once it answers a later message,
    the earlier unanswered ones were lost and leave the window, and the lane moves on."""
    box, _, store = make()
    resent: list[tuple[str, m.Refusal | None]] = []
    box.on_resent = lambda entry, refusal: resent.append((entry.token, refusal))
    for e in owned(store, 200):  # 800 KB of resends: far more than the window
        box.resend(CHANNEL, e)
    for _ in range(ob.BACKGROUND_WINDOW // ob.BACKGROUND_PER_FLUSH + 2):
        await box.flush()  # (a flush sends at most BACKGROUND_PER_FLUSH of them)
    first = background_seqs(box)
    assert len(first) > 1 and box._background_bytes <= ob.BACKGROUND_WINDOW + 8 * 1024
    await box.flush()
    assert background_seqs(box) == first  # the window is full: nothing more goes
    box.release_window(time.monotonic() - 1.0)  # an ack timeout later: still held
    await box.flush()
    assert background_seqs(box) == first
    # The backup answers the last of them: the earlier ones were lost.
    box.acked(CHANNEL, m.Ack(first[-1]))
    assert box._background_bytes == 0
    await box.flush()
    assert max(unanswered(box)) > first[-1]  # the lane moved on
    # and a lost one's answer, if it comes after all, is still acted on
    n = len(resent)
    box.acked(CHANNEL, m.Ack(first[0]))
    assert len(resent) > n and all(refusal is None for _, refusal in resent)


async def test_resending_lasts_from_the_queue_to_the_last_answer() -> None:
    """What a resync's answer waits on while a pass moves sessions (replication.py)."""
    box, _, store = make()
    assert not box.resending()
    for e in owned(store, 3):
        box.resend(CHANNEL, e)
    assert box.resending()  # queued
    await box.flush()
    seqs = background_seqs(box)
    assert seqs and not box._background and box.resending()  # sent, not answered
    for seq in seqs:
        box.acked(CHANNEL, m.Ack(seq))
    assert not box.resending()


async def test_a_last_resort_release_frees_a_lane_nobody_answers() -> None:
    box, _, store = make()
    for e in owned(store, 100):
        box.resend(CHANNEL, e)
    await box.flush()
    first = background_seqs(box)
    box.release_window(time.monotonic() + 1.0)  # (what the heartbeat does, ack_expiry / 2 later)
    assert box._background_bytes == 0
    await box.flush()
    assert max(unanswered(box)) > first[-1]
    await asyncio.sleep(0)


async def test_a_lost_members_resends_leave_the_window_at_once() -> None:
    box, _, store = make()
    for e in owned(store, 100):
        box.resend(CHANNEL, e)
    for _ in range(ob.BACKGROUND_WINDOW // ob.BACKGROUND_PER_FLUSH + 2):
        await box.flush()
    held = unanswered(box)
    assert box._background_bytes > 0
    box.release_channel("c:node:other")  # another member's: nothing changes
    assert box._background_bytes > 0
    box.release_channel(CHANNEL)
    assert box._background_bytes == 0 and unanswered(box) == held  # (still answered if it comes)


async def test_the_window_halves_on_late_answers_and_grows_back_on_prompt_ones() -> None:
    """Late answers show queues building (a busy backup, a busy loop), where requests'
    writes and ACKs wait too: fewer resends are sent at a time, but always one flush's
    worth; prompt answers open the window again."""
    now = [1000.0]
    box, _, store = make()
    box._mono = lambda: now[0]  # (answers' delays as the test says)

    async def answer_after(delay: float) -> None:
        await box.flush()
        seqs = background_seqs(box)
        assert seqs, "a resend was sent"
        now[0] += delay
        for seq in seqs:
            box.acked(CHANNEL, m.Ack(seq))

    for e in owned(store, 400):
        box.resend(CHANNEL, e)
    assert box._window == ob.BACKGROUND_WINDOW
    await answer_after(ob.BACKGROUND_DELAY * 4)
    assert box._window == ob.BACKGROUND_WINDOW // 2  # once per late round trip, not per answer
    for _ in range(5):
        await answer_after(ob.BACKGROUND_DELAY * 4)
    assert box._window == ob.BACKGROUND_MIN_WINDOW
    await box.flush()
    assert box._background_bytes >= ob.BACKGROUND_MIN_WINDOW - 8 * 1024  # still moving
    for seq in background_seqs(box):
        box.acked(CHANNEL, m.Ack(seq))
    for _ in range(30):
        await answer_after(ob.BACKGROUND_DELAY / 4)
    assert box._window == ob.BACKGROUND_WINDOW
