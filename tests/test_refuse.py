"""What a client gets from a fenced node: serve mode answers from memory, refuse mode 503.

A clustered node over the in-memory bus is cut off (``bus.down``): it cannot prove it is
in the cluster, so it is fenced. With ``on_replication_failure="refuse"`` a write, a
login (rotate) and a logout (clear) are answered 503 with ``Retry-After`` and change
nothing; reads are still served. Once the bus is back the node is healthy again and the
same cookie finds the same data. The real-process versions are in ``test_faults.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from flask import session as flask_session
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from clustersess import ClusterSessionMiddleware
from clustersess.cluster import MemoryBus
from clustersess.flask_ext import ClusterSession
from tests.utils import TEST_SECRET

TIMING: dict[str, Any] = {"heartbeat_interval": 0.05, "drop_time": 0.5, "ack_timeout": 0.2}


def wait(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def starlette_app(bus: MemoryBus, mode: str) -> Starlette:
    async def write(request: Request) -> JSONResponse:
        request.session["n"] = request.session.get("n", 0) + 1
        return JSONResponse({"n": request.session["n"]})

    async def read(request: Request) -> JSONResponse:
        return JSONResponse(dict(request.session))

    async def login(request: Request) -> JSONResponse:
        request.session.rotate()  # type: ignore[attr-defined]
        return JSONResponse({"ok": True})

    async def logout(request: Request) -> JSONResponse:
        request.session.clear()
        return JSONResponse({"ok": True})

    async def health(request: Request) -> JSONResponse:
        verdict = request.scope["clustersess.manager"].health()
        return JSONResponse(verdict.as_dict(), status_code=200 if verdict.ok else 503)

    routes = [Route(p, f) for p, f in (
        ("/write", write), ("/read", read), ("/login", login), ("/logout", logout), ("/health", health),
    )]  # fmt: skip
    session = Middleware(
        ClusterSessionMiddleware, secret_key=TEST_SECRET, node_name="n1", transport=bus.transport(),
        on_replication_failure=mode, gc_freeze=False, **TIMING,
    )  # fmt: skip
    return Starlette(routes=routes, middleware=[session])


def healthy(client: Any) -> bool:
    return bool(client.get("/health").status_code == 200)


@pytest.mark.parametrize("mode", ["serve", "refuse"])
def test_a_fenced_starlette_node(mode: str) -> None:
    bus = MemoryBus()
    with TestClient(starlette_app(bus, mode)) as client:
        wait(lambda: healthy(client), "the node to join")
        assert client.get("/write").json() == {"n": 1}
        cookie = client.cookies["JSESSIONID"]
        bus.down = True  # cut off: it cannot prove it is in the cluster
        wait(lambda: not healthy(client), "the node to fence itself")
        assert client.get("/health").json()["state"] == "fenced"
        r = client.get("/write")
        if mode == "serve":
            assert r.status_code == 200 and r.json() == {"n": 2}  # from memory
        else:
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert "set-cookie" not in r.headers and "replicated" in r.text
            for path in ("/login", "/logout"):  # changed nothing, before it started
                r = client.get(path)
                assert r.status_code == 503 and "set-cookie" not in r.headers, path
            assert client.cookies["JSESSIONID"] == cookie
        assert client.get("/read").status_code == 200  # reads are served either way
        bus.down = False
        wait(lambda: healthy(client), "the node to be healthy again")
        assert client.get("/read").json() == {"n": 2 if mode == "serve" else 1}
        assert client.cookies["JSESSIONID"] == cookie
        assert client.get("/write").status_code == 200


def flask_app(bus: MemoryBus, mode: str) -> Flask:
    app = Flask(__name__)

    @app.get("/write")
    def write() -> Any:
        flask_session["n"] = flask_session.get("n", 0) + 1
        return {"n": flask_session["n"]}

    @app.get("/login")
    def login() -> Any:
        flask_session.rotate()  # type: ignore[attr-defined]
        return {"ok": True}

    @app.get("/health")
    def health() -> Any:
        verdict = app.extensions["clustersess"].manager.health()
        return verdict.as_dict(), 200 if verdict.ok else 503

    ClusterSession(
        app, secret_key=TEST_SECRET, node_name="n1", transport=bus.transport(), on_replication_failure=mode,
        gc_freeze=False, handle_signals=False, **TIMING,
    )  # fmt: skip
    return app


def test_a_fenced_flask_node_in_refuse_mode() -> None:
    bus = MemoryBus()
    app = flask_app(bus, "refuse")
    try:
        client = app.test_client()
        wait(lambda: client.get("/health").status_code == 200, "the node to join")
        assert client.get("/write").get_json() == {"n": 1}
        bus.down = True
        wait(lambda: client.get("/health").status_code == 503, "the node to fence itself")
        for path in ("/write", "/login"):
            r = client.get(path)
            assert r.status_code == 503 and r.headers["Retry-After"] == "1", (path, r.status_code, r.data)
        bus.down = False
        wait(lambda: client.get("/health").status_code == 200, "the node to be healthy again")
        assert client.get("/write").get_json() == {"n": 2}
    finally:
        app.extensions["clustersess"].close()
