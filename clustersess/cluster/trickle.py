"""Bulk control items (access times, ownership claims, drops) sent a little at a time.

A pass can make 100,000 of them at once: an adoption's OWNED claims, a rebalance's DROPs,
the access times of every session written in the last minute. Sent in one go they sit
in each receiver's inbound stream ahead of the ACKs that requests wait for (one
subscription delivers everything in order): 45 ACCESSED messages of 500 items held every
ACK behind them for 90 ms. So they leave one message (``PER_TURN`` items, all
destinations together) every ``PACE`` seconds, 50,000 items a second; a receiver spends a
few milliseconds on each, and an ACK waits behind at most a message or two.

A turn also waits until the previous turn's messages were published: the pace is a
ceiling, and a busy sender goes slower. At a fixed rate, a flush that took 10 ms found
another message queued, and each message costs a slice of the flush (a publish and a
turn of a busy loop): in an adoption of 100,000 sessions on 2 cores, flushes grew to
30-100 ms with ten claims each, and every ACK and sync write waited behind them (write
p99 200-1,000 ms, every write slow while the adoption ran).

Each queue renders its items when they leave, from the state of that moment: a claim
whose session was given up meanwhile, or a drop whose session has that backup again, is
not sent at all. Items of one kind to one destination leave in the order they were
queued; other messages overtake them, which is why only kinds that do not depend on
their order relative to others come here (an access time only ever moves later; a claim
and a drop are each checked again when they leave).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Iterable
from typing import Any

from . import messages as m
from .outbox import Outbox, consume

#: items per message and per turn (all queues together), and seconds between turns
PER_TURN = 500
PACE = 0.01
#: the longest a turn waits for the previous one's publication (a flush that died
#: with its messages resolves nothing, and the trickle must not stop for good)
MAX_WAIT = 1.0

Render = Callable[[list[Any]], list[Any]]


def _as_is(items: list[Any]) -> list[Any]:
    return items


class Trickle:
    def __init__(self, outbox: Outbox) -> None:
        self._outbox = outbox
        #: (channel, message kind) -> items due and how they are rendered, round robin
        self._queues: dict[tuple[str, Callable[[tuple[Any, ...]], m.Body]], tuple[collections.deque[Any], Render]] = {}
        self._scheduled = False
        #: counts turns: of the two ways a turn is called (published, or MAX_WAIT), the later one does nothing
        self._turns = 0

    def add(
        self,
        channel: str,
        kind: Callable[[tuple[Any, ...]], m.Body],
        items: Iterable[Any],
        render: Render = _as_is,
    ) -> None:
        """Queue ``items`` for ``kind`` messages on ``channel``; ``render`` turns a
        message's share of them into its items when it leaves (and may drop some)."""
        key = (channel, kind)
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = (collections.deque(), render)
        queue[0].extend(items)
        if queue[0] and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._turn)

    def pending(self) -> int:
        """Items queued and not sent yet."""
        return sum(len(q) for q, _ in self._queues.values())

    def pending_on(self, channel: str, kind: Callable[[tuple[Any, ...]], m.Body]) -> bool:
        """Whether ``kind`` items for ``channel`` are queued and not sent yet."""
        queue = self._queues.get((channel, kind))
        return queue is not None and bool(queue[0])

    def _turn_after(self, turn: int) -> None:
        if turn == self._turns:
            self._turn()

    def _turn(self) -> None:
        self._turns += 1
        budget = PER_TURN
        queues = self._queues
        sent: list[asyncio.Future[int]] = []
        for key in list(queues):
            if budget <= 0:
                break
            due, render = queues.pop(key)
            take = [due.popleft() for _ in range(min(budget, len(due)))]
            budget -= len(take)
            if due:
                queues[key] = (due, render)  # (at the end: the next turn starts with another)
            items = render(take)
            if items:
                fut = self._outbox.send(key[0], key[1](tuple(items)), counted=True)
                if fut is not None:
                    sent.append(fut)
        self._scheduled = bool(queues)
        if not self._scheduled:
            return
        loop = asyncio.get_running_loop()
        if not sent:
            loop.call_later(PACE, self._turn)
            return
        # The next turn comes PACE after this one, or once these were published if later.
        next_at = loop.time() + PACE
        left = len(sent)
        turn = self._turns

        def published(fut: asyncio.Future[int]) -> None:
            nonlocal left
            consume(fut)  # (a failed publish is counted by the outbox; the turns go on)
            left -= 1
            if left == 0:
                loop.call_at(max(next_at, loop.time()), self._turn_after, turn)

        for fut in sent:
            fut.add_done_callback(published)
        loop.call_at(next_at + MAX_WAIT, self._turn_after, turn)
