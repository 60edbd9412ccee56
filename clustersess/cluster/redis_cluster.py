"""Redis Cluster: every channel is a sharded channel (SPUBLISH/SSUBSCRIBE).

Classic PUBLISH on a Redis Cluster is broadcast over the cluster bus to every node, so
its cost grows with the cluster. A sharded channel lives on the shard that owns its slot
(``CRC16(channel) mod 16384``, as for a key), so the direct channels
``<cluster>:node:<name>`` spread over the shards and replication grows with them. The
broadcast channel ``<cluster>:all`` is one channel, so it lives on one shard: the one
that owns its slot (``redis-cli cluster keyslot clustersess:all`` says which; 7165 for the
default cluster name, which a 3-primary cluster made by ``redis-cli --cluster create`` gives
its second primary).

What redis-py's ``RedisCluster`` covers and this module uses: the slot map (from any seed
node; ``dynamic_startup_nodes`` remembers the others), MOVED and ASK on every command
including pipelines and scripts, and a fresh slot map after a connection error (the
next call re-initializes). What its ``ClusterPubSub`` covers and why it is not used for
the subscription: it routes SSUBSCRIBE to the slot's primary and reconciles after a
slot-map refresh, but ``get_sharded_message`` polls shard by shard (a message on the
second shard waits out the timeout given for the first), it reconnects and
re-subscribes *silently* (the node would never learn that it missed messages), and its
liveness check pings its own connection, not the shards'. Here each shard that carries
one of our channels gets a plain :class:`~redis.asyncio.client.PubSub`; the transport
reads them concurrently and watches each, and any change (a connection lost, a slot that
moved, Redis ending the subscription) starts the subscription over from a fresh slot
map, which the node sees as a gap.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from ..redis_url import RedisTarget
from .redis_base import REDIS_ERRORS, Feed, Options, data_node_kwargs


class ClusterRedis:
    """A ``redis://``/``rediss://`` URL naming any node of a Redis Cluster."""

    mode = "cluster"

    def __init__(self, target: RedisTarget, options: Options) -> None:
        if target.scheme == "unix":
            raise ValueError(
                "this Redis is a Redis Cluster node, and a cluster's nodes are reached over TCP: "
                "use redis://HOST:PORT (any node) instead of a unix:// URL"
            )
        if target.db:
            raise ValueError(
                f"this Redis is a Redis Cluster, which has only database 0: remove /{target.db} "
                "from the URL (CLUSTERSESS_CLUSTER keeps clusters apart on one Redis)"
            )
        self._node_kwargs: dict[str, Any] = data_node_kwargs(target, options)
        self._node_kwargs.pop("db")
        host, port = target.hosts[0]
        # Slots no primary serves (mid-failover) fail the calls that need them, not all.
        self._cluster = RedisCluster(host=host, port=port, require_full_coverage=False, **self._node_kwargs)

    @property
    def client(self) -> RedisCluster:
        return self._cluster

    async def publish(self, items: list[tuple[str, bytes]]) -> list[int]:
        # One pipeline per shard, sent concurrently; MOVED/ASK are followed per command.
        pipe = self._cluster.pipeline()
        for channel, data in items:
            pipe.spublish(channel, data)
        return [int(n) for n in await pipe.execute()]

    async def feeds(self, channels: list[str]) -> list[Feed]:
        await self._cluster.initialize()
        # Always from a fresh slot map: we are here because something changed.
        await self._cluster.nodes_manager.initialize()
        by_node: dict[str, tuple[Any, list[str]]] = {}
        for channel in channels:
            node = self._cluster.get_node_from_key(channel)
            if node is None:
                raise ValueError(f"no Redis Cluster node serves slot {key_slot(channel.encode())} ({channel})")
            by_node.setdefault(node.name, (node, []))[1].append(channel)
        feeds = []
        for name, (node, chans) in by_node.items():
            client = aioredis.Redis(host=node.host, port=node.port, **self._node_kwargs)
            feeds.append(Feed(client.pubsub(), tuple(chans), sharded=True, where=name, client=client))
        return feeds

    async def verify(self, feeds: list[Feed]) -> str | None:
        # The slot map is refreshed whenever a publish meets MOVED; no round trip here.
        for feed in feeds:
            for channel in feed.channels:
                try:
                    node = self._cluster.get_node_from_key(channel)
                except REDIS_ERRORS:
                    return None  # slot uncovered for now; the publish errors say so
                if node is not None and node.name != feed.where:
                    return f"the slot of {channel} moved from {feed.where} to {node.name}"
        return None

    async def recover(self) -> None:
        # A demoted primary answers MOVED, never READONLY, in a cluster; nothing to drop.
        return None

    def same_slot(self, keys: list[str]) -> bool:
        return len({key_slot(k.encode()) for k in keys}) <= 1

    async def aclose(self) -> None:
        await self._cluster.aclose()
