"""Generic fixtures shared by the whole suite.

Real processes only: ``redis_server`` is a real ``redis-server`` on a free port, and
``node_factory`` starts real ``clustersess node`` processes. Both kill what they started at
teardown, even when the test failed.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from clustersess import FakeClock
from tests.utils import TEST_SECRET, NodeProcess, RedisServer, ServerProcess


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
