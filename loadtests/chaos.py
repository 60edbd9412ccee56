#!/usr/bin/env python3
"""Chaos run: shop users against a real cluster while one node is SIGKILLed and restarted.

Starts what ``clustersess demo`` starts, on free ports: a ``redis-server``, N demo nodes
(``python -m clustersess.cli node``) and HAProxy in front, configured from the same
template (``clustersess.lb.render``). Then runs the users of ``locustfile.py`` (locust as a
library) for ``--duration`` seconds, SIGKILLs one node at ``--kill-at`` and starts it
again at ``--restart-at``, and ends with one line:

    chaos: requests 19112, 318.3 req/s, p50 3 ms, p95 29 ms, p99 51 ms, failures 0 (0.00%), sessions lost 0 of 1495 (...)

*Sessions lost* counts journeys (one user session each, login to logout) whose session
disappeared or stopped showing a write the cluster had acknowledged; *failures* also
count requests that got no answer because their node died under them, which the users
tolerate (see locustfile.py). In sync replication mode a lost session, or a logout the
cluster forgot, is a bug: the exit code is then 1. Exit code 2: the cluster did not start.

    python3 loadtests/chaos.py                                  # 3 nodes, 50 users, 60 s
    python3 loadtests/chaos.py --users 10 --duration 8 --kill-at 3 --restart-at 5
    python3 loadtests/chaos.py --replication async --lb none --report chaos.json

``--lb none`` puts no load balancer in front: each journey starts on the next node
round-robin and fails over to the following node when a connection is refused.
Membership timing can be set with CLUSTERSESS_HEARTBEAT, CLUSTERSESS_DROP_TIME and
CLUSTERSESS_ACK_TIMEOUT in the environment (defaults: Tomcat's 0.5 s, 3 s; 1 s).
"""

from __future__ import annotations

# locust runs on gevent: patch before anything opens sockets or starts processes.
from gevent import monkey

monkey.patch_all()

import argparse
import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import gevent
from locust import between, events
from locust.env import Environment

from clustersess import lb
from clustersess.demo import DemoError, choose_redis, http_status, redis_ping

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import locustfile

STARTUP_TIMEOUT = 30.0
#: membership settings a caller may pass through to the nodes
PASSED_THROUGH = (
    "CLUSTERSESS_HEARTBEAT",
    "CLUSTERSESS_DROP_TIME",
    "CLUSTERSESS_ACK_TIMEOUT",
    "CLUSTERSESS_MAX_INACTIVE",
)
STATS_SHOWN = ("takeovers", "takeover_misses", "adopted", "handed_over", "ack_timeouts", "requeued",
               "writes_after_handoff", "gaps_detected", "publish_errors")  # fmt: skip

log = logging.getLogger("chaos")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options:
    users: int = 50
    duration: float = 60.0
    nodes: int = 3
    replication: Literal["sync", "async"] = "sync"
    kill_at: float | None = None
    restart_at: float | None = None
    victim: str = "node2"
    lb: Literal["haproxy", "none"] = "haproxy"
    wait_min: float = 0.05
    wait_max: float = 0.3
    report: str | None = None
    keep_logs: bool = False

    @property
    def kill_time(self) -> float:
        return self.duration / 3 if self.kill_at is None else self.kill_at

    @property
    def restart_time(self) -> float:
        return 2 * self.duration / 3 if self.restart_at is None else self.restart_at


# -- processes ----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_prctl: Any = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def _die_with_us() -> None:
    # In the child: SIGTERM it if this script dies, so a killed run leaves nothing behind.
    if _prctl is not None:
        _prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclasses.dataclass(eq=False)
class Proc:
    """One child process; ``start()`` may be called again after it died (same command)."""

    name: str
    cmd: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    cwd: Path | None = None
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as out:
            out.write(f"\n=== {time.strftime('%H:%M:%S')} start: {' '.join(self.cmd)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                self.cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=self.env, cwd=self.cwd, preexec_fn=_die_with_us,  # noqa: PLW1509 - no threads here (gevent)
            )  # fmt: skip

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 10.0) -> None:
        """Send ``sig`` and reap (SIGKILL after ``timeout``)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Cluster:
    """Redis, nodes node1..nodeN and (optionally) HAProxy, as ``clustersess demo`` runs them."""

    def __init__(self, opts: Options, rundir: Path) -> None:
        self.opts = opts
        self.rundir = rundir
        self.redis: Proc | None = None
        self.nodes: dict[str, tuple[int, Proc]] = {}
        self.haproxy: Proc | None = None
        self.lb_port: int | None = None

    def _wait(self, what: str, ready: Callable[[], bool], proc: Proc, timeout: float = STARTUP_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if not proc.alive:
                raise DemoError(f"{what} exited while starting; log {proc.log_path}:\n{proc.tail()}")
            if time.monotonic() > deadline:
                raise DemoError(f"{what} was not ready after {timeout:.0f}s; log {proc.log_path}:\n{proc.tail()}")
            gevent.sleep(0.05)

    def start(self) -> None:
        plan = choose_redis({})  # never an external Redis: the run owns its own
        assert plan.binary is not None
        port = _free_port()
        self.redis = Proc("redis", [plan.binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                    "--appendonly", "no", "--dir", str(self.rundir)], self.rundir / "redis.log")  # fmt: skip
        self.redis.start()
        self._wait("redis-server", lambda: redis_ping(port), self.redis)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLUSTERSESS_") or k in PASSED_THROUGH}
        env.update(
            CLUSTERSESS_SECRET=secrets.token_urlsafe(32),
            CLUSTERSESS_REDIS_URL=f"redis://127.0.0.1:{port}/0",
            PYTHONPATH=os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])]),
        )
        for i in range(1, self.opts.nodes + 1):
            name, node_port = f"node{i}", _free_port()
            cmd = [sys.executable, "-m", "clustersess.cli", "node", "--name", name, "--port", str(node_port),
                   "--replication", self.opts.replication, "--log-level", "warning"]  # fmt: skip
            proc = Proc(name, cmd, self.rundir / f"{name}.log", env={**env, "CLUSTERSESS_NODE": name})
            proc.start()
            self.nodes[name] = (node_port, proc)
        for name in self.nodes:
            self.wait_healthy(name)
        self.wait_members()
        if self.opts.lb == "haproxy":
            self._start_haproxy()

    def _start_haproxy(self) -> None:
        binary = lb.find("haproxy")
        if binary is None:
            raise DemoError("--lb haproxy: no haproxy binary found (apt-get install haproxy), or use --lb none")
        self.lb_port = _free_port()
        backends = [lb.Backend(name, "127.0.0.1", port) for name, (port, _) in self.nodes.items()]
        directory = self.rundir / "haproxy"
        directory.mkdir()
        config = directory / lb.FILES["haproxy"]
        config.write_text(lb.render("haproxy", backends, listen=f"127.0.0.1:{self.lb_port}", cookie=locustfile.COOKIE))
        self.haproxy = Proc(
            "haproxy", lb.command("haproxy", binary, config), self.rundir / "haproxy.log", cwd=directory
        )
        self.haproxy.start()
        port = self.lb_port
        self._wait("HAProxy", lambda: (http_status("127.0.0.1", port, "/health", timeout=1.0) or (0,))[0] == 200, self.haproxy)

    def wait_healthy(self, name: str) -> None:
        port, proc = self.nodes[name]
        self._wait(name, lambda: (http_status("127.0.0.1", port, "/health", timeout=1.0) or (0,))[0] == 200, proc)

    def wait_members(self, timeout: float = 15.0) -> None:
        """Until every live node sees all live nodes."""
        want = {n for n, (_, p) in self.nodes.items() if p.alive}

        def formed() -> bool:
            for name in want:
                seen = {m.get("name") for m in (self.status(name) or {}).get("members", [])}
                if not want <= seen:
                    return False
            return True

        deadline = time.monotonic() + timeout
        while not formed():
            if time.monotonic() > deadline:
                raise DemoError(f"the nodes did not all see each other within {timeout:.0f}s")
            gevent.sleep(0.1)

    def status(self, name: str) -> dict[str, Any] | None:
        port, proc = self.nodes[name]
        answer = http_status("127.0.0.1", port, "/cluster.json", timeout=1.0) if proc.alive else None
        if answer is None or answer[0] != 200:
            return None
        with contextlib.suppress(ValueError):
            return json.loads(answer[1])  # type: ignore[no-any-return]
        return None

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port, _ in self.nodes.values()]

    def stop(self) -> None:
        """Load balancer first, then the nodes (SIGTERM: they hand sessions over), then Redis."""
        if self.haproxy:
            self.haproxy.kill(signal.SIGTERM)
        for _, proc in self.nodes.values():
            if proc.alive and proc.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    proc.proc.send_signal(signal.SIGTERM)
        for _, proc in self.nodes.values():
            proc.kill(signal.SIGTERM)
        if self.redis:
            self.redis.kill(signal.SIGTERM)


# -- the run --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Timeline:
    """What happened when, in seconds since the users started."""

    entries: list[tuple[float, str]] = dataclasses.field(default_factory=list)
    t0: float = 0.0

    def add(self, text: str) -> None:
        t = round(time.monotonic() - self.t0, 2)
        self.entries.append((t, text))
        log.info("t=%.2fs %s", t, text)


def run(opts: Options, out: Any = sys.stdout) -> int:
    """Start the cluster, run the users through the chaos, print the summary; exit code."""
    say: Callable[[str], None] = lambda text: (out.write(text + "\n"), out.flush())
    rundir = Path(tempfile.mkdtemp(prefix="clustersess-chaos-"))
    cluster = Cluster(opts, rundir)
    try:
        try:
            cluster.start()
        except DemoError as exc:
            say(f"chaos: the cluster did not start: {exc}")
            return 2
        code = _run_users(opts, cluster, say)
    finally:
        cluster.stop()
    if code == 0 and not opts.keep_logs:
        shutil.rmtree(rundir, ignore_errors=True)
    else:
        say(f"chaos: logs in {rundir}")
    return code


def _run_users(opts: Options, cluster: Cluster, say: Callable[[str], None]) -> int:
    if opts.victim not in cluster.nodes:
        raise SystemExit(f"--victim {opts.victim}: no such node (node1..node{opts.nodes})")
    ledger = locustfile.LEDGER
    locustfile.ShopUser.wait_time = between(opts.wait_min, opts.wait_max)
    if opts.lb == "none":
        locustfile.NODES[:] = cluster.urls
        host = cluster.urls[0]
    else:
        locustfile.NODES[:] = []
        host = f"http://127.0.0.1:{cluster.lb_port}"
    env = Environment(user_classes=[locustfile.ShopUser], host=host, events=events)
    runner = env.create_local_runner()
    timeline = Timeline()
    _, victim = cluster.nodes[opts.victim]
    owned_at_kill: dict[str, Any] = {}
    restart_ok: list[bool] = []

    def kill() -> None:
        owned_at_kill.update(cluster.status(opts.victim) or {})
        victim.kill(signal.SIGKILL)
        timeline.add(f"SIGKILLed {opts.victim} (pid {victim.pid}, owned {owned_at_kill.get('sessions_owned', '?')} "
                     f"and backed up {owned_at_kill.get('sessions_backed_up', '?')} sessions)")  # fmt: skip

    def restart() -> None:
        victim.start()
        timeline.add(f"restarting {opts.victim} (pid {victim.pid})")
        try:
            cluster.wait_healthy(opts.victim)
        except DemoError as exc:
            timeline.add(f"{opts.victim} did not come back: {exc}")
            restart_ok.append(False)
            return
        restart_ok.append(True)
        timeline.add(f"{opts.victim} is serving again")

    ledger.reset()
    timeline.t0 = time.monotonic()
    runner.start(opts.users, spawn_rate=max(10.0, opts.users / 2))
    timeline.add(f"{opts.users} users starting")
    chaos = []
    if opts.kill_time < opts.duration:
        chaos.append(gevent.spawn_later(opts.kill_time, kill))
        if opts.restart_time < opts.duration:
            chaos.append(gevent.spawn_later(opts.restart_time, restart))
    gevent.sleep(opts.duration)
    runner.quit()
    elapsed = time.monotonic() - timeline.t0
    gevent.joinall(chaos, timeout=STARTUP_TIMEOUT)
    timeline.add("users stopped")

    statuses = {name: cluster.status(name) for name in cluster.nodes}
    total = env.stats.total
    counters = {k: sum(int((s or {}).get("stats", {}).get(k, 0)) for s in statuses.values()) for k in STATS_SHOWN}
    summary = {
        "requests": total.num_requests,
        "rps": round(total.num_requests / elapsed, 1) if elapsed else 0.0,
        "p50_ms": total.get_response_time_percentile(0.50),
        "p95_ms": total.get_response_time_percentile(0.95),
        "p99_ms": total.get_response_time_percentile(0.99),
        "failures": total.num_failures,
        "sessions_lost": ledger.sessions_lost,
        "sessions": ledger.journeys_started,
    }

    for t, text in timeline.entries:
        say(f"  t={t:6.2f}s  {text}")
    say("  users: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in ledger.as_dict().items()))
    say(
        "  cluster now (live nodes, counters since each started): " + ", ".join(f"{k} {v}" for k, v in counters.items())
    )
    errors = sorted(env.stats.errors.values(), key=lambda e: -e.occurrences)
    for err in errors[:8]:
        say(f"  failure x{err.occurrences}: {err.method} {err.name}: {err.error}")
    for p in ledger.problems[:10]:
        say("  problem: " + json.dumps(p))
    if runner.exceptions:
        for exc in runner.exceptions.values():
            say(f"  user crashed x{exc['count']}: {exc['msg']}\n{exc['traceback']}")

    if opts.report:
        Path(opts.report).write_text(json.dumps({
            "options": dataclasses.asdict(opts), "summary": summary, "ledger": ledger.as_dict(),
            "problems": ledger.problems, "timeline": timeline.entries, "errors": [
                {"method": e.method, "name": e.name, "error": str(e.error), "count": e.occurrences} for e in errors
            ], "cluster": statuses, "killed_node_status": owned_at_kill,
        }, indent=2, default=str))  # fmt: skip

    failed_share = 100.0 * total.num_failures / total.num_requests if total.num_requests else 0.0
    restarted = f", restarted at {opts.restart_time:g} s" if restart_ok else ""
    chaos_text = f"{opts.victim} killed at {opts.kill_time:g} s{restarted}" if owned_at_kill else "no node killed"
    say(
        f"chaos: requests {summary['requests']}, {summary['rps']} req/s, p50 {summary['p50_ms']} ms, "
        f"p95 {summary['p95_ms']} ms, p99 {summary['p99_ms']} ms, failures {summary['failures']} ({failed_share:.2f}%), "
        f"sessions lost {summary['sessions_lost']} of {summary['sessions']} "
        f"({opts.replication}, {opts.nodes} nodes, lb {opts.lb}, {opts.users} users, {opts.duration:g} s, {chaos_text})"
    )

    code = 0
    if total.num_requests == 0:
        say("chaos: FAILED: no requests were made")
        code = 1
    if runner.exceptions:
        say("chaos: FAILED: user code raised (see above)")
        code = 1
    if restart_ok == [False]:
        say(f"chaos: FAILED: {opts.victim} did not restart")
        code = 1
    if opts.replication == "sync" and (ledger.sessions_lost or ledger.logouts_not_honoured):
        say(f"chaos: FAILED: sync replication lost {ledger.sessions_lost} session(s) and forgot "
            f"{ledger.logouts_not_honoured} logout(s)")  # fmt: skip
        code = 1
    return code


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--users", type=int, default=50, help="simulated users (default 50)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    p.add_argument("--nodes", type=int, default=3, help="cluster nodes (default 3)")
    p.add_argument("--replication", choices=["sync", "async"], default="sync")
    p.add_argument(
        "--kill-at", type=float, default=None, help="SIGKILL the victim after this many seconds (default duration/3)"
    )
    p.add_argument("--restart-at", type=float, default=None, help="start it again (default 2*duration/3)")
    p.add_argument("--victim", default="node2", help="the node to kill (default node2)")
    p.add_argument("--lb", choices=["haproxy", "none"], default="haproxy")
    p.add_argument("--wait", type=float, nargs=2, default=(0.05, 0.3), metavar=("MIN", "MAX"),
                   help="think time between a user's requests, seconds (default 0.05 0.3)")  # fmt: skip
    p.add_argument("--report", help="write a JSON report (timeline, problems, /cluster.json of every node) here")
    p.add_argument("--keep-logs", action="store_true", help="keep the processes' logs even when the run passes")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    if a.nodes < 2:
        p.error("--nodes must be at least 2 (one is killed)")
    logging.basicConfig(
        level=logging.INFO if a.verbose else logging.WARNING, format="%(asctime)s %(name)s: %(message)s"
    )
    opts = Options(
        users=a.users, duration=a.duration, nodes=a.nodes, replication=a.replication, kill_at=a.kill_at,
        restart_at=a.restart_at, victim=a.victim, lb=a.lb, wait_min=a.wait[0], wait_max=a.wait[1],
        report=a.report, keep_logs=a.keep_logs,
    )  # fmt: skip
    os.environ["SHOP_QUIET"] = "1"  # the locustfile's own summary: we print ours
    return run(opts)


if __name__ == "__main__":
    sys.exit(main())
