"""A node for threaded (WSGI) servers: the async core on a loop thread of its own.

:class:`ThreadedNode` runs the :class:`~clustersess.manager.SessionManager` (and the
cluster layer) unchanged on a private event loop in a daemon thread
(:class:`~clustersess.loop.LoopThread`); request threads call :meth:`ThreadedNode.open`
and :meth:`ThreadedNode.commit`, which run on that loop and wait. So a WSGI node speaks
the same wire protocol and is a full cluster member (owner, backup, takeover, hand-off)
whatever its server: threads (waitress, gunicorn gthread) or a single thread. The WSGI
middleware and the Flask session interface are two thin adapters over it.

Concurrency: a node holds one live session object per ID, shared by every request of that
session. Python code such as ``session["n"] += 1`` is not atomic across threads, so a
request holds a per-session lock from ``open()`` until ``commit()`` (like PHP's session
locking): requests of one session run one at a time on a node, requests of different
sessions run in parallel. The lock is re-entrant, so code that opens the session it is
already in, in the same thread (Flask's ``session_transaction()``), does not deadlock.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
import weakref
from types import FrameType
from typing import Any

from .clock import Clock
from .config import Config
from .cookies import CookieAction, CookieWriter, expires_at_once
from .listeners import SessionListener
from .loop import LoopThread
from .manager import Handle, SessionManager
from .session import Session

log = logging.getLogger("clustersess")

#: the loop thread each threaded manager runs on (weak: a closed node goes away)
_LOOPS: weakref.WeakKeyDictionary[SessionManager, LoopThread] = weakref.WeakKeyDictionary()


class WSGISession(Session):
    """The session as threaded code gets it: ``rotate()``, ``invalidate()`` and
    ``clear()`` run on the node's loop.

    They change the manager's store and tell the cluster, which only the loop thread may
    do; request threads are not that thread. Same memory layout as :class:`Session`: the
    node turns the core's objects into this class in place (``__class__``), so the core
    stays framework-free and there is still one live object per session.
    """

    __slots__ = ()

    def rotate(self) -> None:
        _LOOPS[self._manager].call(self._manager.rotate, self)

    def invalidate(self) -> None:
        _LOOPS[self._manager].call(self._manager.invalidate, self)


class _SessionLocks:
    """One re-entrant lock per live session object, kept while any request uses it.

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
                slot = self._locks[key] = [threading.RLock(), 0]
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


class Opened:
    """One request's hold on its session: the manager's handle, and the lock."""

    __slots__ = ("handle", "locked")

    def __init__(self, handle: Handle) -> None:
        self.handle = handle
        self.locked = False

    @property
    def session(self) -> Session:
        return self.handle.session


class ThreadedNode:
    """A :class:`SessionManager` on its own loop thread, for synchronous code.

    Arguments:
        config: the validated :class:`Config`.
        clock, transport, listeners: passed to :class:`SessionManager`.
        request_timeout: the longest a request waits for the manager (open or commit);
            the core bounds its own waits (ack_timeout, takeover) well below this.
        shutdown_timeout: the longest :meth:`close` waits for the hand-off (default
            ``max(5, 3 * ack_timeout)`` seconds).
        handle_signals: on SIGTERM, hand sessions over before the process dies. Only
            installed when SIGTERM has its default action and this runs in the main
            thread (waitress); servers with their own handler (gunicorn) exit through
            ``sys.exit``, where the ``atexit`` hook does the hand-off.
        session_class: the class sessions are given (a :class:`WSGISession` subclass
            without slots of its own).

    The loop thread is started and the manager started (joining the cluster) here, so a
    node serves as a backup before its first request.

    Raises:
        DuplicateNodeError: another live node already uses this node name.
    """

    def __init__(
        self,
        config: Config,
        *,
        clock: Clock | None = None,
        transport: Any = None,
        listeners: list[SessionListener] | None = None,
        request_timeout: float = 30.0,
        shutdown_timeout: float | None = None,
        handle_signals: bool = True,
        session_class: type[WSGISession] = WSGISession,
    ) -> None:
        assert session_class.__slots__ == (), "session_class must not add slots (it is assigned in place)"
        self.config = config
        self.session_class = session_class
        self.request_timeout = request_timeout
        # Long enough for the hand-off (the cluster waits up to 2 x ack_timeout for acks),
        # short enough that SIGTERM still ends the process well before a SIGKILL follows.
        self.shutdown_timeout = shutdown_timeout or max(5.0, 3 * config.ack_timeout)
        self.cookies = CookieWriter(config)
        #: max_age <= 0: a cookie that comes back anyway is not ours (see cookies.expires_at_once)
        self.ignore_cookies = expires_at_once(config)
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
        atexit.register(self.close)
        if handle_signals:
            self._install_sigterm()

    # -- request path --------------------------------------------------------------------
    def open(self, cookie: str | None) -> Opened:
        """The session for a request that carried ``cookie``, locked for this thread.

        Every :meth:`open` needs a :meth:`commit` or a :meth:`release` (both is fine).
        """
        if self._pid != os.getpid():
            raise RuntimeError(
                "clustersess: this node was created before the server forked its workers "
                "(gunicorn --preload?); its event loop thread does not exist in the worker. Load "
                "the app in each worker (no --preload) and give each worker its own node name "
                "(see deploy/README.md)."
            )
        if self.ignore_cookies:
            cookie = None
        handle = self._loop.run(self.manager.open(cookie), self.request_timeout)
        opened = Opened(handle)
        session = handle.session
        if type(session) is not self.session_class:
            session.__class__ = self.session_class
        try:
            self._locks.acquire(session)
        except BaseException:
            self.release(opened)
            raise
        opened.locked = True
        # Under the lock this request is the only one using the object: its flags are its own.
        session.accessed = session.modified = False
        return opened

    def commit(self, opened: Opened) -> CookieAction:
        """Commit the request's session and release its lock; what to do with the cookie.

        Raises:
            SessionValueError, SessionTooLarge: the session cannot be stored; it keeps its
                last committed state (and the lock is released all the same).
        """
        try:
            return self._loop.run(self.manager.close(opened.handle), self.request_timeout)
        finally:
            self.release(opened)

    def release(self, opened: Opened) -> None:
        """Give the session up without committing (if not committed) and unlock (idempotent)."""
        try:
            if not opened.handle.closed:
                self._loop.call(self.manager.abandon, opened.handle, timeout=self.request_timeout)
        finally:
            if opened.locked:
                opened.locked = False
                self._locks.release(opened.handle.session)

    def cookie_value(self, opened: Opened) -> str:
        """The value a :data:`~clustersess.cookies.SET` sends (see :meth:`SessionManager.cookie_value`)."""
        return self.manager.cookie_value(opened.handle)

    def call(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` on the loop thread (where the manager's state may be touched)."""
        return self._loop.call(fn, *args, timeout=self.request_timeout)

    @property
    def locked_sessions(self) -> int:
        """Sessions some request holds right now (for tests and diagnostics)."""
        return len(self._locks)

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
