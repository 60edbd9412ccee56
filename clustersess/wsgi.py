"""WSGI middleware: the same clustered sessions for synchronous apps (Flask, Django, ...).

The async core runs unchanged on a private event loop in a daemon thread owned by the
middleware (:class:`~clustersess.loop.LoopThread`); request threads call
``manager.open()`` and ``manager.close()`` on it and wait. So a WSGI node speaks the same
wire protocol and is a full cluster member (owner, backup, takeover, hand-off) whatever
its server: threads (waitress, gunicorn gthread) or a single thread.

Concurrency: a node holds one live session object per ID, shared by every request of that
session. Python code such as ``session["n"] += 1`` is not atomic across threads, so the
middleware holds a per-session lock from ``open()`` until ``close()`` (like PHP's session
locking): requests of one session run one at a time on a node, requests of different
sessions run in parallel.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from types import FrameType
from typing import Any

from .clock import Clock
from .config import Config
from .cookies import CookieWriter, find_cookie, make_private
from .listeners import SessionListener
from .loop import LoopThread
from .manager import DELETE_COOKIE, Handle, SessionManager
from .session import Session

__all__ = ["MANAGER_KEY", "SESSION_KEY", "ClusterSessionWSGIMiddleware", "WSGISession"]

log = logging.getLogger("clustersess")

#: environ keys set for the application
SESSION_KEY = "clustersess.session"
MANAGER_KEY = "clustersess.manager"
_STATE_KEY = "clustersess.request"

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
Headers = list[tuple[str, str]]


#: the loop thread each WSGI-served manager runs on (weak: a closed middleware goes away)
_LOOPS: weakref.WeakKeyDictionary[SessionManager, LoopThread] = weakref.WeakKeyDictionary()


class WSGISession(Session):
    """The session as WSGI apps get it: ``rotate()`` and ``invalidate()`` run on the loop.

    They change the manager's store and tell the cluster, which only the loop thread may
    do; request threads are not that thread. Same memory layout as :class:`Session`: the
    middleware turns the core's objects into this class in place (``__class__``), so the
    core stays framework-free and there is still one live object per session.
    """

    __slots__ = ()

    def rotate(self) -> None:
        _LOOPS[self._manager].call(self._manager.rotate, self)

    def invalidate(self) -> None:
        _LOOPS[self._manager].call(self._manager.invalidate, self)


class _SessionLocks:
    """One ``threading.Lock`` per live session object, kept while any request uses it.

    Keyed by ``id(session)``: the object is shared by the requests of one session, is
    kept alive by every holder's handle, and keeps its identity through ``rotate()`` and
    ``invalidate()`` (which change its token).
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[int, list[Any]] = {}  # id -> [lock, users]

    def acquire(self, session: Session) -> None:
        key = id(session)
        with self._guard:
            slot = self._locks.get(key)
            if slot is None:
                slot = self._locks[key] = [threading.Lock(), 0]
            slot[1] += 1
        slot[0].acquire()

    def release(self, session: Session) -> None:
        key = id(session)
        with self._guard:
            slot = self._locks[key]
            slot[1] -= 1
            if slot[1] == 0:
                del self._locks[key]
            slot[0].release()

    def __len__(self) -> int:
        return len(self._locks)


class _Request:
    """One request's session state: its handle, whether it holds the lock, its headers."""

    __slots__ = ("handle", "headers", "locked", "private")

    def __init__(self, handle: Handle) -> None:
        self.handle = handle
        self.locked = False
        self.headers: Headers = []
        self.private = False


class ClusterSessionWSGIMiddleware:
    """Tomcat-style clustered sessions for any WSGI app.

    The session (a :class:`~clustersess.session.Session`, a dict) is in
    ``environ["clustersess.session"]`` and the manager in ``environ["clustersess.manager"]``.

    Arguments:
        app: the WSGI application.
        secret_key, and every :class:`Config` field as a keyword (``node_name``,
            ``redis_url``, ``max_inactive``, ``session_cookie``, ...): anything not given
            comes from ``CLUSTERSESS_*`` variables. Or pass a ready ``config``.
        clock, transport, listeners: passed to :class:`SessionManager`.
        request_timeout: the longest a request waits for the manager (open or commit);
            the core bounds its own waits (ack_timeout, takeover) well below this.
        shutdown_timeout: the longest :meth:`close` waits for the hand-off (default
            ``max(5, 3 * ack_timeout)`` seconds).
        handle_signals: on SIGTERM, hand sessions over before the process dies. Only
            installed when SIGTERM has its default action and this runs in the main
            thread (waitress); servers with their own handler (gunicorn) exit through
            ``sys.exit``, where the ``atexit`` hook does the hand-off.

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
        assert session_class.__slots__ == (), "session_class must not add slots (it is assigned in place)"
        self.app = app
        self.session_class = session_class
        if config is None:
            config = Config.from_env(secret_key=secret_key, **options)
        self.config = config
        self.request_timeout = request_timeout
        # Long enough for the hand-off (the cluster waits up to 2 x ack_timeout for acks),
        # short enough that SIGTERM still ends the process well before a SIGKILL follows.
        self.shutdown_timeout = shutdown_timeout or max(5.0, 3 * config.ack_timeout)
        self.cookies = CookieWriter(config)
        self._cookie_name = config.session_cookie
        self._locks = _SessionLocks()
        self._pid = os.getpid()
        self._closed = False
        self._close_lock = threading.Lock()
        self._previous_sigterm: Any = None
        self._loop = LoopThread(name=f"clustersess-{config.node_name}")
        try:
            # Built on the loop thread: the manager and cluster layer create asyncio
            # objects that belong to that loop.
            self.manager: SessionManager = self._loop.call(
                lambda: SessionManager(config, clock=clock, transport=transport, listeners=listeners)
            )
            _LOOPS[self.manager] = self._loop
            self._loop.run(self.manager.start(), timeout=max(request_timeout, config.drop_time * 3))
        except BaseException:
            self._loop.stop()
            raise
        self.manager.app_started()  # the app this wraps is built
        atexit.register(self.close)
        if handle_signals:
            self._install_sigterm()

    # -- request path --------------------------------------------------------------------
    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        if self._pid != os.getpid():
            raise RuntimeError(
                "clustersess: this middleware was created before the server forked its workers "
                "(gunicorn --preload?); its event loop thread does not exist in the worker. Load "
                "the app in each worker (no --preload) and give each worker its own node name "
                "(see README, 'Several worker processes')."
            )
        cookie = find_cookie(environ.get("HTTP_COOKIE", ""), self._cookie_name)
        loop = self._loop
        handle = loop.run(self.manager.open(cookie), self.request_timeout)
        if type(handle.session) is not self.session_class:
            handle.session.__class__ = self.session_class
        state = _Request(handle)
        try:
            self._locks.acquire(handle.session)
            state.locked = True
            handle.session.accessed = False
            environ[SESSION_KEY] = handle.session
            environ[MANAGER_KEY] = self.manager
            environ[_STATE_KEY] = state

            def session_start_response(status: str, headers: Headers, exc_info: Any = None) -> Any:
                self.commit(environ)  # no-op after the first call
                headers.extend(state.headers)
                if state.private:
                    make_private(headers)
                return start_response(status, headers, exc_info)

            result: Iterable[bytes] = self.app(environ, session_start_response)
        except BaseException:
            self._release(state)
            raise
        if handle.closed:
            return result  # the usual case: the app called start_response already
        # start_response will be called while the body is iterated (a generator app):
        # make sure the session is released when the server closes the body.
        return _ClosingBody(result, lambda: self._release(state))

    def commit(self, environ: Environ) -> None:
        """Commit this request's session now and release its lock (idempotent).

        Called by the middleware when the response starts; the Flask integration calls it
        from ``save_session`` so a commit error goes through Flask's error handling.

        Raises:
            SessionValueError, SessionTooLarge: the session cannot be stored; it keeps its
                last committed state.
        """
        state: _Request = environ[_STATE_KEY]
        handle = state.handle
        if handle.closed:
            return
        try:
            cookie = self._loop.run(self.manager.close(handle), self.request_timeout)
            session = handle.session
            if cookie is None:
                if session.accessed or handle.cookie_in is not None:
                    state.headers.append(("Vary", "Cookie"))
                return
            value = self.cookies.delete() if cookie == DELETE_COOKIE else self.cookies.set(cookie)
            state.headers += [("Set-Cookie", value), ("Vary", "Cookie")]
            state.private = True
        finally:
            self._release(state)

    def _release(self, state: _Request) -> None:
        try:
            if not state.handle.closed:
                self._loop.call(self.manager.abandon, state.handle, timeout=self.request_timeout)
        finally:
            if state.locked:
                state.locked = False
                self._locks.release(state.handle.session)

    # -- lifecycle -----------------------------------------------------------------------
    def close(self) -> None:
        """Hand this node's sessions over (when clustered) and stop the loop thread.

        Idempotent; registered with ``atexit`` and called on SIGTERM (see ``handle_signals``).
        """
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        atexit.unregister(self.close)
        try:
            if self._pid == os.getpid() and self._loop.running:
                self._loop.run(self.manager.stop(), timeout=self.shutdown_timeout)
        except TimeoutError:
            log.error(
                "clustersess: stopping the node did not finish within %.1fs; exiting anyway. Waiting in:\n%s",
                self.shutdown_timeout,
                self._loop.describe_tasks(),
            )
        except Exception:
            log.exception("clustersess: stopping the session manager failed; sessions were not handed over")
        finally:
            self._loop.stop()
            self._restore_sigterm()

    def _install_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return  # the server handles SIGTERM itself and exits through sys.exit -> atexit
        self._previous_sigterm = signal.SIG_DFL
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _restore_sigterm(self) -> None:
        if self._previous_sigterm is None or threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) == self._on_sigterm:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
        self._previous_sigterm = None

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        # Hand the sessions over, then die of SIGTERM as if we had never caught it.
        log.info("clustersess: SIGTERM, handing sessions over before exiting")
        self.close()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


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
