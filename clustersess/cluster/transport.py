"""Moving authenticated bytes between nodes over Redis pub/sub.

A transport has one reader task (``run``) that subscribes, delivers every message to a
callback, and after a lost connection reconnects with redis-py's jittered backoff and
reports the re-subscribe (``on_connect``) so the node can treat it as a gap. Publishing
goes through ``publish`` with a batch, pipelined in one round trip; it returns how many
subscribers received each message (0 means nobody is listening on that channel).
The in-memory stand-in for unit tests and the fault simulator is :mod:`.memory`.
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

# The lease: refresh the claim KEYS[1] held by ARGV[1] for ARGV[2] ms. KEYS[2] is the
# marker another node sets when it adopts this incarnation's sessions (see _ADOPT_LUA).
# Answers "held" (still ours, refreshed), "adopted" (someone took our sessions over: we
# were presumed dead), "lapsed" (expired, nobody adopted: taken again) or "taken:<v>".
_REFRESH_LUA = """
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
"""

# Adopt the sessions of the incarnation ARGV[1], whose claim is KEYS[1]: allowed only once
# its claim has lapsed (or passed to a newer life), and then recorded in KEYS[2] for
# ARGV[2] ms so that the incarnation, should it come back, learns it was replaced.
_ADOPT_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return 0
end
redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
return 1
"""


class TransportError(ConnectionError):
    """The transport is down or refused the call; the caller serves from memory and retries.

    ``kind`` says why: ``"connection"`` (no connection, or it broke), ``"timeout"``,
    ``"readonly"`` (a replica or a demoted primary), ``"oom"`` (``maxmemory`` reached),
    ``"noperm"`` (an ACL forbids it) or ``"error"`` (any other error reply).
    """

    def __init__(self, message: str, kind: str = "connection") -> None:
        super().__init__(message)
        self.kind = kind


def error_kind(exc: BaseException) -> str:
    """The :attr:`TransportError.kind` for a redis-py exception."""
    import redis.exceptions as rexc

    if isinstance(exc, rexc.TimeoutError):
        return "timeout"
    if isinstance(exc, (rexc.ConnectionError, OSError)):
        return "connection"
    if isinstance(exc, rexc.ReadOnlyError) or str(exc).startswith("READONLY"):
        return "readonly"
    if isinstance(exc, rexc.OutOfMemoryError) or str(exc).startswith("OOM"):
        return "oom"
    if isinstance(exc, rexc.NoPermissionError) or str(exc).startswith("NOPERM"):
        return "noperm"
    return "error"


def _wrap(what: str, exc: BaseException) -> TransportError:
    kind = error_kind(exc)
    return TransportError(f"Redis {what} failed: {type(exc).__name__} ({kind})", kind)


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

    async def refresh(self, key: str, value: str, ttl: float, adopted_key: str) -> str:
        """Renew the lease ``key`` held by ``value`` for ``ttl`` seconds.

        Returns ``"held"``, ``"lapsed"`` (it had expired and nobody adopted: taken
        again), ``"adopted"`` (``adopted_key`` exists: another node took this
        incarnation's sessions over) or ``"taken:<holder>"``.
        """
        ...

    async def adopt(self, key: str, value: str, adopted_key: str, marker_ttl: float) -> bool:
        """Record that ``value``'s sessions are being adopted, if its lease ``key`` has
        lapsed; False (and nothing recorded) while ``value`` still holds it."""
        ...

    async def get(self, key: str) -> str | None:
        """The value of ``key`` (the holder of a name claim), or None."""
        ...

    def reset(self) -> None:
        """Drop the subscription connection and reconnect now (the node's own broadcasts
        stopped coming back: a silently dead connection); ``on_connect(False)`` follows."""
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
        common = {
            "socket_connect_timeout": connect_timeout,
            "retry": Retry(NoBackoff(), 0),
            "health_check_interval": 0,
        }
        self._pub = aioredis.Redis.from_url(url, socket_timeout=op_timeout, **common)  # type: ignore[arg-type]
        self._sub = aioredis.Redis.from_url(url, socket_timeout=None, **common)  # type: ignore[arg-type]
        self._backoff = ExponentialWithJitterBackoff(cap=backoff_cap, base=0.05)
        self._reset = False
        self._claim = self._pub.register_script(_CLAIM_LUA)
        self._refresh = self._pub.register_script(_REFRESH_LUA)
        self._adopt = self._pub.register_script(_ADOPT_LUA)

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
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
                    if self._reset:
                        self._reset = False
                        raise rexc.ConnectionError("reset: own messages stopped arriving")
                    if msg is None or msg.get("type") != "message":
                        continue
                    channel = msg["channel"]
                    on_message(channel.decode() if isinstance(channel, bytes) else channel, msg["data"])
            except asyncio.CancelledError:
                raise
            except (rexc.RedisError, OSError) as exc:
                # An error reply (ACL NOPERM on SUBSCRIBE, say) is as fatal to this
                # subscription as a broken connection: retry with backoff either way.
                if self.connected or failures == 0:
                    log.warning(
                        "clustersess: Redis subscription lost (%s, %s); serving from memory",
                        type(exc).__name__, error_kind(exc),
                    )
                self.connected = False
                failures += 1
            finally:
                self.connected = False
                try:
                    # Bounded: a broken connection must not hold up reconnecting or stopping.
                    await asyncio.wait_for(asyncio.shield(pubsub.aclose()), 1.0)  # type: ignore[no-untyped-call]
                except Exception:  # noqa: BLE001, S110 -- the connection is already broken
                    pass
            await asyncio.sleep(self._backoff.compute(failures))

    def reset(self) -> None:
        self._reset = True

    async def publish(self, items: list[tuple[str, bytes]]) -> list[int]:
        import redis.exceptions as rexc

        try:
            async with self._pub.pipeline(transaction=False) as pipe:
                for channel, data in items:
                    pipe.publish(channel, data)
                return [int(n) for n in await pipe.execute()]
        except (rexc.RedisError, OSError) as exc:
            raise _wrap("publish", exc) from None

    async def claim(self, key: str, value: str, ttl: float) -> str:
        import redis.exceptions as rexc

        try:
            holder = await self._claim(keys=[key], args=[value, _ms(ttl)])
        except (rexc.RedisError, OSError) as exc:
            raise _wrap("claim", exc) from None
        return _text(holder)

    async def refresh(self, key: str, value: str, ttl: float, adopted_key: str) -> str:
        import redis.exceptions as rexc

        try:
            return _text(await self._refresh(keys=[key, adopted_key], args=[value, _ms(ttl)]))
        except (rexc.RedisError, OSError) as exc:
            raise _wrap("lease refresh", exc) from None

    async def adopt(self, key: str, value: str, adopted_key: str, marker_ttl: float) -> bool:
        import redis.exceptions as rexc

        try:
            return bool(await self._adopt(keys=[key, adopted_key], args=[value, _ms(marker_ttl)]))
        except (rexc.RedisError, OSError) as exc:
            raise _wrap("adoption", exc) from None

    async def get(self, key: str) -> str | None:
        import redis.exceptions as rexc

        try:
            value = await self._pub.get(key)
        except (rexc.RedisError, OSError) as exc:
            raise _wrap("GET", exc) from None
        return None if value is None else _text(value)

    async def release(self, key: str, value: str) -> None:
        import redis.exceptions as rexc

        try:
            if await self._pub.get(key) == value.encode():
                await self._pub.delete(key)
        except (rexc.RedisError, OSError):
            pass

    async def close(self) -> None:
        for client in (self._pub, self._sub):
            try:
                await client.aclose()
            except Exception:  # noqa: BLE001, S110 -- closing what may already be broken
                pass


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
