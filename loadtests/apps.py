"""The apps under test: one tiny Starlette app, served with each session middleware.

Every contender serves exactly the same four routes with the same handlers; only the
middleware (and so the object the handlers get as "the session") differs:

* ``GET /setup``   creates the session: ``{"user": "alice", "counter": 0}``.
* ``GET /read``    reads one value of the existing session (the READ benchmark).
* ``GET /write``   increments ``counter`` in the session (the WRITE benchmark).
* ``GET /counter`` returns ``counter`` (used after a run to check the writes landed).
* ``GET /health``  readiness probe, touches no session.

Each ``make_*`` function is a uvicorn app factory (``uvicorn --factory``) configured from
the environment, so ``bench.py`` can describe a contender as "an import path plus env":
``BENCH_REDIS_URL`` for starsessions' RedisStore, ``CLUSTERSESS_*`` for clustersess;
``BENCH_GC_FREEZE=1`` freezes any contender's heap after start-up, as clustersess does.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

SECRET = "benchmark-secret-not-for-production"

GetSession = Callable[[Request], Awaitable[dict[str, Any]]]


def _routes(get_session: GetSession) -> list[Route]:
    async def setup(request: Request) -> Response:
        session = await get_session(request)
        session["user"] = "alice"
        session["counter"] = 0
        return PlainTextResponse("ok")

    async def read(request: Request) -> Response:
        session = await get_session(request)
        return PlainTextResponse(str(session.get("user")))

    async def write(request: Request) -> Response:
        session = await get_session(request)
        session["counter"] = session.get("counter", 0) + 1
        return PlainTextResponse(str(session["counter"]))

    async def counter(request: Request) -> Response:
        session = await get_session(request)
        return PlainTextResponse(str(session.get("counter")))

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok")

    return [
        Route("/setup", setup),
        Route("/read", read),
        Route("/write", write),
        Route("/counter", counter),
        Route("/health", health),
    ]


async def _request_session(request: Request) -> dict[str, Any]:
    return request.session


@contextlib.asynccontextmanager
async def _freeze_heap(app: Starlette) -> AsyncIterator[None]:
    # What clustersess does by default, for another contender.
    from clustersess.heap import freeze_once

    freeze_once()
    yield


def _app(middleware: list[Middleware], get_session: GetSession = _request_session) -> Starlette:
    lifespan = _freeze_heap if os.environ.get("BENCH_GC_FREEZE") == "1" else None
    return Starlette(routes=_routes(get_session), middleware=middleware, lifespan=lifespan)


# -- the contenders ---------------------------------------------------------------------
def make_baseline() -> Starlette:
    """No session middleware: the handlers use one process-wide dict as "the session"."""
    shared: dict[str, Any] = {}

    async def get_session(request: Request) -> dict[str, Any]:
        return shared

    return _app([], get_session)


def make_starlette() -> Starlette:
    """Starlette's SessionMiddleware: the whole session lives in a signed cookie."""
    from starlette.middleware.sessions import SessionMiddleware

    return _app([Middleware(SessionMiddleware, secret_key=SECRET)])


def _starsessions(store: Any) -> Starlette:
    from starsessions import SessionMiddleware, load_session

    async def get_session(request: Request) -> dict[str, Any]:
        # starsessions loads lazily; loading in the handler is cheaper than its
        # SessionAutoloadMiddleware (one middleware layer less).
        await load_session(request)
        return request.session

    return _app([Middleware(SessionMiddleware, store=store, cookie_https_only=False)], get_session)


def make_starsessions_redis() -> Starlette:
    """starsessions with its RedisStore (``BENCH_REDIS_URL``)."""
    from redis.asyncio import Redis
    from starsessions.stores.redis import RedisStore

    return _starsessions(RedisStore(connection=Redis.from_url(os.environ["BENCH_REDIS_URL"])))


def make_starsessions_memory() -> Starlette:
    """starsessions with its InMemoryStore."""
    from starsessions import InMemoryStore

    return _starsessions(InMemoryStore())


class FloorSessionMiddleware:
    """The least a server-side session middleware can do, as a yardstick (not a product).

    It finds the ``Cookie`` header (parsing each distinct header once), maps the cookie to
    a plain dict kept in process memory, puts it in ``scope["session"]`` and adds
    ``Vary: Cookie`` when the response starts; a new session gets a random cookie. No
    signing, no expiry, no validation, no change detection, no copy: whatever a real
    middleware does on top of this is its own cost. ``bench.py --only floor`` measures it.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.sessions: dict[str, dict[str, Any]] = {}
        self.tokens: dict[bytes, str | None] = {}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        token = None
        for key, value in scope["headers"]:
            if key == b"cookie":
                token = self.tokens.get(value)
                if token is None and value not in self.tokens:
                    found = [c[8:] for c in value.decode("latin-1").split("; ") if c.startswith("session=")]
                    token = self.tokens[value] = found[0] if found else None
        session = self.sessions.get(token) if token is not None else None
        new = session is None
        if new:
            session, token = {}, secrets.token_urlsafe(16)
        scope["session"] = session

        def send_wrapper(message: dict[str, Any]) -> Any:
            if message["type"] == "http.response.start":
                headers = message.setdefault("headers", [])
                if new and session:
                    self.sessions[token] = session  # type: ignore[index]
                    headers.append((b"set-cookie", f"session={token}; Path=/; HttpOnly".encode()))
                headers.append((b"vary", b"Cookie"))
            return send(message)

        await self.app(scope, receive, send_wrapper)


def make_floor() -> Starlette:
    """:class:`FloorSessionMiddleware`: the cost floor of any server-side session middleware."""
    return _app([Middleware(FloorSessionMiddleware)])


def make_clustersess() -> Starlette:
    """clustersess, configured from ``CLUSTERSESS_*`` (single node unless a Redis URL is set)."""
    from clustersess import ClusterSessionMiddleware

    return _app([Middleware(ClusterSessionMiddleware)])
