"""Bulk control items (access times, ownership claims, drops) sent a little at a time.

A pass can make 100,000 of them at once: an adoption's OWNED claims, a rebalance's DROPs,
the access times of every session written in the last minute. Sent in one go they sit
in each receiver's inbound stream ahead of the ACKs that requests wait for (one
subscription delivers everything in order): 45 ACCESSED messages of 500 items held every
ACK behind them for 90 ms. So they leave one message (``PER_TURN`` items, all
destinations together) every ``PACE`` seconds, 50,000 items a second; a receiver spends a
few milliseconds on each, and an ACK waits behind at most a message or two.

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
from .outbox import Outbox

#: items per message and per turn (all queues together), and seconds between turns
PER_TURN = 500
PACE = 0.01

Render = Callable[[list[Any]], list[Any]]


def _as_is(items: list[Any]) -> list[Any]:
    return items


class Trickle:
    def __init__(self, outbox: Outbox) -> None:
        self._outbox = outbox
        #: (channel, message kind) -> items due and how they are rendered, round robin
        self._queues: dict[tuple[str, Callable[[tuple[Any, ...]], m.Body]], tuple[collections.deque[Any], Render]] = {}
        self._scheduled = False

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

    def _turn(self) -> None:
        budget = PER_TURN
        queues = self._queues
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
                self._outbox.send(key[0], key[1](tuple(items)))
        self._scheduled = bool(queues)
        if self._scheduled:
            asyncio.get_running_loop().call_later(PACE, self._turn)
