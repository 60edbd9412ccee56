#!/usr/bin/env python3
"""Two workers behind HAProxy: clustersess's fast layout against Starlette's cookie sessions.

Three contenders, each two worker processes of ``apps.py``'s tiny app behind the same
HAProxy configuration (``clustersess lb-config``), one after the other on this machine:

* ``clustersess``: ``clustersess node --workers 2``, two supervised workers on two ports,
  each a cluster member (routes ``node1_w1``, ``node1_w2``; sync replication, each the
  other's backup, over one ``redis-server``). HAProxy sends every session to its owner.
* ``starlette``: ``uvicorn --workers 2`` of Starlette's ``SessionMiddleware`` (the session
  is a signed cookie; nothing is shared or replicated). The reference.
* ``one-port``: ``uvicorn --workers 2`` of clustersess on one port, one server line
  ``node1`` (its workers are members ``node1_w<pid>``): the slow layout, where the kernel,
  not the balancer, picks the worker, so about every other request of a session lands on
  the worker that does not own it and takes the session over through Redis.

``wrk`` plays ``--users`` users (8), one per wrk thread, each with its own session (created
beforehand through HAProxy, so spread over both workers) on its share of the connections
(32 in all: 4 per user, as a browser opens several), and updates its cookie from
``Set-Cookie`` as a browser would (which matters for ``one-port``: after a takeover the
cookie names the new owner). Two tests: ``GET /read`` (one session value) and ``GET
/write`` (increments a counter); after the writes the script sums the users' counters to
check that every increment landed. Nothing is pinned: the workers, HAProxy,
Redis and wrk share the machine's cores, as they would on a small server.

Prints req/s, p50, p99, the workers' CPU per request, and the ratios. One run by default:

    python3 loadtests/bench_workers.py                     # 3 contenders x (read, write), 5 s each
    python3 loadtests/bench_workers.py --duration 10 --rounds 3 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from clustersess import lb  # after the path: a checkout runs without installing

SECRET = "benchmark-secret-not-for-production"
TESTS = ("read", "write")
CONTENDERS = {
    "clustersess": "clustersess node --workers 2, 2 ports, HAProxy routes to the owner",
    "starlette": "Starlette SessionMiddleware (signed cookie), uvicorn --workers 2",
    "one-port": "clustersess under uvicorn --workers 2, one port (the slow layout)",
}

WRK_LUA = r"""
-- One user per wrk thread: its own session, on the thread's connections (a browser opens a
-- few per host); its cookie is updated from Set-Cookie, as a browser would.
cookies = {COOKIES}
local path = "{PATH}"
local name = "{NAME}"
local threads = {}
local started = 0

setup = function(thread)
  started = started + 1
  thread:set("user", started)
  table.insert(threads, thread)
end

init = function(args)
  cookie = cookies[(user - 1) % #cookies + 1]
  reissued = 0  -- responses that changed the cookie: on a clustersess read, a takeover each
end

request = function()
  return wrk.format("GET", path, {["Cookie"] = cookie})
end

response = function(status, headers, body)
  local sc = headers["set-cookie"] or headers["Set-Cookie"]
  if sc == nil then return end
  local value = string.match(sc, "^" .. name .. "=([^;]+)")
  if value == nil or value == "null" then return end
  if cookie ~= name .. "=" .. value then
    cookie = name .. "=" .. value
    reissued = reissued + 1
  end
end

done = function(summary, latency, requests)
  local e = summary.errors
  local changed = 0
  for _, t in ipairs(threads) do changed = changed + t:get("reissued") end
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"p50_us":%.1f,"p99_us":%.1f,' ..
    '"errors":%d,"status_errors":%d,"reissued":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, e.status, changed))
end
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_run(count: int) -> int:
    for _ in range(100):
        base = free_port()
        ok = base + count < 65535
        for port in range(base, base + count):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
        if ok:
            return base
    raise RuntimeError("no run of free ports")


def get(port: int, path: str, cookie: str | None = None, timeout: float = 5.0) -> tuple[int, str, str | None]:
    """(status, body, the Set-Cookie name=value or None)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Cookie": cookie} if cookie else {})
        resp = conn.getresponse()
        body = resp.read().decode()
        set_cookie = resp.getheader("set-cookie")
        return resp.status, body, set_cookie.split(";", 1)[0] if set_cookie else None
    finally:
        conn.close()


def wait_ready(port: int, procs: list[subprocess.Popen[bytes]], what: str, timeout: float = 40.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, http.client.HTTPException):
            if get(port, "/health", timeout=1.0)[0] == 200:
                return
        dead = [p for p in procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            raise RuntimeError(f"{what} on port {port} did not get ready (exited: {[p.returncode for p in dead]})")
        time.sleep(0.1)


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        with contextlib.suppress(OSError):
            kids = [int(p) for p in Path(f"/proc/{parent}/task/{parent}/children").read_text().split()]
            found += kids
            todo += kids
    return found


def cpu_seconds(pids: list[int]) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


@dataclasses.dataclass
class Setup:
    """One contender's processes: the servers, HAProxy, and where HAProxy listens."""

    name: str
    procs: list[subprocess.Popen[bytes]]
    lb_port: int
    cookie_name: str
    workers: list[int] = dataclasses.field(default_factory=list)  # the worker pids

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def contender(
    name: str, redis_url: str, round_: int, tmp: Path, log: Any, replication: str = "sync"
) -> Iterator[Setup]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CLUSTERSESS_SECRET": SECRET, "CLUSTERSESS_NODE": "node1",
           "CLUSTERSESS_REDIS_URL": redis_url, "CLUSTERSESS_CLUSTER": f"bench-workers-{name}-{round_}",
           "CLUSTERSESS_REPLICATION": replication}  # fmt: skip
    uvicorn = [sys.executable, "-m", "uvicorn", "--workers", "2", "--loop", "uvloop", "--http", "httptools",
               "--no-access-log", "--log-level", "warning"]  # fmt: skip
    procs: list[subprocess.Popen[bytes]] = []
    if name == "clustersess":
        port = free_run(2)
        cmd = [sys.executable, "-m", "clustersess.cli", "node", "--name", "node1", "--workers", "2",
               "--port", str(port), "--log-level", "warning", "loadtests.workers_apps:clustersess"]  # fmt: skip
        backends = [lb.Backend("node1_w1", "127.0.0.1", port), lb.Backend("node1_w2", "127.0.0.1", port + 1)]
        ports = [port, port + 1]
        cookie = "JSESSIONID"
    else:
        port = free_port()
        app = "loadtests.workers_apps:starlette" if name == "starlette" else "loadtests.workers_apps:clustersess"
        cmd = [*uvicorn, "--port", str(port), app]
        backends = [lb.Backend("node1", "127.0.0.1", port)]
        ports = [port]
        cookie = "session" if name == "starlette" else "JSESSIONID"
    procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
    setup = Setup(name, procs, free_port(), cookie)
    try:
        for p in ports:
            wait_ready(p, procs, name)
        config = tmp / f"haproxy-{name}-{round_}.cfg"
        config.write_text(lb.render("haproxy", backends, listen=f"127.0.0.1:{setup.lb_port}", cookie="JSESSIONID"))
        binary = lb.find("haproxy")
        assert binary is not None
        procs.insert(0, subprocess.Popen(lb.command("haproxy", binary, config), stdout=log, stderr=subprocess.STDOUT))
        wait_ready(setup.lb_port, procs, "HAProxy")
        setup.workers = descendants(procs[1].pid) or [procs[1].pid]
        if name != "starlette":
            time.sleep(1.5)  # the members hear each other (each backs the other up)
        yield setup
    finally:
        setup.stop()


def make_sessions(setup: Setup, users: int) -> list[str]:
    cookies = []
    for _ in range(users):
        status, _, cookie = get(setup.lb_port, "/setup")
        if status != 200 or cookie is None:
            raise RuntimeError(f"{setup.name}: /setup answered {status} without a cookie")
        cookies.append(cookie)
    return cookies


def run_wrk(setup: Setup, cookies: list[str], path: str, duration: int, connections: int, tmp: Path
            ) -> dict[str, Any]:  # fmt: skip
    script = tmp / f"wrk-{setup.name}-{setup.lb_port}-{path.strip('/')}.lua"
    lua_cookies = "{" + ", ".join(json.dumps(c) for c in cookies) + "}"
    lua = WRK_LUA.replace("{COOKIES}", lua_cookies).replace("{PATH}", path).replace("{NAME}", setup.cookie_name)
    script.write_text(lua)
    argv = ["wrk", f"-t{len(cookies)}", f"-c{connections}", f"-d{duration}s", "--timeout", "5s", "-s", str(script),
            f"http://127.0.0.1:{setup.lb_port}{path}"]  # fmt: skip
    cpu0 = cpu_seconds(setup.workers)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=False)
    cpu = cpu_seconds(setup.workers) - cpu0
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stdout}\n{out.stderr}")
    result: dict[str, Any] = json.loads(line[len("BENCH ") :])
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    result["cpu_us"] = cpu * 1e6 / max(1, result["requests"])
    return result


def counters(setup: Setup, cookies: list[str]) -> int:
    if setup.name == "starlette":
        return 0  # the session is the cookie wrk sent: nothing is stored
    total = 0
    for cookie in cookies:
        status, body, _ = get(setup.lb_port, "/counter", cookie)
        if status != 200:
            raise RuntimeError(f"{setup.name}: /counter answered {status}")
        total += int(body)
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of reads before measuring (default 1)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds, each contender once per round (default 1)")
    parser.add_argument("--users", type=int, default=8, help="users (wrk threads), one session each (default 8)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections, shared by the users (default 32)")
    parser.add_argument("--only", default=",".join(CONTENDERS), help="contenders, comma-separated")
    parser.add_argument("--replication", choices=("sync", "async"), default="sync", help="clustersess's (default sync)")
    parser.add_argument("--json", help="write every sample here")
    args = parser.parse_args()
    missing = [t for t in ("wrk", "redis-server") if shutil.which(t) is None]
    missing += [] if lb.find("haproxy") else ["haproxy"]
    if missing:
        print(f"bench_workers: needs {', '.join(missing)} (apt-get install wrk haproxy redis-server)", file=sys.stderr)
        return 2
    if not 1 <= args.users <= args.connections:
        print("bench_workers: --users must be between 1 and --connections (each user needs a connection)",
              file=sys.stderr)  # fmt: skip
        return 2
    names = [n for n in args.only.split(",") if n]
    unknown = set(names) - set(CONTENDERS)
    if unknown:
        print(f"bench_workers: unknown contender(s) {sorted(unknown)}; choose from {list(CONTENDERS)}", file=sys.stderr)
        return 2
    samples: dict[tuple[str, str], list[dict[str, Any]]] = {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmpdir:
        tmp = Path(tmpdir)
        redis_port = free_port()
        redis = subprocess.Popen(
            ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=tmp,
        )  # fmt: skip
        try:
            time.sleep(0.3)
            with open(tmp / "servers.log", "ab") as log:
                for round_ in range(args.rounds):
                    order = names[round_ % len(names) :] + names[: round_ % len(names)]
                    for name in order:
                        redis_url = f"redis://127.0.0.1:{redis_port}/0"
                        with contender(name, redis_url, round_, tmp, log, args.replication) as setup:
                            cookies = make_sessions(setup, args.users)
                            if args.warmup:
                                run_wrk(setup, cookies, "/read", args.warmup, args.connections, tmp)
                            for test in TESTS:
                                before = counters(setup, cookies) if test == "write" else 0
                                result = run_wrk(setup, cookies, f"/{test}", args.duration, args.connections, tmp)
                                if test == "write":
                                    result["counted"] = counters(setup, cookies) - before
                                samples.setdefault((name, test), []).append(result)
                                print(f"  round {round_ + 1} {name:<12} {test:<5} {result['rps']:>9,.0f} req/s"
                                      f"  p99 {result['p99_us'] / 1000:6.2f} ms  errors {result['errors']}",
                                      flush=True)  # fmt: skip
        finally:
            redis.terminate()
            redis.wait(10)
    load_after = os.getloadavg()
    report(names, samples, args, load_before, load_after)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({f"{n}:{t}": v for (n, t), v in samples.items()}, f, indent=1)
    return 0


def reissued(name: str, runs: list[dict[str, Any]]) -> str:
    """How many responses changed a session's cookie: on clustersess, a takeover each
    (the cookie names the new owner); Starlette's writes re-sign the cookie every time."""
    changed, total = sum(r["reissued"] for r in runs), sum(r["requests"] for r in runs)
    return f"{changed / max(1, total):.0%}"


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(
    names: list[str],
    samples: dict[tuple[str, str], list[dict[str, Any]]],
    args: argparse.Namespace,
    load_before: tuple[float, float, float],
    load_after: tuple[float, float, float],
) -> None:
    cpus = os.cpu_count()
    print()
    print(f"two workers behind HAProxy, {args.rounds} round(s) x {args.duration} s, wrk -t{args.users} "
          f"-c{args.connections} ({args.users} users, one session each), {args.replication} replication, {cpus} CPUs; "
          f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")  # fmt: skip
    print()
    print("| contender | test | req/s | p50 ms | p99 ms | worker CPU us/req | cookies re-issued | writes counted |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    med: dict[tuple[str, str], float] = {}
    cpu: dict[tuple[str, str], float] = {}
    for name in names:
        for test in TESTS:
            runs = samples.get((name, test), [])
            if not runs:
                continue
            rps = med[(name, test)] = _median([r["rps"] for r in runs])
            cpu[(name, test)] = _median([r["cpu_us"] for r in runs])
            counted = "" if test == "read" or name == "starlette" else \
                f"{sum(r['counted'] for r in runs):,} of {sum(r['requests'] for r in runs):,}"  # fmt: skip
            print(f"| {CONTENDERS[name]} | {test} | {rps:,.0f} | {_median([r['p50_us'] for r in runs]) / 1000:.2f} | "
                  f"{_median([r['p99_us'] for r in runs]) / 1000:.2f} | {_median([r['cpu_us'] for r in runs]):.0f} | "
                  f"{reissued(name, runs)} | {counted} |")  # fmt: skip
    print()
    pairs = [("clustersess", "starlette"), ("one-port", "clustersess"), ("one-port", "starlette")]
    for a, b in pairs:
        if all((n, t) in med for n in (a, b) for t in TESTS):
            ratios = ", ".join(f"{t} {med[(a, t)] / med[(b, t)]:.2f}x" for t in TESTS)
            costs = ", ".join(f"{t} {cpu[(b, t)] / cpu[(a, t)]:.2f}x" for t in TESTS)
            print(f"{a} against {b}: req/s {ratios}; per worker CPU second (cost ratio) {costs}")


if __name__ == "__main__":
    sys.exit(main())
