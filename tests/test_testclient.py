"""Testing an app that uses clustersess: Starlette's TestClient, FastAPI, Flask's client.

Exactly what a user's own test suite does: any number of ``with TestClient(app)`` in one
process (each has an event loop of its own), in any order, with or without ``with``; a
configuration error raises out of ``TestClient.__enter__`` instead of hanging. Plus the
fixation-safe login recipes README shows, run as written.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi import FastAPI, Request
from flask import Flask, session
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from clustersess import ClusterSessionMiddleware, ConfigError
from clustersess.cluster import MemoryBus
from clustersess.flask_ext import ClusterSession

SECRET = "testclient-secret"


async def incr(request: Any) -> JSONResponse:
    request.session["n"] = request.session.get("n", 0) + 1
    return JSONResponse({"n": request.session["n"]})


async def plain(request: Any) -> JSONResponse:
    return JSONResponse({"ok": True})


def starlette_app(**options: Any) -> Starlette:
    options.setdefault("secret_key", SECRET)
    middleware = [Middleware(ClusterSessionMiddleware, **options)]
    return Starlette(routes=[Route("/incr", incr), Route("/plain", plain)], middleware=middleware)


def call_within(seconds: float, fn: Callable[[], Any]) -> Any:
    """``fn()`` in a thread; fails (instead of hanging the suite) if it takes longer."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds}s: it hangs"
    if "error" in box:
        raise box["error"]
    return box.get("result")


def manager_of(app: Any) -> Any:
    """The middleware instance Starlette built for ``app`` (one per app, kept across clients)."""
    layer = app.middleware_stack
    while not isinstance(layer, ClusterSessionMiddleware):
        layer = layer.app
    return layer.manager


# -- Starlette's TestClient -------------------------------------------------------------------


def test_any_number_of_test_clients_in_any_order_with_or_without_with() -> None:
    app = starlette_app()
    with TestClient(app) as client:
        assert client.get("/incr").json() == {"n": 1}
        cookie = client.cookies["JSESSIONID"]
        runner = manager_of(app)._runner
        assert runner is not None and not runner.done()  # the sweeper runs on this client's loop
    assert manager_of(app)._runner is None  # stopped with the lifespan
    for _ in range(3):  # again and again, each with a loop of its own: the usual pytest fixture
        with TestClient(app, cookies={"JSESSIONID": cookie}) as client:
            n = client.get("/incr").json()["n"]
    assert n == 4
    # Without `with` (no lifespan; every request on a new loop), then with it again.
    client = TestClient(app, cookies={"JSESSIONID": cookie})
    assert client.get("/incr").json() == {"n": 5}
    assert client.get("/incr").json() == {"n": 6}
    with TestClient(app, cookies={"JSESSIONID": cookie}) as client:
        assert client.get("/incr").json() == {"n": 7}
        runner = manager_of(app)._runner
        assert runner is not None and not runner.done()
    # And a fresh app never entered with `with` at all.
    other = starlette_app()
    assert TestClient(other).get("/incr").json() == {"n": 1}


def test_two_clients_of_one_app_at_once() -> None:
    app = starlette_app()
    with TestClient(app) as first, TestClient(app) as second:
        assert first.get("/incr").json() == {"n": 1}
        assert second.get("/incr").json() == {"n": 1}  # its own cookie jar: its own session
        assert first.get("/incr").json() == {"n": 2}


def test_a_configuration_error_raises_out_of_enter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLUSTERSESS_SECRET", raising=False)
    app = starlette_app(secret_key=None)

    def enter() -> None:
        with TestClient(app):
            pytest.fail("the app started without a secret")

    with pytest.raises(ConfigError, match="CLUSTERSESS_SECRET"):
        call_within(10, enter)
    # and without `with`: the first request raises it
    with pytest.raises(ConfigError, match="CLUSTERSESS_SECRET"):
        call_within(10, lambda: TestClient(app).get("/plain"))


def test_a_start_error_raises_out_of_enter() -> None:
    app = starlette_app(node_name="twin", transport=MemoryBus().transport())

    async def broken_start() -> None:
        raise RuntimeError("Redis said no")

    def enter() -> None:
        TestClient(app).get("/plain")  # builds the middleware stack (and starts once)
        manager_of(app).start = broken_start
        with TestClient(app):
            pytest.fail("started although start() failed")

    with pytest.raises(RuntimeError, match="Redis said no"):
        call_within(10, enter)


def test_a_clustered_app_under_repeated_test_clients() -> None:
    bus = MemoryBus()
    app = starlette_app(node_name="n1", transport=bus.transport(), drop_time=0.3, heartbeat_interval=0.05)
    with TestClient(app) as client:  # joins, serves, hands off and leaves on its loop
        assert client.get("/incr").json() == {"n": 1}
        cookie = client.cookies["JSESSIONID"]
    with TestClient(app, cookies={"JSESSIONID": cookie}) as client:  # and again on another
        assert client.get("/incr").json() == {"n": 2}


# -- FastAPI ------------------------------------------------------------------------------------


def fastapi_app() -> FastAPI:
    app = FastAPI()
    app.add_middleware(ClusterSessionMiddleware, secret_key=SECRET)

    @app.post("/login")
    def login(request: Request, user: str) -> dict[str, Any]:
        request.session.rotate()  # type: ignore[attr-defined]  # fixation: a new ID at login
        request.session["user"] = user
        return {"user": user}

    @app.get("/me")
    def me(request: Request) -> dict[str, Any]:
        return {"user": request.session.get("user")}

    @app.post("/logout")
    def logout(request: Request) -> dict[str, Any]:
        request.session.clear()  # ends the session everywhere; the cookie is deleted
        return {}

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"ok": True}

    return app


@pytest.fixture
def client() -> Iterator[TestClient]:
    """The pytest fixture README shows."""
    with TestClient(fastapi_app()) as client:
        yield client


@pytest.mark.parametrize("attempt", [1, 2])  # a function-scoped fixture, used twice
def test_fastapi_login_rotates_and_logout_ends_the_session(client: TestClient, attempt: int) -> None:
    assert client.get("/me").json() == {"user": None}
    planted = _planted_cookie(client)
    _hold(client, planted)
    assert client.post("/login", params={"user": "ann"}).json() == {"user": "ann"}
    logged_in = client.cookies["JSESSIONID"]
    assert logged_in != planted  # the ID a fixation attacker planted is not the one logged in
    assert client.get("/me").json() == {"user": "ann"}
    response = client.post("/logout")
    assert "JSESSIONID=null; path=/; expires=Thu, 01 Jan 1970" in response.headers["set-cookie"]
    assert "JSESSIONID" not in client.cookies
    _hold(client, logged_in)  # the old cookie is dead on the server too
    assert client.get("/me").json() == {"user": None}
    health = client.get("/health")
    assert "set-cookie" not in health.headers and "vary" not in health.headers


def _hold(client: TestClient, cookie: str) -> None:
    """Make the client's jar hold exactly this session cookie."""
    client.cookies.clear()
    client.cookies.set("JSESSIONID", cookie, domain="testserver.local")


def _planted_cookie(client: TestClient) -> str:
    """A valid session cookie an attacker got for themselves and planted on the victim."""
    with TestClient(client.app) as attacker:
        attacker.post("/login", params={"user": "mallory"})
        attacker.post("/logout")
        attacker.get("/me")
        response = attacker.post("/login", params={"user": "mallory"})
        assert response.status_code == 200
        return attacker.cookies["JSESSIONID"]


# -- Flask ----------------------------------------------------------------------------------------


@pytest.fixture
def flask_app() -> Iterator[Flask]:
    from flask_login import LoginManager, UserMixin, login_user, logout_user

    app = Flask(__name__)
    app.secret_key = SECRET
    ext = ClusterSession(app)
    login_manager = LoginManager(app)

    class User(UserMixin):
        def __init__(self, name: str) -> None:
            self.id = name

    login_manager.user_loader(User)

    @app.post("/login/<name>")
    def login(name: str) -> Any:
        session.rotate()  # type: ignore[attr-defined]  # the recipe: a new ID, then log in
        login_user(User(name))
        return {"user": name}

    @app.get("/me")
    def me() -> Any:
        from flask_login import current_user

        return {"user": current_user.get_id()}

    @app.post("/logout")
    def logout() -> Any:
        logout_user()
        session.clear()
        return {}

    yield app
    ext.close()


def test_flask_login_recipe(flask_app: Flask) -> None:
    client = flask_app.test_client()
    with client.session_transaction() as sess:  # Flask's way to prepare a session in a test
        sess["planted"] = True
    before = client.get_cookie("session")
    assert before is not None
    assert client.post("/login/ann").json == {"user": "ann"}
    after = client.get_cookie("session")
    assert after is not None and after.value != before.value
    assert client.get("/me").json == {"user": "ann"}
    client.post("/logout")
    assert client.get_cookie("session") is None
    client.set_cookie("session", after.value)  # the logged-in cookie, replayed after logout
    assert client.get("/me").json == {"user": None}
