#!/usr/bin/env python3
"""One Redis against a 3-shard Redis Cluster, and what 100 members cost the broadcast shard.

``bench``: a 4-node cluster of real ``clustersess node`` processes, first on one
``redis-server``, then on a local Redis Cluster of 3 primaries (sharded pub/sub), each
loaded the same way: ``--concurrency`` clients, each with its own session on one node,
sending sync-replicated writes (``POST /api/session/incr/n``) for ``--seconds``. Prints
writes/s and the write latency (which is mostly the backup's ack: the response waits for
it) for both, and the ratios cluster / single. On one small machine the shards share the
CPU with the nodes and the load generator, so this shows the cost of sharded pub/sub per
write, not the scaling a cluster of real machines gives.

``acks``: the same comparison without HTTP and nodes: an owner transport publishes a 1 kB
message on a backup's channel and the backup answers on the owner's (REPLICATE and ACK),
one at a time and 64 at a time; round trips per second and their latency.

``sim``: 100 real SessionManagers on the in-memory bus (clustersess.cluster.MemoryBus) and
a fake clock, run for ``--sim-seconds`` of wall time with the default heartbeat interval.
Every published message is mapped to the shard its channel's slot falls on in a 3-shard
cluster (slots as ``redis-cli --cluster create`` splits them), giving messages and
deliveries per second per shard; and 10,000 session tokens are given backups with
``Membership.backup_for`` to show how evenly backups spread over the members.

    python3 loadtests/redis_topologies.py                    # all three
    python3 loadtests/redis_topologies.py acks --acks 2000
    python3 loadtests/redis_topologies.py bench --seconds 10 --concurrency 32
    python3 loadtests/redis_topologies.py sim --members 100
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections import Counter
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from redis.crc import key_slot

from tests.cluster_utils import FAST, wait_members
from tests.redis_topologies import Cluster, Single
from tests.utils import NodeProcess

#: slot ranges of a 3-primary cluster made by redis-cli --cluster create
SHARDS = [(0, 5460), (5461, 10922), (10923, 16383)]


def shard_of(channel: str) -> int:
    slot = key_slot(channel.encode())
    return next(i for i, (lo, hi) in enumerate(SHARDS) if lo <= slot <= hi)


# -- bench --------------------------------------------------------------------------------


async def _load(nodes: list[NodeProcess], concurrency: int, seconds: float) -> tuple[int, list[float]]:
    import httpx

    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def worker(i: int, client: httpx.AsyncClient) -> None:
        node = nodes[i % len(nodes)]
        cookie: str | None = None
        while time.perf_counter() < stop:
            started = time.perf_counter()
            resp = await client.post(node.url + "/api/session/incr/n", headers={"Cookie": f"JSESSIONID={cookie}"} if cookie else {})
            latencies.append(time.perf_counter() - started)
            assert resp.status_code == 200, resp.text
            cookie = resp.cookies.get("JSESSIONID") or cookie
            client.cookies.clear()

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=10.0, limits=limits) as client:
        # warm-up: every worker gets its session (and its node its backup) first
        warm = time.perf_counter() + 1.0
        while time.perf_counter() < warm:
            await asyncio.sleep(0.1)
        await asyncio.gather(*(worker(i, client) for i in range(concurrency)))
    return len(latencies), latencies


def bench_one(topo: Any, *, nodes_n: int, concurrency: int, seconds: float) -> dict[str, float]:
    nodes = [NodeProcess(f"node{i}", redis_url=topo.url, env=dict(FAST)) for i in range(1, nodes_n + 1)]
    try:
        for node in nodes:
            node.start()
        wait_members(nodes, nodes_n, timeout=30)
        count, lat = asyncio.run(_load(nodes, concurrency, seconds))
    finally:
        for node in nodes:
            node.kill()
    lat.sort()
    return {
        "writes_per_s": count / seconds,
        "p50_ms": 1000 * lat[len(lat) // 2],
        "p99_ms": 1000 * lat[int(len(lat) * 0.99)],
        "mean_ms": 1000 * statistics.fmean(lat),
    }


def bench(args: argparse.Namespace) -> None:
    results: dict[str, dict[str, float]] = {}
    for name, make in (("one Redis", lambda: Single()), ("Redis Cluster, 3 shards", lambda: Cluster(replicas=0))):
        topo = make().start()
        try:
            results[name] = bench_one(topo, nodes_n=args.nodes, concurrency=args.concurrency, seconds=args.seconds)
        finally:
            topo.cleanup()
    print(f"\nsync writes, {args.nodes} nodes, {args.concurrency} clients, {args.seconds:.0f} s each (load {os.getloadavg()[0]:.1f})")
    print(f"{'':26} {'writes/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
    for name, r in results.items():
        print(f"{name:26} {r['writes_per_s']:10.0f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} {r['mean_ms']:8.2f}")
    single, cluster = results["one Redis"], results["Redis Cluster, 3 shards"]
    print(
        f"ratio cluster/single: throughput {cluster['writes_per_s'] / single['writes_per_s']:.2f}, "
        f"p50 {cluster['p50_ms'] / single['p50_ms']:.2f}, p99 {cluster['p99_ms'] / single['p99_ms']:.2f}"
    )


async def _ack_roundtrips(url: str, count: int, in_flight: int) -> dict[str, float]:
    """An owner and a backup transport: the owner publishes a 1 kB message on the backup's
    channel, the backup answers on the owner's, as REPLICATE and ACK do; ``in_flight``
    of them at a time."""
    from clustersess.cluster.transport import RedisTransport

    owner, backup = RedisTransport(url), RedisTransport(url)
    waiting: dict[bytes, asyncio.Future[None]] = {}

    def at_backup(channel: str, data: bytes) -> None:
        asyncio.get_running_loop().create_task(backup.publish([("bench:node:owner", data[:16])]))

    def at_owner(channel: str, data: bytes) -> None:
        fut = waiting.pop(data, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def connected(first: bool) -> None:
        return None

    tasks = [
        asyncio.create_task(backup.run(["bench:node:backup", "bench:all"], at_backup, connected)),
        asyncio.create_task(owner.run(["bench:node:owner", "bench:all"], at_owner, connected)),
    ]
    while not (owner.connected and backup.connected):
        await asyncio.sleep(0.01)
    latencies: list[float] = []
    payload = b"x" * 1000

    async def one(i: int) -> None:
        tag = f"{i:016d}".encode()
        fut = asyncio.get_running_loop().create_future()
        waiting[tag] = fut
        started = time.perf_counter()
        await owner.publish([("bench:node:backup", tag + payload)])
        await fut
        latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    for i in range(0, count, in_flight):
        await asyncio.gather(*(one(j) for j in range(i, min(count, i + in_flight))))
    elapsed = time.perf_counter() - started
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await owner.close()
    await backup.close()
    latencies.sort()
    return {"per_s": count / elapsed, "p50_ms": 1000 * latencies[len(latencies) // 2], "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)]}


def acks(args: argparse.Namespace) -> None:
    rows: dict[str, dict[int, dict[str, float]]] = {}
    for name, make in (("one Redis", lambda: Single()), ("Redis Cluster, 3 shards", lambda: Cluster(replicas=0))):
        topo = make().start()
        try:
            rows[name] = {k: asyncio.run(_ack_roundtrips(topo.url, args.acks, k)) for k in (1, 64)}
        finally:
            topo.cleanup()
    print(f"\nreplicate -> ack round trips through the transport, {args.acks} each (load {os.getloadavg()[0]:.1f})")
    print(f"{'':26} {'1 in flight: /s':>16} {'p50 ms':>7} {'p99 ms':>7} {'64 in flight: /s':>17} {'p50 ms':>7} {'p99 ms':>7}")
    for name, r in rows.items():
        a, b = r[1], r[64]
        print(f"{name:26} {a['per_s']:16.0f} {a['p50_ms']:7.2f} {a['p99_ms']:7.2f} {b['per_s']:17.0f} {b['p50_ms']:7.2f} {b['p99_ms']:7.2f}")
    single, cluster = rows["one Redis"], rows["Redis Cluster, 3 shards"]
    print(
        f"ratio cluster/single: 1 in flight {cluster[1]['per_s'] / single[1]['per_s']:.2f}, "
        f"64 in flight {cluster[64]['per_s'] / single[64]['per_s']:.2f}; "
        f"p50 {cluster[1]['p50_ms'] / single[1]['p50_ms']:.2f}"
    )


# -- sim ----------------------------------------------------------------------------------


async def _simulate(members: int, seconds: float) -> tuple[Counter[int], Counter[int], Counter[str], list[str]]:
    from clustersess import Config, FakeClock, SessionManager
    from clustersess.cluster import MemoryBus

    bus = MemoryBus()
    clock = FakeClock()
    managers = []
    for i in range(members):
        config = Config(node_name=f"node{i:03d}", secret_key=("sim-secret-" + "x" * 20,), max_inactive=600.0)
        manager = SessionManager(config, clock=clock, transport=bus.transport())
        await manager.start()
        managers.append(manager)
    await asyncio.sleep(1.0)  # everyone has heard everyone
    bus.published.clear()
    started = time.perf_counter()
    await asyncio.sleep(seconds)
    elapsed = time.perf_counter() - started
    published = list(bus.published)
    messages: Counter[int] = Counter()
    deliveries: Counter[int] = Counter()
    for channel, _ in published:
        shard = shard_of(channel)
        messages[shard] += 1
        deliveries[shard] += len(bus.subscribers.get(channel, ())) if channel.endswith(":all") else 1
    view = managers[0].cluster.members if managers[0].cluster is not None else None
    assert view is not None
    spread: Counter[str] = Counter()
    for t in range(10_000):
        backup = view.backup_for(f"token-{t:05d}")
        if backup is not None:
            spread[backup] += 1
    for manager in managers:
        await manager.stop()
    scale = 1 / elapsed
    return (
        Counter({k: int(v * scale) for k, v in messages.items()}),
        Counter({k: int(v * scale) for k, v in deliveries.items()}),
        spread,
        [f"node{i:03d}" for i in range(members)],
    )


def sim(args: argparse.Namespace) -> None:
    import logging

    logging.getLogger("clustersess").setLevel(logging.ERROR)  # 100 members leaving, one by one
    messages, deliveries, spread, names = asyncio.run(_simulate(args.members, args.sim_seconds))
    print(f"\n{args.members} members, heartbeat 0.5 s, {args.sim_seconds:.0f} s on the in-memory bus (load {os.getloadavg()[0]:.1f})")
    print(f"expected on the broadcast shard: {args.members / 0.5:.0f} heartbeats/s, each to {args.members} members")
    print(f"broadcast channel clustersess:all is on shard {shard_of('clustersess:all')} (slot {key_slot(b'clustersess:all')})")
    print(f"{'shard':>6} {'messages/s':>11} {'deliveries/s':>13} {'direct channels':>16}")
    channels = Counter(shard_of(f"clustersess:node:{n}") for n in names)
    for shard in range(len(SHARDS)):
        print(f"{shard:>6} {messages[shard]:>11} {deliveries[shard]:>13} {channels[shard]:>16}")
    counts = [spread.get(n, 0) for n in names[1:]]  # node000 computed the view; it is not a candidate
    mean = statistics.fmean(counts)
    print(
        f"backups of 10,000 sessions over {len(counts)} candidates: mean {mean:.1f}, min {min(counts)}, "
        f"max {max(counts)}, stdev {statistics.pstdev(counts):.1f} ({statistics.pstdev(counts) / mean:.1%} of the mean)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", choices=["bench", "acks", "sim", "all"], default="all")
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--members", type=int, default=100)
    parser.add_argument("--sim-seconds", type=float, default=4.0)
    parser.add_argument("--acks", type=int, default=2000, help="round trips per topology and concurrency")
    args = parser.parse_args()
    if args.what in ("sim", "all"):
        sim(args)
    if args.what in ("acks", "all"):
        acks(args)
    if args.what in ("bench", "all"):
        bench(args)


if __name__ == "__main__":
    main()
