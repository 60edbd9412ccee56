"""``clustersess node --workers N``: N worker processes on N ports, one member each.

The fast way to use several cores of a machine. Every worker is an ordinary single-process
``clustersess node`` (uvicorn + uvloop, no ``--workers``) on its own port, P..P+N-1, with
its own route derived from the node name (``node1_w1``, ``node1_w2``, ...), so the load
balancer sends each session straight to the worker that owns it: no request pays for a
takeover, unlike N workers sharing one port (see :mod:`clustersess.workers`).

The supervisor starts the workers, prints the load balancer lines for them, and restarts a
worker that dies: the new process is a new incarnation of the same route, on the same
port, and takes its place in the cluster once the old one's name claim has expired (at
most the drop time). A worker that cannot start at all (a configuration error, a port in
use) stops the supervisor with its exit status, since a restart would fail the same way.
SIGTERM, SIGINT and SIGHUP stop every worker with one SIGTERM each, so each hands its
sessions to their backups before it exits; the workers run in their own process group, so
a Ctrl-C in the terminal reaches them only through the supervisor, once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from types import FrameType
from typing import Any, TextIO

from . import lb
from .config import ROUTE_RE
from .errors import ClusterSessError
from .workers import worker_route

__all__ = ["Supervisor", "SupervisorError", "WorkerPlan", "die_with_parent", "ports_in_use"]

#: a worker that dies sooner than this after its start counts as dying young (backoff)
STARTED_AFTER = 10.0
#: restart delays of a worker that keeps dying young: 0.5 s, 1 s, 2 s, ... at most this
MAX_BACKOFF = 30.0
#: how long stopping waits for the workers' hand-offs before SIGKILL
STOP_TIMEOUT = 30.0
POLL = 0.1


class SupervisorError(ClusterSessError):
    """The workers cannot be run as asked; the message says how to fix it."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorkerPlan:
    """What ``clustersess node --workers N`` runs: N routes on N consecutive ports.

    Raises:
        SupervisorError: a name too long for its workers' routes, or ports out of range.
    """

    name: str
    workers: int
    host: str = "127.0.0.1"
    port: int = 9091
    app: str = "demo_app:app"
    log_level: str = "info"

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise SupervisorError(f"--workers must be at least 1, not {self.workers}")
        last = worker_route(self.name, self.workers)
        if not ROUTE_RE.fullmatch(last):
            raise SupervisorError(
                f"node name {self.name!r} cannot name {self.workers} workers: their routes ({last}, ...) must be "
                "1-32 characters from A-Z a-z 0-9 _; choose a shorter --name"
            )
        if not 0 < self.port <= 65536 - self.workers:
            raise SupervisorError(f"--port {self.port} leaves no room for {self.workers} worker ports")

    @property
    def routes(self) -> list[str]:
        return [worker_route(self.name, i) for i in range(1, self.workers + 1)]

    @property
    def ports(self) -> list[int]:
        return [self.port + i for i in range(self.workers)]

    def backends(self, host: str | None = None) -> list[lb.Backend]:
        """The workers as load balancer servers, reached at ``host`` (default: the bound
        address, or this machine's host name when bound to every interface)."""
        if host is None:
            host = socket.gethostname() if self.host in ("0.0.0.0", "::", "") else self.host
        return [lb.Backend(route, host, port) for route, port in zip(self.routes, self.ports)]

    def command(self, index: int) -> list[str]:
        """The command line of worker ``index`` (0-based): one plain ``clustersess node``."""
        return [
            sys.executable, "-m", "clustersess.cli", "node",
            "--name", self.routes[index], "--host", self.host, "--port", str(self.ports[index]),
            "--log-level", self.log_level, self.app,
        ]  # fmt: skip


def die_with_parent(parent: int) -> Callable[[], None]:
    """A ``preexec_fn`` asking Linux to SIGTERM the child when ``parent`` dies, so a
    ``kill -9`` of the supervisor (or the demo) leaves no orphan behind."""
    prctl: Any = None
    if sys.platform.startswith("linux"):
        import ctypes

        # Looked up before fork: the child only makes the call.
        prctl = ctypes.CDLL(None, use_errno=True).prctl

    def preexec() -> None:
        if prctl is not None:
            prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


@dataclasses.dataclass(eq=False)
class _Worker:
    index: int
    route: str
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    #: its port accepted a connection in this life (uvicorn listens once the app started)
    listening: bool = False
    #: deaths in a row before STARTED_AFTER
    young_deaths: int = 0
    restart_at: float | None = None
    lives: int = 0


class Supervisor:
    """Runs a :class:`WorkerPlan` until a stop signal; :meth:`run` returns the exit status.

    Arguments:
        plan: the workers to run.
        env: their environment (default this process's; ``CLUSTERSESS_NODE`` is set per worker).
        out: where the supervisor's own lines go (default stdout).
        command: ``index -> argv``, for tests (default :meth:`WorkerPlan.command`).
    """

    def __init__(
        self,
        plan: WorkerPlan,
        *,
        env: Mapping[str, str] | None = None,
        out: TextIO | None = None,
        command: Callable[[int], Sequence[str]] | None = None,
    ) -> None:
        self.plan = plan
        self.env = dict(os.environ if env is None else env)
        self.out = out or sys.stdout
        self.command = command or plan.command
        self.workers = [_Worker(i, route) for i, route in enumerate(plan.routes)]
        self.stopping = threading.Event()
        self.exit_status = 0
        self._ready = False

    # -- lifecycle --------------------------------------------------------------------------
    def run(self) -> int:
        """Start the workers, tend them until a stop signal, stop them; the exit status.

        Raises:
            SupervisorError: a port of the plan is in use.
        """
        signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        busy = ports_in_use(self.plan.host, self.plan.ports)
        if busy:
            raise SupervisorError(
                f"port(s) {', '.join(map(str, busy))} on {self.plan.host} are in use; the {self.plan.workers} workers "
                f"need {self.plan.ports[0]}-{self.plan.ports[-1]}: choose another --port"
            )
        previous = {sig: signal.signal(sig, self._on_signal) for sig in signals}
        try:
            for worker in self.workers:
                self._start(worker)
            self.print_lines()
            while not self.stopping.is_set():
                self._tend()
                self.stopping.wait(POLL)
        finally:
            self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self.exit_status

    def stop(self) -> None:
        """Ask :meth:`run` to stop the workers and return (from any thread)."""
        self.stopping.set()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopping.set()

    def _say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def _start(self, worker: _Worker) -> None:
        env = {**self.env, "CLUSTERSESS_NODE": worker.route}
        worker.proc = subprocess.Popen(
            list(self.command(worker.index)),
            env=env,
            stdin=subprocess.DEVNULL,
            # Own process group: a terminal's Ctrl-C reaches the workers only through us, as
            # one SIGTERM each (a second signal makes uvicorn skip its graceful hand-off).
            # Not a session of their own: with the kernel's autogroup scheduling each session
            # is scheduled as one unit, and on a busy machine workers in sessions of their
            # own ran at half the speed of the same workers in the supervisor's.
            process_group=0,
            preexec_fn=die_with_parent(os.getpid()),  # noqa: PLW1509 - the supervisor has no threads
        )
        worker.started = time.monotonic()
        worker.restart_at = None
        worker.lives += 1
        if worker.lives > 1:
            self._say(f"clustersess: restarted {worker.route} as pid {worker.proc.pid} (a new incarnation)")

    def _tend(self) -> None:
        now = time.monotonic()
        for worker in self.workers:
            proc = worker.proc
            if worker.restart_at is not None:
                if now >= worker.restart_at:
                    self._start(worker)
                continue
            if proc is None or proc.poll() is None:
                if proc is not None and not worker.listening:
                    worker.listening = _listening(proc.pid, self.plan.host, self.plan.ports[worker.index])
                    if worker.listening and all(w.listening for w in self.workers) and not self._ready:
                        self._ready = True
                        self._say(f"clustersess: all {len(self.workers)} workers of {self.plan.name} are listening")
                continue
            code = proc.returncode
            lived = now - worker.started
            if lived >= STARTED_AFTER:
                worker.young_deaths = 0
            ever_served = worker.listening or worker.lives > 1
            worker.listening = False
            if not ever_served and code > 0:
                # Never got going: the app, the config or the port is broken, and would
                # be again. Stop, with the worker's status.
                self._say(f"clustersess: {worker.route} could not start ({_describe(code)}); stopping")
                self.exit_status = code
                self.stopping.set()
                return
            if lived < STARTED_AFTER:
                worker.young_deaths += 1
            delay = min(MAX_BACKOFF, 0.5 * 2 ** max(0, worker.young_deaths - 1)) if worker.young_deaths else 0.0
            self._say(
                f"clustersess: {worker.route} (pid {proc.pid}) {_describe(code)} after {lived:.1f}s; "
                f"restarting it{f' in {delay:.1f}s' if delay else ''}"
            )
            worker.restart_at = now + delay

    def _stop_all(self) -> None:
        running = [w.proc for w in self.workers if w.proc is not None and w.proc.poll() is None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc in running:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # -- output -------------------------------------------------------------------------------
    def print_lines(self) -> None:
        """The workers, and the load balancer lines that route to them."""
        plan = self.plan
        backends = plan.backends()
        self._say(f"clustersess: node {plan.name} runs {plan.workers} workers, one cluster member each:")
        for worker, backend in zip(self.workers, backends):
            pid = worker.proc.pid if worker.proc is not None else "-"
            self._say(f"  {worker.route:<{max(len(r) for r in plan.routes)}}  {backend.address}  pid {pid}")
        self._say("HAProxy lines for them (backend section):")
        for line in lb.node_lines("haproxy", backends):
            self._say(f"    {line}")
        specs = " ".join(f"{b.name}={b.address}" for b in backends)
        self._say(f"a whole load balancer config: clustersess lb-config --lb haproxy|nginx {specs} [other nodes...]")


def _listening(pid: int, host: str, port: int) -> bool:
    """Whether process ``pid`` listens on ``port`` (uvicorn does once its app started).

    On Linux, by the process's own sockets, so another program on the port does not
    count; elsewhere, whether the port accepts a connection at all.
    """
    if os.path.isdir(f"/proc/{pid}/fd"):
        inodes = _listening_inodes(port)
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:[") and link[8:-1] in inodes:
                        return True
        return False
    connect = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
    try:
        with socket.create_connection((connect, port), timeout=0.05):
            return True
    except OSError:
        return False


def _listening_inodes(port: int) -> set[str]:
    """Inodes of the TCP sockets listening on ``port`` (``/proc/net/tcp``, state 0A)."""
    found: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table, encoding="ascii") as f:
            next(f, None)
            for line in f:
                fields = line.split()
                if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    found.add(fields[9])
    return found


def ports_in_use(host: str, ports: Sequence[int]) -> list[int]:
    """Which of ``ports`` cannot be bound on ``host`` right now."""
    busy = []
    for port in ports:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                busy.append(port)
    return busy


def _describe(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"
