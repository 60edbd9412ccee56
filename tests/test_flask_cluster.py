"""A Flask node under a real WSGI server in the same cluster as a Starlette node.

Real processes only: one ``redis-server``, a Starlette node (``clustersess node``), and the
Flask demo (``demo_app.wsgi:app``) under waitress or gunicorn.
"""

from __future__ import annotations

import itertools
import signal
import sys
import textwrap
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.utils import TEST_SECRET, NodeProcess, RedisServer, ServerProcess, base_env, free_port, wait_until

COOKIE = "JSESSIONID"


def request(method: str, url: str, cookie: str | None = None) -> tuple[dict[str, Any], str | None]:
    """One request on a fresh connection; returns (JSON body, the cookie to send next)."""
    headers = {"Cookie": f"{COOKIE}={cookie}"} if cookie else {}
    r = httpx.request(method, url, headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    new = r.cookies.get(COOKIE)
    return r.json(), (new if new is not None else cookie)


def members(url: str) -> set[str]:
    try:
        status = httpx.get(url + "/cluster.json", timeout=2).json()
    except httpx.HTTPError:
        return set()
    return {m["name"] for m in status["members"] if m.get("state") == "up"}


def wait_members(urls: list[str], names: set[str]) -> None:
    for url in urls:
        wait_until(lambda url=url: names <= members(url), timeout=10, what=f"{url} to see {sorted(names)}")


def flask_node(make: Callable[..., ServerProcess], name: str, redis: RedisServer, *, threads: int = 8) -> ServerProcess:
    port = free_port()
    env = base_env({"CLUSTERSESS_SECRET": TEST_SECRET, "CLUSTERSESS_NODE": name, "CLUSTERSESS_REDIS_URL": redis.url})
    cmd = [sys.executable, "-m", "waitress", "--host=127.0.0.1", f"--port={port}", f"--threads={threads}"]
    return make([*cmd, "demo_app.wsgi:app"], port=port, env=env)


@pytest.fixture
def pair(
    redis_server: RedisServer,
    node_factory: Callable[..., NodeProcess],
    process_factory: Callable[..., ServerProcess],
) -> tuple[ServerProcess, NodeProcess]:
    """A Flask node "flask1" (waitress) and a Starlette node "star1", on one Redis."""
    star = node_factory("star1", redis_url=redis_server.url)
    flask = flask_node(process_factory, "flask1", redis_server)
    wait_members([flask.url, star.url], {"flask1", "star1"})
    return flask, star


def test_flask_and_starlette_nodes_share_sessions_both_ways(pair: tuple[ServerProcess, NodeProcess]) -> None:
    flask, star = pair
    # Born on Flask, continued on Starlette, back on Flask.
    body, cookie = request("POST", flask.url + "/api/session/incr/n")
    assert body["data"] == {"n": 1} and cookie is not None and cookie.endswith(".flask1")
    body, cookie = request("POST", star.url + "/api/session/incr/n", cookie)
    assert body["data"] == {"n": 2} and body["node"] == "star1"
    assert cookie is not None and cookie.endswith(".star1")  # taken over: the route follows the owner
    body, cookie = request("POST", flask.url + "/api/session/incr/n", cookie)
    assert body["data"] == {"n": 3} and body["node"] == "flask1" and cookie.endswith(".flask1")  # type: ignore[union-attr]

    # Born on Starlette, read and changed on Flask, rotated there, read back on Starlette.
    body, cookie = request("POST", star.url + "/api/session/incr/k")
    body, cookie = request("GET", flask.url + "/api/session", cookie)
    assert body["data"] == {"k": 1} and body["node"] == "flask1"
    body, rotated = request("POST", flask.url + "/api/session/rotate", cookie)
    assert rotated != cookie
    body, _ = request("GET", star.url + "/api/session", rotated)
    assert body["data"] == {"k": 1}
    body, _ = request("GET", star.url + "/api/session", cookie)
    assert body["data"] == {} and body["new"]  # the pre-rotation ID is dead everywhere


def test_sigkill_of_the_flask_node_loses_no_session(pair: tuple[ServerProcess, NodeProcess]) -> None:
    flask, star = pair
    sessions: list[tuple[str, int]] = []
    for i in range(12):
        cookie = None
        for _ in range(i % 3 + 1):
            body, cookie = request("POST", flask.url + "/api/session/incr/n", cookie)
        assert cookie is not None
        sessions.append((cookie, body["data"]["n"]))
    flask.kill()  # SIGKILL: no hand-off; the backup copies must be enough
    for cookie, n in sessions:
        body, _ = request("GET", star.url + "/api/session", cookie)
        assert body["data"] == {"n": n}, cookie


def test_concurrent_increments_on_one_session_lose_none(pair: tuple[ServerProcess, NodeProcess]) -> None:
    flask, star = pair
    _, cookie = request("POST", flask.url + "/api/session/incr/n")
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: request("POST", flask.url + "/api/session/incr/n", cookie), range(48)))
    seen = sorted(body["data"]["n"] for body, _ in results)
    assert seen == list(range(2, 50))  # every request saw the previous one's write
    body, _ = request("GET", star.url + "/api/session", cookie)  # and the backup has the last one
    assert body["data"] == {"n": 49}


def test_sigterm_under_waitress_hands_sessions_over(pair: tuple[ServerProcess, NodeProcess]) -> None:
    flask, star = pair
    cookies = [request("POST", flask.url + "/api/session/incr/n")[1] for _ in range(5)]
    returncode = flask.terminate(timeout=15)
    assert returncode == -signal.SIGTERM, flask.log_text()  # handed over, then died of the signal as before
    # The only other member, star1, backs up all five and adopted them at the hand-off,
    # before any request asked for them (after a SIGKILL it would take them over later).
    status = httpx.get(star.url + "/cluster.json", timeout=5).json()
    assert status["stats"]["adopted"] == 5 and status["sessions_owned"] == 5
    for cookie in cookies:
        body, _ = request("GET", star.url + "/api/session", cookie)
        assert body["data"] == {"n": 1}


GUNICORN_CONF = textwrap.dedent(
    """
    import logging
    import os

    logging.basicConfig(level=logging.INFO)  # show clustersess's join/hand-off lines

    def post_fork(server, worker):
        # Each worker process is its own cluster member: node1_w1, node1_w2, ...
        os.environ["CLUSTERSESS_NODE"] = f"{os.environ['CLUSTERSESS_NODE_BASE']}_w{worker.age}"
    """
)


def gunicorn_pair(
    redis: RedisServer,
    node_factory: Callable[..., NodeProcess],
    process_factory: Callable[..., ServerProcess],
    tmp_path: Path,
) -> tuple[ServerProcess, NodeProcess]:
    """gunicorn with 2 gthread workers (members guni_w1, guni_w2) and a Starlette node."""
    conf = tmp_path / "gunicorn_conf.py"
    conf.write_text(GUNICORN_CONF)
    port = free_port()
    env = base_env(
        {"CLUSTERSESS_SECRET": TEST_SECRET, "CLUSTERSESS_NODE_BASE": "guni", "CLUSTERSESS_REDIS_URL": redis.url}
    )
    cmd = [sys.executable, "-m", "gunicorn", "-c", str(conf), "-w", "2", "-k", "gthread", "--threads", "4"]
    cmd += ["-b", f"127.0.0.1:{port}", "--graceful-timeout", "10", "demo_app.wsgi:app"]
    guni = process_factory(cmd, port=port, env=env)
    star = node_factory("star1", redis_url=redis.url)
    wait_members([star.url], {"star1", "guni_w1", "guni_w2"})
    return guni, star


def test_gunicorn_workers_are_members_and_alternating_requests_stay_correct(
    redis_server: RedisServer,
    node_factory: Callable[..., NodeProcess],
    process_factory: Callable[..., ServerProcess],
    tmp_path: Path,
) -> None:
    guni, star = gunicorn_pair(redis_server, node_factory, process_factory, tmp_path)
    # One user, sequential requests, each on a new connection: the kernel hands them to
    # either worker, so the session moves between the two members again and again.
    cookie = None
    served: list[str] = []
    for _ in range(40):
        body, cookie = request("POST", guni.url + "/api/session/incr/n", cookie)
        served.append(body["node"])
    assert body["data"] == {"n": 40}  # never lost, never stale
    assert set(served) == {"guni_w1", "guni_w2"}, served  # both workers really served it
    switches = sum(1 for a, b in itertools.pairwise(served) if a != b)
    assert switches > 0

    # The same session, 48 concurrent increments spread over both workers: the per-session
    # lock orders them only inside one process; across the two, ownership moves.
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: request("POST", guni.url + "/api/session/incr/n", cookie), range(48)))
    assert {body["node"] for body, _ in results} == {"guni_w1", "guni_w2"}
    body, _ = request("GET", guni.url + "/api/session", results[-1][1])
    assert body["data"] == {"n": 88}

    # SIGTERM to the master: each worker exits through sys.exit, where atexit runs the
    # hand-off: the owner of the session handed it on, and both workers announced that
    # they left (a worker that died without atexit is dropped for missing heartbeats).
    assert guni.terminate() == 0
    assert "clustersess: handed" in guni.log_text(), guni.log_text()
    wait_until(lambda: "member guni_w1 left" in star.log_text() and "member guni_w2 left" in star.log_text())


def test_gunicorn_workers_stopping_together_lose_no_session(
    redis_server: RedisServer,
    node_factory: Callable[..., NodeProcess],
    process_factory: Callable[..., ServerProcess],
    tmp_path: Path,
) -> None:
    guni, star = gunicorn_pair(redis_server, node_factory, process_factory, tmp_path)
    sessions = [request("POST", guni.url + "/api/session/incr/n")[1] for _ in range(20)]
    assert guni.terminate() == 0  # SIGTERM to the master: both workers stop at once
    lost = [c for c in sessions if request("GET", star.url + "/api/session", c)[0]["data"] != {"n": 1}]
    assert not lost, f"{len(lost)} of {len(sessions)} sessions lost"


def test_app_built_before_the_fork_fails_clearly(process_factory: Callable[..., ServerProcess]) -> None:
    # gunicorn --preload builds the app (and the loop thread) in the master; a forked
    # worker has no loop thread, so it must refuse requests with a message, not hang.
    port = free_port()
    env = base_env({"CLUSTERSESS_SECRET": TEST_SECRET, "CLUSTERSESS_NODE": "pre1"})
    cmd = [sys.executable, "-m", "gunicorn", "--preload", "-w", "1", "-b", f"127.0.0.1:{port}", "demo_app.wsgi:app"]
    proc = process_factory(cmd, port=port, env=env, start=False)
    proc.start(wait=False)

    def status() -> int | None:
        try:
            return httpx.get(proc.url + "/health", timeout=2).status_code
        except httpx.HTTPError:
            return None

    assert wait_until(status, timeout=20, what="gunicorn to answer") == 500
    assert "created before the server forked its workers" in proc.log_text()


def test_flask_node_serves_through_a_redis_outage_and_re_replicates(
    pair: tuple[ServerProcess, NodeProcess], redis_server: RedisServer
) -> None:
    flask, star = pair
    _, cookie = request("POST", flask.url + "/api/session/incr/n")
    applied = httpx.get(star.url + "/cluster.json", timeout=2).json()["stats"]["replications_applied"]
    redis_server.stop()  # SIGKILL: the bus is gone
    for expected in (2, 3, 4):
        body, cookie = request("POST", flask.url + "/api/session/incr/n", cookie)  # from memory, no hang
        assert body["data"] == {"n": expected}
    redis_server.start()  # same port: both nodes reconnect and re-replicate what changed meanwhile
    wait_members([flask.url, star.url], {"flask1", "star1"})
    wait_until(
        lambda: httpx.get(star.url + "/cluster.json", timeout=2).json()["stats"]["replications_applied"] > applied,
        timeout=10,
        what="flask1 to re-replicate the session changed during the outage",
    )
    flask.kill()
    body, _ = request("GET", star.url + "/api/session", cookie)
    assert body["data"] == {"n": 4}
