"""RedisTransport against real Redis deployments: one server, Redis Cluster, Sentinel.

The same interface and semantics in every mode: pub/sub with receiver counts, the name
claim and lease scripts (keys of the ``<cluster>:claim:{<name>}`` form), error replies as
``TransportError(kind=...)``, ``reset()``, the watchdog, and each deployment's own
failover (a shard's replica promoted, a Sentinel failover, slots moved by resharding).
The silent-connection test puts a minimal fault proxy of its own between the transport
and Redis (tests/faultproxy.py is not on main yet).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis

from clustersess.cluster.transport import RedisTransport, TransportError
from tests.redis_topologies import Cluster, Sentinels, running

pytestmark = pytest.mark.timeout(120)

ME, ALL = "clustersess:node:n1", "clustersess:all"
CLAIM, ADOPTED = "clustersess:claim:{n1}", "clustersess:adopted:{n1}:inc1"


class Probe:
    """Records what a transport's ``run`` delivers."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.connects: list[tuple[bool, float]] = []

    def on_message(self, channel: str, data: bytes) -> None:
        self.messages.append((channel, data))

    async def on_connect(self, first: bool) -> None:
        self.connects.append((first, time.monotonic()))

    async def wait(self, what: str, predicate: Any, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            await asyncio.sleep(0.02)

    def reconnects(self) -> list[float]:
        return [t for first, t in self.connects if not first]


@contextlib.asynccontextmanager
async def subscribed(url: str, **kw: Any) -> AsyncIterator[tuple[RedisTransport, Probe]]:
    transport = RedisTransport(url, **kw)
    probe = Probe()
    task = asyncio.create_task(transport.run([ME, ALL], probe.on_message, probe.on_connect))
    try:
        await probe.wait("the first subscription", lambda: transport.connected)
        yield transport, probe
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await transport.close()


async def roundtrip(transport: RedisTransport, probe: Probe, tag: bytes, timeout: float = 15.0) -> None:
    """Publish on both channels until both arrive (publishes may fail while a failover runs)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            counts = await transport.publish([(ME, tag + b"-me"), (ALL, tag + b"-all")])
        except TransportError:
            counts = [0, 0]
        # >= 1: a connection the watchdog gave up on may live on at Redis's end until
        # Redis's own tcp-keepalive drops it (the proxy test), and it counts as a receiver.
        if min(counts) >= 1:
            await probe.wait("delivery", lambda: {(ME, tag + b"-me"), (ALL, tag + b"-all")} <= set(probe.messages))
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"no round trip for {tag!r} (counts {counts})")
        await asyncio.sleep(0.1)


VARIANTS = [
    pytest.param("single", {}, id="single"),
    pytest.param("single", {"tls": True, "acl": True}, id="single-tls-acl"),
    pytest.param("cluster", {"replicas": 0}, id="cluster"),
    pytest.param("cluster", {"replicas": 0, "tls": True, "acl": True}, id="cluster-tls-acl"),
    pytest.param("sentinel", {}, id="sentinel"),
    pytest.param("sentinel", {"tls": True, "acl": True}, id="sentinel-tls-acl"),
]


@pytest.mark.parametrize(("kind", "options"), VARIANTS)
async def test_same_interface_in_every_mode(kind: str, options: dict[str, Any]) -> None:
    with running(kind, **options) as topo:
        async with subscribed(topo.url) as (transport, probe):
            assert transport.mode == kind
            assert [first for first, _ in probe.connects] == [True]
            counts = await transport.publish([(ME, b"a"), (ALL, b"b"), ("clustersess:node:nobody", b"c")])
            assert counts == [1, 1, 0]
            await probe.wait("both messages", lambda: len(probe.messages) == 2)
            assert sorted(probe.messages) == [(ALL, b"b"), (ME, b"a")]
            # the name claim and the lease, with keys that share a slot through {n1}
            assert await transport.claim(CLAIM, "inc1", 5.0) == "inc1"
            assert await transport.claim(CLAIM, "inc2", 5.0) == "inc1"
            assert await transport.get(CLAIM) == "inc1"
            assert await transport.refresh(CLAIM, "inc1", 5.0, ADOPTED) == "held"
            assert await transport.adopt(CLAIM, "inc1", ADOPTED, 5.0) is False
            assert await transport.refresh(CLAIM, "inc2", 5.0, "clustersess:adopted:{n1}:inc2") == "taken:inc1"
            await transport.release(CLAIM, "inc2")  # not the holder: nothing happens
            assert await transport.get(CLAIM) == "inc1"
            await transport.release(CLAIM, "inc1")
            assert await transport.get(CLAIM) is None
            assert await transport.adopt(CLAIM, "inc1", ADOPTED, 5.0) is True
            assert await transport.refresh(CLAIM, "inc1", 5.0, ADOPTED) == "adopted"
            # reset(): the subscription starts over at once and the node hears of it
            started = time.monotonic()
            transport.reset()
            await probe.wait("the reconnect after reset()", lambda: probe.reconnects())
            assert probe.reconnects()[0] - started < 1.0
            await roundtrip(transport, probe, b"after-reset")
            if options.get("acl"):
                # a channel and a key outside the ACL user's patterns: NOPERM, wrapped
                with pytest.raises(TransportError) as info:
                    await transport.publish([("elsewhere:all", b"x")])
                assert info.value.kind == "noperm"
                with pytest.raises(TransportError) as info:
                    await transport.claim("elsewhere:claim:{n1}", "inc1", 5.0)
                assert info.value.kind == "noperm"


async def test_cluster_misuse_is_refused_with_a_clear_message(caplog: pytest.LogCaptureFixture) -> None:
    with running("cluster", replicas=0) as topo:
        transport = RedisTransport(topo.url)
        try:
            with pytest.raises(AssertionError, match="hash tag"):
                await transport.refresh("clustersess:claim:n1", "i", 1.0, "clustersess:adopted:n1:i")
        finally:
            await transport.close()
        # a database number on a Redis Cluster: every call fails, the fix is logged once
        transport = RedisTransport(topo.url + "/2")
        try:
            for _ in range(3):
                with pytest.raises(TransportError, match="only database 0") as info:
                    await transport.publish([(ALL, b"x")])
                assert info.value.kind == "error"
        finally:
            await transport.close()
        assert sum("only database 0" in r.getMessage() for r in caplog.records) == 1


async def test_error_replies_become_transport_errors() -> None:
    """OOM under noeviction and READONLY from a replica never escape as redis-py errors."""
    with running("single") as topo, running("single") as replica_topo:
        admin = topo.server.client()
        async with subscribed(topo.url) as (transport, _):
            admin.config_set("maxmemory", "1")
            admin.config_set("maxmemory-policy", "noeviction")
            with pytest.raises(TransportError) as info:
                await transport.claim(CLAIM, "inc1", 5.0)
            assert info.value.kind == "oom"
            admin.config_set("maxmemory", "0")
            assert await transport.claim(CLAIM, "inc1", 5.0) == "inc1"
        # a replica answers READONLY; after finding "the primary" again it still does
        replica = replica_topo.server.client()
        replica.replicaof("127.0.0.1", topo.server.port)
        transport = RedisTransport(replica_topo.url)
        try:
            with pytest.raises(TransportError) as info:
                await transport.claim(CLAIM, "inc1", 5.0)
            assert info.value.kind == "readonly"
            # promoted (a managed service's failover moved its endpoint here): works again,
            # same transport, no restart
            replica.replicaof("NO", "ONE")
            assert await transport.claim(CLAIM, "inc1", 5.0) == "inc1"
        finally:
            await transport.close()
        admin.close()
        replica.close()
    with pytest.raises(TransportError) as info:
        await RedisTransport("redis://127.0.0.1:1/0").publish([(ALL, b"x")])
    assert info.value.kind == "connection"


# -- the watchdog -------------------------------------------------------------------------


class BlackholeProxy:
    """A TCP proxy that can go silent: it keeps every connection open (no FIN, no RST)
    and drops whatever either side sends, like a NAT that forgot the flow."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.silent = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> BlackholeProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        self._writers += [writer, up_writer]

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    if not self.silent:
                        dst.write(data)
                        await dst.drain()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    async def close(self) -> None:
        for w in self._writers:
            w.close()
        if self._server is not None:
            self._server.close()


async def test_watchdog_notices_a_silently_dead_connection() -> None:
    """A proxy goes silent with the connection open: the watchdog PINGs, hears nothing,
    and starts over within 2 x probe_interval (+ a tick); once traffic flows again the
    node gets on_connect(False). Bound checked: 2.5 s with the default probe_interval 1 s."""
    with running("single") as topo:
        proxy = await BlackholeProxy(topo.server.port).start()
        try:
            async with subscribed(f"redis://127.0.0.1:{proxy.port}/0") as (transport, probe):
                await roundtrip(transport, probe, b"before")
                proxy.silent = True
                went_silent = time.monotonic()
                await probe.wait("the watchdog", lambda: not transport.connected, timeout=10)
                noticed = time.monotonic() - went_silent
                assert noticed < 2.5 + 0.5, noticed  # +0.5: a loaded 2-core machine
                await asyncio.sleep(1.0)  # reconnect attempts meet silence too
                assert not transport.connected
                proxy.silent = False
                healed = time.monotonic()
                await probe.wait("the reconnect", lambda: probe.reconnects(), timeout=10)
                assert probe.reconnects()[0] - healed < 2.0 + 1.0 + 0.5  # backoff cap + handshake
                await roundtrip(transport, probe, b"after")
        finally:
            await proxy.close()


async def test_a_stalled_event_loop_is_not_a_dead_connection() -> None:
    """Our own stall (a blocked loop, a GC pause) is no evidence against Redis: no reconnect."""
    with running("single") as topo:
        async with subscribed(topo.url) as (transport, probe):
            await roundtrip(transport, probe, b"before")
            time.sleep(3.0)  # noqa: ASYNC251 -- the point: block the loop past the watchdog's bound
            await asyncio.sleep(1.0)
            assert transport.connected and not probe.reconnects()
            await roundtrip(transport, probe, b"after")


@pytest.mark.parametrize("kind", ["cluster", "sentinel"])
async def test_watchdog_notices_a_frozen_server(kind: str) -> None:
    """SIGSTOP the server under the subscription (its sockets stay open, nothing answers):
    the watchdog notices within its bound; after SIGCONT the node gets on_connect(False)."""
    # Timeouts long enough that neither Redis Cluster nor Sentinel fails over meanwhile.
    options: dict[str, Any] = (
        {"replicas": 0, "node_timeout_ms": 15000} if kind == "cluster" else {"down_after_ms": 15000}
    )
    with running(kind, **options) as topo:
        async with subscribed(topo.url) as (transport, probe):
            await roundtrip(transport, probe, b"before")
            frozen = topo.primary_for(ALL) if isinstance(topo, Cluster) else topo.current_primary()
            assert frozen is not None and frozen.proc is not None
            frozen.proc.send_signal(signal.SIGSTOP)
            stopped = time.monotonic()
            try:
                await probe.wait("the watchdog", lambda: not transport.connected, timeout=10)
                assert time.monotonic() - stopped < 3.0
            finally:
                frozen.proc.send_signal(signal.SIGCONT)
            await probe.wait("the reconnect", lambda: probe.reconnects(), timeout=15)
            await roundtrip(transport, probe, b"after")


# -- each deployment's own failover ------------------------------------------------------


def _move_slot(topo: Cluster, key: str) -> tuple[int, int]:
    """Move the slot of ``key`` (with its keys) to another primary; returns (from, to) ports."""
    rc = topo.cluster_client()
    try:
        slot = rc.keyslot(key)
        source = topo.primary_for(key)
        target = next(
            n
            for n in topo.nodes
            if n.running and n is not source and n.client().execute_command("ROLE")[0] == b"master"
        )
        src, dst = source.client(), target.client()
        src_id, dst_id = src.execute_command("CLUSTER MYID").decode(), dst.execute_command("CLUSTER MYID").decode()
        dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
        for k in src.execute_command("CLUSTER GETKEYSINSLOT", slot, 100):
            src.execute_command("MIGRATE", "127.0.0.1", target.port, k, 0, 5000)
        for node in (dst, src):
            node.execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
        return source.port, target.port
    finally:
        rc.close()


async def test_cluster_subscriptions_and_claims_follow_resharding() -> None:
    with running("cluster", replicas=0) as topo:
        async with subscribed(topo.url) as (transport, probe):
            assert await transport.claim(CLAIM, "inc1", 30.0) == "inc1"
            before = topo.primary_for(ME).port
            moved = _move_slot(topo, ME)
            assert moved[0] == before
            _move_slot(topo, CLAIM)
            # Redis ends the subscription of a slot that left the node: a gap, then back
            await probe.wait("the re-subscription", lambda: probe.reconnects())
            await roundtrip(transport, probe, b"after-move")
            assert topo.primary_for(ME).port == moved[1]
            # the claim key moved with its slot; MOVED is followed
            assert await transport.refresh(CLAIM, "inc1", 30.0, ADOPTED) == "held"


async def test_cluster_shard_failover_is_survived_like_a_restart() -> None:
    with running("cluster", replicas=1) as topo:
        async with subscribed(topo.url, backoff_cap=0.5) as (transport, probe):
            assert await transport.claim(CLAIM, "inc1", 30.0) == "inc1"
            await roundtrip(transport, probe, b"before")
            topo.fail_over(ALL)  # the shard of the broadcast channel: everyone's subscription
            promoted = time.monotonic()
            await probe.wait("the reconnect", lambda: probe.reconnects(), timeout=20)
            assert probe.reconnects()[-1] - promoted < 3.0
            await roundtrip(transport, probe, b"after")
            topo.heal()
            await roundtrip(transport, probe, b"healed")


async def test_sentinel_failover_is_followed() -> None:
    with running("sentinel") as topo:
        async with subscribed(topo.url, backoff_cap=0.5) as (transport, probe):
            await roundtrip(transport, probe, b"before")
            old = topo.current_primary()
            assert old is not None
            old.stop(signal.SIGKILL)
            # no primary yet: calls fail as TransportError, nothing else
            with pytest.raises(TransportError):
                await transport.publish([(ALL, b"x")])
            await asyncio.get_running_loop().run_in_executor(None, _wait_promoted, topo, old)
            promoted = time.monotonic()
            await probe.wait("the reconnect", lambda: probe.reconnects(), timeout=20)
            assert probe.reconnects()[-1] - promoted < 3.0  # not longer than the backoff cap + handshake
            await roundtrip(transport, probe, b"after")
            assert await transport.claim(CLAIM, "inc1", 30.0) == "inc1"
            topo.failed = old
            await asyncio.get_running_loop().run_in_executor(None, topo.heal)
            # A graceful failover demotes a live primary: READONLY means find it again.
            count = len(probe.reconnects())
            await asyncio.get_running_loop().run_in_executor(None, _graceful_failover, topo)
            await probe.wait("the move to the new primary", lambda: len(probe.reconnects()) > count, timeout=20)
            await roundtrip(transport, probe, b"after-graceful")
            assert await transport.claim(CLAIM, "inc1", 30.0) == "inc1"


def _graceful_failover(topo: Sentinels) -> None:
    """SENTINEL FAILOVER, retried while Sentinel finds the replica not yet fit (NOGOODSLAVE
    right after it rejoined)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            with topo.sentinels[0].client() as s:
                s.execute_command("SENTINEL FAILOVER", topo.service)
            return
        except redis.ResponseError as exc:
            assert "NOGOODSLAVE" in str(exc) and time.monotonic() < deadline, exc
            time.sleep(0.5)


def _wait_promoted(topo: Sentinels, old: Any) -> None:
    deadline = time.monotonic() + 30
    while (p := topo.current_primary()) is None or p is old:
        assert time.monotonic() < deadline, "no promotion"
        time.sleep(0.1)
