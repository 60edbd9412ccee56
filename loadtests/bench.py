#!/usr/bin/env python3
"""Session middleware benchmark: one tiny endpoint served several ways, driven by wrk.

Each contender (see ``CONTENDERS``) is the same Starlette app (``apps.py``) behind a
different session middleware, served by uvicorn + uvloop + httptools with one worker and
no access log, pinned to CPU 0 (``taskset -c 0``). ``wrk`` runs pinned to CPU 1 and
measures two things against a session created beforehand:

* read:  ``GET /read``  reads one value of the session;
* write: ``GET /write`` increments a counter in the session.

wrk cannot update cookies, so every request re-sends the cookie of the session created
before the run. For server-side stores (starsessions, clustersess) every write request
therefore increments the same stored session. For Starlette's SessionMiddleware the
session *is* the cookie: every write request decodes the same initial cookie and
signs and sends a new one (the same increment of the same state each time), which is
still its full write path.

Rounds are interleaved (every contender once per test and round, in a rotating order)
and every round starts fresh server processes (one process of the same code can be
5-10% faster or slower than the next). This 2-core VM's speed also drifts by tens of per
cent within a minute, so "vs baseline" is paired: each run against the baseline run of
the same test and round, seconds apart, and the table shows the median of those ratios
(req/s, p50, p99 and CPU columns are plain medians).

    python3 loadtests/bench.py                       # everything, 3 rounds x 5 s
    python3 loadtests/bench.py --only clustersess --rounds 5 --json out.json
    python3 loadtests/bench.py --only clustersess-sync --tests write --against /tmp/before  # before/after
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.client
import json
import os
import platform
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
SERVER_CPUS = "0"  # the app server's core
CLIENT_CPUS = "1"  # wrk and helper processes (Redis) share the other core
SECRET = "benchmark-secret-not-for-production"
TESTS = ("read", "write")
NOISY = 0.25  # median CPUs used by other processes during the runs above which we warn

# Targets as a ratio to the baseline: issue 2 for a single node, issue 3 for reads on a
# clustered node (reads must not touch Redis).
TARGETS = {
    ("clustersess", "read"): 0.90,
    ("clustersess", "write"): 0.80,
    ("clustersess-sync", "read"): 0.90,
    ("clustersess-async", "read"): 0.90,
}


# -- what runs --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Server:
    """One uvicorn process.

    ``app`` is a factory in ``loadtests/`` (``module:function``, run with ``--factory``).
    ``env`` values are ``str.format`` templates over the run context: ``{redis_url}``
    (when a "redis" service runs), ``{name}`` (the contender's name: contenders that
    share Redis need their own ``CLUSTERSESS_CLUSTER``), ``{round}`` (servers restart
    every round, and a new cluster per round keeps the last round's members out of it),
    ``{secret}``, ``{port}`` (this server's port) and ``{ports[i]}`` (the ports of the
    contender's servers, in order).
    """

    app: str
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    cpus: str = SERVER_CPUS


@dataclasses.dataclass(frozen=True)
class Contender:
    """A configuration under test. wrk drives ``servers[0]``; other servers (cluster
    peers) run alongside. ``services`` names extra processes from ``SERVICES`` (one of
    each is started per benchmark run and shared)."""

    label: str
    servers: tuple[Server, ...]
    services: tuple[str, ...] = ()
    #: the session lives server-side, so ``/counter`` must grow by about the write count
    server_side: bool = True
    #: False only for the baseline, which has no session (and so no cookie) at all
    sets_cookie: bool = True
    #: run without ``--only`` (the clustered configurations are opt-in)
    default: bool = True


_CLUSTERSESS_ENV = {"CLUSTERSESS_SECRET": "{secret}", "CLUSTERSESS_NODE": "node1"}


def _clustered_env(replication: str) -> dict[str, str]:
    return {
        **_CLUSTERSESS_ENV,
        "CLUSTERSESS_REDIS_URL": "{redis_url}",
        "CLUSTERSESS_CLUSTER": "bench-{name}-{round}",
        "CLUSTERSESS_REPLICATION": replication,
    }


def _clustered(label: str, replication: str, node1_env: Mapping[str, str] | None = None) -> Contender:
    """Two nodes sharing the one Redis (so each contender has its own cluster name); wrk
    drives node1 (plus ``node1_env``), node2 (the backup) runs on the client CPU. Opt-in."""
    env = _clustered_env(replication)
    return Contender(
        label,
        (
            Server("apps:make_clustersess", {**env, **(node1_env or {})}),
            Server("apps:make_clustersess", {**env, "CLUSTERSESS_NODE": "node2"}, cpus=CLIENT_CPUS),
        ),
        services=("redis",),
        default=False,
    )


CONTENDERS: dict[str, Contender] = {
    "baseline": Contender("no session middleware", (Server("apps:make_baseline"),), sets_cookie=False),
    "starlette": Contender(
        "Starlette SessionMiddleware (signed cookie)", (Server("apps:make_starlette"),), server_side=False
    ),
    "starsessions-redis": Contender(
        "starsessions + RedisStore",
        (Server("apps:make_starsessions_redis", {"BENCH_REDIS_URL": "{redis_url}"}),),
        services=("redis",),
    ),
    "starsessions-memory": Contender("starsessions + InMemoryStore", (Server("apps:make_starsessions_memory"),)),
    # A yardstick, opt-in: the least any server-side session middleware does (apps.py).
    "floor": Contender("floor: cookie -> dict, Vary (no real session)", (Server("apps:make_floor"),), default=False),
    "clustersess": Contender("clustersess, single node", (Server("apps:make_clustersess", _CLUSTERSESS_ENV),)),
    # Clustered (opt-in: --only), see _clustered().
    **{
        f"clustersess-{mode}": _clustered(f"clustersess, 2 nodes, {mode} replication", mode) for mode in ("sync", "async")
    },
    # Opt-in, to size the gc_freeze default (clustersess/heap.py) on both sides: sync
    # writes without it, and starsessions + Redis (whose requests also wait on Redis)
    # with the same freeze after start-up (apps.py, BENCH_GC_FREEZE).
    "clustersess-sync-nofreeze": _clustered(
        "clustersess, 2 nodes, sync, gc_freeze off", "sync", {"CLUSTERSESS_GC_FREEZE": "0"}
    ),
    "starsessions-redis-frozen": Contender(
        "starsessions + RedisStore, heap frozen after start-up",
        (Server("apps:make_starsessions_redis", {"BENCH_REDIS_URL": "{redis_url}", "BENCH_GC_FREEZE": "1"}),),
        services=("redis",),
        default=False,
    ),
}


#: contender name -> the checkout it runs from (``--against``: "<name>-before" entries)
TREES: dict[str, str] = {}


def add_before(names: list[str], tree: str) -> list[str]:
    """For ``--against TREE``: each contender also runs from TREE, as "<name>-before"."""
    out = list(names)
    for name in names:
        if name == "baseline":
            continue
        before = f"{name}-before"
        contender = CONTENDERS[name]
        CONTENDERS[before] = dataclasses.replace(contender, label=f"{contender.label} (before: {tree})", default=False)
        TREES[before] = tree
        out.append(before)
    return out


# -- processes --------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_CLK_TCK = os.sysconf("SC_CLK_TCK")


class Proc:
    """A child process with its output in a log file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, name: str, argv: list[str], logdir: str, env: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log_path = os.path.join(logdir, f"{name}.log")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - open for the process's lifetime, closed in stop()
        self.popen = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=HERE)

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{self.tail()}")

    def cpu_seconds(self) -> float:
        """User + system CPU time the process has used so far (Linux /proc)."""
        with open(f"/proc/{self.popen.pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK

    def tail(self, lines: int = 30) -> str:
        with open(self.log_path, "rb") as f:
            return b"\n".join(f.read().splitlines()[-lines:]).decode("utf-8", "replace")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()


def _wait_until(ready: Callable[[], bool], proc: Proc, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.check_alive()
        try:
            if ready():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name} did not become ready in {timeout:.0f} s:\n{proc.tail()}")


def start_redis(ctx: dict[str, Any], logdir: str) -> Proc:
    port = free_port()
    argv = [
        "taskset",
        "-c",
        CLIENT_CPUS,
        "redis-server",
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--protected-mode",
        "no",
    ]
    proc = Proc("redis", argv, logdir)

    def ping() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")

    _wait_until(ping, proc)
    ctx["redis_url"] = f"redis://127.0.0.1:{port}/0"
    return proc


#: extra processes a contender may need; each starter adds its address to the context
SERVICES: dict[str, Callable[[dict[str, Any], str], Proc]] = {"redis": start_redis}


def http_get(port: int, path: str, cookie: str | None = None) -> tuple[int, str, list[str]]:
    """(status, body, Set-Cookie values) of one GET."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers={"Cookie": cookie} if cookie else {})
        resp = conn.getresponse()
        return resp.status, resp.read().decode(), resp.headers.get_all("set-cookie") or []
    finally:
        conn.close()


@dataclasses.dataclass
class Running:
    name: str
    contender: Contender
    procs: list[Proc]
    port: int  # the port wrk drives
    cookie: str = ""  # "name=value" of the session under test


def start_contender(
    name: str, contender: Contender, ctx: Mapping[str, Any], logdir: str, tree: str | None = None
) -> Running:
    """Start ``contender``'s servers; with ``tree`` (another checkout of this repository,
    e.g. a git worktree of an earlier commit), its clustersess and ``loadtests/`` apps."""
    ports = [free_port() for _ in contender.servers]
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("CLUSTERSESS_", "BENCH_"))}
    tree = tree if tree is not None else TREES.get(name)
    if tree is not None:
        base_env["PYTHONPATH"] = os.path.abspath(tree)
    procs: list[Proc] = []
    try:
        for i, (server, port) in enumerate(zip(contender.servers, ports)):
            fmt = {**ctx, "name": name, "secret": SECRET, "port": port, "ports": ports}
            env = {**base_env, **{k: v.format(**fmt) for k, v in server.env.items()}}
            argv = [
                "taskset",
                "-c",
                server.cpus,
                sys.executable,
                "-m",
                "uvicorn",
                "--factory",
                "--app-dir",
                HERE if tree is None else os.path.join(os.path.abspath(tree), "loadtests"),
                server.app,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--loop",
                "uvloop",
                "--http",
                "httptools",
                "--no-access-log",
                "--log-level",
                "warning",
                "--lifespan",
                "on",
                "--workers",
                "1",
            ]
            proc = Proc(f"{name}-{ctx.get('round', '')}-{i}", argv, logdir, env)
            procs.append(proc)
        for proc, port in zip(procs, ports):
            _wait_until(lambda port=port: http_get(port, "/health")[0] == 200, proc)  # type: ignore[misc]
    except BaseException:
        for proc in procs:
            proc.stop()
        raise
    return Running(name, contender, procs, ports[0])


def create_session(run: Running) -> None:
    """Create the session under test and check that the cookie really selects it."""
    status, _, cookies = http_get(run.port, "/setup")
    if status != 200 or (run.contender.sets_cookie and not cookies):
        raise RuntimeError(f"{run.name}: /setup answered {status} with Set-Cookie {cookies!r}")
    # The baseline has no session and sets no cookie; wrk still sends one of similar
    # size, so every contender parses the same kind of request.
    run.cookie = cookies[0].split(";", 1)[0].strip() if cookies else "session=" + "x" * 72
    status, body, _ = http_get(run.port, "/read", run.cookie)
    if (status, body) != (200, "alice"):
        raise RuntimeError(f"{run.name}: /read with the session cookie answered {status} {body!r}")


# -- wrk --------------------------------------------------------------------------------
WRK_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"p50_us":%.1f,"p99_us":%.1f,"max_us":%.1f,' ..
    '"connect_errors":%d,"read_errors":%d,"write_errors":%d,"status_errors":%d,"timeouts":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def run_wrk(port: int, path: str, cookie: str, *, duration: int, connections: int, lua: str) -> dict[str, Any]:
    argv = [
        "taskset",
        "-c",
        CLIENT_CPUS,
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{duration}s",
        "--timeout",
        "5s",
        "-s",
        lua,
        "-H",
        f"Cookie: {cookie}",
        f"http://127.0.0.1:{port}{path}",
    ]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=False)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stdout}\n{out.stderr}")
    result: dict[str, Any] = json.loads(line[len("BENCH ") :])
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    result["errors"] = sum(
        result[k] for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
    )
    return result


# -- the run ----------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    versions = {}
    for pkg in ("uvicorn", "uvloop", "httptools", "starlette", "starsessions", "redis", "clustersess"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[pkg] = version(pkg)
    wrk = (
        subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False).stdout.split(" [")[0].strip()
    )
    return {"cpus": os.cpu_count(), "cpu_model": model, "python": platform.python_version(), "wrk": wrk, **versions}


def select(only: str | None) -> list[str]:
    if not only:
        return [name for name, contender in CONTENDERS.items() if contender.default]
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        raise SystemExit(f"unknown contender(s) {unknown}; choose from: {', '.join(CONTENDERS)}")
    # The baseline always runs: every ratio is relative to it.
    return ["baseline", *[n for n in names if n != "baseline"]]


@contextlib.contextmanager
def services_running(names: list[str], logdir: str) -> Iterator[tuple[dict[str, Any], list[Proc]]]:
    """Start the services the contenders share (Redis); yields the format context and them."""
    ctx: dict[str, Any] = {}
    services: list[Proc] = []
    try:
        for service in sorted({s for n in names for s in CONTENDERS[n].services}):
            services.append(SERVICES[service](ctx, logdir))
        yield ctx, services
    finally:
        for proc in services:
            proc.stop()


@contextlib.contextmanager
def running(
    names: list[str], ctx: Mapping[str, Any], logdir: str, tag: str, tree: str | None = None
) -> Iterator[dict[str, Running]]:
    """Start the contenders' servers (fresh processes, named with ``tag``) and their sessions."""
    runs: dict[str, Running] = {}
    try:
        for name in names:
            runs[name] = start_contender(name, CONTENDERS[name], {**ctx, "round": tag}, logdir, tree)
            create_session(runs[name])
        yield runs
    finally:
        for run in runs.values():
            for proc in run.procs:
                proc.stop()


def process_cpu_seconds(exclude: set[int]) -> dict[int, float]:
    """CPU time of every process on the machine except ``exclude``.

    Per process rather than /proc/stat totals: kernel time for loopback networking is
    charged to no process, and would otherwise count as someone else's load. Reaped
    children's time is left out (it covers their whole life, not this window), so a
    short-lived process that exits within the window is missed: an estimate of the noise.
    """
    times: dict[int, float] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) in exclude:
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:  # exited meanwhile
            continue
        times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / _CLK_TCK
    return times


def other_cpu_seconds(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU time other processes used between two snapshots (new processes count whole)."""
    return sum(t - before.get(pid, 0.0) for pid, t in after.items() if t >= before.get(pid, 0.0))


def wait_for_quiet(exclude: set[int], limit: float) -> None:
    """Wait (at most ``limit`` seconds) until other processes use less than NOISY CPUs."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        before = process_cpu_seconds(exclude)
        time.sleep(0.5)
        if other_cpu_seconds(before, process_cpu_seconds(exclude)) / 0.5 < NOISY:
            return


def counter(run: Running) -> int:
    status, body, _ = http_get(run.port, "/counter", run.cookie)
    if status != 200:
        raise RuntimeError(f"{run.name}: /counter answered {status}")
    return int(body)


def measure_one(
    args: argparse.Namespace,
    run: Running,
    runs: Mapping[str, Running],
    services: list[Proc],
    test: str,
    wrk: Mapping[str, Any],
    counts: dict[str, dict[str, int]],
) -> dict[str, Any]:
    """One wrk run of ``test`` against ``run``, with its server CPU and the machine's noise."""
    for proc in run.procs:
        proc.check_alive()
    before = counter(run) if test == "write" else 0
    cpu = sum(proc.cpu_seconds() for proc in run.procs)
    # this script (and wrk, its child), the servers and the services
    exclude = {os.getpid(), *(p.popen.pid for r in runs.values() for p in r.procs)}
    exclude.update(p.popen.pid for p in services)
    if args.settle > 0:
        wait_for_quiet(exclude, args.settle)
    snapshot, start = process_cpu_seconds(exclude), time.monotonic()
    res = run_wrk(run.port, f"/{test}", run.cookie, duration=args.duration, **wrk)
    wall = time.monotonic() - start
    others = other_cpu_seconds(snapshot, process_cpu_seconds(exclude))
    cpu = sum(proc.cpu_seconds() for proc in run.procs) - cpu
    # Server CPU per request is far less sensitive to other load on the machine than
    # req/s: it is the cost, not the share of a core we got.
    res["cpu_us"] = cpu / max(res["requests"], 1) * 1e6
    # What everything else on the machine used meanwhile, in CPUs: the noise.
    res["other_load"] = others / wall
    if test == "write":
        counts[run.name]["requests"] += res["requests"]
        counts[run.name]["increments"] += counter(run) - before
    return res


def measure(args: argparse.Namespace) -> dict[str, Any]:
    names = select(args.only)
    if getattr(args, "against", None):
        names = add_before(names, args.against)
    tests = [t for t in TESTS if t in args.tests.split(",")]
    samples: dict[tuple[str, str], list[dict[str, Any]]] = {(n, t): [] for n in names for t in tests}
    counts: dict[str, dict[str, int]] = {n: {"requests": 0, "increments": 0} for n in names}
    with tempfile.TemporaryDirectory(prefix="clustersess-bench-") as tmp:
        lua = os.path.join(tmp, "report.lua")
        with open(lua, "w") as f:
            f.write(WRK_LUA)
        # Every round starts every server afresh. One process can be several per cent
        # faster or slower than another running the very same code (memory layout, hash
        # seed); with a new process per round, the medians measure the code, not the luck
        # of one process.
        with services_running(names, tmp) as (ctx, services):
            wrk = {"connections": args.connections, "lua": lua}
            for rnd in range(args.rounds):
                with running(names, ctx, tmp, f"r{rnd + 1}") as runs:
                    if args.warmup > 0:
                        for name in names:
                            for test in tests:
                                run_wrk(runs[name].port, f"/{test}", runs[name].cookie, duration=args.warmup, **wrk)
                    # One test at a time across all contenders, so a contender's run and
                    # the baseline's it is compared with are seconds apart, not minutes:
                    # this machine's speed drifts by tens of per cent within a minute.
                    shift = rnd % len(names)  # rotate the order so no contender always goes first
                    for test in tests:
                        for name in names[shift:] + names[:shift]:
                            run = runs[name]
                            samples[name, test].append(measure_one(args, run, runs, services, test, wrk, counts))
                            res = samples[name, test][-1]
                            flag = f"  ERRORS: {res['errors']}" if res["errors"] else ""
                            print(
                                f"  round {rnd + 1}/{args.rounds}  {name:<20} {test:<5} {res['rps']:9.0f} req/s"
                                f"  p50 {res['p50_us'] / 1000:6.2f} ms  p99 {res['p99_us'] / 1000:6.2f} ms"
                                f"  cpu {res['cpu_us']:5.1f} us/req  other load {res['other_load']:4.2f} CPUs{flag}",
                                file=sys.stderr,
                                flush=True,
                            )
    summary: dict[str, dict[str, Any]] = {}
    for (name, test), rows in samples.items():
        summary.setdefault(name, {})[test] = {
            "rps": statistics.median(r["rps"] for r in rows),
            "p50_ms": statistics.median(r["p50_us"] for r in rows) / 1000,
            "p99_ms": statistics.median(r["p99_us"] for r in rows) / 1000,
            "cpu_us": statistics.median(r["cpu_us"] for r in rows),
            "errors": sum(r["errors"] for r in rows),
            "rounds_rps": [round(r["rps"]) for r in rows],
        }
    for name in names:
        for test in tests:
            # Ratios are paired: each round's run against the same round's baseline, then
            # the median of those, so drift between rounds cancels out.
            pairs = list(zip(samples[name, test], samples["baseline", test]))
            row = summary[name][test]
            row["ratio"] = statistics.median(r["rps"] / b["rps"] for r, b in pairs)
            row["cpu_ratio"] = statistics.median(b["cpu_us"] / r["cpu_us"] for r, b in pairs)
            row["rounds_ratio"] = [round(r["rps"] / b["rps"], 3) for r, b in pairs]
        if "write" in tests:
            summary[name]["write"]["writes_landed"] = counts[name]
    for name in names:
        if f"{name}-before" not in names:
            continue
        for test in tests:
            # this tree against the earlier one, paired by round like the baseline ratios
            pairs = list(zip(samples[name, test], samples[f"{name}-before", test]))
            summary[name][test]["vs_before"] = statistics.median(r["rps"] / b["rps"] for r, b in pairs)
            summary[name][test]["cpu_vs_before"] = statistics.median(b["cpu_us"] / r["cpu_us"] for r, b in pairs)
            summary[name][test]["rounds_vs_before"] = [round(r["rps"] / b["rps"], 3) for r, b in pairs]
    return {
        "command": " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
        "machine": machine_info(),
        "settings": {
            "rounds": args.rounds,
            "duration_s": args.duration,
            "connections": args.connections,
            "warmup_s": args.warmup,
            "settle_s": args.settle,
            "server_cpus": SERVER_CPUS,
            "client_cpus": CLIENT_CPUS,
        },
        "contenders": {n: CONTENDERS[n].label for n in names},
        "other_load": {
            "median": statistics.median(r["other_load"] for rows in samples.values() for r in rows),
            "max": max(r["other_load"] for rows in samples.values() for r in rows),
        },
        "summary": summary,
        "samples": {f"{n}/{t}": rows for (n, t), rows in samples.items()},
    }


def table(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        (
            f"medians of {s['rounds']} interleaved rounds x {s['duration_s']} s (ratios: medians of per-round"
            f" ratios), wrk -t1 -c{s['connections']};"
            f" server on CPU {s['server_cpus']}, wrk (and Redis) on CPU {s['client_cpus']}"
        ),
        (
            f"other processes on the machine used a median {result['other_load']['median']:.2f} CPUs"
            f" (max {result['other_load']['max']:.2f}) during the runs"
        ),
        "",
        "| contender | test | req/s | p50 ms | p99 ms | vs baseline | server CPU us/req | CPU vs baseline |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for test in TESTS:
        for name, label in result["contenders"].items():
            row = result["summary"][name].get(test)
            if row is None:
                continue
            err = f" ({row['errors']} errors)" if row["errors"] else ""
            lines.append(
                f"| {label} | {test} | {row['rps']:,.0f}{err} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} |"
                f" {row['ratio']:.2f}x | {row['cpu_us']:.1f} | {row['cpu_ratio']:.2f}x |"
            )
    notes = []
    for name, label in result["contenders"].items():
        row = result["summary"][name].get("write")
        if row is None:
            continue
        landed = row["writes_landed"]
        if CONTENDERS[name].server_side:
            notes.append(
                f"- {label}: the stored counter grew by {landed['increments']:,} over "
                f"{landed['requests']:,} completed write requests"
            )
        else:
            notes.append(f"- {label}: state is in the cookie; every write re-signs the same initial state")
    if notes:
        lines += ["", "Write check (GET /counter before and after each write run):", *notes]
    verdicts = []
    for (name, test), target in TARGETS.items():
        row = result["summary"].get(name, {}).get(test)
        if row is not None:
            ok = "met" if row["ratio"] >= target else "MISSED"
            verdicts.append(
                f"- {name} {test}: {row['ratio']:.2f}x of baseline req/s (target >= {target:.2f}x): {ok};"
                f" by server CPU per request {row['cpu_ratio']:.2f}x;"
                f" per round {' '.join(f'{r:.2f}' for r in row['rounds_ratio'])}"
            )
    if verdicts:
        lines += ["", "Targets:", *verdicts]
    if result["other_load"]["median"] > NOISY:
        lines += ["", f"WARNING: other load above {NOISY} CPUs: req/s and latencies are unreliable, run again later"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=int, default=5, help="whole seconds per wrk run (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the table shows medians (default 3)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument("--warmup", type=int, default=1, help="whole seconds of unmeasured load per contender and test, every round")
    parser.add_argument(
        "--settle",
        type=float,
        default=0.0,
        help="before each run, wait up to this many seconds for other processes to go quiet (default 0: off)",
    )
    parser.add_argument("--only", help=f"comma-separated contenders (baseline always runs): {', '.join(CONTENDERS)}")
    parser.add_argument("--tests", default=",".join(TESTS), help="comma-separated: read,write (default both)")
    parser.add_argument("--json", metavar="PATH", help="also write every sample and the medians as JSON")
    parser.add_argument(
        "--against",
        metavar="TREE",
        help="also run each contender from another checkout (e.g. a git worktree of an earlier commit) as <name>-before",
    )
    parser.add_argument("--list", action="store_true", help="list the contenders and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, contender in CONTENDERS.items():
            print(f"{name:<26} {contender.label}{'' if contender.default else '  (only with --only)'}")
        return
    missing = [tool for tool in ("wrk", "taskset") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"needs {' and '.join(missing)} (Debian: apt-get install -y wrk util-linux)")
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("needs at least 2 CPUs: the server and wrk are pinned to different cores")
    if args.against and not os.path.isfile(os.path.join(args.against, "clustersess", "__init__.py")):
        raise SystemExit(f"--against {args.against}: not a checkout of this repository")
    result = measure(args)
    print(table(result))
    befores = [
        (name, test, row)
        for name, tests in result["summary"].items()
        for test, row in tests.items()
        if "vs_before" in row
    ]
    if befores:
        print(f"\nthis tree against {args.against} (paired per round, medians):\n")
        print("| contender | test | req/s ratio | CPU/request ratio (before / now) | per round |")
        print("|---|---|---:|---:|---|")
        for name, test, row in befores:
            rounds = " ".join(f"{r:.3f}" for r in row["rounds_vs_before"])
            print(f"| {name} | {test} | {row['vs_before']:.3f} | {row['cpu_vs_before']:.3f} | {rounds} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
