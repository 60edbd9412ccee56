"""The demo app in a real uvicorn server process (``clustersess node``), spoken to over TCP."""

from __future__ import annotations

import asyncio
import http.client
import re
import signal
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from clustersess import ids
from tests.utils import NodeProcess, ServerProcess, base_env, free_port

NODE_NAME = "alpha_1"


@pytest.fixture(scope="module")
def node() -> Iterator[NodeProcess]:
    with NodeProcess(NODE_NAME) as proc:
        yield proc


async def call(
    client: httpx.AsyncClient, method: str, path: str, cookie: str | None = None, **kw: Any
) -> httpx.Response:
    client.cookies.clear()  # send exactly the cookie the test chose
    headers = {"cookie": f"JSESSIONID={cookie}"} if cookie is not None else {}
    return await client.request(method, path, headers=headers, **kw)


def set_cookie_value(resp: httpx.Response) -> str:
    (header,) = resp.headers.get_list("set-cookie")
    assert header.startswith("JSESSIONID=")
    return header.split(";", 1)[0].split("=", 1)[1]


@pytest.fixture
async def client(node: NodeProcess) -> Any:
    async with httpx.AsyncClient(base_url=node.url, timeout=10) as c:
        yield c


async def test_health(client: httpx.AsyncClient) -> None:
    resp = await call(client, "GET", "/health")
    assert resp.status_code == 200 and not resp.headers.get_list("set-cookie")


async def test_test_jsp_shows_server_id_and_counts_hits(node: NodeProcess, client: httpx.AsyncClient) -> None:
    resp = await call(client, "GET", "/test.jsp")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    body = resp.text
    cookie = set_cookie_value(resp)
    token, route = cookie.split("~")[0], cookie.split(".")[-1]
    session_id = f"{token}.{route}"
    assert route == NODE_NAME and ids.parse_id(session_id) is not None
    assert "Server info:" in body
    assert f"127.0.0.1:{node.port}<br>" in body
    assert f"ID {session_id} <br>" in body
    assert NODE_NAME in body
    assert re.search(r"Hits 1\b", body)
    assert body.index("Server info:") < body.index(f"127.0.0.1:{node.port}<br>") < body.index(f"ID {session_id} <br>")
    for hits in (2, 3, 4):
        resp = await call(client, "GET", "/test.jsp", cookie)
        assert f"ID {session_id} <br>" in resp.text
        assert re.search(rf"Hits {hits}\b", resp.text), resp.text
        assert not resp.headers.get_list("set-cookie")  # same session, same cookie
    # Without the cookie: a new session, a new ID, the counter starts over.
    resp = await call(client, "GET", "/test.jsp")
    assert session_id not in resp.text and re.search(r"Hits 1\b", resp.text)


async def test_cookie_attributes_from_a_real_server(client: httpx.AsyncClient) -> None:
    resp = await call(client, "POST", "/api/session", json={"a": 1})
    (header,) = resp.headers.get_list("set-cookie")
    lowered = header.lower()
    assert "; path=/" in lowered and "; httponly" in lowered and "samesite=lax" in lowered
    assert "domain=" not in lowered and "max-age" not in lowered and "secure" not in lowered
    assert resp.headers["cache-control"] == "private"
    assert "cookie" in resp.headers["vary"].lower()


async def test_api_session_endpoints(client: httpx.AsyncClient) -> None:
    # GET on no session: reports a new session and writes nothing.
    resp = await call(client, "GET", "/api/session")
    view = resp.json()
    assert view["new"] is True and view["data"] == {} and view["node"] == NODE_NAME
    assert not resp.headers.get_list("set-cookie")

    resp = await call(client, "POST", "/api/session", json={"user": "ann", "cart": ["apple"]})
    cookie = set_cookie_value(resp)
    sid = resp.json()["id"]
    assert sid == f"{cookie.split('~')[0]}.{NODE_NAME}"

    resp = await call(client, "GET", "/api/session", cookie)
    assert resp.json() == {"id": sid, "node": NODE_NAME, "new": False, "data": {"user": "ann", "cart": ["apple"]}}
    assert not resp.headers.get_list("set-cookie")

    resp = await call(client, "POST", "/api/session", cookie, json={"cart": ["apple", "pear"]})
    assert resp.json()["data"] == {"user": "ann", "cart": ["apple", "pear"]}
    for expected in (1, 2):
        resp = await call(client, "POST", "/api/session/incr/visits", cookie)
        assert resp.json()["data"]["visits"] == expected
    assert (await call(client, "POST", "/api/session/incr/user", cookie)).status_code == 409
    assert (await call(client, "POST", "/api/session", cookie, content=b"[1,2]")).status_code == 400
    assert (await call(client, "POST", "/api/session", cookie, content=b"{nope")).status_code == 400

    # rotate: new ID, same data, old ID dead.
    resp = await call(client, "POST", "/api/session/rotate", cookie)
    rotated = set_cookie_value(resp)
    assert rotated != cookie and resp.json()["id"] != sid
    assert resp.json()["data"]["user"] == "ann"
    dead = (await call(client, "GET", "/api/session", cookie)).json()
    assert dead["new"] is True and dead["data"] == {} and dead["id"] != sid
    assert (await call(client, "GET", "/api/session", rotated)).json()["data"]["visits"] == 2

    # invalidate: cookie deleted, ID dead.
    resp = await call(client, "DELETE", "/api/session", rotated)
    (header,) = resp.headers.get_list("set-cookie")
    assert header.startswith("JSESSIONID=null;") and "Max-Age=0" in header
    assert (await call(client, "GET", "/api/session", rotated)).json()["new"] is True


async def test_64_concurrent_increments_against_real_server(node: NodeProcess) -> None:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=node.url, timeout=20, limits=limits) as client:
        resp = await call(client, "POST", "/api/session", json={"n": 0})
        cookie = set_cookie_value(resp)
        headers = {"cookie": f"JSESSIONID={cookie}"}
        client.cookies.clear()
        results = await asyncio.gather(*(client.post("/api/session/incr/n", headers=headers) for _ in range(64)))
        assert [r.status_code for r in results] == [200] * 64
        assert max(r.json()["data"]["n"] for r in results) == 64
        assert len({r.json()["data"]["n"] for r in results}) == 64  # every increment saw its own value
        final = await call(client, "GET", "/api/session", cookie)
        assert final.json()["data"]["n"] == 64


def _raw_get(node: NodeProcess, path: str, cookie_header: bytes) -> tuple[int, str | None]:
    conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=10)
    try:
        conn.putrequest("GET", path)
        conn.putheader("Cookie", cookie_header)
        conn.endheaders()
        resp = conn.getresponse()
        resp.read()
        return resp.status, resp.getheader("set-cookie")
    finally:
        conn.close()


@pytest.mark.parametrize(
    "raw",
    [
        b"JSESSIONID=",
        b"JSESSIONID=" + b"A" * 5000,
        "JSESSIONID=caf\u00e9~x.alpha_1".encode("latin-1"),
        "JSESSIONID=\u65e5\u672c".encode(),
        b"JSESSIONID=a.b.c",
        b"JSESSIONID=" + ids.new_token().encode() + b"~" + b"Q" * 43 + b".alpha_1",
        b'JSESSIONID="',
    ],
)
def test_bad_cookies_never_5xx_on_real_server(node: NodeProcess, raw: bytes) -> None:
    status, set_cookie = _raw_get(node, "/api/session", raw)
    assert status == 200 and set_cookie is None
    status, set_cookie = _raw_get(node, "/test.jsp", raw)
    assert status == 200 and set_cookie is not None and set_cookie.startswith("JSESSIONID=")
    presented = raw.split(b"=", 1)[1].split(b"~")[0].decode("latin-1")
    assert not presented or presented not in set_cookie


def test_node_name_is_the_route(node_factory: Any) -> None:
    other = node_factory("beta_2")
    conn = http.client.HTTPConnection("127.0.0.1", other.port, timeout=10)
    conn.request("GET", "/test.jsp")
    resp = conn.getresponse()
    body = resp.read().decode()
    cookie = resp.getheader("set-cookie")
    conn.close()
    assert cookie is not None and cookie.split(";")[0].endswith(".beta_2")
    assert re.search(r"ID [A-Za-z0-9_-]{24}\.beta_2 <br>", body)
    assert f"127.0.0.1:{other.port}<br>" in body
    # A graceful stop exits promptly.
    other.terminate()
    assert other.returncode in (0, -signal.SIGTERM)


def test_missing_secret_makes_plain_uvicorn_exit(process_factory: Any) -> None:
    """Under uvicorn's default lifespan mode ("auto") a failed startup would be swallowed;
    clustersess fails the lifespan explicitly, so the server process must exit."""
    port = free_port()
    proc: ServerProcess = process_factory(
        [sys.executable, "-m", "uvicorn", "demo_app:app", "--host", "127.0.0.1", "--port", str(port)],
        port=port,
        env=base_env({"CLUSTERSESS_NODE": "n1"}),  # no CLUSTERSESS_SECRET
        start=False,
    )
    proc.start(wait=False)
    code = proc.wait(timeout=20)
    log = proc.log_text()
    assert code != 0, log
    assert "CLUSTERSESS_SECRET" in log, log
    assert not proc.is_ready()


def test_missing_secret_makes_clustersess_node_exit(node_factory: Any) -> None:
    proc: NodeProcess = node_factory("n1", secret=None, start=False)
    proc.start(wait=False)
    assert proc.wait(timeout=20) != 0
    assert "CLUSTERSESS_SECRET" in proc.log_text()


def test_secret_list_from_env_rotates_keys(node_factory: Any) -> None:
    """CLUSTERSESS_SECRET="old,new": cookies are signed with the LAST key of the list.

    (Acceptance of old-key cookies needs a session that outlives the key change, which a
    single node cannot show across a restart; test_middleware covers it in-process.)"""
    proc = node_factory("keys", secret="old-key,new-key")
    conn = http.client.HTTPConnection("127.0.0.1", proc.port, timeout=10)
    conn.request("POST", "/api/session", body=b'{"a": 1}', headers={"content-type": "application/json"})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    value = resp.getheader("set-cookie").split(";")[0].split("=", 1)[1]
    assert ids.CookieSigner(("new-key",)).verify(value) is not None
    assert ids.CookieSigner(("old-key",)).verify(value) is None


# -- a WebSocket app in a real server ------------------------------------------------------
# The child process imports this module as "tests.test_server:ws_app".


def _build_ws_app() -> Any:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import JSONResponse
    from starlette.routing import Route, WebSocketRoute

    from clustersess import ClusterSessionMiddleware

    async def health(request: Any) -> Any:
        return JSONResponse({"ok": True})

    async def view(request: Any) -> Any:
        return JSONResponse({"id": request.session.id, "data": dict(request.session)})

    async def ws(websocket: Any) -> None:
        session = websocket.session
        session["ws_visits"] = session.get("ws_visits", 0) + 1
        await websocket.accept()
        await websocket.send_json({"id": session.id, "data": dict(session)})
        await websocket.close()

    return Starlette(
        routes=[Route("/health", health), Route("/view", view), WebSocketRoute("/ws", ws)],
        middleware=[Middleware(ClusterSessionMiddleware)],
    )


def __getattr__(name: str) -> Any:  # build the app only when a server asks for it
    if name == "ws_app":
        return _build_ws_app()
    raise AttributeError(name)


async def test_websocket_session_on_real_server(node_factory: Any) -> None:
    import json

    from websockets.asyncio.client import connect

    proc = node_factory("wsnode", app="tests.test_server:ws_app")
    ws_url = proc.url.replace("http://", "ws://") + "/ws"
    async with connect(ws_url, open_timeout=10) as ws:
        first = json.loads(await ws.recv())
        set_cookie = ws.response.headers.get("set-cookie")
    assert first["data"] == {"ws_visits": 1}
    assert set_cookie is not None and set_cookie.startswith("JSESSIONID=")
    cookie = set_cookie.split(";")[0].split("=", 1)[1]
    assert cookie.endswith(".wsnode") and cookie.split("~")[0] == first["id"].split(".")[0]
    async with connect(ws_url, additional_headers={"Cookie": f"JSESSIONID={cookie}"}, open_timeout=10) as ws:
        second = json.loads(await ws.recv())
        assert ws.response.headers.get("set-cookie") is None
    assert second == {"id": first["id"], "data": {"ws_visits": 2}}
    async with httpx.AsyncClient(base_url=proc.url, timeout=10) as client:
        assert (await call(client, "GET", "/view", cookie)).json()["data"] == {"ws_visits": 2}


async def test_idle_expiry_on_real_server(node_factory: Any) -> None:
    # Real time, so margins are wide (the machine is shared and noisy).
    proc = node_factory("expiring", env={"CLUSTERSESS_MAX_INACTIVE": "2"})
    async with httpx.AsyncClient(base_url=proc.url, timeout=10) as client:
        cookie = set_cookie_value(await call(client, "POST", "/api/session", json={"a": 1}))
        await asyncio.sleep(1.2)
        assert (await call(client, "GET", "/api/session", cookie)).json()["data"] == {"a": 1}
        await asyncio.sleep(1.2)  # 2.4 s after the write: alive only because the read slid it
        assert (await call(client, "GET", "/api/session", cookie)).json()["data"] == {"a": 1}
        await asyncio.sleep(2.6)
        view = (await call(client, "GET", "/api/session", cookie)).json()
        assert view["new"] is True and view["data"] == {}
