"""An in-process stand-in for Redis pub/sub and the few keys the cluster uses.

:class:`MemoryBus` gives every node a :class:`MemoryTransport` with the same interface as
:class:`~clustersess.cluster.transport.RedisTransport`: at-most-once delivery, receiver
counts, name claims and leases with expiry, and a switch to cut the bus
(``bus.down = True``) to rehearse outages. Fast unit tests use it; it never replaces the
real-process tests against a real ``redis-server``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .transport import OnConnect, OnMessage, TransportError


class MemoryBus:
    """An in-process stand-in for Redis pub/sub, for fast unit tests.

    Implements the same :class:`Transport` interface per node (``bus.transport()``),
    with at-most-once delivery, receiver counts, claims, and a switch to cut the bus
    (``bus.down = True``) to rehearse outages.
    """

    def __init__(self, now: Callable[[], float] | None = None) -> None:
        self.subscribers: dict[str, list[OnMessage]] = {}
        #: key -> (value, expiry on ``now()``'s clock, or None)
        self.keys: dict[str, tuple[str, float | None]] = {}
        self._now = now
        self.down = False
        self.published: list[tuple[str, bytes]] = []

    def now(self) -> float:
        return self._now() if self._now is not None else asyncio.get_running_loop().time()

    def get(self, key: str) -> str | None:
        item = self.keys.get(key)
        if item is None:
            return None
        value, until = item
        if until is not None and until <= self.now():
            del self.keys[key]
            return None
        return value

    def set(self, key: str, value: str, ttl: float | None = None) -> None:
        self.keys[key] = (value, None if ttl is None else self.now() + ttl)

    def transport(self) -> MemoryTransport:
        return MemoryTransport(self)

    def inject(self, channel: str, data: bytes) -> int:
        """Publish raw bytes as an outsider would (forged or garbage messages)."""
        subs = list(self.subscribers.get(channel, ()))
        loop = asyncio.get_running_loop()
        for cb in subs:
            loop.call_soon(cb, channel, data)
        return len(subs)


class MemoryTransport:
    def __init__(self, bus: MemoryBus) -> None:
        self.bus = bus
        self.connected = False
        self._subs: list[tuple[str, OnMessage]] = []
        self._reset = False

    def reset(self) -> None:
        self._reset = True

    async def run(self, channels: list[str], on_message: OnMessage, on_connect: OnConnect) -> None:
        first = True
        try:
            while True:
                while self.bus.down:
                    await asyncio.sleep(0.01)
                for ch in channels:
                    self.bus.subscribers.setdefault(ch, []).append(on_message)
                    self._subs.append((ch, on_message))
                self.connected = True
                await on_connect(first)
                first = False
                while not self.bus.down and not self._reset:
                    await asyncio.sleep(0.01)
                self._reset = False
                self._unsubscribe()
        finally:
            self._unsubscribe()

    def _unsubscribe(self) -> None:
        self.connected = False
        for ch, cb in self._subs:
            subs = self.bus.subscribers.get(ch, [])
            if cb in subs:
                subs.remove(cb)
        self._subs.clear()

    async def publish(self, items: list[tuple[str, bytes]]) -> list[int]:
        if self.bus.down or not self.connected:
            raise TransportError("memory bus is down")
        self.bus.published.extend(items)
        return [self.bus.inject(ch, data) for ch, data in items]

    def _check(self) -> None:
        if self.bus.down:
            raise TransportError("memory bus is down")

    async def claim(self, key: str, value: str, ttl: float) -> str:
        self._check()
        holder = self.bus.get(key)
        if holder is None or holder == value:
            self.bus.set(key, value, ttl)
            return value
        return holder

    async def refresh(self, key: str, value: str, ttl: float, adopted_key: str) -> str:
        self._check()
        holder = self.bus.get(key)
        if holder == value:
            self.bus.set(key, value, ttl)
            return "held"
        if self.bus.get(adopted_key) is not None:
            return "adopted"
        if holder is None:
            self.bus.set(key, value, ttl)
            return "lapsed"
        return "taken:" + holder

    async def adopt(self, key: str, value: str, adopted_key: str, marker_ttl: float) -> bool:
        self._check()
        if self.bus.get(key) == value:
            return False
        self.bus.set(adopted_key, "1", marker_ttl)
        return True

    async def get(self, key: str) -> str | None:
        self._check()
        return self.bus.get(key)

    async def release(self, key: str, value: str) -> None:
        if self.bus.get(key) == value:
            del self.bus.keys[key]

    async def close(self) -> None:
        self._unsubscribe()
