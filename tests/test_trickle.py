"""The trickle: bulk control items leave one message per turn, rendered when they leave."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from clustersess.cluster import messages as m
from clustersess.cluster import trickle
from clustersess.cluster.trickle import Trickle


class Sent:
    """Stands in for the outbox: records what would be published."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, m.Drop]] = []
        #: the loop's time of each message
        self.at: list[float] = []

    def send(self, channel: str, body: m.Body, *, counted: bool = False) -> None:
        assert isinstance(body, m.Drop)
        self.messages.append((channel, body))
        self.at.append(asyncio.get_running_loop().time())


def tokens(n: int, prefix: str = "A") -> list[tuple[str, int]]:
    return [(f"{prefix}{i:023d}", 1) for i in range(n)]


async def test_a_big_batch_leaves_one_message_per_turn() -> None:
    sent = Sent()
    t = Trickle(sent)  # type: ignore[arg-type]
    t.add("ch:node:b", m.Drop, tokens(trickle.PER_TURN * 2 + 7))
    await asyncio.sleep(0)
    assert [len(b.items) for _, b in sent.messages] == [trickle.PER_TURN]  # the first at once
    assert t.pending() == trickle.PER_TURN + 7
    for _ in range(100):  # (up to 1 s on a busy machine; 20 ms on an idle one)
        if len(sent.messages) == 3:
            break
        await asyncio.sleep(trickle.PACE)
    assert [len(b.items) for _, b in sent.messages] == [trickle.PER_TURN, trickle.PER_TURN, 7]
    # and each no sooner than the pace allows (a busy machine only makes them later)
    assert all(b - a >= trickle.PACE * 0.9 for a, b in zip(sent.at, sent.at[1:])), sent.at
    assert t.pending() == 0
    sent_items = [i for _, b in sent.messages for i in b.items]
    assert sent_items == tokens(trickle.PER_TURN * 2 + 7)  # in order, each once


async def test_items_are_rendered_when_they_leave() -> None:
    """A claim given up (or a drop whose session has that backup again) after it was
    queued is not sent: the render reads the state of the moment it leaves."""
    sent = Sent()
    t = Trickle(sent)  # type: ignore[arg-type]
    withdrawn: set[str] = set()

    def render(items: list[Any]) -> list[Any]:
        return [i for i in items if i[0] not in withdrawn]

    items = tokens(trickle.PER_TURN + 3)
    t.add("ch:all", m.Drop, items, render)
    await asyncio.sleep(0)
    withdrawn.update(tok for tok, _ in items[trickle.PER_TURN :])  # the second turn's, meanwhile
    await asyncio.sleep(trickle.PACE * 3)
    assert len(sent.messages) == 1 and len(sent.messages[0][1].items) == trickle.PER_TURN
    assert t.pending() == 0


async def test_queues_share_the_turns() -> None:
    """Two destinations' queues alternate: one big queue does not hold the other back, and
    a turn never sends more than PER_TURN items in all."""
    sent = Sent()
    t = Trickle(sent)  # type: ignore[arg-type]
    t.add("ch:node:b", m.Drop, tokens(trickle.PER_TURN * 3, "B"))
    t.add("ch:node:c", m.Drop, tokens(10, "C"))
    await asyncio.sleep(0)
    await asyncio.sleep(trickle.PACE * 1.5)
    channels = [ch for ch, _ in sent.messages]
    assert channels[:2] == ["ch:node:b", "ch:node:c"]
    await asyncio.sleep(trickle.PACE * 4)
    per_channel = {ch: sum(len(b.items) for c, b in sent.messages if c == ch) for ch in channels}
    assert per_channel == {"ch:node:b": trickle.PER_TURN * 3, "ch:node:c": 10}


class Unpublished(Sent):
    """An outbox whose flush is slow: each message's future resolves when the test says."""

    def __init__(self) -> None:
        super().__init__()
        self.futures: list[asyncio.Future[int]] = []

    def send(self, channel: str, body: m.Body, *, counted: bool = False) -> asyncio.Future[int]:  # type: ignore[override]
        super().send(channel, body)
        assert counted  # the trickle waits for its messages to be published
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.futures.append(fut)
        return fut


async def test_a_turn_waits_until_the_previous_one_was_published() -> None:
    """The pace is a ceiling: a busy sender's flushes found ten claims queued each (one
    every 10 ms, a flush of 100 ms), and every ACK waited behind them."""
    sent = Unpublished()
    t = Trickle(sent)  # type: ignore[arg-type]
    t.add("ch:all", m.Drop, tokens(trickle.PER_TURN * 3))
    await asyncio.sleep(0)
    await asyncio.sleep(trickle.PACE * 5)
    assert len(sent.messages) == 1  # not published yet: no second message
    sent.futures[0].set_result(2)
    await asyncio.sleep(0)
    await asyncio.sleep(trickle.PACE * 1.5)
    assert len(sent.messages) == 2  # published, and the pace had passed: the next one
    sent.futures[1].set_exception(ConnectionError("Redis went away"))  # a failed publish also ends the wait
    await asyncio.sleep(trickle.PACE * 1.5)
    assert [len(b.items) for _, b in sent.messages] == [trickle.PER_TURN] * 3 and t.pending() == 0


async def test_a_turn_whose_messages_are_never_published_is_followed_after_max_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A flush that died with its messages resolves nothing; the trickle goes on."""
    monkeypatch.setattr(trickle, "MAX_WAIT", 0.05)
    sent = Unpublished()
    t = Trickle(sent)  # type: ignore[arg-type]
    t.add("ch:all", m.Drop, tokens(trickle.PER_TURN + 1))
    await asyncio.sleep(0)
    await asyncio.sleep(trickle.PACE * 3)
    assert len(sent.messages) == 1
    await asyncio.sleep(0.1)
    assert len(sent.messages) == 2 and t.pending() == 0
    sent.futures[0].set_result(2)  # published after all, late: no extra turn, nothing sent twice
    await asyncio.sleep(trickle.PACE * 3)
    assert len(sent.messages) == 2
