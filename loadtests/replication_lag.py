#!/usr/bin/env python3
"""Replication lag and takeover time, measured against a real redis-server.

Replication lag: an owner in this process commits sessions at a steady rate (default
1,000 writes/s over 200 sessions) through the real :class:`SessionManager` and Redis
transport; a backup node runs in a separate process with a session listener
(``notify_listeners_on_replication``) that records when each version was applied. Each
write stores its commit time in the session, so lag = applied - committed, on one clock.

Takeover: three real ``clustersess node`` processes; sessions are written on node1,
node1 is SIGKILLed, and each session is then read once on node2/node3; the time of that
first request (which fetches the session from its backup and re-issues the cookie) is
the takeover time as a user sees it.

    python3 loadtests/replication_lag.py                 # both, sync and async
    python3 loadtests/replication_lag.py --rate 1000 --seconds 10 --mode async
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from tests.utils import NodeProcess, RedisServer, base_env, wait_until  # noqa: E402

SECRET = "lag-benchmark-secret"

BACKUP = r"""
import asyncio, json, sys, time
from clustersess import Config, SessionManager, SessionListener
lags = []
class Rec(SessionListener):
    def changed(self, ev):
        t = ev.data.get("t")
        if t is not None:
            lags.append(time.time() - t)
    created = changed
async def main():
    cfg = Config(secret_key=(sys.argv[2],), node_name="backup", redis_url=sys.argv[1],
                 notify_listeners_on_replication=True, heartbeat_interval=0.2, drop_time=1.0)
    m = SessionManager(cfg, listeners=[Rec()])
    await m.start()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    print(json.dumps(lags), flush=True)
    await m.stop()
asyncio.run(main())
"""


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


async def drive_owner(url: str, mode: str, rate: int, seconds: float, sessions: int) -> dict[str, float]:
    from clustersess import Config, SessionManager

    cfg = Config(
        secret_key=(SECRET,), node_name="owner", redis_url=url, replication=mode,  # type: ignore[arg-type]
        heartbeat_interval=0.2, drop_time=1.0,
    )
    m = SessionManager(cfg)
    await m.start()
    assert m.cluster is not None
    await asyncio.sleep(0.5)  # hear the backup
    cookies: list[str | None] = [None] * sessions
    latencies: list[float] = []

    async def write(i: int) -> None:
        h = await m.open(cookies[i])
        h.session["n"] = h.session.get("n", 0) + 1
        started = time.perf_counter()
        h.session["t"] = time.time()
        c = await m.close(h)
        latencies.append(time.perf_counter() - started)
        if c:
            cookies[i] = c

    interval = 1.0 / rate
    tasks = set()
    start = time.perf_counter()
    n = 0
    while (now := time.perf_counter()) - start < seconds:
        due = start + n * interval
        if due > now:
            await asyncio.sleep(due - now)
        task = asyncio.create_task(write(n % sessions))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        n += 1
    await asyncio.gather(*tasks)
    achieved = n / (time.perf_counter() - start)
    stats = m.stats.as_dict()
    await m.stop()
    return {
        "writes": n,
        "achieved_rate": achieved,
        "commit_p50_ms": pct(latencies, 50) * 1000,
        "commit_p99_ms": pct(latencies, 99) * 1000,
        "ack_timeouts": stats["ack_timeouts"],
        "messages_sent": stats["messages_sent"],
    }


def lag_run(mode: str, rate: int, seconds: float, sessions: int) -> dict[str, float]:
    with RedisServer() as redis:
        backup = subprocess.Popen(
            [sys.executable, "-c", BACKUP, redis.url, SECRET],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=base_env(),
        )
        try:
            assert backup.stdout is not None and backup.stdin is not None
            assert backup.stdout.readline().strip() == "ready"
            owner = asyncio.run(drive_owner(redis.url, mode, rate, seconds, sessions))
            time.sleep(0.5)
            backup.stdin.write("\n")
            backup.stdin.flush()
            lags = json.loads(backup.stdout.readline())
        finally:
            backup.kill()
            backup.wait()
    return {
        **owner,
        "applied": len(lags),
        "lag_p50_ms": pct(lags, 50) * 1000,
        "lag_p99_ms": pct(lags, 99) * 1000,
        "lag_max_ms": max(lags) * 1000 if lags else float("nan"),
    }


def takeover_run(sessions: int) -> dict[str, float]:
    import httpx

    env = {"CLUSTERSESS_HEARTBEAT": "0.5", "CLUSTERSESS_DROP_TIME": "3.0"}
    with RedisServer() as redis:
        nodes = [NodeProcess(f"node{i}", redis_url=redis.url, env=env, secret=SECRET) for i in (1, 2, 3)]
        try:
            for node in nodes:
                node.start()
            time.sleep(1.0)
            cookies = []
            with httpx.Client() as client:
                for i in range(sessions):
                    client.cookies.clear()
                    r = client.post(nodes[0].url + "/api/session", json={"i": i})
                    cookies.append(r.headers["set-cookie"].split(";")[0].split("=", 1)[1])
                nodes[0].kill(signal.SIGKILL)
                times = []
                ok = 0
                for i, cookie in enumerate(cookies):
                    client.cookies.clear()
                    started = time.perf_counter()
                    r = client.get(nodes[1 + i % 2].url + "/api/session", headers={"Cookie": f"JSESSIONID={cookie}"})
                    times.append(time.perf_counter() - started)
                    ok += r.json()["data"] == {"i": i}
        finally:
            for node in nodes:
                node.kill()
    return {
        "sessions": sessions,
        "intact": ok,
        "takeover_p50_ms": pct(times, 50) * 1000,
        "takeover_p99_ms": pct(times, 99) * 1000,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=int, default=1000, help="writes per second")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--sessions", type=int, default=200)
    ap.add_argument("--mode", choices=["sync", "async", "both"], default="both")
    ap.add_argument("--takeover-sessions", type=int, default=200)
    ap.add_argument("--skip-takeover", action="store_true")
    args = ap.parse_args()
    modes = ["sync", "async"] if args.mode == "both" else [args.mode]
    print(f"replication lag at {args.rate} writes/s for {args.seconds:.0f}s over {args.sessions} sessions")
    print(f"{'mode':6} {'writes':>7} {'rate':>7} {'applied':>8} {'lag p50':>9} {'lag p99':>9} {'lag max':>9} {'commit p50':>11} {'commit p99':>11} {'timeouts':>9}")
    for mode in modes:
        r = lag_run(mode, args.rate, args.seconds, args.sessions)
        print(
            f"{mode:6} {r['writes']:7d} {r['achieved_rate']:7.0f} {r['applied']:8d} {r['lag_p50_ms']:7.2f}ms {r['lag_p99_ms']:7.2f}ms"
            f" {r['lag_max_ms']:7.2f}ms {r['commit_p50_ms']:9.2f}ms {r['commit_p99_ms']:9.2f}ms {r['ack_timeouts']:9d}"
        )
    if not args.skip_takeover:
        t = takeover_run(args.takeover_sessions)
        print(
            f"takeover after SIGKILL of the owner (drop time 3 s, measured before it): {t['intact']}/{t['sessions']} intact,"
            f" first request p50 {t['takeover_p50_ms']:.2f} ms, p99 {t['takeover_p99_ms']:.2f} ms"
        )


if __name__ == "__main__":
    main()
