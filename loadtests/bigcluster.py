#!/usr/bin/env python3
"""A node holding 200,000 sessions, and what it costs (issue 12).

Real processes: a ``redis-server``, an owner (node1) and its backup (node2), later a
third node, each ``clustersess node loadtests.bigapp:app`` (the demo app plus debug
endpoints, see ``bigapp.py``) with the default timing (heartbeat 0.5 s, drop time 3 s).

1. **Load**: ``--sessions`` sessions of about ``--payload`` bytes of JSON are written to
   node1 over many keep-alive connections (each POST without a cookie creates one; sync
   replication, so each is acknowledged by node2). Memory per session is the RSS delta of
   each process over the load divided by the sessions; then tracemalloc is started in
   both nodes, ``--traced`` more sessions are written, and the traced bytes per session
   are reported (tracemalloc slows allocation down and uses memory of its own, which is
   why it is off during the main load and the RSS figure). Target: under 1.5x the
   payload plus 400 bytes, on the owner and on the backup.
2. ``--sweep-sessions`` sessions are written to node2 (to be expired later), and a few
   hundred small probe sessions to each node.
3. A steady client load (``--rate`` requests/s, half reads, half increments, open loop,
   on the probe sessions, each sent to its owner) runs from here to the end, and request
   latency is reported per phase and node:

   * **baseline**: nothing else happens;
   * **resync**: ``CLIENT KILL TYPE pubsub`` on the nodes' Redis (every node reconnects and
     resyncs);
   * **rebalance**: node3 starts and joins; about half of node1's sessions get node3 as
     their backup;
   * **sweep**: node2's sweep sessions all expire at once, in one pass of the real
     sweeper (``SessionManager.sweep_pass()``) on the owner and on the backups; the debug
     endpoint only moves their last access back (owner's and backups' copies) and
     schedules that pass now, instead of waiting up to a minute for the sweeper;
   * **adoption**: node1 is SIGKILLed; node2 and node3 each adopt the half of its
     sessions they back up (100,000 each at full size) and give them new backups. Reported:
     time until node1 was dropped and until the survivors owned all its sessions.

   Target: p99 under 20 ms. Finally a sample of node1's sessions is read through node2.

    python3 loadtests/bigcluster.py                     # the issue's size (heavy: ~6 GB, minutes)
    python3 loadtests/bigcluster.py --sessions 20000    # a quick run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import random
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import httpx
import redis.asyncio as aioredis

from tests.utils import NodeProcess, RedisServer

APP = "loadtests.bigapp:app"
P99_TARGET_MS = 20.0
#: reconnect instead of reusing a connection idle this long (uvicorn closes at 5 s)
IDLE_CLOSE = 2.0
#: seconds of margin around the sweep sessions' creation times (copies carry ages, not
#: the owner's timestamps, so a backup's created time can differ by a little)
SLACK = 0.5


# -- a small HTTP/1.1 keep-alive client -------------------------------------------------


class Conn:
    """One keep-alive HTTP/1.1 connection: cheaper per request than any client library,
    so the load generator takes little CPU away from the nodes on a 2-core machine."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        #: time.monotonic() of the last answer
        self.used = time.monotonic()
        self._r: asyncio.StreamReader | None = None
        self._w: asyncio.StreamWriter | None = None

    async def request(
        self, method: str, path: str, *, body: bytes = b"", cookie: str | None = None
    ) -> tuple[int, str | None, bytes]:
        """(status, the JSESSIONID it sets or None, body). Reconnects if needed."""
        if self._w is None:
            self._r, self._w = await asyncio.open_connection(self.host, self.port)
        assert self._r is not None
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {len(body)}\r\n"
        if cookie:
            head += f"Cookie: JSESSIONID={cookie}\r\n"
        if body:
            head += "Content-Type: application/json\r\n"
        try:
            self._w.write(head.encode() + b"\r\n" + body)
            raw = await self._r.readuntil(b"\r\n\r\n")
            lines = raw.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            length, set_cookie = 0, None
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name = name.lower()
                if name == "content-length":
                    length = int(value)
                elif name == "set-cookie" and value.strip().startswith("JSESSIONID="):
                    set_cookie = value.strip()[len("JSESSIONID=") :].split(";")[0]
            data = await self._r.readexactly(length)
        except BaseException:
            self.close()
            raise
        self.used = time.monotonic()
        return status, set_cookie, data

    def close(self) -> None:
        if self._w is not None:
            self._w.close()
        self._r = self._w = None


def payload_body(i: int, size: int, noise: str) -> bytes:
    """A session of about ``size`` bytes of JSON: an id and a slice of random text."""
    start = (i * 7919) % (len(noise) - size)
    return json.dumps({"u": i, "pad": noise[start : start + max(0, size - 24)]}).encode()


async def load(
    host: str, port: int, count: int, size: int, *, concurrency: int, sample_every: int = 0, start: int = 0
) -> tuple[float, list[tuple[int, str]], int]:
    """Create ``count`` sessions on a node; (seconds, sampled (index, cookie), errors)."""
    noise = os.urandom(4096).hex()
    todo = iter(range(start, start + count))
    sample: list[tuple[int, str]] = []
    errors = 0

    async def worker() -> None:
        nonlocal errors
        conn = Conn(host, port)
        for i in todo:
            try:
                status, cookie, _ = await conn.request("POST", "/api/session", body=payload_body(i, size, noise))
            except (OSError, asyncio.IncompleteReadError):
                errors += 1
                continue
            if status != 200 or cookie is None:
                errors += 1
            elif sample_every and i % sample_every == 0:
                sample.append((i, cookie))
        conn.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started, sample, errors


# -- the steady client load --------------------------------------------------------------


@dataclasses.dataclass
class Sample:
    at: float  # time.monotonic() when sent
    node: str
    kind: str  # "read" | "write"
    ms: float | None  # None: failed
    error: str = ""


class Prober:
    """Open-loop requests at a fixed rate on probe sessions, each sent to its owner."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.targets: dict[str, tuple[NodeProcess, list[str]]] = {}
        self.samples: list[Sample] = []
        self._idle: dict[str, list[Conn]] = {}
        self._task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()

    def target(self, node: NodeProcess, cookies: list[str]) -> None:
        self.targets[node.name] = (node, cookies)

    def drop(self, name: str) -> None:
        self.targets.pop(name, None)
        for conn in self._idle.pop(name, []):
            conn.close()

    async def _one(self, node: NodeProcess, cookie: str, kind: str) -> None:
        pool = self._idle.setdefault(node.name, [])
        conn = pool.pop() if pool else Conn(node.host, node.port)
        if time.monotonic() - conn.used > IDLE_CLOSE:
            conn.close()  # the server may have closed it (uvicorn: after 5 s idle) as we send
        at = time.monotonic()
        t0 = time.perf_counter()
        error = ""
        try:
            if kind == "read":
                status, _, _ = await conn.request("GET", "/api/session", cookie=cookie)
            else:
                status, _, _ = await conn.request("POST", "/api/session/incr/n", cookie=cookie)
            ms: float | None = (time.perf_counter() - t0) * 1000
            if status != 200:
                ms, error = None, f"HTTP {status}"
        except (OSError, asyncio.IncompleteReadError) as exc:
            ms, error = None, type(exc).__name__
        else:
            if node.name in self.targets:
                pool.append(conn)
        self.samples.append(Sample(at, node.name, kind, ms, error))

    async def _run(self) -> None:
        step = 1.0 / self.rate
        due = time.monotonic()
        k = 0
        while True:
            due += step
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            if not self.targets:
                continue
            names = sorted(self.targets)
            node, cookies = self.targets[names[k % len(names)]]
            kind = "read" if (k // len(names)) % 2 == 0 else "write"
            k += 1
            task = asyncio.create_task(self._one(node, random.choice(cookies), kind))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._inflight:
            await asyncio.wait(self._inflight, timeout=10)
        for pool in self._idle.values():
            for conn in pool:
                conn.close()

    def writes(self, node: str, t0: float, t1: float) -> int:
        """Successful probe writes on ``node`` sent in [t0, t1] (each is one replication)."""
        return sum(
            1 for s in self.samples if s.node == node and s.kind == "write" and s.ms is not None and t0 <= s.at <= t1
        )

    def window(self, t0: float, t1: float) -> dict[str, list[Sample]]:
        out: dict[str, list[Sample]] = {}
        for s in self.samples:
            if t0 <= s.at <= t1:
                out.setdefault(s.node, []).append(s)
        return out


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


# -- the cluster -------------------------------------------------------------------------


class Cluster:
    def __init__(self, redis_server: RedisServer, env: dict[str, str]) -> None:
        self.redis = redis_server
        self.env = env
        self.nodes: dict[str, NodeProcess] = {}
        self.http = httpx.AsyncClient(timeout=60.0)

    def start(self, name: str) -> NodeProcess:
        node = NodeProcess(name, app=APP, redis_url=self.redis.url, env=self.env, startup_timeout=60)
        self.nodes[name] = node
        node.start()
        return node

    async def status(self, name: str) -> dict[str, Any]:
        resp = await self.http.get(self.nodes[name].url + "/cluster.json")
        return resp.json()  # type: ignore[no-any-return]

    async def debug(self, name: str, path: str, method: str = "GET") -> dict[str, Any]:
        resp = await self.http.request(method, self.nodes[name].url + path)
        resp.raise_for_status()
        return resp.json()  # type: ignore[no-any-return]

    def live(self) -> list[str]:
        return [n for n, p in self.nodes.items() if p.running]

    async def settled(self, names: list[str] | None = None) -> bool:
        """Every node connected, no rebalance running, nothing waiting for an ack, all
        members seen. (Acks alone are not enough: between a rebalance's slices, all of
        them can be in, and a rebalance taken for settled at 40,000 of its 110,000
        sessions ran on into the sweep.)"""
        names = names or self.live()
        for name in names:
            st = await self.status(name)
            others = [m for m in st["members"] if not m.get("self")]
            busy = st.get("pending_replication", 0) or st.get("rebalancing")
            if not st.get("connected") or busy or len(others) != len(names) - 1:
                return False
        return True

    async def steady(self, names: list[str] | None = None, gap: float = 0.5) -> bool:
        """:meth:`settled` twice, ``gap`` seconds apart: the probe writes keep a few acks
        outstanding at any moment, a resync or rebalance thousands for seconds."""
        if not await self.settled(names):
            return False
        await asyncio.sleep(gap)
        return await self.settled(names)

    def stop(self) -> None:
        for node in self.nodes.values():
            node.kill()


async def wait_for(check: Callable[[], Awaitable[bool]], timeout: float, interval: float = 0.25) -> float | None:
    """Seconds until ``check()`` was true, or None after ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        with contextlib.suppress(httpx.HTTPError):
            if await check():
                return time.monotonic() - started
        await asyncio.sleep(interval)
    return None


# -- machine state -----------------------------------------------------------------------


def cpu_jiffies() -> int:
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    idle = int(fields[3]) + int(fields[4])
    return sum(int(x) for x in fields[:8]) - idle


def proc_jiffies(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except OSError:
        return 0


@dataclasses.dataclass
class Phase:
    name: str
    t0: float
    t1: float
    settled: float | None
    info: dict[str, Any]
    #: node -> the event loop's stalls and the GC's long passes during the phase (see
    #: bigapp.py: {"stalls": [[when, seconds]], "collections": [[when, seconds, gen]]})
    stalls: dict[str, dict[str, list[list[float]]]] = dataclasses.field(default_factory=dict)


def report_line(phase: Phase, prober: Prober) -> list[str]:
    lines = []
    for node, samples in sorted(prober.window(phase.t0, phase.t1).items()):
        ok = [s.ms for s in samples if s.ms is not None]
        errors: dict[str, int] = {}
        for s in samples:
            if s.ms is None:
                errors[s.error] = errors.get(s.error, 0) + 1
        failed = ", ".join(f"{n} {e}" for e, n in sorted(errors.items())) or "0"
        p99 = pct(ok, 99)
        by_kind = "/".join(
            f"{pct([x.ms for x in samples if x.ms is not None and x.kind == k], 99):.0f}" for k in ("read", "write")
        )
        seen = phase.stalls.get(node, {})
        stalls = [late for _, late in seen.get("stalls", [])]
        stall = f"{max(stalls) * 1000:.0f} ms, {sum(stalls) * 1000:.0f} ms" if stalls else "none"
        gcs = seen.get("collections", [])
        longest = max(gcs, key=lambda c: c[1]) if gcs else None
        gc_cell = f"{len(gcs)}, {longest[1] * 1000:.0f} ms (gen {longest[2]:.0f})" if longest else "none"
        lines.append(
            f"| {phase.name} | {node} | {len(samples)} | {pct(ok, 50):.1f} | {p99:.1f} | "
            f"{max(ok, default=float('nan')):.1f} | {by_kind} | {failed} | {p99 / P99_TARGET_MS:.2f}x | {stall} | {gc_cell} |"
        )
    return lines


# -- the run -----------------------------------------------------------------------------


async def run(args: argparse.Namespace, out: list[str]) -> int:
    env = {"CLUSTERSESS_SECRET": "bigcluster-secret-not-for-production"}
    load_avg = os.getloadavg()
    jiffies0, wall0 = cpu_jiffies(), time.monotonic()
    server = RedisServer().start()
    cluster = Cluster(server, env)
    phases: list[Phase] = []
    prober = Prober(args.rate)
    spent: list[int] = []  # CPU time of processes that ended

    def say(line: str) -> None:
        print(line, flush=True)
        out.append(line)

    try:
        node1, node2 = cluster.start("node1"), cluster.start("node2")
        assert await wait_for(cluster.settled, 30), "the two nodes did not see each other"
        say(
            f"# bigcluster: {args.sessions:,} sessions of ~{args.payload} B; redis {server.port}; "
            f"load average at start {load_avg[0]:.2f} {load_avg[1]:.2f} {load_avg[2]:.2f}, {os.cpu_count()} CPUs"
        )

        # 1. load, with RSS before and after
        rss0 = {n: (await cluster.debug(n, "/debug/memory?collect=1"))["rss"] for n in ("node1", "node2")}
        secs, sample, errors = await load(
            node1.host,
            node1.port,
            args.sessions,
            args.payload,
            concurrency=args.concurrency,
            sample_every=max(1, args.sessions // 1000),
        )
        say(f"loaded {args.sessions:,} sessions in {secs:.1f} s ({args.sessions / secs:,.0f}/s), {errors} errors")
        took = await wait_for(cluster.settled, 300)
        st2 = await cluster.status("node2")
        say(
            f"replication settled {took if took is None else round(took, 1)} s later; "
            f"node2 backs up {st2['sessions_backed_up']:,}"
        )
        mem = {n: await cluster.debug(n, "/debug/memory?collect=1") for n in ("node1", "node2")}
        payload = mem["node1"]["payload_owned"] / max(1, mem["node1"]["owned"])
        target = 1.5 * payload + 400
        rows = []
        for name, role, count in (
            ("node1", "owner", mem["node1"]["owned"]),
            ("node2", "backup", mem["node2"]["backups"]),
        ):
            per = (mem[name]["rss"] - rss0[name]) / max(1, count)
            rows.append((name, role, count, per))

        # tracemalloc sample
        traced = {}
        for n in ("node1", "node2"):
            traced[n] = (await cluster.debug(n, "/debug/tracemalloc?on=1", "POST"))["traced"]
        await load(node1.host, node1.port, args.traced, args.payload, concurrency=args.concurrency, start=args.sessions)
        await wait_for(cluster.settled, 120)
        # The owner keeps a session's decoded object while it is in use; the sweeper drops
        # it once the session idled a minute. Its release pass, run now: the idle figure.
        idle: dict[str, float] = {}
        for n in ("node1", "node2"):
            busy = (await cluster.debug(n, "/debug/memory?collect=1"))["traced"]
            await cluster.debug(n, "/debug/release", "POST")
            after = (await cluster.debug(n, "/debug/memory?collect=1"))["traced"]
            idle[n] = (after - traced[n]) / args.traced
            traced[n] = (busy - traced[n]) / args.traced
            await cluster.debug(n, "/debug/tracemalloc?on=0", "POST")
        say("")
        say(f"memory per session (payload {payload:.0f} B of JSON; target 1.5 x payload + 400 = {target:.0f} B):")
        say("")
        say(
            "| node | holds | sessions | RSS delta / session | vs target (RSS) | traced / session, just written |"
            " traced / session, idle (after the sweeper's release) | vs target (idle) |"
        )
        say("|---|---|---:|---:|---:|---:|---:|---:|")
        for name, role, count, per in rows:
            say(
                f"| {name} | {role} | {count:,} | {per:,.0f} B | {per / target:.2f}x | {traced[name]:,.0f} B |"
                f" {idle[name]:,.0f} B | {idle[name] / target:.2f}x |"
            )
        say("")

        # 2. sessions to sweep later (owned by node2), probe sessions; apart in time by a
        # margin, so that the expiry's window by creation time catches nothing else
        await asyncio.sleep(SLACK * 2)
        t_from = time.time()
        await load(
            node2.host,
            node2.port,
            args.sweep_sessions,
            args.payload,
            concurrency=args.concurrency,
            start=args.sessions + args.traced,
        )
        t_to = time.time()
        await asyncio.sleep(SLACK * 2)
        probes: dict[str, list[str]] = {}

        async def make_probes(name: str) -> None:
            node = cluster.nodes[name]
            conn, cookies = Conn(node.host, node.port), []
            for _ in range(args.probes):
                status, cookie, _ = await conn.request("POST", "/api/session", body=b'{"n": 0}')
                assert status == 200 and cookie
                cookies.append(cookie)
            conn.close()
            probes[name] = cookies

        for name in ("node1", "node2"):
            await make_probes(name)
        assert await wait_for(cluster.settled, 300), "not settled before the phases"
        for name in ("node1", "node2"):
            prober.target(cluster.nodes[name], probes[name])
        prober.start()

        async def phase(
            name: str,
            trigger: Callable[[], Awaitable[dict[str, Any]]],
            done: Callable[[], Awaitable[bool]],
            timeout: float,
        ) -> Phase:
            t0 = time.monotonic()
            live = cluster.live()
            stalls: dict[str, dict[str, list[list[float]]]] = {}

            async def collect() -> None:
                for n in live:
                    with contextlib.suppress(httpx.HTTPError):
                        stalls[n] = await cluster.debug(n, f"/debug/lag?since={t0}")  # type: ignore[assignment]

            if name == "adoption":
                await collect()  # node1 is about to die
            spies = []
            if args.profile:
                os.makedirs(args.profile, exist_ok=True)
                for n in live:
                    out_file = os.path.join(args.profile, f"{name}-{n}.json")
                    spies.append(
                        await asyncio.create_subprocess_exec(
                            "py-spy", "record", "--format", "speedscope", "--rate", "500", "--nonblocking", "--idle",
                            "-o", out_file, "--pid", str(cluster.nodes[n].pid),
                            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
                        )
                    )
            info = await trigger()
            took = await wait_for(done, timeout)
            await asyncio.sleep(1.0)
            t1 = time.monotonic()
            for spy in spies:
                with contextlib.suppress(ProcessLookupError):
                    spy.send_signal(signal.SIGINT)
                await spy.wait()
            if name == "adoption":
                before = stalls.copy()
                await collect()
                for n, v in before.items():
                    stalls.setdefault(n, v)
            else:
                await collect()
            if args.profile:
                for n, d in stalls.items():
                    with open(os.path.join(args.profile, f"{name}-{n}-stalls.txt"), "w") as f:
                        for when, late, stack in d.get("stacks", []):
                            if t0 <= when <= t1:
                                f.write(f"--- {late * 1000:.0f} ms into a stall\n{stack}\n")
            ph = Phase(
                name, t0, t1, took, info, {n: {k: [s for s in v if s[0] <= t1] for k, v in d.items()} for n, d in stalls.items()}
            )
            phases.append(ph)
            outcome = f"settled in {took:.1f} s" if took is not None else f"NOT settled in {timeout:.0f} s"
            say(f"{name}: {outcome}; {info}")
            return ph

        async def sent_counts() -> dict[str, int]:
            return {n: (await cluster.status(n))["stats"]["replications_sent"] for n in cluster.live()}

        async def nothing() -> dict[str, Any]:
            await asyncio.sleep(args.baseline)
            return {}

        async def true() -> bool:
            return True

        await phase("baseline", nothing, true, 1)

        # resync
        before = await sent_counts()
        admin = aioredis.Redis.from_url(server.url)

        async def kill_pubsub() -> dict[str, Any]:
            return {"killed": await admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")}

        ph = await phase("resync", kill_pubsub, cluster.steady, args.timeout)
        after = await sent_counts()
        ph.info["sessions re-sent"] = {n: after[n] - before[n] - prober.writes(n, ph.t0, ph.t1) for n in after}
        say(f"  resync re-sent (not counting the probes' writes) {ph.info['sessions re-sent']}")

        # rebalance: node3 joins
        before = await sent_counts()

        async def join() -> dict[str, Any]:
            t = time.monotonic()
            await asyncio.get_running_loop().run_in_executor(None, cluster.start, "node3")
            return {"node3 started in s": round(time.monotonic() - t, 1)}

        ph = await phase("rebalance", join, cluster.steady, args.timeout)
        after = await sent_counts()
        st3 = await cluster.status("node3")
        ph.info.update(
            moved_to_node3=st3["sessions_backed_up"],
            sent={n: after[n] - before.get(n, 0) - prober.writes(n, ph.t0, ph.t1) for n in after},
        )
        say(f"  rebalance: node3 now backs up {st3['sessions_backed_up']:,}; sent {ph.info['sent']}")
        await make_probes("node3")
        prober.target(cluster.nodes["node3"], probes["node3"])

        # sweep: node2's sweep sessions expire in one pass
        owned2 = (await cluster.status("node2"))["sessions_owned"]
        backups = sum([(await cluster.status(n))["sessions_backed_up"] for n in cluster.live()])

        async def sweep() -> dict[str, Any]:
            window = f"created_from={t_from - SLACK}&created_to={t_to + SLACK}"
            return {n: await cluster.debug(n, f"/debug/expire?{window}", "POST") for n in cluster.live()}

        async def swept() -> bool:
            st = {n: await cluster.status(n) for n in cluster.live()}
            return (
                st["node2"]["sessions_owned"] <= owned2 - args.sweep_sessions
                and sum(s["sessions_backed_up"] for s in st.values()) <= backups - args.sweep_sessions
                and await cluster.steady()
            )

        await phase("sweep", sweep, swept, args.timeout)

        # adoption: node1 dies
        st = {n: await cluster.status(n) for n in cluster.live()}
        victim = st["node1"]["sessions_owned"]
        survivors = ["node2", "node3"]
        owned_before = sum(st[n]["sessions_owned"] for n in survivors)
        prober.drop("node1")
        dropped_at: dict[str, float] = {}

        async def kill1() -> dict[str, Any]:
            spent.append(proc_jiffies(node1.pid or 0))  # gone from /proc once it is dead
            node1.kill(signal.SIGKILL)
            return {"node1 owned": victim}

        t_kill = time.monotonic()

        async def adopted() -> bool:
            total = 0
            for n in survivors:
                s = await cluster.status(n)
                if n not in dropped_at and not any(m["name"] == "node1" for m in s["members"]):
                    dropped_at[n] = time.monotonic() - t_kill
                total += s["sessions_owned"]
            return total >= owned_before + victim

        ph = await phase("adoption", kill1, adopted, args.timeout)
        ph.info["node1 dropped after s"] = {n: round(v, 1) for n, v in dropped_at.items()}
        ph.info["own them all after s"] = None if ph.settled is None else round(ph.settled, 1)
        say(f"  adoption: {ph.info}")
        rereplicated = await wait_for(cluster.steady, args.timeout)
        say(
            f"  survivors settled (new backups acknowledged) {rereplicated if rereplicated is None else round(rereplicated, 1)} s after that"
        )
        await prober.stop()

        # check a sample of node1's sessions through node2
        intact = 0
        conn = Conn(node2.host, node2.port)
        for i, cookie in sample:
            status, _, data = await conn.request("GET", "/api/session", cookie=cookie)
            if status == 200 and json.loads(data)["data"].get("u") == i:
                intact += 1
        conn.close()
        say(f"sample of node1's sessions read through node2 after its death: {intact} of {len(sample)} intact")

        say("")
        say(
            f"request latency (ms) from a steady {args.rate:.0f} req/s, half reads, half writes; target p99 {P99_TARGET_MS:.0f} ms:"
        )
        say("")
        say(
            "| phase | node | requests | p50 | p99 | max | p99 reads/writes | failed | p99 vs target |"
            " event loop stalls over 2 ms: longest, total | GC passes over 2 ms: count, longest |"
        )
        say("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for ph in phases:
            for line in report_line(ph, prober):
                say(line)
        say("")
        say(f"requests over {P99_TARGET_MS:.0f} ms, per second after each phase's trigger (s: reads+writes):")
        for ph in phases:
            slow: dict[int, list[int]] = {}
            for samples in prober.window(ph.t0, ph.t1).values():
                for x in samples:
                    if x.ms is not None and x.ms > P99_TARGET_MS:
                        slow.setdefault(int(x.at - ph.t0), [0, 0])[x.kind == "write"] += 1
            if slow:
                say(f"  {ph.name}: " + ", ".join(f"{t}: {r}+{w}" for t, (r, w) in sorted(slow.items())))
        ours = sum(spent) + sum(
            proc_jiffies(p)
            for p in [
                os.getpid(),
                *(n.pid for n in cluster.nodes.values() if n.pid),
                *([server.proc.pid] if server.proc else []),
            ]
        )
        busy = cpu_jiffies() - jiffies0
        wall = time.monotonic() - wall0
        hz = os.sysconf("SC_CLK_TCK")
        say("")
        say(
            f"machine: {os.cpu_count()} CPUs, {wall:.0f} s; all processes used {busy / hz / wall:.2f} CPUs on average, "
            f"this run's about {ours / hz / wall:.2f} (so others {max(0.0, (busy - ours) / hz / wall):.2f}); "
            f"load average at the end {os.getloadavg()[0]:.2f}"
        )
        await admin.aclose()
        return 0
    finally:
        with contextlib.suppress(Exception):
            await prober.stop()
        cluster.stop()
        await cluster.http.aclose()
        server.cleanup()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=200_000, help="sessions loaded onto node1 (default 200,000)")
    p.add_argument("--payload", type=int, default=1024, help="bytes of JSON per session (default 1024)")
    p.add_argument(
        "--traced",
        type=int,
        default=None,
        help="sessions loaded under tracemalloc (default sessions/10, at most 20,000)",
    )
    p.add_argument(
        "--sweep-sessions", type=int, default=None, help="sessions on node2 that expire at once (default sessions/4)"
    )
    p.add_argument("--probes", type=int, default=300, help="probe sessions per node")
    p.add_argument("--rate", type=float, default=200.0, help="probe requests per second, in total")
    p.add_argument("--concurrency", type=int, default=64, help="connections of the loader")
    p.add_argument("--baseline", type=float, default=5.0, help="seconds of the baseline phase")
    p.add_argument("--profile", metavar="DIR", help="record each phase of each node with py-spy (speedscope, idle included) into DIR")
    p.add_argument("--timeout", type=float, default=180.0, help="longest wait for a phase to settle")
    p.add_argument("--out", help="also write the report to this file")
    args = p.parse_args()
    if args.traced is None:
        args.traced = max(1000, min(20_000, args.sessions // 10))
    if args.sweep_sessions is None:
        args.sweep_sessions = args.sessions // 4
    out: list[str] = []
    try:
        return asyncio.run(run(args, out))
    finally:
        if args.out:
            with open(args.out, "w") as f:
                f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    sys.exit(main())
