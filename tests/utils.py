"""Shared test helpers: free ports, a real ``redis-server``, real node processes, and
what to do when a tool is missing.

Everything here starts *real* processes and always cleans them up: every wait has a
timeout, and the context managers (and the conftest fixtures built on them) kill what
they started even when the test fails. Logs go to files so a failing test can show them
(``proc.log_text()``).

A test that needs a tool the machine may lack calls :func:`require_tool` (or
:func:`require_redis`): without it the test is skipped with a message naming the Debian
package; with ``CLUSTERSESS_TEST_REQUIRE_ALL=1`` (set by ``.ci/run``) it fails instead, so
CI cannot pass by skipping.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import cache
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn, Self

import pytest

from clustersess import redisbin
from clustersess.cookies import CookieAction

if TYPE_CHECKING:
    from clustersess.manager import Handle, SessionManager

REPO_ROOT = Path(__file__).resolve().parent.parent
TEST_SECRET = "test-secret-4f1c9a2e7d3b5a60-not-for-production"

__all__ = [
    "DELETED",
    "REPO_ROOT",
    "REQUIRE_ALL",
    "TEST_SECRET",
    "NodeProcess",
    "RedisServer",
    "ServerProcess",
    "async_wait_until",
    "base_env",
    "cookie_after",
    "free_port",
    "http_get",
    "missing",
    "redis_binary",
    "require_redis",
    "require_tool",
    "wait_until",
]


#: set (by .ci/run) so that a test needing a missing tool fails instead of skipping
REQUIRE_ALL = os.environ.get("CLUSTERSESS_TEST_REQUIRE_ALL", "") not in ("", "0")


def missing(what: str, *, install: str) -> NoReturn:
    """Skip the current test (or module) for a missing prerequisite, or fail under
    ``CLUSTERSESS_TEST_REQUIRE_ALL``. ``install`` says how to get it."""
    message = f"needs {what}; {install}"
    if REQUIRE_ALL:
        pytest.fail(f"{message} (CLUSTERSESS_TEST_REQUIRE_ALL is set: nothing may skip)", pytrace=False)
    pytest.skip(message, allow_module_level=True)


def require_tool(name: str, *, package: str) -> str:
    """The path of executable ``name``, or skip/fail naming the Debian ``package``."""
    path = shutil.which(name)
    if path is None:
        missing(f"{name} on PATH", install=f"on Debian: apt-get install -y {package}")
    return path


@cache
def redis_binary() -> redisbin.RedisBinary | None:
    """The ``redis-server`` the suite runs (:func:`clustersess.redisbin.find_redis_server`)."""
    return redisbin.find_redis_server()


def require_redis(min_version: tuple[int, ...] = ()) -> redisbin.RedisBinary:
    """The suite's ``redis-server``, at least ``min_version``; else skip/fail saying how."""
    found = redis_binary()
    if found is None:
        missing("redis-server", install="pip install -e '.[test]' (ships one) or apt-get install -y redis-server")
    if found.version < min_version:
        wanted = ".".join(map(str, min_version))
        missing(f"Redis >= {wanted} (found {found.describe()})", install="on Debian: apt-get install -y redis-server")
    return found


#: what :func:`cookie_after` answers for a response that deletes the cookie
DELETED = "<deleted>"


async def cookie_after(manager: SessionManager, handle: Handle) -> str | None:
    """``manager.close(handle)`` as the client sees it: the cookie value a Set-Cookie
    carries, :data:`DELETED`, or ``None`` (no Set-Cookie)."""
    action = await manager.close(handle)
    if action is CookieAction.SET:
        return manager.cookie_value(handle)
    return DELETED if action is CookieAction.DELETE else None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to port 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_until(
    predicate: Callable[[], Any], *, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"
) -> Any:
    """Poll ``predicate`` until it returns something truthy; return it, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


async def async_wait_until(
    predicate: Callable[[], Any | Awaitable[Any]],
    *,
    timeout: float = 10.0,
    interval: float = 0.05,
    what: str = "condition",
) -> Any:
    """Async :func:`wait_until`; ``predicate`` may be a plain or an async callable."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def base_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any ``CLUSTERSESS_*`` variable, plus ``extra``.

    The repository root is put on ``PYTHONPATH`` so ``demo_app`` and ``tests.*`` app
    modules import in a child process whatever its working directory.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLUSTERSESS_")}
    env.pop("PYTEST_CURRENT_TEST", None)
    paths = [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def http_get(
    url: str, *, timeout: float = 2.0, headers: Mapping[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """A tiny blocking GET (no client library, no connection pool): (status, headers, body)."""
    assert url.startswith("http://"), url
    hostport, _, path = url[len("http://") :].partition("/")
    host, _, port = hostport.partition(":")
    conn = http.client.HTTPConnection(host, int(port or 80), timeout=timeout)
    try:
        conn.request("GET", "/" + path, headers=dict(headers or {}))
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def _signal_and_reap(proc: subprocess.Popen[bytes], sig: int, timeout: float) -> None:
    """Send ``sig`` to a running process and wait for it; SIGKILL it if it lingers.

    The process leads a process group of its own (``start_new_session``); once it has
    exited, and before it is reaped (so its group ID cannot be reused), whatever is left
    in the group is SIGKILLed: a SIGKILLed nginx master leaves its workers listening
    otherwise. The signal itself goes to the leader only, as a server would get it.
    """
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        if not _exited(proc.pid, timeout):
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            _exited(proc.pid, timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)


def _exited(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` has exited, without reaping it (it stays a zombie)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True  # reaped already
        if info is not None:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)


# -- redis ------------------------------------------------------------------------------


class RedisServer:
    """A real ``redis-server`` on a free port, in its own temporary directory.

    ``stop()`` kills it (SIGKILL by default, like a crash; pass ``signal.SIGTERM`` for a
    clean shutdown); ``start()`` starts it again on the SAME port, for outage tests.
    """

    def __init__(
        self, port: int | None = None, *, executable: str | None = None, startup_timeout: float = 10.0
    ) -> None:
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.executable = executable or require_redis().path
        self.startup_timeout = startup_timeout
        self.dir = Path(tempfile.mkdtemp(prefix="clustersess-redis-"))
        self.log_path = self.dir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> RedisServer:
        """Start (or restart) the server and wait until it answers PING."""
        assert not self.running, "redis-server is already running"
        cmd = [
            self.executable,
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.dir),
            "--protected-mode", "no",
            "--daemonize", "no",
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.dir,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.startup_timeout
        while not self.ping():
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}:\n{self.log_text()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"redis-server on port {self.port} did not answer PING:\n{self.log_text()}")
            time.sleep(0.02)
        return self

    def ping(self, timeout: float = 0.5) -> bool:
        """True if the server answers PING right now."""
        try:
            with socket.create_connection((self.host, self.port), timeout=timeout) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGKILL, timeout: float = 10.0) -> None:
        """Stop the server (SIGKILL: a crash; SIGTERM: a clean shutdown) and wait for it."""
        if self.proc is None:
            return
        _signal_and_reap(self.proc, sig, timeout)
        self.proc = None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


# -- server processes -------------------------------------------------------------------


class ServerProcess:
    """Any HTTP server command run as a child process, with its output in a log file.

    ``start()`` waits until ``GET <url><health_path>`` answers 200 (or until the process
    exits, which raises with its log). ``kill()``, ``terminate()`` and the context manager
    always reap the process. ``start()`` may be called again after it stopped (same port).
    """

    def __init__(
        self,
        cmd: Sequence[str],
        *,
        port: int,
        host: str = "127.0.0.1",
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        health_path: str = "/health",
        startup_timeout: float = 20.0,
        log_path: str | Path | None = None,
    ) -> None:
        self.cmd = list(cmd)
        self.port = port
        self.host = host
        self.env = dict(env) if env is not None else base_env()
        self.cwd = str(cwd or REPO_ROOT)
        self.health_path = health_path
        self.startup_timeout = startup_timeout
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="clustersess-proc-", suffix=".log")
            os.close(fd)
            log_path = name
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, *, wait: bool = True) -> ServerProcess:
        assert not self.running, "already running"
        self.returncode = None
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== start: {' '.join(self.cmd)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,  # see _signal_and_reap
            )
        if wait:
            try:
                self.wait_ready()
            except BaseException:
                self.kill()
                raise
        return self

    def is_ready(self) -> bool:
        try:
            status, _, _ = http_get(self.url + self.health_path, timeout=1.0)
        except (OSError, http.client.HTTPException):
            return False
        return status == 200

    def wait_ready(self, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.startup_timeout)
        assert self.proc is not None
        while not self.is_ready():
            if self.proc.poll() is not None:
                self.returncode = self.proc.returncode
                raise RuntimeError(
                    f"{self.cmd[:6]} exited with {self.returncode} before it was ready:\n{self.log_text()}"
                )
            if time.monotonic() > deadline:
                waited = timeout or self.startup_timeout
                raise TimeoutError(f"{self.url}{self.health_path} not ready after {waited}s:\n{self.log_text()}")
            time.sleep(0.05)

    def wait(self, timeout: float = 20.0) -> int:
        """Wait for the process to exit by itself; returns its exit code (kills it on timeout)."""
        assert self.proc is not None, "not started"
        try:
            self.returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise TimeoutError(f"process did not exit within {timeout}s:\n{self.log_text()}") from None
        return self.returncode

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 10.0) -> int | None:
        """Send ``sig`` (default SIGKILL: a crash) and reap the process."""
        if self.proc is None:
            return self.returncode
        _signal_and_reap(self.proc, sig, timeout)
        self.returncode = self.proc.returncode
        return self.returncode

    def terminate(self, timeout: float = 15.0) -> int | None:
        """Graceful stop: SIGTERM, then wait (SIGKILL if it takes longer than ``timeout``)."""
        return self.kill(signal.SIGTERM, timeout)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> Self:
        if self.proc is None:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.kill()
        if exc_type is not None:
            # Make the server's side of the story visible in the pytest report.
            sys.stderr.write(f"\n--- log of {self.cmd[:6]} ({self.log_path}) ---\n{self.log_text()[-8000:]}\n")


class NodeProcess(ServerProcess):
    """``python -m clustersess.cli node --name NAME --port PORT [APP]`` as a child process.

    Arguments:
        name: node name (route).
        port: default a free port.
        app: ``module:attr``; default the CLI's default (the demo app).
        env: extra environment (``CLUSTERSESS_*``...), on top of a clean :func:`base_env`.
        secret: ``CLUSTERSESS_SECRET``; pass ``None`` to leave it unset.
        redis_url: passed as ``--redis-url``.
        args: more CLI options, e.g. ``["--replication", "async"]``.
    """

    def __init__(
        self,
        name: str = "node1",
        port: int | None = None,
        app: str | None = None,
        *,
        env: Mapping[str, str] | None = None,
        secret: str | None = TEST_SECRET,
        redis_url: str | None = None,
        host: str = "127.0.0.1",
        args: Sequence[str] = (),
        log_level: str = "warning",
        **kwargs: Any,
    ) -> None:
        self.name = name
        port = port or free_port(host)
        extra: dict[str, str] = {}
        if secret is not None:
            extra["CLUSTERSESS_SECRET"] = secret
        extra.update(env or {})
        cmd = [sys.executable, "-m", "clustersess.cli", "node", "--name", name, "--host", host, "--port", str(port)]
        if redis_url:
            cmd += ["--redis-url", redis_url]
        cmd += ["--log-level", log_level, *args]
        if app:
            cmd.append(app)
        super().__init__(cmd, port=port, host=host, env=base_env(extra), **kwargs)

    def __repr__(self) -> str:
        return f"<NodeProcess {self.name} {self.url} pid={self.pid}>"
