"""What every Redis topology shares: client options, the lease scripts, subscription feeds.

A *topology* (:mod:`.redis_single`, :mod:`.redis_sentinel`, :mod:`.redis_cluster`) knows
how to reach Redis as it is deployed: which client publishes, how a batch is published,
and which connections carry the node's subscriptions. Everything else (the reader, the
watchdog, reconnecting, error wrapping) is the same in every mode and lives in
:class:`~clustersess.cluster.transport.RedisTransport`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import socket
from typing import Any, Protocol

import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ..redis_url import RedisTarget

#: everything a Redis call can raise that is Redis's doing, not ours. RedisClusterException
#: (slot not covered, no node for a slot) is not a RedisError in redis-py.
REDIS_ERRORS: tuple[type[Exception], ...] = (rexc.RedisError, rexc.RedisClusterException, OSError)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options:
    """Timeouts shared by every connection a transport makes.

    Attributes:
        connect_timeout: TCP (and TLS) connect.
        op_timeout: one command's reply; also AUTH and the subscribe handshake.
    """

    connect_timeout: float = 1.0
    op_timeout: float = 2.0

    def client_kwargs(self) -> dict[str, Any]:
        """redis-py keywords: no hidden retries (a failed call surfaces at once and the
        transport decides), no redis-py health checks (the transport's watchdog does that),
        and TCP keepalive tight enough that the kernel notices a dead peer in ~11 s."""
        return {
            "socket_connect_timeout": self.connect_timeout,
            "socket_timeout": self.op_timeout,
            "retry": Retry(NoBackoff(), 0),
            "health_check_interval": 0,
            "socket_keepalive": True,
            "socket_keepalive_options": KEEPALIVE,
        }


async def publish_pipelined(client: Any, items: list[tuple[str, bytes]]) -> list[int]:
    """PUBLISH a batch on one connection in one round trip; receiver counts per item."""
    async with client.pipeline(transaction=False) as pipe:
        for channel, data in items:
            pipe.publish(channel, data)
        return [int(n) for n in await pipe.execute()]


#: idle 5 s, then a probe every 2 s, dead after 3 unanswered (only options this OS has)
KEEPALIVE: dict[int, int] = {
    getattr(socket, name): value
    for name, value in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3))
    if hasattr(socket, name)
}


@dataclasses.dataclass(eq=False)
class Feed:
    """One subscription connection: the channels it carries and how it subscribes.

    ``last_heard`` (loop time of the last thing read from it, a message or a PONG) and
    ``pinged`` are the watchdog's; ``client`` is closed with the feed when set.
    """

    pubsub: PubSub
    channels: tuple[str, ...]
    sharded: bool
    where: str
    client: aioredis.Redis | None = None
    last_heard: float = 0.0
    pinged: bool = False

    async def subscribe(self) -> None:
        if self.sharded:
            # One SSUBSCRIBE per channel: channels of different slots in one command are
            # refused with CROSSSLOT even when one node owns both slots.
            for channel in self.channels:
                await self.pubsub.ssubscribe(channel)
        else:
            await self.pubsub.subscribe(*self.channels)

    def address(self) -> tuple[str, int] | None:
        """The server this feed's connection is on, once connected."""
        conn = self.pubsub.connection
        host, port = getattr(conn, "host", None), getattr(conn, "port", None)
        return (str(host), int(port)) if host is not None and port is not None else None

    async def aclose(self) -> None:
        try:
            await self.pubsub.aclose()  # type: ignore[no-untyped-call]
        finally:
            if self.client is not None:
                await self.client.aclose()


class Topology(Protocol):
    """One way Redis is deployed (single, Sentinel, Cluster), as the transport uses it."""

    #: the registry name: ``"single"``, ``"sentinel"`` or ``"cluster"``
    mode: str

    @property
    def client(self) -> Any:
        """The client for keys and scripts (``redis.asyncio.Redis`` or ``RedisCluster``)."""
        ...

    async def publish(self, items: list[tuple[str, bytes]]) -> list[int]:
        """Publish a batch in one round trip (per shard); receiver counts per item."""
        ...

    async def feeds(self, channels: list[str]) -> list[Feed]:
        """Fresh, not yet subscribed feeds that together carry ``channels``."""
        ...

    async def verify(self, feeds: list[Feed]) -> str | None:
        """Why ``feeds`` no longer listen where the messages are published, or None."""
        ...

    async def recover(self) -> None:
        """A call found a replica where the primary was (a failover): drop the pooled
        connections, so the next call finds the primary anew."""
        ...

    async def aclose(self) -> None: ...


class Script:
    """A Lua script run by its SHA1, sent in full once a server does not know it.

    Not redis-py's ``Script``: that one reloads with SCRIPT LOAD on the client it was
    registered on, which in a Redis Cluster is broadcast to every primary. ``EVAL`` on a
    miss loads it exactly where it is needed (a failed-over primary starts without the
    script cache).
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, client: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except rexc.NoScriptError:
            return await client.eval(self.source, len(keys), *keys, *args)


# Atomically take or refresh a name claim; returns the holder's value.
CLAIM = Script("""
local v = redis.call('GET', KEYS[1])
if (not v) or v == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return ARGV[1]
end
return v
""")

# The lease: refresh the claim KEYS[1] held by ARGV[1] for ARGV[2] ms. KEYS[2] is the
# marker another node sets when it adopts this incarnation's sessions (see ADOPT).
# Answers "held" (still ours, refreshed), "adopted" (someone took our sessions over: we
# were presumed dead), "lapsed" (expired, nobody adopted: taken again) or "taken:<v>".
# In a Redis Cluster both keys must share a slot: the {<name>} hash tag does that.
REFRESH = Script("""
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 'held'
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  return 'adopted'
end
if not v then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 'lapsed'
end
return 'taken:' .. v
""")

# Adopt the sessions of the incarnation ARGV[1], whose claim is KEYS[1]: allowed only once
# its claim has lapsed (or passed to a newer life), and then recorded in KEYS[2] for
# ARGV[2] ms so that the incarnation, should it come back, learns it was replaced.
ADOPT = Script("""
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return 0
end
redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
return 1
""")

# Drop the claim KEYS[1] only if ARGV[1] still holds it (never a successor's).
RELEASE = Script("""
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
""")


def data_node_kwargs(target: RedisTarget, options: Options) -> dict[str, Any]:
    """Keywords for a client of one data node: credentials, db, TLS, timeouts."""
    return {**target.connection_kwargs(), **options.client_kwargs()}
