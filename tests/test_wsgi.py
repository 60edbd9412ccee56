"""The WSGI middleware and the Flask integration, in process (direct WSGI calls and
werkzeug's/Flask's test clients; the manager really runs on its own loop thread)."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest
from flask import Flask, flash, get_flashed_messages, session
from werkzeug.exceptions import InternalServerError
from werkzeug.test import Client

from clustersess import ConfigError, FakeClock, Session, SessionEvent, SessionListener, SessionTooLarge
from clustersess.cluster import MemoryBus
from clustersess.flask_ext import ClusterSession, FlaskSession
from clustersess.wsgi import MANAGER_KEY, SESSION_KEY, ClusterSessionWSGIMiddleware

SECRET = "wsgi-test-secret"

Environ = dict[str, Any]


# -- plain WSGI apps -------------------------------------------------------------------------


def counter_app(environ: Environ, start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Increments session["n"] with a deliberate pause between read and write."""
    session = environ[SESSION_KEY]
    n = session.get("n", 0)
    time.sleep(0.002)  # without the per-session lock, concurrent requests interleave here
    session["n"] = n + 1
    start_response("200 OK", [("Content-Type", "text/plain"), ("Cache-Control", "public, max-age=60")])
    return [str(session["n"]).encode()]


def reader_app(environ: Environ, start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(environ[SESSION_KEY].get("n")).encode()]


def generator_app(environ: Environ, start_response: Callable[..., Any]) -> Iterator[bytes]:
    """Calls start_response only when the body is first iterated (PEP 3333 allows it)."""
    environ[SESSION_KEY]["lazy"] = True
    start_response("200 OK", [("Content-Type", "text/plain")])
    yield b"a"
    yield b"b"


def failing_app(environ: Environ, start_response: Callable[..., Any]) -> Iterable[bytes]:
    environ[SESSION_KEY]["n"] = 999
    raise RuntimeError("boom")


def huge_app(environ: Environ, start_response: Callable[..., Any]) -> Iterable[bytes]:
    environ[SESSION_KEY].setdefault("blob", []).append("x" * 200)  # nested: found at commit
    start_response("200 OK", [])
    return [b""]


def dispatch(environ: Environ, start_response: Callable[..., Any]) -> Iterable[bytes]:
    apps = {"/incr": counter_app, "/read": reader_app, "/lazy": generator_app, "/fail": failing_app, "/huge": huge_app}
    return apps[environ["PATH_INFO"]](environ, start_response)


@pytest.fixture
def make() -> Iterator[Callable[..., ClusterSessionWSGIMiddleware]]:
    made: list[ClusterSessionWSGIMiddleware] = []

    def build(app: Any = dispatch, **kw: Any) -> ClusterSessionWSGIMiddleware:
        kw.setdefault("secret_key", SECRET)
        mw = ClusterSessionWSGIMiddleware(app, **kw)
        made.append(mw)
        return mw

    yield build
    for mw in made:
        mw.close()


@pytest.fixture
def mw(make: Callable[..., ClusterSessionWSGIMiddleware]) -> ClusterSessionWSGIMiddleware:
    return make()


def call(app: Any, path: str, cookie: str | None = None) -> tuple[str, dict[str, list[str]], bytes]:
    """One request straight through the WSGI interface (thread-safe, no cookie jar)."""
    environ: Environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "SERVER_NAME": "t", "SERVER_PORT": "80"}
    if cookie is not None:
        environ["HTTP_COOKIE"] = cookie
    got: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
        got["status"] = status
        got["headers"] = headers
        return lambda data: None

    result = app(environ, start_response)
    try:
        body = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    headers: dict[str, list[str]] = {}
    for name, value in got["headers"]:
        headers.setdefault(name.lower(), []).append(value)
    return got["status"], headers, body


def cookie_of(headers: dict[str, list[str]]) -> str:
    (set_cookie,) = headers["set-cookie"]
    return set_cookie.split(";")[0]


# -- the middleware ------------------------------------------------------------------------------


def test_session_round_trip_and_headers(mw: ClusterSessionWSGIMiddleware) -> None:
    status, headers, body = call(mw, "/incr")
    assert status == "200 OK" and body == b"1"
    cookie = cookie_of(headers)
    assert cookie.startswith("JSESSIONID=") and cookie.endswith(".node1")
    set_cookie = headers["set-cookie"][0]
    assert "httponly" in set_cookie and "samesite=lax" in set_cookie and "path=/" in set_cookie
    assert headers["vary"] == ["Cookie"]
    assert headers["cache-control"] == ["private, max-age=60"]  # "public" dropped: it sets a cookie

    status, headers, body = call(mw, "/incr", cookie)
    assert body == b"2" and "set-cookie" not in headers  # same ID: no new cookie
    assert headers["vary"] == ["Cookie"] and headers["cache-control"] == ["public, max-age=60"]
    _, headers, body = call(mw, "/read", cookie)
    assert body == b"2" and "set-cookie" not in headers
    assert mw.manager.status()["sessions_owned"] == 1


def test_request_without_session_use_gets_no_cookie(mw: ClusterSessionWSGIMiddleware) -> None:
    _, headers, body = call(mw, "/read")
    assert body == b"None" and "set-cookie" not in headers and "vary" not in headers
    assert mw.manager.status()["sessions_owned"] == 0


def test_environ_exposes_manager(make: Callable[..., ClusterSessionWSGIMiddleware]) -> None:
    seen: dict[str, Any] = {}

    def app(environ: Environ, start_response: Callable[..., Any]) -> Iterable[bytes]:
        seen.update(environ)
        start_response("200 OK", [])
        return [b""]

    mw = make(app)
    call(mw, "/")
    assert seen[MANAGER_KEY] is mw.manager and isinstance(seen[SESSION_KEY], Session)


@pytest.mark.parametrize("cookie", ["JSESSIONID=garbage.node1", "JSESSIONID=" + "A" * 24 + "~" + "B" * 43 + ".node1"])
def test_forged_cookie_gets_a_fresh_session(mw: ClusterSessionWSGIMiddleware, cookie: str) -> None:
    _, headers, body = call(mw, "/incr", cookie)
    assert body == b"1" and "A" * 24 not in cookie_of(headers)
    assert mw.manager.stats.rejected_cookies == 1


def test_missing_secret_is_a_config_error_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLUSTERSESS_SECRET", raising=False)
    with pytest.raises(ConfigError, match="CLUSTERSESS_SECRET"):
        ClusterSessionWSGIMiddleware(dispatch)


def test_configuration_from_environment(
    monkeypatch: pytest.MonkeyPatch, make: Callable[..., ClusterSessionWSGIMiddleware]
) -> None:
    monkeypatch.setenv("CLUSTERSESS_SECRET", SECRET)
    monkeypatch.setenv("CLUSTERSESS_NODE", "wsgi_7")
    monkeypatch.setenv("CLUSTERSESS_COOKIE", "SID")
    mw = make(secret_key=None)
    _, headers, _ = call(mw, "/incr")
    cookie = cookie_of(headers)
    assert cookie.startswith("SID=") and cookie.endswith(".wsgi_7")


def test_invalid_keyword_is_a_config_error(make: Callable[..., ClusterSessionWSGIMiddleware]) -> None:
    with pytest.raises(ConfigError, match="node name"):
        make(node_name="bad name")


def test_generator_app_gets_cookie_and_releases_session(mw: ClusterSessionWSGIMiddleware) -> None:
    mw.app = generator_app
    status, headers, body = call(mw, "/lazy")
    assert status == "200 OK"
    assert body == b"ab" and "set-cookie" in headers
    assert mw.node.locked_sessions == 0
    mw.app = dispatch
    assert mw.manager.stats.commits == 1  # the change made before start_response was stored


def test_failed_request_changes_are_dropped_and_lock_released(mw: ClusterSessionWSGIMiddleware) -> None:
    _, headers, _ = call(mw, "/incr")
    cookie = cookie_of(headers)
    with pytest.raises(RuntimeError, match="boom"):
        call(mw, "/fail", cookie)
    assert mw.node.locked_sessions == 0
    _, _, body = call(mw, "/read", cookie)
    assert body == b"1"


def test_commit_error_propagates_and_releases_lock(make: Callable[..., ClusterSessionWSGIMiddleware]) -> None:
    mw = make(max_session_size=1000)
    _, headers, _ = call(mw, "/huge")
    cookie = cookie_of(headers)
    for _ in range(3):
        call(mw, "/huge", cookie)
    with pytest.raises(SessionTooLarge):
        for _ in range(5):
            call(mw, "/huge", cookie)
    assert mw.node.locked_sessions == 0
    assert mw.manager.stats.too_large == 1


def test_concurrent_increments_on_one_session_lose_none(mw: ClusterSessionWSGIMiddleware) -> None:
    _, headers, _ = call(mw, "/incr")
    cookie = cookie_of(headers)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(4):
                call(mw, "/incr", cookie)
        except Exception as exc:  # noqa: BLE001  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    _, _, body = call(mw, "/read", cookie)
    assert body == b"65"  # 1 + 16 threads x 4
    assert mw.node.locked_sessions == 0


def test_different_sessions_do_not_wait_for_each_other(make: Callable[..., ClusterSessionWSGIMiddleware]) -> None:
    inside = threading.Event()
    release = threading.Event()

    def app(environ: Environ, start_response: Callable[..., Any]) -> Iterable[bytes]:
        environ[SESSION_KEY]["x"] = 1
        if environ["PATH_INFO"] == "/block":
            inside.set()
            assert release.wait(10)
        start_response("200 OK", [])
        return [b""]

    mw = make(app)
    _, h1, _ = call(mw, "/")
    _, h2, _ = call(mw, "/")
    blocked = threading.Thread(target=call, args=(mw, "/block", cookie_of(h1)))
    blocked.start()
    assert inside.wait(10)
    started = time.monotonic()
    call(mw, "/", cookie_of(h2))  # another session: does not wait for the blocked one
    assert time.monotonic() - started < 2
    release.set()
    blocked.join(10)
    assert not blocked.is_alive()


def test_sweeper_runs_on_the_loop_thread(make: Callable[..., ClusterSessionWSGIMiddleware]) -> None:
    clock = FakeClock()
    mw = make(clock=clock, max_inactive=10, sweep_interval=0.05)
    call(mw, "/incr")
    assert mw.manager.status()["sessions_owned"] == 1
    clock.advance(11)
    deadline = time.monotonic() + 5
    while mw.manager.status()["sessions_owned"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert mw.manager.status()["sessions_owned"] == 0 and mw.manager.stats.sessions_expired == 1


def test_close_is_idempotent_and_restores_sigterm(make: Callable[..., ClusterSessionWSGIMiddleware]) -> None:
    before = signal.getsignal(signal.SIGTERM)
    mw = make()
    assert signal.getsignal(signal.SIGTERM) == mw.node._on_sigterm  # pytest's main thread, default handler
    thread = mw.node._loop._thread
    mw.close()
    mw.close()
    assert not thread.is_alive()
    assert signal.getsignal(signal.SIGTERM) == before


def test_server_with_own_sigterm_handler_is_left_alone(make: Callable[..., ClusterSessionWSGIMiddleware]) -> None:
    def handler(signum: int, frame: Any) -> None:  # pragma: no cover - never delivered
        pass

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        make()
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- Flask ---------------------------------------------------------------------------------------


@pytest.fixture
def flask_app() -> Iterator[tuple[Flask, ClusterSession]]:
    app = Flask(__name__)
    ext = ClusterSession(app, secret_key=SECRET, node_name="flask1", max_session_size=2000)

    @app.get("/incr")
    def incr() -> Any:
        session["n"] = session.get("n", 0) + 1
        return {"n": session["n"], "id": session.id, "cls": type(session._get_current_object()).__name__}  # type: ignore[attr-defined]

    @app.get("/read")
    def read() -> Any:
        return {"data": dict(session), "new": session.new, "permanent": session.permanent}

    @app.post("/login")
    def login() -> Any:
        old = session.id
        session.rotate()
        session["user"] = "ann"
        session.permanent = True
        session.modified = True  # what Flask code does after a nested change: harmless
        return {"old": old, "id": session.id}

    @app.post("/logout")
    def logout() -> Any:
        session.invalidate()
        return {"id": session.id}

    @app.get("/flash")
    def do_flash() -> Any:
        flash("hello", "info")
        return "ok"

    @app.get("/flashes")
    def flashes() -> Any:
        return {"messages": get_flashed_messages(with_categories=True)}

    @app.get("/huge")
    def huge() -> Any:
        session.setdefault("blob", []).append("x" * 1000)
        return "ok"

    @app.errorhandler(500)
    def server_error(exc: InternalServerError) -> Any:
        # A commit error surfaces while Flask finalizes the response, as its 500.
        return {"error": type(exc.original_exception).__name__}, 500

    @app.get("/plain")
    def plain() -> Any:
        return "no session here"

    yield app, ext
    ext.close()


def test_flask_session_is_the_clustered_session(flask_app: tuple[Flask, ClusterSession]) -> None:
    app, ext = flask_app
    client = app.test_client()
    r1 = client.get("/incr")
    r2 = client.get("/incr")
    assert r2.json == {"n": 2, "id": r1.json["id"], "cls": "FlaskSession"}  # type: ignore[index]
    assert r1.json["id"].endswith(".flask1")  # type: ignore[index]
    assert r1.headers["Set-Cookie"].startswith("session=")  # Flask's SESSION_COOKIE_NAME
    assert r1.headers["Cache-Control"] == "private"
    # Flask's rule (should_set_cookie): a change re-sends the cookie; here the same one.
    assert r2.headers["Set-Cookie"] == r1.headers["Set-Cookie"] and r2.headers["Vary"] == "Cookie"
    r3 = client.get("/read")
    assert "Set-Cookie" not in r3.headers and r3.headers["Vary"] == "Cookie"
    assert ext.manager is app.extensions["clustersess"].manager
    assert isinstance(ext.manager.store.owned[r1.json["id"].split(".")[0]].session, FlaskSession)  # type: ignore[index]


def test_flask_rotate_invalidate_permanent(flask_app: tuple[Flask, ClusterSession]) -> None:
    app, ext = flask_app
    client = app.test_client()
    first = client.get("/incr").json["id"]  # type: ignore[index]
    login = client.post("/login")
    assert login.json["old"] == first and login.json["id"] != first  # type: ignore[index]
    assert "Set-Cookie" in login.headers
    read = client.get("/read").json
    assert read == {"data": {"n": 1, "user": "ann", "_permanent": True}, "new": False, "permanent": True}
    logout = client.post("/logout")
    assert "Max-Age=0" in logout.headers["Set-Cookie"]
    assert client.get("/read").json["data"] == {}  # type: ignore[index]
    assert ext.manager.stats.sessions_rotated == 1 and ext.manager.stats.sessions_invalidated == 1


def test_flask_flash_messages_survive_json(flask_app: tuple[Flask, ClusterSession]) -> None:
    app, _ = flask_app
    client = app.test_client()
    client.get("/flash")
    assert client.get("/flashes").json == {"messages": [["info", "hello"]]}
    assert client.get("/flashes").json == {"messages": []}


def test_flask_commit_error_is_flasks_500(flask_app: tuple[Flask, ClusterSession]) -> None:
    app, ext = flask_app
    client = app.test_client()
    assert client.get("/huge").status_code == 200
    r = client.get("/huge")
    assert r.status_code == 500 and r.json == {"error": "SessionTooLarge"}
    assert ext.node is not None and ext.node.locked_sessions == 0
    assert len(client.get("/read").json["data"]["blob"]) == 1  # type: ignore[index]  # last good state


def test_flask_route_without_session_sets_nothing(flask_app: tuple[Flask, ClusterSession]) -> None:
    app, _ = flask_app
    r = app.test_client().get("/plain")
    assert r.data == b"no session here" and "Set-Cookie" not in r.headers and "Vary" not in r.headers


def test_flask_test_request_context_has_a_session(flask_app: tuple[Flask, ClusterSession]) -> None:
    app, ext = flask_app
    with app.test_request_context("/"):
        session["x"] = 1
        flash("works here too")
        assert get_flashed_messages() == ["works here too"]
    assert ext.node is not None and ext.node.locked_sessions == 0  # given up at teardown, not stored
    assert ext.manager.status()["sessions_owned"] == 0


def test_werkzeug_client_keeps_the_cookie(mw: ClusterSessionWSGIMiddleware) -> None:
    client = Client(mw)
    client.get("/incr")
    assert client.get("/incr").get_data() == b"2"


def test_rotate_and_invalidate_run_on_the_loop_thread_of_a_cluster_node() -> None:
    # With a cluster, rotate() and invalidate() publish to it, which only the loop thread
    # may do: the WSGI session sends them there from the request thread.
    bus = MemoryBus()
    app = Flask(__name__)
    ext = ClusterSession(app, secret_key=SECRET, node_name="flask1", transport=bus.transport())
    threads: list[str] = []

    @app.post("/rotate")
    def rotate() -> Any:
        session["n"] = 1
        session.rotate()
        return {"id": session.id}

    @app.post("/logout")
    def logout() -> Any:
        session.invalidate()
        return {"id": session.id}

    class Spy(SessionListener):
        def destroyed(self, event: SessionEvent, reason: str) -> None:
            threads.append(threading.current_thread().name)

    ext.manager.listeners.append(Spy())
    try:
        client = app.test_client()
        client.post("/rotate")
        client.post("/rotate")
        client.post("/logout")
        assert ext.manager.stats.sessions_rotated == 2 and ext.manager.stats.sessions_invalidated == 1
        assert threads == ["clustersess-flask1"]  # the invalidation ran on the loop thread
        invalidations = [data for channel, data in bus.published if b"invalidated" in data]
        assert len(invalidations) == 2  # the stored ID the second rotate() replaced; the logout
    finally:
        ext.close()
