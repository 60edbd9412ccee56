#!/usr/bin/env python3
"""Flask session benchmark: clustersess's Flask node against Flask's own sessions, driven by wrk.

The same tiny Flask app (``make_app`` below) with four session setups:

* ``flask-cookie``: Flask's default signed-cookie session (the state is the cookie);
* ``flask-session``: Flask-Session with Redis (server-side, one Redis round trip per
  read, two per write);
* ``clustersess``: a single clustersess node (sessions in memory, no Redis);
* ``clustersess-backup``: a clustersess node in a cluster with a Starlette peer as its
  backup (sync replication: a write waits for the backup's ack over Redis).

Every app runs under waitress (4 threads, ``--threads``) pinned to CPU 0; wrk, Redis and the backup peer
run on CPU 1. Tests ``read`` and ``write`` re-send the cookie of one session created
beforehand (see ``bench.py`` for why): for clustersess every request of the run is a
request of the same session and queues on its per-session lock, its worst case.
``read-64`` and ``write-64`` spread the requests round robin over 64 sessions, closer to
real traffic.

Rounds are interleaved; the table shows medians and ratios to ``flask-cookie``.

    python3 loadtests/bench_flask.py                  # 3 rounds x 5 s
    python3 loadtests/bench_flask.py --rounds 5 --only clustersess,flask-session
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

# One harness: processes, Redis, wrk and its report script come from bench.py.
from bench import (
    CLIENT_CPUS,
    SECRET,
    SERVER_CPUS,
    WRK_LUA,
    Proc,
    _wait_until,
    free_port,
    http_get,
    machine_info,
    run_wrk,
    start_redis,
)

#: test name -> (path, how many sessions wrk spreads its requests over)
TESTS = {"read": ("/read", 1), "write": ("/write", 1), "read-64": ("/read", 64), "write-64": ("/write", 64)}
SESSIONS = max(n for _, n in TESTS.values())
BASELINE = "flask-cookie"
WAITRESS_THREADS = 4  # default of --threads

# wrk's request() hook: spread the requests over the cookies in COOKIES, round robin.
MANY_LUA = r"""
local i = 0
request = function()
  i = i + 1
  return wrk.format(nil, nil, {["Cookie"] = COOKIES[(i % #COOKIES) + 1]})
end
"""


@dataclasses.dataclass(frozen=True)
class Setup:
    label: str
    needs_redis: bool = False
    backup_peer: bool = False  # start a Starlette clustersess node as the backup


SETUPS: dict[str, Setup] = {
    "flask-cookie": Setup("Flask signed-cookie session (default)"),
    "flask-session": Setup("Flask-Session 0.8, Redis", needs_redis=True),
    "clustersess": Setup("clustersess Flask node, single"),
    "clustersess-backup": Setup("clustersess Flask node + backup (sync)", needs_redis=True, backup_peer=True),
}


# -- the app (imported by waitress in the server process) -------------------------------
def make_app() -> Any:
    """The Flask app for ``BENCH_SETUP`` (waitress ``--call bench_flask:make_app``)."""
    from flask import Flask, session

    setup = os.environ["BENCH_SETUP"]
    app = Flask(__name__)
    app.secret_key = SECRET
    if setup == "flask-session":
        import redis
        from flask_session import Session

        app.config.update(SESSION_TYPE="redis", SESSION_REDIS=redis.Redis.from_url(os.environ["BENCH_REDIS_URL"]))
        Session(app)
    elif setup.startswith("clustersess"):
        from clustersess.flask_ext import ClusterSession

        ClusterSession(app, secret_key=SECRET, node_name="flask1", redis_url=os.environ.get("BENCH_REDIS_URL"))

    @app.get("/health")
    def health() -> str:
        return "ok"

    @app.get("/setup")
    def setup_session() -> str:
        session["user"] = "alice"
        session["n"] = 0
        return "ok"

    @app.get("/read")
    def read() -> str:
        return str(session.get("user"))

    @app.get("/write")
    def write() -> str:
        session["n"] = session.get("n", 0) + 1
        return "ok"

    @app.get("/counter")
    def counter() -> str:
        return str(session.get("n", 0))

    return app


# -- running it -------------------------------------------------------------------------
@dataclasses.dataclass
class Running:
    name: str
    procs: list[Proc]
    port: int
    cookies: list[str] = dataclasses.field(default_factory=list)


def start(name: str, setup: Setup, redis_url: str | None, logdir: str, threads: int) -> Running:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLUSTERSESS_", "BENCH_"))}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    env["BENCH_SETUP"] = name
    if setup.needs_redis:
        assert redis_url is not None
        env["BENCH_REDIS_URL"] = redis_url
    procs: list[Proc] = []
    port = free_port()
    try:
        if setup.backup_peer:
            peer_port = free_port()
            peer_env = {**env, "CLUSTERSESS_SECRET": SECRET}
            argv = ["taskset", "-c", CLIENT_CPUS, sys.executable, "-m", "clustersess.cli", "node", "--name", "peer1",
                    "--port", str(peer_port), "--redis-url", str(redis_url), "--log-level", "warning"]  # fmt: skip
            procs.append(Proc(f"{name}-peer", argv, logdir, peer_env))
            _wait_until(lambda: http_get(peer_port, "/health")[0] == 200, procs[-1])
        argv = ["taskset", "-c", SERVER_CPUS, sys.executable, "-m", "waitress", "--host=127.0.0.1", f"--port={port}",
                f"--threads={threads}", "--call", "bench_flask:make_app"]  # fmt: skip
        procs.append(Proc(name, argv, logdir, env))
        _wait_until(lambda: http_get(port, "/health")[0] == 200, procs[-1])
        if setup.backup_peer:
            _wait_until(lambda: '"peer1"' in http_get(peer_port, "/cluster.json")[1], procs[-1])
    except BaseException:
        for proc in procs:
            proc.stop()
        raise
    run = Running(name, procs, port)
    for _ in range(SESSIONS):
        status, _, cookies = http_get(port, "/setup")
        if status != 200 or not cookies:
            raise RuntimeError(f"{name}: /setup answered {status} with Set-Cookie {cookies!r}")
        run.cookies.append(cookies[0].split(";", 1)[0].strip())
        status, body, _ = http_get(port, "/read", run.cookies[-1])
        if (status, body) != (200, "alice"):
            raise RuntimeError(f"{name}: /read with the session cookie answered {status} {body!r}")
    return run


def counter(run: Running, sessions: int) -> int:
    """The sum of the stored counters of the first ``sessions`` sessions."""
    return sum(int(http_get(run.port, "/counter", cookie)[1]) for cookie in run.cookies[:sessions])


def lua_script(tmp: str, run: Running, sessions: int) -> str:
    path = os.path.join(tmp, f"{run.name}-{sessions}.lua")
    if not os.path.exists(path):
        with open(path, "w") as f:
            f.write(WRK_LUA)
            if sessions > 1:
                quoted = ", ".join(f'"{c}"' for c in run.cookies[:sessions])
                f.write(f"COOKIES = {{{quoted}}}\n" + MANY_LUA)
    return path


def measure(args: argparse.Namespace) -> dict[str, Any]:
    names = [n.strip() for n in (args.only or ",".join(SETUPS)).split(",") if n.strip()]
    unknown = [n for n in names if n not in SETUPS]
    if unknown:
        raise SystemExit(f"unknown setup(s) {unknown}; choose from {', '.join(SETUPS)}")
    if BASELINE not in names:
        names.insert(0, BASELINE)
    samples: dict[tuple[str, str], list[dict[str, Any]]] = {(n, t): [] for n in names for t in TESTS}
    landed: dict[str, list[int]] = {n: [0, 0] for n in names}  # increments stored, write requests
    with tempfile.TemporaryDirectory(prefix="clustersess-bench-flask-") as tmp:
        services: list[Proc] = []
        runs: dict[str, Running] = {}
        try:
            ctx: dict[str, Any] = {}
            if any(SETUPS[n].needs_redis for n in names):
                services.append(start_redis(ctx, tmp))
            for name in names:
                runs[name] = start(name, SETUPS[name], ctx.get("redis_url"), tmp, args.threads)
            for name in names:
                for test, (path, n) in TESTS.items():
                    lua = lua_script(tmp, runs[name], n)
                    run_wrk(
                        runs[name].port,
                        path,
                        runs[name].cookies[0],
                        duration=args.warmup,
                        connections=args.connections,
                        lua=lua,
                    )
            for rnd in range(args.rounds):
                order = names[rnd % len(names) :] + names[: rnd % len(names)]
                for name in order:
                    run = runs[name]
                    for test, (path, n) in TESTS.items():
                        lua = lua_script(tmp, run, n)
                        writes = path == "/write"
                        before = counter(run, n) if writes else 0
                        res = run_wrk(
                            run.port,
                            path,
                            run.cookies[0],
                            duration=args.duration,
                            connections=args.connections,
                            lua=lua,
                        )
                        if writes:
                            landed[name][0] += counter(run, n) - before
                            landed[name][1] += res["requests"]
                        samples[(name, test)].append(res)
                        print(f"round {rnd + 1} {name:<20} {test:<8} {res['rps']:>8,.0f} req/s", file=sys.stderr)
                        time.sleep(0.2)
        finally:
            for run in runs.values():
                for proc in run.procs:
                    proc.stop()
            for proc in services:
                proc.stop()
    summary: dict[str, dict[str, Any]] = {}
    for name in names:
        summary[name] = {}
        for test in TESTS:
            rows = samples[(name, test)]
            summary[name][test] = {
                "rps": statistics.median(r["rps"] for r in rows),
                "p50_ms": statistics.median(r["p50_us"] for r in rows) / 1000,
                "p99_ms": statistics.median(r["p99_us"] for r in rows) / 1000,
                "errors": sum(r["errors"] for r in rows),
                "samples": [round(r["rps"]) for r in rows],
            }
    for name in names:
        for test in TESTS:
            summary[name][test]["ratio"] = summary[name][test]["rps"] / summary[BASELINE][test]["rps"]
    return {"summary": summary, "landed": landed, "names": names, "settings": vars(args), "machine": machine_info()}


def table(result: dict[str, Any]) -> str:
    s = result["settings"]
    header = (
        f"medians of {s['rounds']} interleaved rounds x {s['duration']} s, wrk -t1 -c{s['connections']}; waitress "
        f"({s['threads']} threads) on CPU {SERVER_CPUS}, wrk, Redis and the backup peer on CPU {CLIENT_CPUS}"
    )
    lines = [
        header,
        "",
        "| setup | test | req/s | p50 ms | p99 ms | vs Flask cookie session |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for test in TESTS:
        for name in result["names"]:
            row = result["summary"][name][test]
            err = f" ({row['errors']} errors)" if row["errors"] else ""
            lines.append(f"| {SETUPS[name].label} | {test} | {row['rps']:,.0f}{err} | {row['p50_ms']:.2f} |"
                         f" {row['p99_ms']:.2f} | {row['ratio']:.2f}x |")  # fmt: skip
    lines += ["", "Write check (server-side counter before and after each write run):"]
    for name in result["names"]:
        stored, requests = result["landed"][name]
        if name == "flask-cookie":
            lines.append(f"- {SETUPS[name].label}: state is in the cookie; every write re-signs the same state")
        else:
            lines.append(f"- {SETUPS[name].label}: {stored:,} increments stored for {requests:,} write requests")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of unmeasured load per setup and test")
    parser.add_argument("--threads", type=int, default=WAITRESS_THREADS, help="waitress threads (default 4)")
    parser.add_argument("--only", help=f"comma-separated setups (the baseline always runs): {', '.join(SETUPS)}")
    args = parser.parse_args(argv)
    missing = [tool for tool in ("wrk", "taskset", "redis-server") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"needs {', '.join(missing)} (Debian: apt-get install -y wrk util-linux redis-server)")
    print(table(measure(args)))


if __name__ == "__main__":
    main()
