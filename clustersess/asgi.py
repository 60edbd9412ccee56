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
from .cookies import CookieWriter, find_cookie, make_private
from .errors import ConfigError
from .listeners import SessionListener
from .manager import DELETE_COOKIE, Handle, SessionManager

log = logging.getLogger("clustersess")

_VARY = (b"vary", b"Cookie")

Scope = dict[str, Any]
Message = dict[str, Any]

_UNSEEN: Any = object()
_HEADER_CACHE_SIZE = 1024
_MAX_CACHED_HEADER = 4096


class ClusterSessionMiddleware:
    """Tomcat-style clustered sessions for any ASGI app.

    Accepts Starlette's ``SessionMiddleware`` keywords (``secret_key``,
    ``session_cookie``, ``max_age``, ``path``, ``same_site``, ``https_only``, ``domain``,
    ``partitioned``) and every :class:`Config` field (``node_name``, ``max_inactive``,
    ``redis_url``, ...). Anything not given comes from ``CLUSTERSESS_*`` variables.
    Alternatively pass a ready ``config`` or ``manager``.

    A configuration error (a missing secret, say) is raised here when possible; under a
    server it also fails the ASGI lifespan startup, so the server exits instead of
    serving requests it cannot handle.
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
                    self.manager: SessionManager | None = None
                    self.cookies: CookieWriter | None = None
                    return
            manager = SessionManager(config, clock=clock, transport=transport, listeners=listeners)
        self.manager = manager
        self.cookies = CookieWriter(manager.config)
        self._cookie_name = manager.config.session_cookie
        #: raw Cookie header -> our cookie's value (see _read_cookie)
        self._header_cache: dict[bytes, str | None] = {}

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self._started:
            await self._dispatch(scope, receive, send)
            return
        manager: SessionManager = self.manager  # type: ignore[assignment]  # set: started
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
            handle = await manager.open(cookie)
        # session.accessed needs no reset: it only decides Vary for a request without a
        # cookie, and such a request always gets a new session object.
        scope["session"] = handle.session
        scope["clustersess.manager"] = manager
        # The HTTP path is inlined here (not a helper coroutine): it runs on every
        # request, and each extra coroutine layer costs measurable time per request.
        # For the same reason send_wrapper is a plain function returning the awaitable
        # (the app awaits it either way), and a node without a cluster commits without
        # awaiting anything.

        def send_wrapper(message: Message) -> Any:
            if message["type"] == "http.response.start":
                if manager.close_local(handle):  # unchanged, cookie current
                    out = None
                elif manager.cluster is None:
                    out = manager.close_nowait(handle)
                else:
                    return self._finish_and_send(handle, message, send)
                headers = message.get("headers")
                if out is None and type(headers) is list and handle.cookie_in is not None:
                    headers.append(_VARY)  # _add_cookie()'s most common case, inlined
                else:
                    self._add_cookie(handle, out, message)
            return send(message)

        try:
            await self.app(scope, receive, send_wrapper)
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
        if self.manager is None:
            assert self.config_error is not None
            raise self.config_error
        if not self._started:
            await self._ensure_started()
            self.manager.app_started()  # a server without lifespan: the app runs now
        if kind == "http":
            await self(scope, receive, send)
        else:
            await self._websocket(scope, receive, send)

    async def _websocket(self, scope: Scope, receive: Any, send: Any) -> None:
        assert self.manager is not None
        cookie = self._read_cookie(scope)
        handle = await self.manager.open(cookie)
        scope["session"] = handle.session
        scope["clustersess.manager"] = self.manager

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
                    await self.manager.close(handle)  # type: ignore[union-attr]
                except Exception:
                    log.exception("clustersess: could not commit a websocket session")
                    self.manager.abandon(handle)  # type: ignore[union-attr]

    async def _finish_and_send(self, handle: Handle, message: Message, send: Any) -> None:
        await self._finish(handle, message)
        await send(message)

    async def _finish(self, handle: Handle, message: Message) -> None:
        assert self.manager is not None
        self._add_cookie(handle, await self.manager.close(handle), message)

    def _add_cookie(self, handle: Handle, cookie: str | None, message: Message) -> None:
        """Put what :meth:`SessionManager.close` answered into the response headers."""
        assert self.cookies is not None
        headers = message.setdefault("headers", [])
        if not isinstance(headers, list):
            headers = message["headers"] = list(headers)
        if cookie is None:
            if handle.session.accessed or handle.cookie_in is not None:
                headers.append(_VARY)
            return
        value = self.cookies.delete() if cookie == DELETE_COOKIE else self.cookies.set(cookie)
        headers.append((b"set-cookie", value.encode("latin-1")))
        headers.append(_VARY)
        make_private(headers)

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
                    found = find_cookie(value.decode("latin-1"), name)
                    if type(value) is bytes and len(value) <= _MAX_CACHED_HEADER:
                        if len(cache) >= _HEADER_CACHE_SIZE:
                            cache.clear()
                        cache[value] = found
                else:
                    found = hit
                if found is not None:
                    return found
        return None

    async def _ensure_started(self) -> None:
        # Servers without lifespan support: start the background work on first use.
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if not self._started:
                await self.manager.start()  # type: ignore[union-attr]
                self._started = True

    async def _lifespan(self, scope: Scope, receive: Any, send: Any) -> None:
        async def receive_wrapper() -> Message:
            message: Message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    if self.manager is None:
                        assert self.config_error is not None
                        raise self.config_error
                    await self._ensure_started()
                except Exception as exc:
                    log.error("clustersess startup failed: %s", exc)
                    await send({"type": "lifespan.startup.failed", "message": f"clustersess: {exc}"})
                    await asyncio.Future()  # the server shuts down and cancels us
            elif message["type"] == "lifespan.shutdown" and self._started:
                await self.manager.stop()  # type: ignore[union-attr]
                self._started = False
            return message

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete" and self.manager is not None:
                self.manager.app_started()
            await send(message)

        await self.app(scope, receive_wrapper, send_wrapper)
