"""Moving authenticated bytes between nodes: Redis pub/sub, or an in-memory bus.

A transport has one reader task (``run``) that subscribes, delivers every message to a
callback, and after a lost connection reconnects with redis-py's jittered backoff and
reports the re-subscribe (``on_connect``) so the node can treat it as a gap. Publishing
goes through ``publish`` with a batch, pipelined in one round trip; it returns how many
subscribers received each message (0 means nobody is listening on that channel).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from redis.backoff import ExponentialWithJitterBackoff

log = logging.getLogger("clustersess.transport")

OnMessage = Callable[[str, bytes], None]
OnConnect = Callable[[bool], Awaitable[None]]  # argument: True on the first connect

# Atomically take or refresh a name claim; returns the holder's value.
_CLAIM_LUA = """
local v = redis.call('GET', KEYS[1])
if (not v) or v == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return ARGV[1]
end
return v
"""


class TransportError(ConnectionError):
    """The transport is down; the caller serves from memory and retries later."""


class Transport(Protocol):
    connected: bool

    async def run(self, channels: list[str], on_message: OnMessage, on_connect: OnConnect) -> None:
        """Subscribe and deliver messages until cancelled, reconnecting as needed."""
        ...

    async def publish(self, items: list[tuple[str, bytes]]) -> list[int]:
        """Publish a batch; receiver counts per item. Raises :class:`TransportError`."""
        ...

    async def claim(self, key: str, value: str, ttl: float) -> str:
        """Take or refresh ``key`` for ``value`` unless someone else holds it; the holder."""
        ...

    async def release(self, key: str, value: str) -> None:
        """Drop a claim held by ``value``."""
        ...

    async def close(self) -> None: ...


class RedisTransport:
    """Redis pub/sub with one subscriber connection and one pipelined publisher."""

    def __init__(
        self, url: str, *, connect_timeout: float = 1.0, op_timeout: float = 2.0, backoff_cap: float = 2.0
    ) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.connected = False
        self._url = url
        # No hidden retries: a failed call surfaces at once, and the node decides.
        common = dict(
            socket_connect_timeout=connect_timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        self._pub = aioredis.Redis.from_url(url, socket_timeout=op_timeout, **common)  # type: ignore[arg-type]
        self._sub = aioredis.Redis.from_url(url, socket_timeout=None, **common)  # type: ignore[arg-type]
        self._backoff = ExponentialWithJitterBackoff(cap=backoff_cap, base=0.05)
        self._claim = self._pub.register_script(_CLAIM_LUA)

    async def run(self, channels: list[str], on_message: OnMessage, on_connect: OnConnect) -> None:
        import redis.exceptions as rexc

        failures = 0
        first = True
        while True:
            pubsub = self._sub.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(*channels)
                self.connected = True
                if failures:
                    log.warning("clustersess: reconnected to Redis after %d failed attempt(s)", failures)
                failures = 0
                await on_connect(first)
                first = False
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
                    if msg is None or msg.get("type") != "message":
                        continue
                    channel = msg["channel"]
                    on_message(channel.decode() if isinstance(channel, bytes) else channel, msg["data"])
            except asyncio.CancelledError:
                raise
            except (rexc.ConnectionError, rexc.TimeoutError, OSError) as exc:
                if self.connected or failures == 0:
                    log.warning("clustersess: Redis connection lost (%s); serving from memory", type(exc).__name__)
                self.connected = False
                failures += 1
            finally:
                self.connected = False
                try:
                    # Bounded: a broken connection must not hold up reconnecting or stopping.
                    await asyncio.wait_for(asyncio.shield(pubsub.aclose()), 1.0)  # type: ignore[no-untyped-call]
                except Exception:  # the connection is already broken
                    pass
            await asyncio.sleep(self._backoff.compute(failures))

    async def publish(self, items: list[tuple[str, bytes]]) -> list[int]:
        import redis.exceptions as rexc

        try:
            async with self._pub.pipeline(transaction=False) as pipe:
                for channel, data in items:
                    pipe.publish(channel, data)
                return [int(n) for n in await pipe.execute()]
        except (rexc.ConnectionError, rexc.TimeoutError, OSError) as exc:
            raise TransportError(f"Redis publish failed: {type(exc).__name__}") from None

    async def claim(self, key: str, value: str, ttl: float) -> str:
        import redis.exceptions as rexc

        try:
            holder = await self._claim(keys=[key], args=[value, max(1, int(ttl * 1000))])
        except (rexc.ConnectionError, rexc.TimeoutError, OSError) as exc:
            raise TransportError(f"Redis claim failed: {type(exc).__name__}") from None
        return holder.decode() if isinstance(holder, bytes) else str(holder)

    async def release(self, key: str, value: str) -> None:
        import redis.exceptions as rexc

        try:
            if await self._pub.get(key) == value.encode():
                await self._pub.delete(key)
        except (rexc.ConnectionError, rexc.TimeoutError, OSError):
            pass

    async def close(self) -> None:
        for client in (self._pub, self._sub):
            try:
                await client.aclose()
            except Exception:
                pass


class MemoryBus:
    """An in-process stand-in for Redis pub/sub, for fast unit tests.

    Implements the same :class:`Transport` interface per node (``bus.transport()``),
    with at-most-once delivery, receiver counts, claims, and a switch to cut the bus
    (``bus.down = True``) to rehearse outages.
    """

    def __init__(self) -> None:
        self.subscribers: dict[str, list[OnMessage]] = {}
        self.keys: dict[str, str] = {}
        self.down = False
        self.published: list[tuple[str, bytes]] = []

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
                while not self.bus.down:
                    await asyncio.sleep(0.01)
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

    async def claim(self, key: str, value: str, ttl: float) -> str:
        if self.bus.down:
            raise TransportError("memory bus is down")
        holder = self.bus.keys.setdefault(key, value)
        return holder

    async def release(self, key: str, value: str) -> None:
        if self.bus.keys.get(key) == value:
            del self.bus.keys[key]

    async def close(self) -> None:
        self._unsubscribe()
