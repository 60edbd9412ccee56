"""One Redis server (or a managed service's primary endpoint): PUBLISH and SUBSCRIBE."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from ..redis_url import RedisTarget
from .redis_base import Feed, Options, data_node_kwargs, publish_pipelined


class SingleRedis:
    """A ``redis://``, ``rediss://`` or ``unix://`` URL that is not a Redis Cluster.

    A managed service's primary endpoint is a DNS name that moves to the promoted replica
    on failover; :meth:`recover` drops every pooled connection so that the next one
    resolves the name again instead of talking to the demoted primary.
    """

    mode = "single"

    def __init__(self, target: RedisTarget, options: Options) -> None:
        kw = data_node_kwargs(target, options)
        if target.scheme == "unix":
            kw.pop("ssl", None)
            address: dict[str, Any] = {"unix_socket_path": target.path}
        else:
            host, port = target.hosts[0]
            address = {"host": host, "port": port}
        self._where = target.describe()
        self._pub = aioredis.Redis(**address, **kw)
        # Subscriptions get their own pool, so a reconnect never waits behind publishes.
        self._sub = aioredis.Redis(**address, **kw)

    @property
    def client(self) -> aioredis.Redis:
        return self._pub

    async def publish(self, items: list[tuple[str, bytes]]) -> list[int]:
        return await publish_pipelined(self._pub, items)

    async def feeds(self, channels: list[str]) -> list[Feed]:
        return [Feed(self._sub.pubsub(), tuple(channels), sharded=False, where=self._where)]

    async def verify(self, feeds: list[Feed]) -> str | None:
        return None

    async def recover(self) -> None:
        await self._pub.connection_pool.disconnect()
        await self._sub.connection_pool.disconnect()

    async def aclose(self) -> None:
        await self._pub.aclose()
        await self._sub.aclose()
