"""WSGI middleware: the same clustered sessions for synchronous apps (Django, plain WSGI).

A thin adapter over :class:`~clustersess.threaded.ThreadedNode` (which runs the async core
on a loop thread of its own and holds the per-session lock): the cookie is read when the
request starts, and the session committed and the cookie written when the app calls
``start_response``. Flask apps use :mod:`clustersess.flask_ext` instead, which plugs the
same node into Flask's own session interface.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .clock import Clock
from .config import Config
from .cookies import KEEP, SET, add_vary_cookie, find_cookie, make_private
from .listeners import SessionListener
from .manager import SessionManager
from .threaded import Opened, ThreadedNode, WSGISession

__all__ = ["MANAGER_KEY", "SESSION_KEY", "ClusterSessionWSGIMiddleware", "WSGISession"]

#: environ keys set for the application
SESSION_KEY = "clustersess.session"
MANAGER_KEY = "clustersess.manager"
_STATE_KEY = "clustersess.request"

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
Headers = list[tuple[str, str]]


class _Request:
    """One request's session state: its hold on the session, the headers to add."""

    __slots__ = ("headers", "opened", "private")

    def __init__(self, opened: Opened) -> None:
        self.opened = opened
        self.headers: Headers = []
        self.private = False


class ClusterSessionWSGIMiddleware:
    """Tomcat-style clustered sessions for any WSGI app.

    The session (a :class:`~clustersess.session.Session`, a dict) is in
    ``environ["clustersess.session"]`` and the manager in ``environ["clustersess.manager"]``.
    WSGI has no ``request.session`` that could tell when the app used the session, so
    ``Vary: Cookie`` is added when the request carried a session cookie or the app
    changed the session (set ``session.accessed = True`` to add it for a request without
    a cookie that read the session).

    Arguments:
        app: the WSGI application.
        secret_key, and every :class:`Config` field as a keyword (``node_name``,
            ``redis_url``, ``max_inactive``, ``session_cookie``, ...): anything not given
            comes from ``CLUSTERSESS_*`` variables. Or pass a ready ``config``.
        clock, transport, listeners, request_timeout, shutdown_timeout, handle_signals,
            session_class: see :class:`~clustersess.threaded.ThreadedNode`.

    The event loop thread is started and the manager started (joining the cluster) here,
    so a node serves as a backup before its first request.

    Raises:
        ConfigError: a missing or invalid setting (``CLUSTERSESS_SECRET`` not set, say).
        DuplicateNodeError: another live node already uses this node name.
    """

    def __init__(
        self,
        app: Any,
        secret_key: Any = None,
        *,
        config: Config | None = None,
        clock: Clock | None = None,
        transport: Any = None,
        listeners: list[SessionListener] | None = None,
        request_timeout: float = 30.0,
        shutdown_timeout: float | None = None,
        handle_signals: bool = True,
        session_class: type[WSGISession] = WSGISession,
        **options: Any,
    ) -> None:
        self.app = app
        if config is None:
            config = Config.from_env(secret_key=secret_key, **options)
        self.config = config
        self.node = ThreadedNode(
            config,
            clock=clock,
            transport=transport,
            listeners=listeners,
            request_timeout=request_timeout,
            shutdown_timeout=shutdown_timeout,
            handle_signals=handle_signals,
            session_class=session_class,
        )
        self.manager: SessionManager = self.node.manager
        self.cookies = self.node.cookies
        self._cookie_name = config.session_cookie
        self.manager.app_started()  # the app this wraps is built

    # -- request path --------------------------------------------------------------------
    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        cookie = find_cookie(environ.get("HTTP_COOKIE", ""), self._cookie_name)
        opened = self.node.open(cookie)
        state = _Request(opened)
        try:
            environ[SESSION_KEY] = opened.session
            environ[MANAGER_KEY] = self.manager
            environ[_STATE_KEY] = state

            def session_start_response(status: str, headers: Headers, exc_info: Any = None) -> Any:
                self.commit(environ)  # no-op after the first call
                if state.headers:
                    for name, value in state.headers:
                        if name == "Vary":
                            add_vary_cookie(headers, raw=False)
                        else:
                            headers.append((name, value))
                if state.private:
                    make_private(headers)
                return start_response(status, headers, exc_info)

            result: Iterable[bytes] = self.app(environ, session_start_response)
        except BaseException:
            self.node.release(opened)
            raise
        if opened.handle.closed:
            return result  # the usual case: the app called start_response already
        # start_response will be called while the body is iterated (a generator app):
        # make sure the session is released when the server closes the body.
        return _ClosingBody(result, lambda: self.node.release(opened))

    def commit(self, environ: Environ) -> None:
        """Commit this request's session now and release its lock (idempotent).

        Called by the middleware when the response starts.

        Raises:
            SessionValueError, SessionTooLarge: the session cannot be stored; it keeps its
                last committed state.
        """
        state: _Request = environ[_STATE_KEY]
        opened = state.opened
        if opened.handle.closed:
            self.node.release(opened)
            return
        session = opened.session
        action = self.node.commit(opened)
        if action is not KEEP:
            value = self.cookies.set(self.node.cookie_value(opened)) if action is SET else self.cookies.delete()
            state.headers.append(("Set-Cookie", value))
            state.private = True
        # No request.session here to tell a read from no use at all: a request that
        # carried the cookie may have read it (see the class docstring).
        if action is not KEEP or session.accessed or opened.handle.cookie_in is not None:
            state.headers.append(("Vary", "Cookie"))

    # -- lifecycle -----------------------------------------------------------------------
    def close(self) -> None:
        """Hand this node's sessions over (when clustered) and stop the loop thread.

        Idempotent; registered with ``atexit`` and called on SIGTERM (see ``handle_signals``).
        """
        self.node.close()


class _ClosingBody:
    """A response body that runs ``on_close`` when the server closes it (PEP 3333)."""

    __slots__ = ("_body", "_on_close")

    def __init__(self, body: Iterable[bytes], on_close: Callable[[], None]) -> None:
        self._body = body
        self._on_close = on_close

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._body)

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._on_close()
