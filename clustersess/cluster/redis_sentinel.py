"""A Sentinel-watched primary: find it through the Sentinels and follow it when it moves.

redis-py's ``Sentinel.master_for`` covers most of it: every new connection asks the
Sentinels for the primary, an idle connection to a former primary is dropped, and a
READONLY reply on a connection to the primary (it was demoted) disconnects it and raises
``ConnectionError("The previous master is now a slave")``. What this module adds:

* the subscription is checked against the Sentinels' answer every ``VERIFY_EVERY``
  seconds, so a subscriber left on a demoted or partitioned primary moves too (Sentinel
  kills the clients of an instance it reconfigures, but not of one it cannot reach);
* :meth:`recover` drops the publisher's busy connections as well as the idle ones.

While the Sentinels name no primary (the old one is down, the new one not yet promoted),
every call fails with ``MasterNotFoundError`` (a ``ConnectionError``), which the
transport raises as ``TransportError(kind="connection")``: nodes serve from memory.
"""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel

from ..redis_url import RedisTarget
from .redis_base import REDIS_ERRORS, Feed, Options, data_node_kwargs, publish_pipelined

#: seconds between two checks that the subscription is on the primary the Sentinels name
VERIFY_EVERY = 2.0

_VERIFY_ERRORS: tuple[type[Exception], ...] = (TimeoutError, *REDIS_ERRORS)


class SentinelRedis:
    """A ``redis+sentinel://`` (or ``rediss+sentinel://``) URL."""

    mode = "sentinel"

    def __init__(self, target: RedisTarget, options: Options) -> None:
        assert target.service is not None, "parse_redis_url() requires a service for Sentinel URLs"
        self._service = target.service
        self._options = options
        kw = data_node_kwargs(target, options)
        self._sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(target.hosts), sentinel_kwargs={**target.sentinel_kwargs(), **options.client_kwargs()}, **kw
        )
        self._pub: aioredis.Redis = self._sentinel.master_for(self._service)
        self._sub: aioredis.Redis = self._sentinel.master_for(self._service)
        self._next_verify = 0.0

    @property
    def client(self) -> aioredis.Redis:
        return self._pub

    async def publish(self, items: list[tuple[str, bytes]]) -> list[int]:
        return await publish_pipelined(self._pub, items)

    async def feeds(self, channels: list[str]) -> list[Feed]:
        self._next_verify = 0.0
        return [Feed(self._sub.pubsub(), tuple(channels), sharded=False, where=f"primary of {self._service}")]

    async def verify(self, feeds: list[Feed]) -> str | None:
        now = asyncio.get_running_loop().time()
        if now < self._next_verify:
            return None
        self._next_verify = now + VERIFY_EVERY
        try:
            async with asyncio.timeout(self._options.op_timeout):
                primary = await self._sentinel.discover_master(self._service)
        except _VERIFY_ERRORS:
            # No primary named right now (a failover is under way) or no Sentinel answers:
            # no evidence against the subscription; it fails by itself if its server died.
            return None
        primary = (str(primary[0]), int(primary[1]))
        for feed in feeds:
            where = feed.address()
            if where is not None and where != primary:
                await self.recover()
                return (
                    f"Sentinel names {primary[0]}:{primary[1]} the primary of {self._service!r}, "
                    f"the subscription is on {where[0]}:{where[1]}"
                )
        return None

    async def recover(self) -> None:
        await self._pub.connection_pool.disconnect()
        await self._sub.connection_pool.disconnect()

    async def aclose(self) -> None:
        await self._pub.aclose()
        await self._sub.aclose()
        await self._sentinel.aclose()
