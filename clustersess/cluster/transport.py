"""Moving authenticated bytes between nodes over Redis pub/sub.

A transport has one reader task (``run``) that subscribes, delivers every message to a
callback, and after a lost connection reconnects with redis-py's jittered backoff and
reports the re-subscribe (``on_connect``) so the node can treat it as a gap. Publishing
goes through ``publish`` with a batch, pipelined in one round trip; it returns how many
subscribers received each message (0 means nobody is listening on that channel).
The in-memory stand-in for unit tests and the fault simulator is :mod:`.memory`.

:class:`RedisTransport` speaks to Redis as it is deployed, chosen from the URL and, for
``redis://``, from ``INFO cluster`` at connect time (the registry :data:`TOPOLOGIES`):
one server (:mod:`.redis_single`), a Sentinel-watched primary (:mod:`.redis_sentinel`) or
a Redis Cluster with sharded pub/sub (:mod:`.redis_cluster`). The interface and its
semantics are the same in every mode; docs/redis.md says what each failover looks like.

A watchdog guards every subscription connection: when nothing has been read from one for
``probe_interval`` seconds it sends a PING, and when nothing has come back after twice
that, the connection is taken for dead (a NAT or firewall dropped it without a FIN or RST)
and the subscription starts over, which is a gap like any reconnect (a stall of this
process, seen as a late watchdog tick, restarts the bound instead). ``reset()`` does the
same on request. TCP keepalive is on, tight, on every connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from redis.backoff import ExponentialWithJitterBackoff

from ..pacing import Slicer
from ..redis_url import RedisTarget, parse_redis_url
from .redis_base import ADOPT, CLAIM, REDIS_ERRORS, REFRESH, RELEASE, Feed, Options, Script, Topology
from .redis_cluster import ClusterRedis
from .redis_sentinel import SentinelRedis
from .redis_single import SingleRedis

log = logging.getLogger("clustersess.transport")

OnMessage = Callable[[str, bytes], None]
OnConnect = Callable[[bool], Awaitable[None]]  # argument: True on the first connect

#: how each deployment is reached, by the name :func:`detect` answers
TOPOLOGIES: dict[str, Callable[[RedisTarget, Options], Topology]] = {
    "single": SingleRedis,
    "sentinel": SentinelRedis,
    "cluster": ClusterRedis,
}


class TransportError(ConnectionError):
    """The transport is down or refused the call; the caller serves from memory and retries.

    ``kind`` says why: ``"connection"`` (no connection, or it broke; also a Redis Cluster
    slot without a primary and a Sentinel that names none, both mid-failover),
    ``"timeout"``, ``"readonly"`` (a replica or a demoted primary, still so after finding
    the primary again), ``"oom"`` (``maxmemory`` reached), ``"noperm"`` (an ACL forbids
    it) or ``"error"`` (any other error reply).
    """

    def __init__(self, message: str, kind: str = "connection") -> None:
        super().__init__(message)
        self.kind = kind


def error_kind(exc: BaseException) -> str:
    """The :attr:`TransportError.kind` for a redis-py exception."""
    import redis.exceptions as rexc

    text = str(exc)
    if isinstance(exc, rexc.ReadOnlyError) or text.startswith("READONLY") or "previous master is now a slave" in text:
        return "readonly"  # the last: redis-py's Sentinel connection turns READONLY into that
    if isinstance(exc, rexc.TimeoutError):
        return "timeout"
    if isinstance(exc, (rexc.ConnectionError, OSError, rexc.ClusterDownError, rexc.RedisClusterException)):
        return "connection"
    if isinstance(exc, rexc.OutOfMemoryError) or text.startswith("OOM"):
        return "oom"
    if isinstance(exc, rexc.NoPermissionError) or text.startswith("NOPERM"):
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
        """Drop the subscription connection(s) and reconnect now; ``run`` then calls
        ``on_connect(False)`` as after any reconnect. For a node whose own broadcasts
        stopped coming back."""
        ...

    async def close(self) -> None: ...


class _Lost(Exception):
    """The subscription has to start over (the message says why)."""


#: what ends one life of the subscription (and is then retried)
_SUBSCRIPTION_ERRORS: tuple[type[Exception], ...] = (_Lost, TimeoutError, *REDIS_ERRORS)
#: what fails opening one
_OPEN_ERRORS: tuple[type[Exception], ...] = (TransportError, ValueError, *_SUBSCRIPTION_ERRORS)
_CONNECT_ERRORS: tuple[type[Exception], ...] = (TimeoutError, *REDIS_ERRORS)


async def detect(target: RedisTarget, options: Options) -> str:
    """Which :data:`TOPOLOGIES` entry serves ``target``: ``"sentinel"`` from the URL,
    else ``"cluster"`` if the server says ``cluster_enabled:1``, else ``"single"``."""
    import redis.asyncio as aioredis
    import redis.exceptions as rexc

    if target.sentinel:
        return "sentinel"
    # Database 0 for the probe: a Redis Cluster refuses SELECT, and then says nothing else.
    kw = {**target.connection_kwargs(), **options.client_kwargs(), "db": 0}
    if target.scheme == "unix":
        probe = aioredis.Redis(unix_socket_path=target.path, **kw)
    else:
        host, port = target.hosts[0]
        probe = aioredis.Redis(host=host, port=port, **kw)
    try:
        try:
            info = await probe.info("cluster")
            return "cluster" if int(info.get("cluster_enabled", 0)) else "single"
        except rexc.ResponseError:
            # INFO may be forbidden to the application's ACL user; CLUSTER INFO tells too.
            try:
                await probe.execute_command("CLUSTER INFO")  # type: ignore[no-untyped-call]
            except rexc.ResponseError as exc:
                if "cluster support disabled" in str(exc):
                    return "single"
                raise
            return "cluster"
    finally:
        await probe.aclose()


class RedisTransport:
    """Redis pub/sub for one node: a single Redis, Sentinel or a Redis Cluster.

    Arguments:
        url: a URL as :func:`clustersess.redis_url.parse_redis_url` accepts it.
        connect_timeout: TCP/TLS connect timeout, seconds.
        op_timeout: longest wait for one command's reply.
        backoff_cap: longest wait between two reconnect attempts.
        probe_interval: PING a subscription connection silent this long; one silent for
            twice this long is dead. A silently dropped connection is so noticed within
            ``2 * probe_interval`` plus a quarter of it (the watchdog's tick).

    Raises:
        ValueError: ``url`` is not a valid Redis URL (:class:`~clustersess.Config` has
            checked it already when it came from there).
    """

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float = 1.0,
        op_timeout: float = 2.0,
        backoff_cap: float = 2.0,
        probe_interval: float = 1.0,
    ) -> None:
        self.connected = False
        #: ``"single"``, ``"sentinel"`` or ``"cluster"`` once known (at the first connect)
        self.mode: str | None = None
        self._target = parse_redis_url(url)
        self._options = Options(connect_timeout=connect_timeout, op_timeout=op_timeout)
        self._probe = probe_interval
        self._backoff = ExponentialWithJitterBackoff(cap=backoff_cap, base=0.05)
        self._topology: Topology | None = None
        self._lock = asyncio.Lock()
        self._reset = asyncio.Event()
        self._wakeup: asyncio.Future[None] | None = None
        self._recovered_at = -1e9
        self._misconfigured: str | None = None
        self._closed = False

    # -- the subscription ----------------------------------------------------------------
    async def run(self, channels: list[str], on_message: OnMessage, on_connect: OnConnect) -> None:
        failures = 0
        first = True
        while not self._closed:
            self._reset.clear()
            try:
                topology = await self._topo()
                async with asyncio.timeout(self._options.op_timeout + self._options.connect_timeout):
                    feeds = await topology.feeds(channels)
            except _OPEN_ERRORS as exc:
                failures = self._lost(failures, exc)
            else:
                try:
                    await self._serve(topology, feeds, on_message, on_connect, first)
                except _SUBSCRIPTION_ERRORS as exc:
                    # An error reply (ACL NOPERM on SUBSCRIBE, say) is as fatal to this
                    # subscription as a broken connection: retry with backoff either way.
                    was_up = self.connected
                    failures = 0 if was_up else failures
                    failures = self._lost(failures, exc)
                    first = first and not was_up
                finally:
                    self.connected = False
                    await _close_all(feeds)
                if self._reset.is_set():
                    failures = 0  # asked to reconnect now: no backoff for the first try
                    continue
            # Wait out the backoff, unless someone asks us to reconnect right now.
            await self._pause(self._backoff.compute(failures))
        await asyncio.get_running_loop().create_future()  # closed: wait to be cancelled

    def _lost(self, failures: int, exc: BaseException) -> int:
        _reraise_cancel()
        if failures == 0:
            why = str(exc) if isinstance(exc, _Lost) else f"{type(exc).__name__}, {error_kind(exc)}"
            log.warning("clustersess: Redis subscription lost (%s); serving from memory", why)
        return failures + 1

    async def _serve(
        self, topology: Topology, feeds: list[Feed], on_message: OnMessage, on_connect: OnConnect, first: bool
    ) -> None:
        early: list[tuple[str, bytes]] = []
        async with asyncio.timeout(self._options.op_timeout + self._options.connect_timeout):
            for feed in feeds:
                await self._subscribe(feed, early)
        self.connected = True
        if not first:
            log.warning("clustersess: Redis subscription back (%s)", ", ".join(f.where for f in feeds))
        await on_connect(first)
        for channel, data in early:
            on_message(channel, data)
        # A reader per feed and the watchdog, owned here; they only ever end by raising.
        # Not a TaskGroup: in Python 3.11 a child failing while the group is exiting leaves
        # this task marked as being cancelled, and _reraise_cancel() must trust that mark.
        tasks = [asyncio.create_task(self._read(f, on_message), name=f"clustersess-redis-{f.where}") for f in feeds]
        tasks.append(asyncio.create_task(self._watch(topology, feeds), name="clustersess-redis-watchdog"))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)
            # Retrieved even when we are being cancelled (a reader that failed as the node
            # closed its connections): otherwise asyncio logs "never retrieved" at exit.
            failed = {t: t.exception() for t in tasks if not t.cancelled()}
        errors = [failed[t] for t in done if t in failed]
        raise next((e for e in errors if e is not None), _Lost("a subscription task ended"))

    async def _subscribe(self, feed: Feed, early: list[tuple[str, bytes]]) -> None:
        """Subscribe and wait for Redis to confirm every channel, so that what the node
        publishes in ``on_connect`` is published to a subscription that exists."""
        await feed.subscribe()
        pending = set(feed.channels)
        while pending:
            msg = await feed.pubsub.get_message(timeout=self._options.op_timeout)
            if msg is None:
                raise _Lost(f"Redis at {feed.where} did not confirm the subscription")
            kind, channel = msg["type"], _text(msg.get("channel"))
            if kind in ("subscribe", "ssubscribe"):
                pending.discard(channel)
            elif kind in ("message", "smessage"):
                early.append((channel, msg["data"]))
        feed.last_heard = asyncio.get_running_loop().time()

    async def _read(self, feed: Feed, on_message: OnMessage) -> None:
        loop = asyncio.get_running_loop()
        pubsub = feed.pubsub
        # Messages already buffered are read without a pause: a backlog (a resync's
        # batches) would be handled in one piece, so it is handled in slices.
        slicer = Slicer(loop.time, check=1, shared=False)
        while True:
            msg = await pubsub.get_message(timeout=None)
            feed.last_heard = loop.time()
            feed.pinged = False
            if msg is None:
                continue
            kind = msg["type"]
            if kind == "message" or kind == "smessage":
                on_message(_text(msg["channel"]), msg["data"])
                if slicer.due():
                    await slicer.pause()
            elif kind in ("unsubscribe", "sunsubscribe"):
                # We never unsubscribe: Redis ended it (the channel's slot moved to
                # another shard, or this node stopped being a primary).
                raise _Lost(f"Redis at {feed.where} ended the subscription to {_text(msg['channel'])}")
            elif kind in ("subscribe", "ssubscribe"):
                raise _Lost(f"the connection to {feed.where} was re-established behind our back")
            # "pong": a sign of life, nothing more

    async def _watch(self, topology: Topology, feeds: list[Feed]) -> None:
        loop = asyncio.get_running_loop()
        tick = self._probe / 4
        last_tick = loop.time()
        while True:
            await self._pause(tick)
            if self._reset.is_set():
                raise _Lost("reset requested")
            now = loop.time()
            if now - last_tick > tick + self._probe:
                # We were the silent ones (a blocked loop, a GC pause, SIGSTOP): what Redis
                # sent meanwhile is still unread in the socket. Not evidence against the
                # connection; give it a fresh bound.
                for feed in feeds:
                    feed.last_heard, feed.pinged = now, False
            last_tick = now
            for feed in feeds:
                silent = now - feed.last_heard
                if silent >= 2 * self._probe:
                    raise _Lost(f"nothing from Redis at {feed.where} for {silent:.1f}s, not even a PONG")
                if silent >= self._probe and not feed.pinged:
                    feed.pinged = True
                    async with asyncio.timeout(self._probe):
                        await feed.pubsub.ping()
            reason = await topology.verify(feeds)
            _reraise_cancel()
            if reason is not None:
                raise _Lost(reason)

    def reset(self) -> None:
        """Drop the subscription connection(s) and reconnect now (see :class:`Transport`)."""
        self._reset.set()
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def _pause(self, delay: float) -> None:
        """Sleep ``delay`` seconds, or until :meth:`reset`. Not ``asyncio.timeout`` around
        an event: in Python 3.11 a cancellation that lands as the timeout fires is
        swallowed, and this runs in loops that must stop when cancelled."""
        if self._reset.is_set():
            return
        loop = asyncio.get_running_loop()
        wakeup: asyncio.Future[None] = loop.create_future()
        self._wakeup = wakeup
        timer = loop.call_later(delay, _wake, wakeup)
        try:
            await wakeup
        finally:
            timer.cancel()
            self._wakeup = None

    # -- calls ---------------------------------------------------------------------------
    async def _topo(self) -> Topology:
        topology = self._topology
        if topology is not None:
            return topology
        async with self._lock:
            if self._closed:
                raise TransportError("the transport is closed", "connection")
            if self._topology is None:
                try:
                    async with asyncio.timeout(self._options.op_timeout + self._options.connect_timeout):
                        mode = await detect(self._target, self._options)
                    self._topology = TOPOLOGIES[mode](self._target, self._options)
                except ValueError as exc:
                    # A setting to fix (a unix:// URL or a database number on a Redis
                    # Cluster): said loudly once, and every call fails until it is fixed.
                    if self._misconfigured != str(exc):
                        self._misconfigured = str(exc)
                        log.error("clustersess: %s", exc)
                    raise TransportError(str(exc), "error") from None
                except _CONNECT_ERRORS as exc:
                    raise _wrap("connect", exc) from None
                self.mode = mode
                log.info("clustersess: Redis at %s is %s", self._target.describe(), _MODES[mode])
            return self._topology

    async def _call(self, what: str, op: Callable[[Topology], Awaitable[Any]]) -> Any:
        topology = await self._topo()
        try:
            return await op(topology)
        except REDIS_ERRORS as exc:
            if error_kind(exc) != "readonly":
                raise _wrap(what, exc) from None
        # A failover demoted the server we were talking to: find the primary again (and
        # move the subscription there too), then try once more. At most once a second: a
        # URL that names a replica for good must not churn connections on every call.
        now = asyncio.get_running_loop().time()
        if now - self._recovered_at < 1.0:
            raise TransportError(f"Redis {what} failed: READONLY again right after finding the primary", "readonly")
        self._recovered_at = now
        log.warning("clustersess: Redis answered READONLY to %s: the primary moved; finding it again", what)
        await topology.recover()
        self.reset()
        try:
            return await op(topology)
        except REDIS_ERRORS as exc:
            raise _wrap(what, exc) from None

    async def publish(self, items: list[tuple[str, bytes]]) -> list[int]:
        return await self._call("publish", lambda t: t.publish(items))  # type: ignore[no-any-return]

    async def _script(self, what: str, script: Script, keys: list[str], args: list[Any]) -> Any:
        return await self._call(what, lambda t: _run(t, script, keys, args))

    async def claim(self, key: str, value: str, ttl: float) -> str:
        return _text(await self._script("claim", CLAIM, [key], [value, _ms(ttl)]))

    async def refresh(self, key: str, value: str, ttl: float, adopted_key: str) -> str:
        return _text(await self._script("lease refresh", REFRESH, [key, adopted_key], [value, _ms(ttl)]))

    async def adopt(self, key: str, value: str, adopted_key: str, marker_ttl: float) -> bool:
        return bool(await self._script("adoption", ADOPT, [key, adopted_key], [value, _ms(marker_ttl)]))

    async def get(self, key: str) -> str | None:
        value = await self._call("GET", lambda t: t.client.get(key))
        return None if value is None else _text(value)

    async def release(self, key: str, value: str) -> None:
        try:
            await self._script("release", RELEASE, [key], [value])
        except TransportError as exc:
            # The claim then lapses by itself after its TTL (one drop time).
            log.warning("clustersess: could not release the node name claim (%s); it expires by itself", exc)

    async def close(self) -> None:
        self._closed = True
        topology, self._topology = self._topology, None
        if topology is not None:
            try:
                await topology.aclose()
            except Exception:  # closing broken connections; nothing left to save
                log.debug("clustersess: error while closing Redis clients", exc_info=True)


_MODES = {
    "single": "a single Redis (PUBLISH/SUBSCRIBE)",
    "sentinel": "a Sentinel-watched primary (PUBLISH/SUBSCRIBE on the primary)",
    "cluster": "a Redis Cluster (sharded pub/sub: SPUBLISH/SSUBSCRIBE)",
}


async def _run(topology: Topology, script: Script, keys: list[str], args: list[Any]) -> Any:
    if isinstance(topology, ClusterRedis):
        assert topology.same_slot(keys), (
            f"keys {keys} are in different Redis Cluster slots; give them a common {{hash tag}}"
        )
    return await script(topology.client, keys, args)


async def _close_all(feeds: list[Feed]) -> None:
    for feed in feeds:
        try:
            # Bounded: a broken connection must not hold up reconnecting or stopping.
            async with asyncio.timeout(1.0):
                await asyncio.shield(feed.aclose())
        except Exception:  # the connection is already broken
            _reraise_cancel()
            log.debug("clustersess: error while closing a subscription", exc_info=True)


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _reraise_cancel() -> None:
    """Re-raise a cancellation that an ``asyncio.timeout`` turned into TimeoutError (it
    does when both happen in one loop iteration, in Python 3.11)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
