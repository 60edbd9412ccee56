"""Generic fixtures shared by the whole suite, and two suite-wide checks.

Real processes only: ``redis_server`` is a real ``redis-server`` on a free port, and
``node_factory`` starts real ``clustersess node`` processes. Both kill what they started at
teardown, even when the test failed.

The report header says which ``redis-server`` the suite runs (see
:func:`tests.utils.redis_binary`). At the end, no process the suite started may still be
running: every child inherits a marker variable, and any process that still carries it
is killed and named, and the run fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from clustersess import FakeClock
from tests.utils import REQUIRE_ALL, TEST_SECRET, NodeProcess, RedisServer, ServerProcess, redis_binary

#: inherited by every process the suite starts (base_env keeps it: no CLUSTERSESS_ prefix)
RUN_MARKER = "TESTRUN_OF_CLUSTERSESS"


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault(RUN_MARKER, f"{os.getpid()}-{uuid.uuid4().hex[:8]}")


def pytest_report_header(config: pytest.Config) -> list[str]:
    found = redis_binary()
    redis = found.describe() if found is not None else "none found (tests that need it skip)"
    lines = [f"clustersess: {redis}"]
    if REQUIRE_ALL:
        lines.append("clustersess: CLUSTERSESS_TEST_REQUIRE_ALL is set: a test that needs a missing tool fails")
    return lines


def _leftovers(marker: str) -> list[tuple[int, str]]:
    """Processes other than this one whose environment carries ``marker``."""
    needle = f"{RUN_MARKER}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(
                    (int(entry.name), (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
                )
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return found


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    marker = os.environ.get(RUN_MARKER, "")
    # Only the run that made the marker checks (a pytest started by a test inherits it).
    if not marker.startswith(f"{os.getpid()}-") or not Path("/proc/self/environ").exists():
        return
    left = _leftovers(marker)
    for pid, _ in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    if left:
        listing = "\n".join(f"  pid {pid}: {cmd}" for pid, cmd in left)
        session.config.get_terminal_writer().line(f"\nprocesses outlived the suite (killed now):\n{listing}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> None:
    # When a hypothesis test fails, its report hook imports libcst (to suggest a patch),
    # which emits a DeprecationWarning; under filterwarnings=error that turns a readable
    # failure into a pytest INTERNALERROR. Import it here first, with the warning muted.
    if call.excinfo is not None and hasattr(getattr(item, "obj", None), "hypothesis"):
        with warnings.catch_warnings(), contextlib.suppress(ImportError):
            warnings.simplefilter("ignore", DeprecationWarning)
            import hypothesis.extra._patching  # noqa: F401


@pytest.fixture
def secret() -> str:
    return TEST_SECRET


@pytest.fixture
def fake_clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh, real redis-server on a free port (function-scoped; stop()/start() allowed)."""
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def node_factory() -> Iterator[Callable[..., NodeProcess]]:
    """``node_factory(name, **kw)`` starts a :class:`NodeProcess` (waits for /health);
    ``node_factory(name, start=False, **kw)`` only builds it. All are killed at teardown."""
    made: list[ServerProcess] = []

    def make(name: str = "node1", *, start: bool = True, **kwargs: Any) -> NodeProcess:
        node = NodeProcess(name, **kwargs)
        made.append(node)
        if start:
            node.start()
        return node

    try:
        yield make
    finally:
        for proc in made:
            proc.kill()


@pytest.fixture
def process_factory() -> Iterator[Callable[..., ServerProcess]]:
    """Like ``node_factory`` for any server command: ``process_factory(cmd, port=..., start=...)``."""
    made: list[ServerProcess] = []

    def make(cmd: list[str], *, start: bool = True, **kwargs: Any) -> ServerProcess:
        proc = ServerProcess(cmd, **kwargs)
        made.append(proc)
        if start:
            proc.start()
        return proc

    try:
        yield make
    finally:
        for proc in made:
            proc.kill()
