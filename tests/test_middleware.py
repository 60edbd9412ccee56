"""ClusterSessionMiddleware in-process: a Starlette app behind httpx's ASGI transport."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from clustersess import ClusterSessionMiddleware, Config, FakeClock, SessionEvent, SessionListener, SessionManager, ids

SECRET = "middleware-test-secret"


# -- the app under test -------------------------------------------------------------------


def _view(request: Request) -> dict[str, Any]:
    s = request.session
    return {"id": s.id, "new": s.is_new, "data": dict(s)}  # type: ignore[attr-defined]


async def read(request: Request) -> Response:
    return JSONResponse(_view(request))


async def write(request: Request) -> Response:
    body = await request.json()
    try:
        request.session.update(body)
    except TypeError as exc:
        return JSONResponse({"error": str(exc)}, status_code=400)
    return JSONResponse(_view(request))


async def write_date(request: Request) -> Response:
    try:
        request.session["when"] = datetime.date(2024, 1, 1)
    except TypeError as exc:
        return JSONResponse({"error": str(exc)}, status_code=400)
    return JSONResponse(_view(request))


async def append(request: Request) -> Response:
    request.session.setdefault("cart", [])
    request.session["cart"].append(request.path_params["item"])
    return JSONResponse(_view(request))


async def append_bad(request: Request) -> Response:
    request.session["cart"].append({1, 2})  # not JSON; only found at commit
    return JSONResponse({"ok": True})


async def incr(request: Request) -> Response:
    await request.body()
    await asyncio.sleep(0)
    session = request.session
    session["n"] = session.get("n", 0) + 1
    await asyncio.sleep(0)
    return JSONResponse(_view(request))


async def rotate(request: Request) -> Response:
    request.session.rotate()  # type: ignore[attr-defined]
    return JSONResponse(_view(request))


async def invalidate(request: Request) -> Response:
    request.session.invalidate()  # type: ignore[attr-defined]
    return JSONResponse(_view(request))


async def no_session(request: Request) -> Response:
    return PlainTextResponse("hello")


async def status(request: Request) -> Response:
    return JSONResponse(request.scope["clustersess.manager"].status())


async def cached(request: Request) -> Response:
    request.session["x"] = 1
    return PlainTextResponse("c", headers={"cache-control": request.query_params["cc"]})


async def boom(request: Request) -> Response:
    request.session["half"] = "written"
    raise RuntimeError("handler failed")


async def ws_endpoint(websocket: WebSocket) -> None:
    session = websocket.session
    seen = dict(session)
    session["ws"] = session.get("ws", 0) + 1
    await websocket.accept()
    await websocket.send_json({"id": session.id, "seen": seen, "new": session.is_new})  # type: ignore[attr-defined]
    await websocket.close()


def make_app(manager: SessionManager) -> Starlette:
    routes = [
        Route("/read", read),
        Route("/write", write, methods=["POST"]),
        Route("/write-date", write_date, methods=["POST"]),
        Route("/append/{item}", append, methods=["POST"]),
        Route("/append-bad", append_bad, methods=["POST"]),
        Route("/incr", incr, methods=["POST"]),
        Route("/rotate", rotate, methods=["POST"]),
        Route("/invalidate", invalidate, methods=["POST"]),
        Route("/plain", no_session),
        Route("/status", status),
        Route("/cached", cached),
        Route("/boom", boom),
        WebSocketRoute("/ws", ws_endpoint),
    ]
    return Starlette(routes=routes, middleware=[Middleware(ClusterSessionMiddleware, manager=manager)])


class Recorder(SessionListener):
    def __init__(self) -> None:
        self.kinds: list[str] = []

    def created(self, event: SessionEvent) -> None:
        self.kinds.append("created")

    def changed(self, event: SessionEvent) -> None:
        self.kinds.append("changed")

    def destroyed(self, event: SessionEvent, reason: str) -> None:  # type: ignore[override]
        self.kinds.append(f"destroyed:{reason}")


class Harness:
    """An app, its manager and an httpx client; cookies are always sent explicitly."""

    def __init__(self, manager: SessionManager, raise_app_exceptions: bool = True) -> None:
        self.manager = manager
        self.app = make_app(manager)
        transport = httpx.ASGITransport(app=self.app, raise_app_exceptions=raise_app_exceptions)
        self.client = httpx.AsyncClient(transport=transport, base_url="http://testserver")
        self.cookie_name = manager.config.session_cookie

    async def request(
        self, method: str, path: str, cookie: str | None = None, *, raw_cookie: bytes | None = None, **kw: Any
    ) -> httpx.Response:
        self.client.cookies.clear()  # never let the client's jar decide what is sent
        headers = dict(kw.pop("headers", {}))
        if raw_cookie is not None:
            headers["cookie"] = raw_cookie
        elif cookie is not None:
            headers["cookie"] = f"{self.cookie_name}={cookie}"
        return await self.client.request(method, path, headers=headers, **kw)

    @staticmethod
    def set_cookies(resp: httpx.Response) -> list[str]:
        return resp.headers.get_list("set-cookie")

    def cookie_value(self, resp: httpx.Response) -> str:
        (header,) = self.set_cookies(resp)
        name, _, rest = header.partition("=")
        assert name == self.cookie_name
        return rest.split(";", 1)[0]

    async def close(self) -> None:
        await self.client.aclose()
        await self.manager.stop()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
async def make(clock: FakeClock, recorder: Recorder) -> AsyncIterator[Callable[..., Awaitable[Harness]]]:
    made: list[Harness] = []

    async def factory(*, raise_app_exceptions: bool = True, **options: Any) -> Harness:
        options.setdefault("secret_key", SECRET)
        options.setdefault("node_name", "node1")
        manager = SessionManager(Config(**options), clock=clock, listeners=[recorder])
        harness = Harness(manager, raise_app_exceptions)
        made.append(harness)
        return harness

    yield factory
    for harness in made:
        await harness.close()


@pytest.fixture
async def h(make: Callable[..., Awaitable[Harness]]) -> Harness:
    return await make()


def _attrs(set_cookie: str) -> dict[str, str]:
    parts = [p.strip() for p in set_cookie.split(";")]
    out = {}
    for p in parts[1:]:
        k, _, v = p.partition("=")
        out[k.lower()] = v
    return out


# -- cookie format and attributes -----------------------------------------------------


async def test_default_cookie_attributes(h: Harness) -> None:
    resp = await h.request("POST", "/write", json={"a": 1})
    assert resp.status_code == 200
    (header,) = h.set_cookies(resp)
    assert header.startswith("JSESSIONID=")
    attrs = _attrs(header)
    assert attrs["path"] == "/"
    assert "httponly" in attrs and attrs["samesite"] == "lax"
    for absent in ("domain", "max-age", "expires", "secure"):
        assert absent not in attrs, header
    assert resp.headers["cache-control"] == "private"
    assert "Cookie" in resp.headers.get_list("vary")
    value = h.cookie_value(resp)
    assert value.count(".") == 1 and value.endswith(".node1")
    assert value.split("~")[0] + ".node1" == resp.json()["id"]


async def test_configured_cookie_attributes(make: Callable[..., Awaitable[Harness]]) -> None:
    h = await make(
        session_cookie="SID", https_only=True, domain="example.org", max_age=120, path="/app", same_site="strict"
    )
    resp = await h.request("POST", "/write", json={"a": 1})
    (header,) = h.set_cookies(resp)
    assert header.startswith("SID=")
    attrs = _attrs(header)
    assert "secure" in attrs and attrs["domain"] == "example.org" and attrs["max-age"] == "120"
    assert attrs["path"] == "/app"
    assert attrs["samesite"] == "strict"
    cookie = h.cookie_value(resp)
    # Read: nothing to re-send. Write: the Max-Age is refreshed, as Starlette does.
    assert h.set_cookies(await h.request("GET", "/read", cookie)) == []
    assert len(h.set_cookies(await h.request("POST", "/write", cookie, json={"a": 2}))) == 1
    # A JSESSIONID cookie is not ours under a custom name.
    resp = await h.request("GET", "/read", raw_cookie=f"JSESSIONID={cookie}".encode())
    assert resp.json()["new"] is True


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("public, max-age=60", "private, max-age=60"),
        ("public, s-maxage=600, max-age=60", "private, max-age=60"),
        ("no-store", "no-store"),
        ("private, max-age=5", "private, max-age=5"),
    ],
)
async def test_cache_control_made_private_when_cookie_set(h: Harness, given: str, expected: str) -> None:
    resp = await h.request("GET", "/cached", params={"cc": given})
    assert h.set_cookies(resp)
    assert resp.headers.get_list("cache-control") == [expected]


async def test_read_only_requests_set_no_cookie_and_store_nothing(h: Harness, recorder: Recorder) -> None:
    resp = await h.request("GET", "/read")
    assert resp.json()["new"] is True and h.set_cookies(resp) == []
    assert resp.headers.get("vary") == "Cookie"  # the session was used
    assert h.manager.status()["sessions_owned"] == 0
    cookie = h.cookie_value(await h.request("POST", "/write", json={"a": [1]}))
    commits = h.manager.stats.commits
    for _ in range(3):
        resp = await h.request("GET", "/read", cookie)
        assert resp.json()["data"] == {"a": [1]} and h.set_cookies(resp) == []
        assert "cache-control" not in resp.headers
    assert h.manager.stats.commits == commits
    assert recorder.kinds == ["created"]


async def test_route_without_session_use_gets_no_cookie_and_no_vary(h: Harness) -> None:
    resp = await h.request("GET", "/plain")
    assert resp.text == "hello" and h.set_cookies(resp) == [] and "vary" not in resp.headers
    assert h.manager.status()["sessions_owned"] == 0


# -- strict mode and bad cookies --------------------------------------------------------


async def test_strict_mode_unknown_and_forged_ids_not_adopted(h: Harness) -> None:
    unknown = h.manager.signer.cookie_value(ids.new_token(), "node1")
    forged = f"{ids.new_token()}~{'x' * 43}.node1"
    for cookie in (unknown, forged):
        token = cookie.split("~")[0]
        resp = await h.request("GET", "/read", cookie)
        assert resp.status_code == 200 and resp.json()["new"] is True
        assert token not in resp.json()["id"] and h.set_cookies(resp) == []
        resp = await h.request("POST", "/write", cookie, json={"a": 1})
        assert token not in resp.json()["id"]
        assert token not in h.cookie_value(resp)


RAW_BAD_COOKIES = [
    pytest.param(b"JSESSIONID=", id="empty"),
    pytest.param(b"JSESSIONID", id="no-equals"),
    pytest.param(b"JSESSIONID=" + b"A" * 5000, id="oversized"),
    pytest.param(b"JSESSIONID=" + b"A" * 24 + b"~" + b"B" * 4100 + b".node1", id="oversized-shape"),
    pytest.param("JSESSIONID=héllo~wörld.node1".encode(), id="non-ascii-utf8"),
    pytest.param(b"JSESSIONID=\xff\xfe\x00\x01", id="binary"),
    pytest.param(b"JSESSIONID=a.b.c.d", id="many-dots"),
    pytest.param(b'JSESSIONID="quoted', id="quote"),
    pytest.param(b"JSESSIONID=;;;=;", id="separators"),
    pytest.param(b"=;JSESSIONID==", id="bare-equals"),
    pytest.param(b"JSESSIONID=null", id="null"),
    pytest.param(b"JSESSIONID=%00%ff", id="percent"),
    pytest.param(b";" * 70000, id="huge-header"),
]


@pytest.mark.parametrize("raw", RAW_BAD_COOKIES)
async def test_bad_cookies_are_treated_as_absent(h: Harness, raw: bytes) -> None:
    resp = await h.request("GET", "/read", raw_cookie=raw)
    assert resp.status_code == 200
    assert resp.json()["new"] is True and h.set_cookies(resp) == []
    resp = await h.request("POST", "/write", raw_cookie=raw, json={"k": "v"})
    assert resp.status_code == 200
    fresh = h.cookie_value(resp)
    assert h.manager.signer.verify(fresh) is not None
    assert (await h.request("GET", "/read", fresh)).json()["data"] == {"k": "v"}


async def test_valid_cookie_among_others_is_found(h: Harness) -> None:
    cookie = h.cookie_value(await h.request("POST", "/write", json={"a": 1}))
    for raw in (
        f"other=1; JSESSIONID={cookie}; more=2",
        f'JSESSIONID=; JSESSIONID="{cookie}"',  # a parent path's empty cookie first
        f"  JSESSIONID = {cookie} ",
    ):
        resp = await h.request("GET", "/read", raw_cookie=raw.encode())
        assert resp.json()["data"] == {"a": 1}, raw


async def test_a_cookie_under_another_route_is_rerouted_to_this_node(h: Harness) -> None:
    cookie = h.cookie_value(await h.request("POST", "/write", json={"a": 1}))
    moved = cookie.rsplit(".", 1)[0] + ".node9"
    resp = await h.request("GET", "/read", moved)
    assert resp.json()["data"] == {"a": 1}
    assert h.cookie_value(resp) == cookie  # re-issued with the real owner's route


# -- key rotation, rotate, invalidate -----------------------------------------------------


async def test_key_rotation_resigns_cookie_with_current_key(make: Callable[..., Awaitable[Harness]]) -> None:
    old = await make(secret_key=("k1",))
    cookie = old.cookie_value(await old.request("POST", "/write", json={"a": 1}))
    new = await make(secret_key=("k1", "k2"))
    new.manager.store = old.manager.store  # same sessions, new key list (a rolling restart)
    resp = await new.request("GET", "/read", cookie)
    assert resp.json()["data"] == {"a": 1}
    fresh = new.cookie_value(resp)
    assert fresh != cookie and fresh.split("~")[0] == cookie.split("~")[0]
    assert ids.CookieSigner(("k2",)).verify(fresh) is not None
    assert new.set_cookies(await new.request("GET", "/read", fresh)) == []
    # Once k1 is dropped, the old cookie is worthless.
    newest = await make(secret_key=("k2",))
    newest.manager.store = old.manager.store
    assert (await newest.request("GET", "/read", cookie)).json()["new"] is True
    assert (await newest.request("GET", "/read", fresh)).json()["data"] == {"a": 1}


async def test_rotate_over_http(h: Harness) -> None:
    cookie = h.cookie_value(await h.request("POST", "/write", json={"user": "ann"}))
    resp = await h.request("POST", "/rotate", cookie)
    new_cookie = h.cookie_value(resp)
    assert new_cookie != cookie and resp.json()["data"] == {"user": "ann"}
    assert resp.headers["cache-control"] == "private"
    dead = (await h.request("GET", "/read", cookie)).json()
    assert dead["new"] is True and dead["data"] == {} and cookie.split("~")[0] not in dead["id"]
    assert (await h.request("GET", "/read", new_cookie)).json()["data"] == {"user": "ann"}


async def test_invalidate_deletes_cookie(h: Harness, recorder: Recorder) -> None:
    cookie = h.cookie_value(await h.request("POST", "/write", json={"user": "ann"}))
    resp = await h.request("POST", "/invalidate", cookie)
    (header,) = h.set_cookies(resp)
    attrs = _attrs(header)
    assert header.startswith("JSESSIONID=null;")
    assert attrs["max-age"] == "0" and "1970" in attrs["expires"] and attrs["path"] == "/"
    assert "httponly" in attrs
    assert resp.headers["cache-control"] == "private" and "Cookie" in resp.headers.get_list("vary")
    assert (await h.request("GET", "/read", cookie)).json()["new"] is True
    assert recorder.kinds == ["created", "destroyed:invalidated"]


# -- expiry ------------------------------------------------------------------------------


async def test_expiry_on_access_over_http(make: Callable[..., Awaitable[Harness]], clock: FakeClock) -> None:
    h = await make(max_inactive=60)
    cookie = h.cookie_value(await h.request("POST", "/write", json={"a": 1}))
    clock.advance(59)
    assert (await h.request("GET", "/read", cookie)).json()["data"] == {"a": 1}
    clock.advance(61)
    resp = await h.request("GET", "/read", cookie)
    assert resp.json()["new"] is True and resp.json()["data"] == {}


class Lifespan:
    """Drives an app's ASGI lifespan the way a server does."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        await self.app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, self.inbox.get, self.outbox.put)

    async def startup(self) -> dict[str, Any]:
        self.task = asyncio.create_task(self._run())
        await self.inbox.put({"type": "lifespan.startup"})
        return await asyncio.wait_for(self.outbox.get(), 5)

    async def shutdown(self) -> dict[str, Any]:
        await self.inbox.put({"type": "lifespan.shutdown"})
        message = await asyncio.wait_for(self.outbox.get(), 5)
        assert self.task is not None
        await asyncio.wait_for(self.task, 5)
        return message


async def test_lifespan_starts_and_stops_the_sweeper(
    make: Callable[..., Awaitable[Harness]], clock: FakeClock, recorder: Recorder
) -> None:
    h = await make(max_inactive=60, sweep_interval=0.01)
    life = Lifespan(h.app)
    assert (await life.startup())["type"] == "lifespan.startup.complete"
    assert h.manager._runner is not None and not h.manager._runner.done()
    cookie = h.cookie_value(await h.request("POST", "/write", json={"a": 1}))
    clock.advance(61)
    for _ in range(300):
        if h.manager.status()["sessions_owned"] == 0:
            break
        await asyncio.sleep(0.01)
    assert h.manager.status()["sessions_owned"] == 0
    assert recorder.kinds == ["created", "destroyed:expired"]
    assert (await h.request("GET", "/read", cookie)).json()["new"] is True
    assert (await life.shutdown())["type"] == "lifespan.shutdown.complete"
    assert h.manager._runner is None


# -- change detection and errors ------------------------------------------------------------


async def test_nested_mutation_over_http(h: Harness, recorder: Recorder) -> None:
    resp = await h.request("POST", "/append/apple")
    cookie = h.cookie_value(resp)
    resp = await h.request("POST", "/append/pear", cookie)
    assert h.set_cookies(resp) == []  # same ID: stored server side, no new cookie needed
    assert (await h.request("GET", "/read", cookie)).json()["data"] == {"cart": ["apple", "pear"]}
    assert recorder.kinds == ["created", "changed"]


async def test_json_error_names_key_and_keeps_last_good_state(make: Callable[..., Awaitable[Harness]]) -> None:
    h = await make(raise_app_exceptions=False)
    cookie = h.cookie_value(await h.request("POST", "/write", json={"cart": ["ok"]}))
    resp = await h.request("POST", "/write-date", cookie)
    assert resp.status_code == 400
    assert "session['when']" in resp.json()["error"] and "JSON" in resp.json()["error"]
    # Found only at commit: the request fails (500), the TypeError names the key, and the
    # stored session keeps its last good state.
    resp = await h.request("POST", "/append-bad", cookie)
    assert resp.status_code == 500
    assert (await h.request("GET", "/read", cookie)).json()["data"] == {"cart": ["ok"]}


async def test_json_error_raises_type_error_naming_key(h: Harness) -> None:
    cookie = h.cookie_value(await h.request("POST", "/write", json={"cart": ["ok"]}))
    with pytest.raises(TypeError, match=r"session\['cart'\]"):
        await h.request("POST", "/append-bad", cookie)
    assert (await h.request("GET", "/read", cookie)).json()["data"] == {"cart": ["ok"]}


async def test_size_limit_over_http(make: Callable[..., Awaitable[Harness]]) -> None:
    h = await make(max_session_size=256, raise_app_exceptions=False)
    cookie = h.cookie_value(await h.request("POST", "/write", json={"a": "small"}))
    resp = await h.request("POST", "/write", cookie, json={"b": "x" * 1000})
    assert resp.status_code == 500 and h.set_cookies(resp) == []
    assert (await h.request("GET", "/read", cookie)).json()["data"] == {"a": "small"}
    assert h.manager.status()["stats"]["too_large"] == 1


async def test_failed_handler_changes_are_dropped(make: Callable[..., Awaitable[Harness]]) -> None:
    h = await make(raise_app_exceptions=False)
    cookie = h.cookie_value(await h.request("POST", "/write", json={"a": 1}))
    resp = await h.request("GET", "/boom", cookie)
    assert resp.status_code == 500
    # the failed request (which took the fast path in) no longer holds the session
    assert [e.inflight for e in h.manager.store.owned.values()] == [0]
    assert (await h.request("GET", "/read", cookie)).json()["data"] == {"a": 1}
    resp = await h.request("GET", "/boom")
    assert resp.status_code == 500 and h.manager.status()["sessions_owned"] == 1


# -- concurrency ---------------------------------------------------------------------------


async def test_64_concurrent_increments_in_process(h: Harness) -> None:
    cookie = h.cookie_value(await h.request("POST", "/write", json={"n": 0}))
    results = await asyncio.gather(*(h.request("POST", "/incr", cookie) for _ in range(64)))
    assert all(r.status_code == 200 for r in results)
    assert max(r.json()["data"]["n"] for r in results) == 64
    assert (await h.request("GET", "/read", cookie)).json()["data"] == {"n": 64}


# -- websocket -----------------------------------------------------------------------------


async def _websocket(app: Any, cookie_header: bytes | None) -> list[dict[str, Any]]:
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    sent: list[dict[str, Any]] = []
    await inbox.put({"type": "websocket.connect"})

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "websocket.close":
            await inbox.put({"type": "websocket.disconnect", "code": 1000})

    headers = [(b"host", b"testserver")]
    if cookie_header is not None:
        headers.append((b"cookie", cookie_header))
    scope = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "scheme": "ws",
        "path": "/ws",
        "raw_path": b"/ws",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "server": ("127.0.0.1", 80),
        "client": ("127.0.0.1", 5555),
        "subprotocols": [],
        "state": {},
    }
    await asyncio.wait_for(app(scope, inbox.get, send), 5)
    return sent


async def test_websocket_scope_gets_the_session(h: Harness) -> None:
    resp = await h.request("POST", "/write", json={"user": "ann"})
    cookie = h.cookie_value(resp)
    sent = await _websocket(h.app, f"JSESSIONID={cookie}".encode())
    accept = next(m for m in sent if m["type"] == "websocket.accept")
    assert not [v for k, v in accept.get("headers", []) if k == b"set-cookie"]  # same ID
    import json

    payload = json.loads(next(m for m in sent if m["type"] == "websocket.send")["text"])
    assert payload["seen"] == {"user": "ann"} and payload["id"] == resp.json()["id"] and payload["new"] is False
    # The change made before accept was committed.
    assert (await h.request("GET", "/read", cookie)).json()["data"] == {"user": "ann", "ws": 1}


async def test_websocket_new_session_cookie_on_accept(h: Harness) -> None:
    sent = await _websocket(h.app, None)
    accept = next(m for m in sent if m["type"] == "websocket.accept")
    cookies = [v.decode() for k, v in accept["headers"] if k == b"set-cookie"]
    assert len(cookies) == 1 and cookies[0].startswith("JSESSIONID=")
    value = cookies[0].split(";")[0].split("=", 1)[1]
    assert (await h.request("GET", "/read", value)).json()["data"] == {"ws": 1}


async def test_scope_exposes_the_manager_and_its_status(h: Harness) -> None:
    await h.request("POST", "/write", json={"a": 1})
    status = (await h.request("GET", "/status")).json()
    assert status["node"] == "node1" and status["clustered"] is False
    assert status["sessions_owned"] == 1 and status["members"] == []
    assert status["stats"]["sessions_created"] == 1
