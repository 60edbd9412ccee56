"""Property-based cookie fuzzing: whatever a client sends in its Cookie header, the
middleware never answers 5xx and never adopts a session ID it did not sign.

Requests are raw ASGI calls rather than httpx, because an HTTP client refuses to send
most of these bytes; a server may still hand them to the app.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from clustersess import ClusterSessionMiddleware, Config, SessionManager
from tests.utils import cookie_after

SECRET = "fuzz-secret"
FUZZ = settings(
    max_examples=400,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


async def read(request: Request) -> Response:
    s = request.session
    return JSONResponse({"id": s.id, "new": s.is_new, "data": dict(s)})  # type: ignore[attr-defined]


async def write(request: Request) -> Response:
    request.session["w"] = request.session.get("w", 0) + 1
    return JSONResponse({"id": request.session.id})  # type: ignore[attr-defined]


class Site:
    def __init__(self) -> None:
        self.manager = SessionManager(Config(secret_key=SECRET, node_name="node1"))
        self.app = Starlette(
            routes=[Route("/read", read), Route("/write", write)],
            middleware=[Middleware(ClusterSessionMiddleware, manager=self.manager)],
        )

    async def call(self, path: str, cookie_header: bytes | None) -> tuple[int, dict[bytes, list[bytes]], bytes]:
        headers = [(b"host", b"testserver")]
        if cookie_header is not None:
            headers.append((b"cookie", cookie_header))
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": headers,
            "server": ("127.0.0.1", 80),
            "client": ("127.0.0.1", 1234),
            "state": {},
        }
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await self.app(scope, receive, send)
        start = sent[0]
        out: dict[bytes, list[bytes]] = {}
        for k, v in start.get("headers", []):
            out.setdefault(k.lower(), []).append(v)
        body = b"".join(m.get("body", b"") for m in sent[1:])
        return start["status"], out, body


@pytest.fixture
async def site() -> Any:
    s = Site()
    yield s
    await s.manager.stop()


@pytest.fixture
async def victim(site: Site) -> tuple[str, str]:
    """An existing session somebody would like to hijack: (cookie value, session ID)."""
    status, headers, body = await site.call("/write", None)
    assert status == 200
    cookie = headers[b"set-cookie"][0].split(b";")[0].split(b"=", 1)[1].decode()
    return cookie, json.loads(body)["id"]


async def check_not_adopted(site: Site, victim: tuple[str, str], header: bytes) -> None:
    cookie, victim_id = victim
    signed = cookie.split(".")[0].encode()  # token~signature
    status, headers, body = await site.call("/read", header)
    assert status < 500
    view = json.loads(body)
    if view["id"] == victim_id:
        # Only a header that carries the genuine signed token may reach that session.
        assert signed in header
    else:
        assert view["new"] is True and view["data"] == {}
        assert b"set-cookie" not in headers  # a read stores nothing and sets no cookie
        assert view["id"].split(".")[0].encode() not in header
    status, headers, body = await site.call("/write", header)
    assert status < 500
    new_id = json.loads(body)["id"]
    if new_id != victim_id:
        assert new_id.split(".")[0].encode() not in header  # a fresh ID, never a presented one


@FUZZ
@given(header=st.binary(max_size=600))
async def test_arbitrary_cookie_header_bytes(site: Site, victim: tuple[str, str], header: bytes) -> None:
    await check_not_adopted(site, victim, header)


@FUZZ
@given(value=st.text(max_size=300))
async def test_arbitrary_session_cookie_text(site: Site, victim: tuple[str, str], value: str) -> None:
    await check_not_adopted(site, victim, b"JSESSIONID=" + value.encode("utf-8", "surrogatepass"))


cookie_alphabet = st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_~.=;\"' ,\\")


@FUZZ
@given(
    before=st.text(cookie_alphabet, max_size=40),
    after=st.text(cookie_alphabet, max_size=40),
    token=st.text(cookie_alphabet, min_size=1, max_size=60),
)
async def test_cookie_shaped_garbage(site: Site, victim: tuple[str, str], before: str, after: str, token: str) -> None:
    await check_not_adopted(site, victim, f"{before}JSESSIONID={token}{after}".encode())


@FUZZ
@given(data=st.data())
async def test_mutated_valid_cookie(site: Site, victim: tuple[str, str], data: st.DataObject) -> None:
    cookie, _ = victim
    signed, route = cookie.split(".")
    kind = data.draw(st.sampled_from(["replace", "insert", "delete", "swap-route", "truncate"]))
    pos = data.draw(st.integers(0, len(signed) - 1))
    if kind == "replace":
        ch = data.draw(st.characters(codec="ascii"))
        assume(ch != signed[pos])
        mutated = signed[:pos] + ch + signed[pos + 1 :] + "." + route
    elif kind == "insert":
        ch = data.draw(st.characters(codec="ascii"))
        mutated = signed[:pos] + ch + signed[pos:] + "." + route
    elif kind == "delete":
        mutated = signed[:pos] + signed[pos + 1 :] + "." + route
    elif kind == "truncate":
        mutated = cookie[:pos]
    else:
        mutated = signed + "." + data.draw(st.text(cookie_alphabet, max_size=40))
    await check_not_adopted(site, victim, f"JSESSIONID={mutated}".encode("latin-1"))


async def test_the_victim_cookie_itself_is_adopted(site: Site, victim: tuple[str, str]) -> None:
    # The property above must not hold vacuously: the genuine cookie does reach the session.
    cookie, victim_id = victim
    status, _, body = await site.call("/read", f"JSESSIONID={cookie}".encode())
    assert status == 200 and json.loads(body)["id"] == victim_id and json.loads(body)["data"] == {"w": 1}


@settings(max_examples=1000, deadline=None, database=None)
@given(header=st.text(max_size=300))
def test_find_cookie_returns_absent_or_a_clean_value(header: str) -> None:
    from clustersess.cookies import find_cookie
    from clustersess.ids import MAX_COOKIE_LENGTH

    value = find_cookie(header, "JSESSIONID")
    if value is not None:
        assert value and value.isascii() and len(value) <= MAX_COOKIE_LENGTH
        assert value in header
        assert ";" not in value


@FUZZ
@given(cookie=st.one_of(st.text(max_size=200), st.text(cookie_alphabet, max_size=120)))
async def test_manager_open_never_raises_and_never_adopts(site: Site, victim: tuple[str, str], cookie: str) -> None:
    _, victim_id = victim
    handle = await site.manager.open(cookie)
    try:
        if handle.session.id == victim_id:
            assert victim[0].split(".")[0] in cookie
        else:
            assert handle.session.is_new and handle.session.id.split(".")[0] not in cookie
    finally:
        assert await cookie_after(site.manager, handle) is None
