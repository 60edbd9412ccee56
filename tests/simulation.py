"""A deterministic fault simulator for the cluster protocol (FoundationDB / VOPR style).

Real :class:`~clustersess.SessionManager` instances, with the real protocol code, run on
one event loop whose clock is virtual (it jumps to the next timer when nothing is
runnable), over :class:`SimRedis`: an in-memory Redis and TCP model with faults. A seeded
schedule interleaves client requests (writes, reads, logins that rotate the ID, logouts)
with faults: a node cut off both ways or one way (its TCP connections stay open and
buffer, as a blackholed link does), a node frozen (a GC pause, SIGSTOP), Redis frozen,
Redis answering READONLY, Redis restarted with its data lost, connections dropped
silently or cleanly, extra delay, a node killed (SIGKILL) or stopped (SIGTERM) and
started again. Then everything heals, the cluster must settle, one more owner is
killed, and the checker looks at the history:

* every write answered as replicated (refuse mode: answered at all; serve mode: answered,
  on a schedule without kills before the heal) is present, unless a reported conflict
  superseded it;
* one owner per session once healed, and its backup holds the same version;
* a logout answered as done is final: the old cookie never finds a session again;
* no request ever sees another client's session; the middleware never raises anything
  but the documented ReplicationUnavailable.

Every source of randomness (tokens, incarnations, request ids, backoff jitter, the
schedule itself) comes from the seed, so a failing seed replays exactly::

    python -m tests.simulation --seed 1234 --trace
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import random
import selectors
import sys
from collections.abc import Callable, Iterator
from typing import Any

import redis.backoff

from clustersess import Config, SessionListener, SessionManager, ids
from clustersess.cluster import membership as membership_module
from clustersess.cluster import ownership as ownership_module
from clustersess.cluster.transport import OnConnect, OnMessage, TransportError
from clustersess.cookies import CookieAction
from clustersess.errors import ReplicationUnavailable
from clustersess.listeners import SessionEvent
from tests.utils import DELETED, cookie_after

SECRET = "simulation-secret-0123456789abcdef"
WALL0 = 1_800_000_000.0
#: per-node timing of the simulated cluster (virtual seconds)
TIMING: dict[str, Any] = {"heartbeat_interval": 0.25, "drop_time": 1.5, "ack_timeout": 0.5, "max_inactive": 600.0}
OP_TIMEOUT = 2.0  # like RedisTransport's socket timeout
CONNECT_TIMEOUT = 1.0
TCP_GIVEUP = 12.0  # a blackholed connection is declared dead by TCP after this long


# == virtual time ==============================================================================
class _Selector(selectors.BaseSelector):
    """No I/O ever happens: select() only moves the loop's clock to the next timer."""

    def __init__(self) -> None:
        self._keys: dict[int, selectors.SelectorKey] = {}
        self.loop: VirtualLoop | None = None

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        key = selectors.SelectorKey(fileobj, fd, events, data)
        self._keys[fd] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        return self._keys.pop(fd)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        self.unregister(fileobj)
        return self.register(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        assert self.loop is not None
        if timeout is None:
            raise RuntimeError("simulation deadlock: nothing is scheduled")
        self.loop.now += max(0.0, timeout)
        return []

    def get_map(self) -> Any:
        return self._keys

    def close(self) -> None:
        self._keys.clear()


class VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        selector = _Selector()
        super().__init__(selector)
        selector.loop = self
        self.now = 0.0

    def time(self) -> float:
        return self.now


class SimClock:
    """A node's clocks: virtual time, with this node's wall-clock skew."""

    def __init__(self, loop: VirtualLoop, skew: float = 0.0) -> None:
        self.loop = loop
        self.skew = skew

    def time(self) -> float:
        return WALL0 + self.loop.now + self.skew

    def monotonic(self) -> float:
        return self.loop.now


# == Redis and TCP =============================================================================
@dataclasses.dataclass
class Link:
    """What a node's network and process state let through right now."""

    cut_in: bool = False  # nothing reaches the node (its connections stay open, bytes wait)
    cut_out: bool = False  # nothing the node sends reaches Redis
    frozen: bool = False  # the process does not run (its sockets buffer both ways)
    delay: float = 0.0

    def can_receive(self) -> bool:
        return not (self.cut_in or self.frozen)

    def can_send(self) -> bool:
        return not (self.cut_out or self.frozen)


class Conn:
    """One TCP connection between a node and Redis."""

    __slots__ = ("alive", "blocked_since", "opened", "zombie")

    def __init__(self, now: float) -> None:
        self.alive = True
        self.opened = now
        self.blocked_since: float | None = None
        #: closed by the node while its link was cut: Redis still thinks it is there
        self.zombie = False


class SimRedis:
    def __init__(self, loop: VirtualLoop, rng: random.Random) -> None:
        self.loop = loop
        self.rng = rng
        self.keys: dict[str, tuple[str, float | None]] = {}
        #: channel -> subscribed transports (and zombie subscriptions)
        self.subs: dict[str, list[tuple[SimTransport, Conn]]] = {}
        self.links: dict[str, Link] = {}
        self.frozen = False
        self.readonly = False
        self.generation = 0  # bumped by a restart: every connection of older ones is dead
        self.latency = 0.0003

    def link(self, node: str) -> Link:
        return self.links.setdefault(node, Link())

    # -- keys -------------------------------------------------------------------------------
    def get(self, key: str) -> str | None:
        item = self.keys.get(key)
        if item is None:
            return None
        if item[1] is not None and item[1] <= self.loop.now:
            del self.keys[key]
            return None
        return item[0]

    def set(self, key: str, value: str, ttl: float | None) -> None:
        self.keys[key] = (value, None if ttl is None else self.loop.now + ttl)

    # -- the path of one command ------------------------------------------------------------
    async def command(self, node: str, conn: Conn, fn: Callable[[], Any], *, write: bool = False) -> Any:
        """Run ``fn`` inside Redis as the command of ``node`` on ``conn``; raises
        TransportError like redis-py would (timeout, broken connection, READONLY)."""
        loop = self.loop
        start = loop.now
        link = self.link(node)
        if not conn.alive:
            raise TransportError("connection closed", "connection")
        # to Redis
        while not link.can_send() or self.frozen:
            if loop.now - start >= OP_TIMEOUT:
                conn.alive = False
                raise TransportError("timeout", "timeout")
            await asyncio.sleep(0.05)
            if not conn.alive:
                raise TransportError("connection closed", "connection")
        await asyncio.sleep(self.latency + link.delay)
        if not conn.alive:
            raise TransportError("connection closed", "connection")
        if write and self.readonly:
            result: Any = TransportError("READONLY You can't write against a read only replica.", "readonly")
        else:
            result = fn()
        # and back
        while not link.can_receive() or self.frozen:
            if loop.now - start >= OP_TIMEOUT:
                conn.alive = False
                raise TransportError("timeout", "timeout")
            await asyncio.sleep(0.05)
        await asyncio.sleep(self.latency + link.delay)
        if loop.now - start >= OP_TIMEOUT:
            conn.alive = False
            raise TransportError("timeout", "timeout")
        if isinstance(result, TransportError):
            raise result
        return result

    def publish(self, channel: str, data: bytes) -> int:
        count = 0
        for transport, conn in list(self.subs.get(channel, ())):
            if not conn.alive and not conn.zombie:
                continue
            count += 1
            if conn.alive:
                transport.enqueue(conn, channel, data)
        return count

    def subscribe(self, transport: SimTransport, conn: Conn, channels: list[str]) -> None:
        for ch in channels:
            self.subs.setdefault(ch, []).append((transport, conn))

    def unsubscribe(self, conn: Conn) -> None:
        for ch, subs in self.subs.items():
            self.subs[ch] = [(t, c) for t, c in subs if c is not conn]

    def restart(self) -> None:
        """Redis restarts without persistence: keys gone, every connection dropped."""
        self.keys.clear()
        self.generation += 1
        for subs in self.subs.values():
            for transport, conn in subs:
                conn.alive = False
                transport.broken()
        self.subs.clear()

    def tick(self) -> None:
        """TCP gives up on connections blackholed for too long; zombies go away once the
        link heals (the FIN finally arrives)."""
        now = self.loop.now
        for subs in list(self.subs.values()):
            for transport, conn in subs:
                link = self.link(transport.node)
                blocked = not (link.can_receive() and link.can_send()) or self.frozen
                if blocked:
                    if conn.blocked_since is None:
                        conn.blocked_since = now
                    elif now - conn.blocked_since > TCP_GIVEUP:
                        if conn.alive:
                            conn.alive = False
                            transport.broken()
                        conn.zombie = False
                else:
                    conn.blocked_since = None
                    if conn.zombie:
                        conn.zombie = False
        for ch, subs in list(self.subs.items()):
            self.subs[ch] = [(t, c) for t, c in subs if c.alive or c.zombie]


class SimTransport:
    """The :class:`~clustersess.cluster.transport.Transport` interface over SimRedis."""

    def __init__(self, redis: SimRedis, node: str) -> None:
        self.redis = redis
        self.node = node
        self.connected = False
        self._pub: Conn | None = None
        self._sub: Conn | None = None
        self._inbox: list[tuple[str, bytes]] = []
        self._wake = asyncio.Event()
        self._broken = asyncio.Event()
        self._on_message: OnMessage | None = None
        self._closed = False
        self._failures = 0
        self._backoff = redis_backoff()

    # -- subscription -------------------------------------------------------------------------
    async def run(self, channels: list[str], on_message: OnMessage, on_connect: OnConnect) -> None:
        self._on_message = on_message
        first = True
        loop = self.redis.loop
        while not self._closed:
            conn = Conn(loop.now)
            try:
                await self.redis.command(self.node, conn, lambda: None)  # connect + SUBSCRIBE
            except TransportError:
                self._failures += 1
                await asyncio.sleep(self._backoff.compute(self._failures))
                continue
            self._sub = conn
            self._broken.clear()
            self.redis.subscribe(self, conn, channels)
            self.connected = True
            self._failures = 0
            await on_connect(first)
            first = False
            deliver = asyncio.ensure_future(self._deliver(conn))
            try:
                await self._broken.wait()
            finally:
                deliver.cancel()
                self.connected = False
                self._drop(conn)
            self._failures += 1
            await asyncio.sleep(self._backoff.compute(self._failures))

    def _drop(self, conn: Conn) -> None:
        link = self.redis.link(self.node)
        if link.can_send() and not self.redis.frozen:
            self.redis.unsubscribe(conn)  # the FIN arrives
        elif conn.alive:
            conn.zombie = True  # Redis still thinks we are subscribed
        conn.alive = False
        self._inbox.clear()

    def enqueue(self, conn: Conn, channel: str, data: bytes) -> None:
        if conn is not self._sub:
            return
        self._inbox.append((channel, data))
        self._wake.set()

    async def _deliver(self, conn: Conn) -> None:
        redis = self.redis
        link = redis.link(self.node)
        while conn.alive:
            await self._wake.wait()
            self._wake.clear()
            while self._inbox and conn.alive:
                if not link.can_receive() or redis.frozen:
                    await asyncio.sleep(0.05)  # bytes wait in the buffers
                    continue
                await asyncio.sleep(redis.latency + link.delay)
                if not self._inbox or not conn.alive:
                    break
                channel, data = self._inbox.pop(0)
                assert self._on_message is not None
                self._on_message(channel, data)

    def broken(self) -> None:
        """The connection died (Redis restart, TCP gave up, an error)."""
        self._broken.set()
        if self._pub is not None:
            self._pub.alive = False

    def reset(self) -> None:
        if self._sub is not None:
            self._sub.alive = False
        self._broken.set()

    # -- commands -----------------------------------------------------------------------------
    def _pub_conn(self) -> Conn:
        if self._pub is None or not self._pub.alive:
            self._pub = Conn(self.redis.loop.now)
        return self._pub

    async def publish(self, items: list[tuple[str, bytes]]) -> list[int]:
        redis = self.redis
        return list(await redis.command(self.node, self._pub_conn(), lambda: [redis.publish(c, d) for c, d in items]))

    async def claim(self, key: str, value: str, ttl: float) -> str:
        redis = self.redis

        def run() -> str:
            holder = redis.get(key)
            if holder is None or holder == value:
                redis.set(key, value, ttl)
                return value
            return holder

        return str(await redis.command(self.node, self._pub_conn(), run, write=True))

    async def refresh(self, key: str, value: str, ttl: float, adopted_key: str) -> str:
        redis = self.redis

        def run() -> str:
            holder = redis.get(key)
            if holder == value:
                redis.set(key, value, ttl)
                return "held"
            if redis.get(adopted_key) is not None:
                return "adopted"
            if holder is None:
                redis.set(key, value, ttl)
                return "lapsed"
            return "taken:" + holder

        return str(await redis.command(self.node, self._pub_conn(), run, write=True))

    async def adopt(self, key: str, value: str, adopted_key: str, marker_ttl: float) -> bool:
        redis = self.redis

        def run() -> bool:
            if redis.get(key) == value:
                return False
            redis.set(adopted_key, "1", marker_ttl)
            return True

        return bool(await redis.command(self.node, self._pub_conn(), run, write=True))

    async def get(self, key: str) -> str | None:
        redis = self.redis
        result = await redis.command(self.node, self._pub_conn(), lambda: redis.get(key))
        return None if result is None else str(result)

    async def release(self, key: str, value: str) -> None:
        redis = self.redis

        def run() -> None:
            if redis.get(key) == value:
                redis.keys.pop(key, None)

        with contextlib.suppress(TransportError):
            await redis.command(self.node, self._pub_conn(), run, write=True)

    async def close(self) -> None:
        self._closed = True
        self.reset()
        if self._pub is not None:
            self._pub.alive = False

    def killed(self) -> None:
        """The process died: the kernel closes its sockets."""
        self._closed = True
        if self._sub is not None and self._sub.alive:
            self._drop(self._sub)
        if self._pub is not None:
            self._pub.alive = False
        self._broken.set()


def redis_backoff() -> redis.backoff.ExponentialWithJitterBackoff:
    return redis.backoff.ExponentialWithJitterBackoff(cap=0.5, base=0.05)


# == determinism ===============================================================================
@contextlib.contextmanager
def seeded(rng: random.Random) -> Iterator[None]:
    """Route every random choice the protocol makes through ``rng``."""
    import clustersess.cluster.node as node_module

    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

    class _OS:
        @staticmethod
        def urandom(n: int) -> bytes:
            return rng.getrandbits(8 * n).to_bytes(n, "big")

    def incarnation() -> str:
        return f"{rng.getrandbits(64):016x}"

    patches: list[tuple[Any, str, Any]] = [
        (ids, "new_token", lambda: "".join(rng.choice(alphabet) for _ in range(24))),
        (membership_module, "new_incarnation", incarnation),
        (node_module, "new_incarnation", incarnation),
        (ownership_module, "os", _OS),
        (ownership_module, "random", rng),
        (redis.backoff, "random", rng),
    ]
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in patches]
    for obj, attr, value in patches:
        setattr(obj, attr, value)
    try:
        yield
    finally:
        for obj, attr, value in saved:
            setattr(obj, attr, value)


# == the world =================================================================================
class Conflicts(SessionListener):
    def __init__(self, world: World) -> None:
        self.world = world

    def conflict(self, event: SessionEvent, discarded: list[dict[str, Any]]) -> None:
        self.world.conflicts.add(event.session_id.rpartition(".")[0])
        self.world.note(f"conflict reported for {event.session_id[:6]}: kept {event.data}, discarded {discarded}")


@dataclasses.dataclass
class Client:
    name: str
    home: str
    cookie: str | None = None
    token: str | None = None
    next_v: int = 0
    acked: int = 0  # the last value answered as replicated
    busy: bool = False


class Violation(AssertionError):
    pass


class World:
    def __init__(self, seed: int, *, nodes: int = 3, mode: str = "refuse", trace: bool = False) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.loop = VirtualLoop()
        self.redis = SimRedis(self.loop, self.rng)
        self.mode = mode
        self.trace = trace
        self.names = [f"n{i}" for i in range(1, nodes + 1)]
        self.managers: dict[str, SessionManager] = {}
        self.transports: dict[str, SimTransport] = {}
        self.down: set[str] = set()
        self.log: list[str] = []
        self.conflicts: set[str] = set()
        self.dead_cookies: list[str] = []
        self.clients = [Client(f"c{i}", self.names[i % nodes]) for i in range(6)]
        self.errors: list[str] = []
        self.kills_before_heal = 0
        self._starting: set[str] = set()

    def note(self, text: str) -> None:
        line = f"{self.loop.now:8.3f}  {text}"
        self.log.append(line)
        if self.trace:
            print(line)

    # -- nodes ----------------------------------------------------------------------------------
    async def start(self, name: str) -> None:
        transport = SimTransport(self.redis, name)
        skew = self.rng.choice([0.0, 0.0, 0.0, 300.0, -300.0, 5.0])
        config = Config(
            node_name=name, secret_key=SECRET, on_replication_failure=self.mode,  # type: ignore[arg-type]
            gc_freeze=False, **TIMING,
        )  # fmt: skip
        manager = SessionManager(
            config, clock=SimClock(self.loop, skew), transport=transport, listeners=[Conflicts(self)]
        )
        self.managers[name] = manager
        self.transports[name] = transport
        self.down.discard(name)
        self.note(f"start {name} (clock skew {skew:+.0f}s)")
        await manager.start()

    async def kill(self, name: str) -> None:
        manager = self.managers.pop(name)
        self.transports.pop(name).killed()
        self.down.add(name)
        self.note(f"kill {name}")
        assert manager._runner is not None
        manager._runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await manager._runner
        manager._runner = None

    async def terminate(self, name: str) -> None:
        self.note(f"SIGTERM {name}")
        manager = self.managers[name]
        await manager.stop()
        self.managers.pop(name)
        self.transports.pop(name)
        self.down.add(name)
        self.note(f"{name} stopped (handed over {manager.stats.handed_over})")

    def live(self) -> list[str]:
        return [n for n in self.names if n in self.managers]

    def routable(self) -> list[str]:
        """Nodes a load balancer would send to: up, not frozen, /health ok."""
        return [n for n in self.live() if not self.redis.link(n).frozen and self.managers[n].health().ok]

    # -- requests -------------------------------------------------------------------------------
    def pick_node(self, client: Client) -> str | None:
        live = [n for n in self.live() if not self.redis.link(n).frozen]
        if not live:
            return None
        home = client.cookie.rpartition(".")[2] if client.cookie else client.home
        if home in live and self.rng.random() < 0.8:
            return home  # sticky, even to a fenced node (its clients still reach it)
        healthy = [n for n in self.routable()]
        return self.rng.choice(healthy or live)

    async def request(self, client: Client, kind: str, node: str) -> None:
        manager = self.managers[node]
        old_cookie = client.cookie
        try:
            handle = await manager.open(client.cookie)
        except ReplicationUnavailable:
            self.note(f"{client.name} {kind} on {node}: 503 (session unavailable)")
            return
        session = handle.session
        data = dict(session)
        was_new = session.is_new
        if data.get("c") not in (None, client.name):
            self.fail(f"{client.name} on {node} got another client's session: {data}")
        if old_cookie in self.dead_cookies and not session.is_new:
            self.fail(f"{client.name} on {node}: a logged-out cookie found its session again: {data}")
        value = None
        if kind in ("write", "login"):
            client.next_v += 1
            value = client.next_v
            session["c"] = client.name
            session["v"] = value
        try:
            if kind == "login":
                session.rotate()
            elif kind == "logout":
                session.invalidate()
        except ReplicationUnavailable:
            manager.abandon(handle)
            self.note(f"{client.name} {kind} on {node}: 503 before any change")
            return
        try:
            out = await cookie_after(manager, handle)
        except ReplicationUnavailable as exc:
            # 503, with the cookie the session now has (a rotation may have happened)
            if exc.action is CookieAction.SET:
                client.cookie = manager.cookie_value(handle)
                verified = manager.signer.verify(client.cookie)
                client.token = verified.token if verified else None
            elif exc.action is CookieAction.DELETE:
                client.cookie, client.token, client.acked = None, None, 0  # ended, unconfirmed
            self.note(f"{client.name} {kind} on {node}: 503")
            return
        except Exception as exc:  # noqa: BLE001 -- any other error is a finding
            self.fail(f"{client.name} {kind} on {node}: close() raised {exc!r}")
            return
        if out == DELETED:
            client.cookie = None
        elif out is not None:
            client.cookie = out
        if kind == "logout":
            if old_cookie and not was_new:
                self.dead_cookies.append(old_cookie)
            client.cookie, client.acked, client.token = None, 0, None
            self.note(f"{client.name} logout on {node}: done")
            return
        if kind == "login" and old_cookie and not was_new:
            self.dead_cookies.append(old_cookie)
        if value is not None:
            token = manager.signer.verify(client.cookie).token if client.cookie else None
            if token != client.token:
                client.acked = 0
                client.token = token
            if self.counts_as_acked(node):
                client.acked = value
            self.note(f"{client.name} {kind} v={value} on {node}: ok (cookie {client.cookie and client.cookie[:6]})")

    def counts_as_acked(self, node: str) -> bool:
        # refuse mode: answered = replicated. serve mode: every answer counts, on schedules
        # that kill nothing before the heal (the promise: kept once the cluster settled).
        return self.mode == "refuse" or self.kills_before_heal == 0

    def fail(self, message: str) -> None:
        self.note("VIOLATION: " + message)
        self.errors.append(message)

    async def client_loop(self, client: Client, until: float) -> None:
        while self.loop.now < until:
            await asyncio.sleep(self.rng.expovariate(4.0))
            node = self.pick_node(client)
            if node is None:
                continue
            kind = self.rng.choices(["write", "read", "login", "logout"], [6, 3, 1, 0.4])[0]
            if client.cookie is None:
                kind = "write"
            manager = self.managers[node]
            try:
                await self.request(client, kind, node)
            except (asyncio.CancelledError, ReplicationUnavailable):
                if self.managers.get(node) is manager and asyncio.current_task().cancelling():  # type: ignore[union-attr]
                    raise
                self.note(f"{client.name} {kind} on {node}: died with its node")

    # -- faults ---------------------------------------------------------------------------------
    async def fault_loop(self, until: float) -> None:
        rng = self.rng
        kinds = ["cut", "cut_in", "cut_out", "freeze", "redis_freeze", "readonly", "drop", "silent_drop", "delay"]
        if self.mode == "refuse":
            kinds += ["kill", "kill", "sigterm", "redis_restart"]
        while self.loop.now < until:
            await asyncio.sleep(rng.uniform(0.5, 4.0))
            kind = rng.choice(kinds)
            node = rng.choice(self.live()) if self.live() else None
            if node is None:
                continue
            link = self.redis.link(node)
            length = rng.choice([0.3, 1.0, 2.5, 4.0, 8.0])
            if kind == "cut":
                self.note(f"cut {node} off both ways for {length}s")
                link.cut_in = link.cut_out = True
                self.loop.call_later(length, self._heal, node)
            elif kind == "cut_in":
                self.note(f"cut {node} off inbound for {length}s")
                link.cut_in = True
                self.loop.call_later(length, self._heal, node)
            elif kind == "cut_out":
                self.note(f"cut {node} off outbound for {length}s")
                link.cut_out = True
                self.loop.call_later(length, self._heal, node)
            elif kind == "freeze":
                self.note(f"freeze {node} for {length}s")
                link.frozen = True
                self.loop.call_later(length, self._heal, node)
            elif kind == "redis_freeze":
                self.note(f"freeze Redis for {length}s")
                self.redis.frozen = True
                self.loop.call_later(length, self._thaw_redis)
            elif kind == "readonly":
                self.note(f"Redis READONLY for {length}s")
                self.redis.readonly = True
                self.loop.call_later(length, self._writable)
            elif kind == "drop":
                self.note(f"drop {node}'s subscription cleanly")
                self.transports[node].broken()
            elif kind == "silent_drop":
                self.note(f"drop {node}'s subscription silently")
                sub = self.transports[node]._sub
                if sub is not None:
                    sub.alive = False
                    sub.zombie = True
            elif kind == "delay":
                self.note(f"delay {node} by 50 ms for {length}s")
                link.delay = 0.05
                self.loop.call_later(length, self._heal, node)
            elif kind in ("kill", "sigterm") and not self.down and self.settled():
                # One failure at a time: the cluster must have re-replicated after the last
                # one (a second kill before that may take a session's owner and backup).
                self.kills_before_heal += 1
                if kind == "kill":
                    await self.kill(node)
                else:
                    await self.terminate(node)
                self.loop.call_later(rng.uniform(1.0, 6.0), self._restart, node)
            elif kind == "redis_restart" and rng.random() < 0.3:
                self.note("restart Redis (its data is lost)")
                self.kills_before_heal += 1  # what only a lease in Redis protected may be lost
                self.redis.restart()

    def _restart(self, node: str) -> None:
        if node in self.down and node not in self._starting:
            self._starting.add(node)
            task = asyncio.ensure_future(self.start(node))
            task.add_done_callback(lambda t: self._starting.discard(node))

    def _heal(self, node: str) -> None:
        link = self.redis.link(node)
        if link.cut_in or link.cut_out or link.frozen or link.delay:
            self.note(f"heal {node}")
        link.cut_in = link.cut_out = link.frozen = False
        link.delay = 0.0

    def _thaw_redis(self) -> None:
        self.note("Redis resumes")
        self.redis.frozen = False

    def _writable(self) -> None:
        self.note("Redis writable again")
        self.redis.readonly = False

    async def tcp_ticker(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            self.redis.tick()

    # -- settling and checking ------------------------------------------------------------------
    def settled(self) -> bool:
        for name in self.live():
            mg = self.managers[name]
            node: Any = mg.cluster
            if not mg.health().ok or node.pending_replication() or node.ownership.unconfirmed:
                return False
            busy = node.ownership._taking or node.ownership._reclaim_due or node.ownership._released
            if busy or len(node.members.live()) != len(self.live()) - 1:
                return False
        return True

    async def settle(self, what: str, timeout: float = 40.0) -> None:
        deadline = self.loop.now + timeout
        while not self.settled():
            if self.loop.now > deadline:
                self.fail(f"the cluster did not settle {what} within {timeout}s: " + self.describe())
                return
            await asyncio.sleep(0.25)
        await asyncio.sleep(2 * TIMING["heartbeat_interval"])
        self.note(f"settled {what}")

    def describe(self) -> str:
        parts = []
        for name in self.live():
            mg = self.managers[name]
            node: Any = mg.cluster
            parts.append(
                f"{name}: {mg.health()} pending={node.pending_replication()} "
                f"unconfirmed={len(node.ownership.unconfirmed)} "
                f"members={node.members.live()}"
            )
        return "; ".join(parts)

    def holders(self, token: str) -> dict[str, Any]:
        return {
            n: ("owned" if token in mg.store.owned else "copy", mg.store.owned.get(token) or mg.store.backups[token])
            for n, mg in self.managers.items()
            if token in mg.store.owned or token in mg.store.backups
        }

    async def check(self) -> None:
        for client in self.clients:
            if client.token is None or not client.acked:
                continue  # a session none of whose writes was acknowledged may be gone
            held = self.holders(client.token)
            owners = [n for n, (role, _) in held.items() if role == "owned"]
            if len(owners) != 1:
                self.fail(f"{client.name}'s session has owners {owners} once healed")
                continue
            entry = held[owners[0]][1]
            backup = entry.backup
            if backup is not None and backup in self.managers:
                copy = self.managers[backup].store.backups.get(client.token)
                if copy is None or copy.vv != entry.vv:
                    self.fail(f"{client.name}'s backup on {backup} does not hold the owner's version")
        # kill the owner of a session with acknowledged writes, then read everything back
        victims = [c for c in self.clients if c.token and c.acked]
        if victims:
            victim = self.rng.choice(victims)
            owner = next((n for n, (r, _) in self.holders(victim.token or "").items() if r == "owned"), None)
            if owner is not None and len(self.live()) > 1:
                await self.kill(owner)
                await asyncio.sleep(TIMING["drop_time"] * 2.5)
                await self.settle("after the last kill")
        for client in self.clients:
            if client.cookie is None:
                continue
            node = self.rng.choice(self.live())
            manager = self.managers[node]
            handle = await manager.open(client.cookie)
            data = dict(handle.session)
            manager.abandon(handle)
            got = data.get("v", 0)
            if client.acked and got < client.acked and (client.token not in self.conflicts):
                self.fail(
                    f"{client.name}: acknowledged write v={client.acked} lost (read v={got} on {node}, "
                    f"token {client.token and client.token[:6]})"
                )
        for cookie in self.dead_cookies:
            node = self.rng.choice(self.live())
            manager = self.managers[node]
            handle = await manager.open(cookie)
            new = handle.session.is_new
            manager.abandon(handle)
            if not new:
                self.fail(f"a logged-out cookie {cookie[:6]} found a session on {node} at the end")

    # -- one schedule ---------------------------------------------------------------------------
    async def main(self, duration: float) -> None:
        ticker = asyncio.ensure_future(self.tcp_ticker())
        for name in self.names:
            await self.start(name)
        await self.settle("at start")
        until = self.loop.now + duration
        tasks = [asyncio.ensure_future(self.client_loop(c, until)) for c in self.clients]
        tasks.append(asyncio.ensure_future(self.fault_loop(until - 2.0)))
        await asyncio.gather(*tasks)
        self.note("faults over: healing everything")
        for name in self.names:
            self._heal(name)
        self.redis.frozen = self.redis.readonly = False
        for name in self.names:
            while name in self._starting:
                await asyncio.sleep(0.1)
            if name not in self.managers:
                await self.start(name)
        await self.settle("after the heal")
        await self.check()
        for name in list(self.managers):
            await self.kill(name)
        ticker.cancel()

    def run(self, duration: float = 20.0) -> list[str]:
        logger = logging.getLogger("clustersess")
        level = logger.level
        logger.setLevel(logging.CRITICAL + 1 if not self.trace else logging.WARNING)
        asyncio.set_event_loop(self.loop)
        try:
            with seeded(self.rng):
                self.loop.run_until_complete(asyncio.wait_for(self.main(duration), 600.0))
        except Exception as exc:  # noqa: BLE001 -- the harness must not hide a protocol bug
            self.fail(f"the schedule crashed: {exc!r}")
        finally:
            for task in asyncio.all_tasks(self.loop):
                task.cancel()
            with contextlib.suppress(Exception):
                self.loop.run_until_complete(asyncio.sleep(0))
            asyncio.set_event_loop(None)
            self.loop.close()
            logger.setLevel(level)
        return self.errors


def run_seed(seed: int, *, trace: bool = False, duration: float = 20.0) -> tuple[list[str], list[str]]:
    mode = "refuse" if seed % 2 == 0 else "serve"
    world = World(seed, mode=mode, nodes=3 + (seed % 5 == 0), trace=trace)
    errors = world.run(duration)
    return errors, world.log


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, help="replay one seed")
    parser.add_argument("--seeds", type=int, default=200, help="how many seeds to run from --start")
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--duration", type=float, default=20.0, help="virtual seconds of faults per schedule")
    parser.add_argument("--trace", action="store_true", help="print the schedule's history as it runs")
    args = parser.parse_args(argv)
    seeds = [args.seed] if args.seed is not None else range(args.start, args.start + args.seeds)
    failed = 0
    for seed in seeds:
        errors, log = run_seed(seed, trace=args.trace, duration=args.duration)
        if errors:
            failed += 1
            print(f"seed {seed}: {len(errors)} violation(s); first: {errors[0]}")
            if args.seed is not None and not args.trace:
                print("\n".join(log))
    print(f"{len(list(seeds))} schedule(s), {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
