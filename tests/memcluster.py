"""The in-memory cluster harness: real SessionManagers on one MemoryBus and one FakeClock.

``Cluster`` starts managers wired through :class:`clustersess.cluster.MemoryBus` (the same
transport interface as Redis) with short heartbeat and drop times; ``Peer`` is a member
that is only a codec and a channel, to drive a node's receive path message by message.
The real-process counterpart is ``tests/cluster_utils.py``.
"""


from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from clustersess import Config, FakeClock, SessionListener, SessionManager
from clustersess.cluster import MemoryBus
from clustersess.cluster import messages as m
from clustersess.cluster.membership import new_incarnation
from clustersess.cluster.wire import Codec
from tests.utils import TEST_SECRET, async_wait_until, cookie_after

#: short membership timing so failures are detected in a fraction of a second
FAST: dict[str, Any] = {
    "secret_key": TEST_SECRET,
    "heartbeat_interval": 0.05,
    "drop_time": 0.5,
    "ack_timeout": 0.3,
    "max_inactive": 600.0,
}


async def eventually(predicate: Callable[[], Any], *, timeout: float = 3.0, what: str = "condition") -> Any:
    return await async_wait_until(predicate, timeout=timeout, interval=0.005, what=what)


async def delivered() -> None:
    """Let the bus deliver what was injected (it schedules callbacks with call_soon) and
    the node answer (its flusher yields once before publishing, to batch)."""
    for _ in range(5):
        await asyncio.sleep(0)


class Cluster:
    """Managers on one in-memory bus and one fake clock."""

    def __init__(self) -> None:
        self.bus = MemoryBus()
        self.clock = FakeClock()
        self.nodes: dict[str, SessionManager] = {}

    async def add(self, name: str, *, listeners: list[SessionListener] | None = None, **options: Any) -> SessionManager:
        config = Config(node_name=name, **{**FAST, **options})
        manager = SessionManager(config, clock=self.clock, transport=self.bus.transport(), listeners=listeners)
        await manager.start()
        self.nodes[name] = manager
        return manager

    async def start(self, *names: str, **options: Any) -> list[SessionManager]:
        managers = [await self.add(n, **options) for n in names]
        await self.joined()
        return managers

    async def joined(self) -> None:
        """Wait until every running node lists every other one as a member."""
        names = set(self.nodes)

        def complete() -> bool:
            return all(set(mg.cluster.members.live()) == names - {n} for n, mg in self.nodes.items() if mg.cluster)

        await eventually(complete, what=f"membership {sorted(names)}")

    async def crash(self, name: str) -> None:
        """Stop a node's tasks without a hand-off or a LEAVE, like SIGKILL."""
        manager = self.nodes.pop(name)
        assert manager._runner is not None
        manager._runner.cancel()
        try:
            await manager._runner
        except asyncio.CancelledError:
            pass
        manager._runner = None

    async def stop(self, name: str) -> None:
        await self.nodes.pop(name).stop()

    async def close(self) -> None:
        for name in list(self.nodes):
            await self.crash(name)

    async def __aenter__(self) -> Cluster:  # noqa: PYI034 (never subclassed)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def holders(self, token: str) -> dict[str, str]:
        """Where copies of ``token`` live: node -> "owned" / "backup"."""
        out = {}
        for name, mg in self.nodes.items():
            if token in mg.store.owned:
                out[name] = "owned"
            elif token in mg.store.backups:
                out[name] = "backup"
        return out


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with Cluster() as c:
        yield c


class Peer:
    """A cluster member that is only a codec and a channel: it sends crafted messages and
    records what it is sent, to drive a node's receive path message by message."""

    def __init__(
        self, bus: MemoryBus, name: str = "mallory", *, secret: str = TEST_SECRET, cluster: str = "clustersess",
        auto_ack: bool = False,
    ) -> None:
        self.bus = bus
        self.auto_ack = auto_ack
        self.name = name
        self.codec = Codec((secret,), cluster)
        self.incarnation = new_incarnation()
        self.prefix = cluster
        self.seq: dict[str, int] = {}
        self.received: list[m.Envelope] = []
        bus.subscribers.setdefault(self.channel(name), []).append(self._receive)
        self.claim()

    def claim(self, incarnation: str | None = None) -> None:
        """Hold our name's claim in the bus, as a real node does before it speaks."""
        self.bus.set(f"{self.prefix}:claim:{{{self.name}}}", incarnation or self.incarnation)

    def channel(self, node: str) -> str:
        return f"{self.prefix}:node:{node}"

    @property
    def all(self) -> str:
        return f"{self.prefix}:all"

    def _receive(self, channel: str, raw: bytes) -> None:
        env = self.codec.decode(channel, raw)
        self.received.append(env)
        if self.auto_ack and isinstance(env.body, m.Replicate):
            back = self.channel(env.src)
            self.bus.inject(back, self.encode(back, m.Ack(env.seq)))

    def encode(
        self, channel: str, body: m.Body, *, seq: int | None = None, inc: str | None = None, named: str | None = None
    ) -> bytes:
        """A frame of ``body`` for ``channel`` (``named``: the channel the frame claims)."""
        if seq is None:
            seq = self.seq.get(channel, 0) + 1
        self.seq[channel] = max(seq, self.seq.get(channel, 0))
        env = m.Envelope(self.prefix, named or channel, self.name, inc or self.incarnation, seq, body)
        return self.codec.encode(env)

    def heartbeat(self, hello: bool = False) -> m.Heartbeat:
        return m.Heartbeat("peer:1", 0, 0, time.time(), hello)

    async def send(self, channel: str, body: m.Body, **kw: Any) -> bytes:
        raw = self.encode(channel, body, **kw)
        assert self.bus.inject(channel, raw) >= 1, f"nobody listens on {channel}"
        await delivered()
        return raw

    def got(self, kind: type[m.Body]) -> list[Any]:
        return [e.body for e in self.received if isinstance(e.body, kind)]


async def write(manager: SessionManager, cookie: str | None, **data: Any) -> str:
    """One request that sets ``data``; returns the cookie the client then holds."""
    handle = await manager.open(cookie)
    handle.session.update(data)
    new = await cookie_after(manager, handle)
    return new or cookie or ""


async def read(manager: SessionManager, cookie: str) -> tuple[dict[str, Any], bool, str]:
    """One read-only request: (data, is_new, cookie the client then holds)."""
    handle = await manager.open(cookie)
    data, new = dict(handle.session), handle.session.is_new
    out = await cookie_after(manager, handle)
    return data, new, out or cookie


def token_of(manager: SessionManager, cookie: str) -> str:
    verified = manager.signer.verify(cookie)
    assert verified is not None
    return verified.token


def route_of(cookie: str) -> str:
    return cookie.rpartition(".")[2]
