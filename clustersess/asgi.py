"""Pure ASGI middleware: a drop-in replacement for Starlette's ``SessionMiddleware``.

It sets ``scope["session"]`` (so ``request.session`` works unchanged), starts and stops
the node's background work with the ASGI lifespan, and writes the cookie in a
``send`` wrapper when the response starts.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from .clock import Clock
from .config import Config
from .cookies import KEEP, SET, CookieAction, CookieWriter, add_vary_cookie, expires_at_once, find_cookie, make_private
from .errors import ConfigError, ReplicationUnavailable
from .listeners import SessionListener
from .manager import Handle, SessionManager

log = logging.getLogger("clustersess")

_VARY = (b"vary", b"Cookie")

Scope = dict[str, Any]
Message = dict[str, Any]

_UNSEEN: Any = object()
_HEADER_CACHE_SIZE = 1024
_MAX_CACHED_HEADER = 4096


_SAFE_METHODS = frozenset(("GET", "HEAD", "OPTIONS"))


async def _nothing() -> None:
    return None


class ClusterSessionMiddleware:
    """Tomcat-style clustered sessions for any ASGI app.

    Accepts Starlette's ``SessionMiddleware`` keywords (``secret_key``,
    ``session_cookie``, ``max_age``, ``path``, ``same_site``, ``https_only``, ``domain``,
    ``partitioned``) and every :class:`Config` field (``node_name``, ``max_inactive``,
    ``redis_url``, ...). Anything not given comes from ``CLUSTERSESS_*`` variables.
    Alternatively pass a ready ``config`` or ``manager``.

    A configuration error (a missing secret, say) is raised here when possible; under a
    server it also fails the ASGI lifespan startup (the server exits instead of serving
    requests it cannot handle, and ``with TestClient(app)`` raises it).

    The node's background work starts with the lifespan, or with the first request on a
    server without one, on that event loop; a later lifespan on another loop (each
    ``with TestClient(app)`` has its own) starts it again there.
    """

    def __init__(
        self,
        app: Any,
        secret_key: Any = None,
        session_cookie: str | None = None,
        max_age: int | None = None,
        path: str | None = None,
        same_site: str | None = None,
        https_only: bool | None = None,
        domain: str | None = None,
        partitioned: bool | None = None,
        *,
        config: Config | None = None,
        manager: SessionManager | None = None,
        clock: Clock | None = None,
        transport: Any = None,
        listeners: list[SessionListener] | None = None,
        **options: Any,
    ) -> None:
        self.app = app
        self.config_error: ConfigError | None = None
        # True once the manager runs; until then every call goes through _dispatch()
        self._started = False
        self._start_lock: asyncio.Lock | None = None
        self._start_lock_loop: asyncio.AbstractEventLoop | None = None
        if manager is None:
            if config is None:
                if secret_key is not None and not isinstance(secret_key, (list, tuple)):
                    secret_key = str(secret_key)  # starlette.datastructures.Secret
                try:
                    config = Config.from_env(
                        secret_key=secret_key,
                        session_cookie=session_cookie,
                        max_age=max_age,
                        path=path,
                        same_site=same_site,
                        https_only=https_only,
                        domain=domain,
                        partitioned=partitioned,
                        **options,
                    )
                except ConfigError as exc:
                    # Starlette builds its middleware stack inside the first ASGI call
                    # (often the lifespan), where uvicorn's default "auto" lifespan mode
                    # would swallow this exception and keep serving. Remember it and
                    # fail the lifespan startup explicitly instead.
                    log.error("clustersess cannot start: %s", exc)
                    self.config_error = exc
                    self._manager: SessionManager | None = None
                    return
            manager = SessionManager(config, clock=clock, transport=transport, listeners=listeners)
        self._manager = manager
        self.cookies = CookieWriter(manager.config)
        self._cookie_name = manager.config.session_cookie
        # max_age <= 0: no cookie may come back (see cookies.expires_at_once)
        self._ignore_cookies = expires_at_once(manager.config)
        #: raw Cookie header -> our cookie's value (see _read_cookie)
        self._header_cache: dict[bytes, str | None] = {}

    @property
    def manager(self) -> SessionManager:
        """The node's :class:`SessionManager`.

        Raises:
            ConfigError: the configuration was invalid (the same error as at start-up).
        """
        if self._manager is None:
            assert self.config_error is not None
            raise self.config_error
        return self._manager

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self._started:
            await self._dispatch(scope, receive, send)
            return
        manager = self._manager
        assert manager is not None  # _started implies it
        # _read_cookie(), with its common case inlined: a Cookie header seen before.
        cookie = None
        for key, value in scope["headers"]:
            if key == b"cookie":
                try:
                    cookie = self._header_cache.get(value, _UNSEEN)
                except TypeError:  # not bytes (unhashable): never cached
                    cookie = _UNSEEN
                if cookie is _UNSEEN:
                    cookie = self._read_cookie(scope)
                    break
                if cookie is not None:
                    break
        # The common case (a known cookie for a session this node owns) needs no await.
        handle = manager.open_local(cookie) if cookie else None
        if handle is None:
            try:
                # Lazy ownership for safe methods: a GET that never uses its session
                # (a health check, a static file) reads nothing and moves nothing. Other
                # methods take the session over before the app runs, so that concurrent
                # read-modify-writes on several nodes stay exact.
                handle = await manager.open(cookie, lazy=scope["method"] in _SAFE_METHODS)
            except ReplicationUnavailable as exc:  # the node is stopping mid-takeover
                await self._refuse(None, exc, send)
                return
        scope["session"] = handle.session
        scope["clustersess.manager"] = manager
        # The HTTP path is inlined here (not a helper coroutine): it runs on every
        # request, and each extra coroutine layer costs measurable time per request.
        # For the same reason send_wrapper is a plain function returning the awaitable
        # (the app awaits it either way), and a node without a cluster commits without
        # awaiting anything. The slow path (_finish) makes the same decision: a property
        # test (tests/test_cookie_decision.py) holds the two to the same headers.

        def send_wrapper(message: Message) -> Any:
            if message["type"] == "http.response.start":
                if manager.close_local(handle):  # unchanged, cookie current
                    action = KEEP
                elif manager.cluster is None:
                    action = manager.close_nowait(handle)
                else:
                    return self._finish_and_send(handle, message, send)
                if action is not KEEP:
                    self._add_headers(handle, action, message)
                elif handle.session.accessed:
                    # _add_headers(KEEP)'s common case, inlined: no Vary of the app's own.
                    headers = message.get("headers")
                    if type(headers) is not list:
                        self._add_headers(handle, action, message)
                    else:
                        for name, _ in headers:
                            if name == b"vary":
                                add_vary_cookie(headers, raw=True)
                                break
                        else:
                            headers.append(_VARY)
            elif handle.refused:
                return _nothing()  # the app's body of a response replaced by a 503
            return send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except ReplicationUnavailable as exc:
            # Raised by rotate()/invalidate()/clear() on a fenced node in refuse mode,
            # before the response started: answer 503, nothing was changed.
            if handle.closed:
                raise
            manager.abandon(handle)
            await self._refuse(handle, exc, send)
        finally:
            if not handle.closed:
                manager.abandon(handle)

    async def _dispatch(self, scope: Scope, receive: Any, send: Any) -> None:
        """Everything but an HTTP request on a started node: lifespan, WebSocket, start-up."""
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if kind != "http" and kind != "websocket":  # pragma: no cover
            await self.app(scope, receive, send)
            return
        manager = self.manager  # raises the ConfigError, if any
        if not self._started:
            await self._start()
            manager.app_started()  # a server without lifespan: the app runs now
        if kind == "http":
            await self(scope, receive, send)
        else:
            await self._websocket(scope, receive, send)

    async def _websocket(self, scope: Scope, receive: Any, send: Any) -> None:
        manager = self.manager
        cookie = self._read_cookie(scope)
        handle = await manager.open(cookie)
        scope["session"] = handle.session
        scope["clustersess.manager"] = manager

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "websocket.accept" and not handle.closed:
                await self._finish(handle, message)
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if not handle.closed:
                # Rejected or closed before accept: still commit what the app stored.
                try:
                    await manager.close(handle)
                except Exception:
                    log.exception("clustersess: could not commit a websocket session")
                    manager.abandon(handle)

    async def _refuse(self, handle: Handle | None, exc: ReplicationUnavailable, send: Any) -> None:
        """Answer 503 (``on_replication_failure="refuse"``), with the cookie the session has
        now: a rotation that happened stays done, so the client must learn the new ID."""
        log.warning("clustersess: answered 503: %s", exc.reason)
        message: Message = {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"retry-after", b"1"),
                (b"cache-control", b"no-store"),
            ],
        }
        if handle is not None:
            action = exc.action if isinstance(exc.action, CookieAction) else KEEP
            self._add_headers(handle, action, message)
        await send(message)
        await send({"type": "http.response.body", "body": b"session change could not be replicated; retry\n"})

    async def _finish_and_send(self, handle: Handle, message: Message, send: Any) -> None:
        """A clustered commit: awaits the backup's ack. If the change cannot be confirmed
        and the node refuses such writes, a 503 replaces the app's response."""
        try:
            await self._finish(handle, message)
        except ReplicationUnavailable as exc:
            handle.refused = True
            await self._refuse(handle, exc, send)
            return
        await send(message)

    async def _finish(self, handle: Handle, message: Message) -> None:
        """Commit (awaiting the cluster) and write the cookie headers for the outcome."""
        action = await self.manager.close(handle)
        if action is not KEEP or handle.session.accessed:
            self._add_headers(handle, action, message)

    def _add_headers(self, handle: Handle, action: CookieAction, message: Message) -> None:
        """Write ``action`` into the response headers: Set-Cookie (then Cache-Control:
        private), and ``Vary: Cookie`` (always, when called: the session was used)."""
        headers = message.get("headers")
        if type(headers) is not list:
            headers = message["headers"] = list(headers or ())
        if action is not KEEP:
            value = self.cookies.set(self.manager.cookie_value(handle)) if action is SET else self.cookies.delete()
            headers.append((b"set-cookie", value.encode("latin-1")))
            make_private(headers)
        for name, _ in headers:
            if name == b"vary":
                add_vary_cookie(headers, raw=True)  # merged into the app's own
                return
        headers.append(_VARY)

    def _read_cookie(self, scope: Scope) -> str | None:
        name = self._cookie_name
        cache = self._header_cache
        for key, value in scope["headers"]:
            if key == b"cookie":
                # A client sends the same Cookie header with every request, and parsing
                # it is a good part of the middleware's cost on a read; find_cookie is a
                # pure function of the header, so remember its answer (bounded, like the
                # signer's verification cache).
                found: str | None
                hit = cache.get(value, _UNSEEN) if type(value) is bytes else _UNSEEN
                if hit is _UNSEEN:
                    # latin-1 decodes any bytes; find_cookie rejects non-ASCII values.
                    found = None if self._ignore_cookies else find_cookie(value.decode("latin-1"), name)
                    if type(value) is bytes and len(value) <= _MAX_CACHED_HEADER:
                        if len(cache) >= _HEADER_CACHE_SIZE:
                            cache.clear()
                        cache[value] = found
                else:
                    found = hit
                if found is not None:
                    return found
        return None

    async def _start(self) -> None:
        """Start the node's background work on the running loop (idempotent there)."""
        loop = asyncio.get_running_loop()
        if self._start_lock_loop is not loop:  # an asyncio.Lock belongs to one loop
            self._start_lock, self._start_lock_loop = asyncio.Lock(), loop
        assert self._start_lock is not None
        async with self._start_lock:
            await self.manager.start()
            self._started = True

    async def _stop(self) -> None:
        if self._started:
            self._started = False
            await self.manager.stop()

    async def _lifespan(self, scope: Scope, receive: Any, send: Any) -> None:
        # The node starts before the app's own start-up code (which may use sessions) and
        # stops after its shutdown code. If it cannot start, the app never sees the
        # lifespan: startup.failed is sent, and the error raised, as Starlette's router
        # does (uvicorn then exits; TestClient raises it from __enter__).
        message: Message = await receive()
        if message["type"] == "lifespan.startup":
            try:
                await self._start()
            except Exception as exc:
                log.error("clustersess startup failed: %s", exc)
                await send({"type": "lifespan.startup.failed", "message": f"clustersess: {exc}"})
                raise
        first: list[Message] = [message]

        async def receive_wrapper() -> Message:
            if first:
                return first.pop()
            message: Message = await receive()
            return message

        async def send_wrapper(message: Message) -> None:
            kind = message["type"]
            if kind == "lifespan.startup.complete":
                self.manager.app_started()
            elif kind in ("lifespan.startup.failed", "lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await self._stop()
            await send(message)

        try:
            await self.app(scope, receive_wrapper, send_wrapper)
        finally:
            # The app's lifespan ended without a word (it does not support the protocol,
            # or it crashed): the node stops; a server that goes on serving starts it
            # again with its first request.
            await self._stop()
