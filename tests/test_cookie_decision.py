"""One cookie decision: the ASGI fast path and the slow path write the same headers.

The fast path (``open_local`` / ``close_local`` / ``close_nowait`` and the branch inlined
in the middleware's ``send_wrapper``) exists for speed only. Hypothesis drives the same
sequences of requests through a single node, which takes it whenever it can, and through
a node that never can (every shortcut refused, a cluster to await), and compares what
each response says about the cookie: Set-Cookie (the value as "the one sent", "a new
one", or deleted, with its attributes), Vary and Cache-Control. The decision itself is
also checked against :func:`clustersess.cookies.decide`'s table.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from clustersess import ClusterSessionMiddleware, Config, SessionManager
from clustersess.cluster import MemoryBus
from clustersess.cookies import DELETE, KEEP, SET, decide
from clustersess.manager import Handle
from tests.memcluster import FAST

OPS = ["none", "read", "write", "write-same", "nested", "pop", "clear", "invalidate", "rotate", "rotate-write"]
COOKIES = ["jar", "none", "stale", "forged", "other-route"]


class FullPathManager(SessionManager):
    """Takes no shortcut: every request opens and commits through the awaited path."""

    def open_local(self, cookie: str) -> Handle | None:
        return None

    def close_local(self, handle: Handle) -> bool:
        return False


async def handler(request: Request) -> Response:
    ops = request.query_params["ops"].split(",")
    for op in ops:
        if op == "none":
            continue
        session: Any = request.session  # Starlette marks the session accessed here
        if op == "read":
            session.get("k")
        elif op == "write":
            session["k"] = session.get("k", 0) + 1
        elif op == "write-same":
            session["k"] = session.get("k", 0)
        elif op == "nested":
            session.setdefault("list", []).append(1)
        elif op == "pop":
            session.pop("k", None)
        elif op == "clear":
            session.clear()
        elif op == "invalidate":
            session.invalidate()
        elif op == "rotate":
            session.rotate()
        elif op == "rotate-write":
            session.rotate()
            session["k"] = 1
    return PlainTextResponse("ok", headers={"cache-control": "public, max-age=60"})


class Site:
    """An app on one manager and a client that keeps its own cookie jar."""

    def __init__(self, manager: SessionManager) -> None:
        self.manager = manager
        app = Starlette(
            routes=[Route("/", handler)], middleware=[Middleware(ClusterSessionMiddleware, manager=manager)]
        )
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")
        self.jar: str | None = None
        self.history: list[str] = []

    async def request(self, which: str, ops: list[str]) -> list[tuple[str, str]]:
        sent = self._cookie(which)
        headers = {"cookie": f"JSESSIONID={sent}"} if sent is not None else {}
        response = await self.client.get("/", params={"ops": ",".join(ops)}, headers=headers)
        assert response.status_code == 200
        out = []
        for name, value in response.headers.multi_items():
            if name == "set-cookie":
                cookie, _, attrs = value.partition("; ")
                got = cookie.split("=", 1)[1]
                if got == "null":
                    label = "deleted"
                    self.jar = None
                else:
                    label = "the one sent" if got == sent else "a new one"
                    self.jar = got
                    self.history.append(got)
                out.append((name, f"{label}; {attrs}"))
            elif name in ("vary", "cache-control"):
                out.append((name, value))
        return out

    def _cookie(self, which: str) -> str | None:
        if which == "jar" or (which == "stale" and not self.history[:-1]):
            return self.jar
        if which == "stale":
            return self.history[-2]  # the client's previous cookie (rotated away, or older)
        if which == "forged":
            return "A" * 24 + "~" + "B" * 43 + ".node1"
        if which == "other-route" and self.jar is not None:
            return self.jar.rsplit(".", 1)[0] + ".node9"
        return None


steps = st.lists(
    st.tuples(st.sampled_from(COOKIES), st.lists(st.sampled_from(OPS), min_size=1, max_size=3)), min_size=1, max_size=6
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=steps, max_age=st.sampled_from([None, 3600]))
def test_fast_and_slow_paths_write_the_same_headers(steps: list[tuple[str, list[str]]], max_age: int | None) -> None:
    asyncio.run(_compare(steps, max_age))


async def _compare(steps: list[tuple[str, list[str]]], max_age: int | None) -> None:
    config = Config(**{**FAST, "node_name": "node1", "max_age": max_age})
    fast = Site(SessionManager(config))
    slow_manager = FullPathManager(config, transport=MemoryBus().transport())
    await slow_manager.start()
    slow = Site(slow_manager)
    try:
        for which, ops in steps:
            a = await fast.request(which, ops)
            b = await slow.request(which, ops)
            assert a == b, (which, ops)
    finally:
        await slow_manager.stop()
        await fast.client.aclose()
        await slow.client.aclose()


def test_the_decision_table() -> None:
    # nothing stored: delete only a cookie whose session this request ended
    assert decide(stored=False, ended=True, had_cookie=True, current=False, refresh=False) is DELETE
    assert decide(stored=False, ended=True, had_cookie=False, current=False, refresh=False) is KEEP
    assert decide(stored=False, ended=False, had_cookie=True, current=False, refresh=True) is KEEP
    # stored: set unless the client's cookie is current (and no lifetime to renew)
    assert decide(stored=True, ended=False, had_cookie=True, current=True, refresh=False) is KEEP
    assert decide(stored=True, ended=False, had_cookie=True, current=True, refresh=True) is SET
    assert decide(stored=True, ended=True, had_cookie=True, current=False, refresh=False) is SET  # a new session
    assert decide(stored=True, ended=False, had_cookie=False, current=False, refresh=False) is SET
