"""Several workers of one server on one port: detected, refused without Redis, members with it.

Detection is unit-tested on real frames of functions that stand in for the servers' own;
everything else runs real servers: ``uvicorn --workers 2`` and gunicorn (gthread for the
Flask demo, uvicorn's worker class for the Starlette one), with a real ``redis-server``.
"""

from __future__ import annotations

import itertools
import re
import sys
import threading
import types
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from clustersess import Config, ConfigError
from clustersess.workers import ServerWorkers, base_route, detect, for_this_process, is_worker_route, worker_route
from tests.utils import TEST_SECRET, RedisServer, ServerProcess, base_env, free_port, wait_until

FAST = {"CLUSTERSESS_HEARTBEAT": "0.2", "CLUSTERSESS_DROP_TIME": "1.0"}


# -- routes and the decision ------------------------------------------------------------------


def test_worker_routes() -> None:
    assert worker_route("node1", 42) == "node1_w42"
    assert is_worker_route("node1_w42") and not is_worker_route("node1") and not is_worker_route("node1_wx")
    assert base_route("node1_w42") == "node1" and base_route("node1") == "node1"
    assert base_route("a_b_w1_w7") == "a_b_w1"  # only the last suffix is the worker's


CLUSTERED = Config(secret_key=TEST_SECRET, node_name="node1", redis_url="redis://127.0.0.1:1/0")
TWO = ServerWorkers("uvicorn", 2, "uvicorn --workers")


def test_a_single_process_keeps_its_name() -> None:
    assert for_this_process(CLUSTERED, ServerWorkers("gunicorn", 1, "gunicorn -w")) is CLUSTERED
    assert detect() is None  # pytest is no server


def test_clustered_workers_get_their_own_route_and_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    import os

    config = for_this_process(CLUSTERED, TWO)
    assert config.node_name == f"node1_w{os.getpid()}"
    [line] = [r.getMessage() for r in caplog.records if "workers on one port" in r.getMessage()]
    assert "slower" in line and "clustersess node --name node1 --workers 2" in line


def test_workers_without_redis_are_refused_with_the_fix() -> None:
    with pytest.raises(ConfigError) as info:
        for_this_process(Config(secret_key=TEST_SECRET), TWO)
    message = str(info.value)
    assert "lose its session" in message
    assert "clustersess node --name node1 --workers 2" in message and "CLUSTERSESS_REDIS_URL" in message


def test_a_name_set_per_worker_is_kept_and_a_long_one_refused() -> None:
    named = Config(secret_key=TEST_SECRET, node_name="node1_w3", redis_url="redis://h/0")
    assert for_this_process(named, TWO) is named  # e.g. from a gunicorn post_fork hook
    with pytest.raises(ConfigError, match="at most 23 characters"):
        for_this_process(Config(secret_key=TEST_SECRET, node_name="n" * 24, redis_url="redis://h/0"), TWO)


def _server_frame(module: str, function: str, owner: object, inner: Callable[[], Any]) -> Any:
    """Run ``inner`` inside a function called ``function`` of a module named ``module``."""
    namespace: dict[str, Any] = {"__name__": module, "inner": inner}
    exec(f"def {function}(self):\n    return inner()\n", namespace)  # noqa: S102 - a stand-in frame
    return namespace[function](owner)


def test_detect_reads_uvicorn_and_gunicorn_from_their_frames() -> None:
    uvicorn_process = types.SimpleNamespace(config=types.SimpleNamespace(workers=3))
    assert _server_frame("uvicorn.supervisors.multiprocess", "target", uvicorn_process, detect) == ServerWorkers(
        "uvicorn", 3, "uvicorn --workers"
    )
    arbiter = types.SimpleNamespace(num_workers=4)
    assert _server_frame("gunicorn.arbiter", "spawn_worker", arbiter, detect) == ServerWorkers(
        "gunicorn", 4, "gunicorn -w"
    )
    # A frame of another module with the same function name is not a server's.
    assert _server_frame("myapp.tasks", "target", uvicorn_process, detect) is None


def test_detect_sees_the_main_threads_frames_from_another_thread() -> None:
    # The WSGI middleware builds its manager on its loop thread while gunicorn's frames
    # are on the main thread, which waits.
    found: list[ServerWorkers | None] = []

    def from_a_thread() -> None:
        thread = threading.Thread(target=lambda: found.append(detect()))
        thread.start()
        thread.join()

    _server_frame("gunicorn.arbiter", "spawn_worker", types.SimpleNamespace(num_workers=2), from_a_thread)
    assert found == [ServerWorkers("gunicorn", 2, "gunicorn -w")]


# -- real servers ------------------------------------------------------------------------------


def request(method: str, url: str, cookie: str | None = None) -> tuple[dict[str, Any], str | None]:
    """One request on a fresh connection (the kernel picks the worker); (body, cookie)."""
    headers = {"Cookie": f"JSESSIONID={cookie}"} if cookie else {}
    r = httpx.request(method, url, headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    new = r.cookies.get("JSESSIONID")
    return r.json(), (new if new is not None else cookie)


def members(url: str) -> set[str]:
    try:
        status = httpx.get(url + "/cluster.json", timeout=2).json()
    except httpx.HTTPError:
        return set()
    return {m["name"] for m in status["members"] if m.get("state") == "up"}


def uvicorn_cmd(port: int, app: str = "demo_app:app", workers: int = 2) -> list[str]:
    return [sys.executable, "-m", "uvicorn", app, "--workers", str(workers), "--port", str(port)]


def gunicorn_cmd(port: int, app: str, *worker: str) -> list[str]:
    return [sys.executable, "-m", "gunicorn", "-w", "2", *worker, "-b", f"127.0.0.1:{port}", app]


def env(redis: RedisServer | None, name: str = "node1") -> dict[str, str]:
    extra = {"CLUSTERSESS_SECRET": TEST_SECRET, "CLUSTERSESS_NODE": name, **FAST}
    if redis is not None:
        extra["CLUSTERSESS_REDIS_URL"] = redis.url
    return base_env(extra)


REFUSAL = "without Redis each keeps its own sessions"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "server",
    [
        pytest.param("uvicorn", id="uvicorn --workers 2"),
        pytest.param("gunicorn-gthread", id="gunicorn -w 2 -k gthread (Flask)"),
    ],
)
def test_several_workers_without_redis_refuse_to_start(
    server: str, process_factory: Callable[..., ServerProcess]
) -> None:
    port = free_port()
    if server == "uvicorn":
        cmd = uvicorn_cmd(port)
    else:
        cmd = gunicorn_cmd(port, "demo_app.wsgi:app", "-k", "gthread", "--threads", "4")
    proc = process_factory(cmd, port=port, env=env(None), start=False)
    proc.start(wait=False)
    code = proc.wait(timeout=40)
    log = proc.log_text()
    assert REFUSAL in log and "clustersess node --name node1 --workers 2" in log, log
    assert not proc.is_ready()
    if server != "uvicorn":
        assert code != 0  # gunicorn: "Worker failed to boot"; uvicorn's parent exits 0 after stopping


def started_pair(
    cmd: list[str], redis: RedisServer, make: Callable[..., ServerProcess]
) -> tuple[ServerProcess, set[str]]:
    port = int(cmd[cmd.index("-b") + 1].rsplit(":", 1)[1]) if "-b" in cmd else int(cmd[cmd.index("--port") + 1])
    proc = make(cmd, port=port, env=env(redis))

    def two() -> set[str] | None:
        found = members(proc.url)
        return found if len(found) == 2 else None

    return proc, wait_until(two, timeout=20, what="2 members")


def alternate(url: str, rounds: int = 40) -> tuple[str | None, list[str]]:
    """Sequential increments of one session, each on a new connection; (cookie, nodes)."""
    cookie = None
    served = []
    for i in range(rounds):
        body, cookie = request("POST", url + "/api/session/incr/n", cookie)
        assert body["data"] == {"n": i + 1}, (i, body)  # never lost, never stale
        served.append(body["node"])
    return cookie, served


@pytest.mark.timeout(90)
def test_uvicorn_workers_with_redis_are_members_and_sessions_stay_exact(
    redis_server: RedisServer, process_factory: Callable[..., ServerProcess]
) -> None:
    proc, names = started_pair(uvicorn_cmd(free_port()), redis_server, process_factory)
    assert all(re.fullmatch(r"node1_w[0-9]+", n) for n in names), names
    cookie, served = alternate(proc.url)
    assert set(served) == names, served  # both workers served the one session
    assert sum(a != b for a, b in itertools.pairwise(served)) > 0
    # Concurrent increments across both workers: the ownership protocol orders them.
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: request("POST", proc.url + "/api/session/incr/n", cookie), range(32)))
    body, _ = request("GET", proc.url + "/api/session", results[-1][1])
    assert body["data"] == {"n": 72}
    log = proc.log_text()
    lines = [line for line in log.splitlines() if "workers on one port, so this one is cluster member" in line]
    assert len(lines) == 2 and all("clustersess node --name node1 --workers 2" in line for line in lines), log
    assert "DuplicateNodeError" not in log and "already named" not in log


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("app", "worker"),
    [
        pytest.param("demo_app.wsgi:app", ("-k", "gthread", "--threads", "4"), id="gthread Flask"),
        pytest.param("demo_app:app", ("-k", "uvicorn.workers.UvicornWorker"), id="UvicornWorker Starlette"),
    ],
)
def test_gunicorn_workers_with_redis_are_members_without_a_hook(
    app: str, worker: tuple[str, ...], redis_server: RedisServer, process_factory: Callable[..., ServerProcess]
) -> None:
    proc, names = started_pair(gunicorn_cmd(free_port(), app, *worker), redis_server, process_factory)
    assert all(re.fullmatch(r"node1_w[0-9]+", n) for n in names), names
    _, served = alternate(proc.url, 30)
    assert set(served) == names, served
