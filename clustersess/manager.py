"""The framework-free core: opens a session for a request and commits it at the end.

Adapters (``asgi.py``, ``wsgi.py``) call :meth:`SessionManager.open` when a request
starts and :meth:`SessionManager.close` before its response starts. The manager owns the
local store, the cookie signer, the stats, the listeners and the background tasks; when
clustered it delegates replication and takeover to :class:`clustersess.cluster.ClusterNode`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

from . import codec, heap, ids, tasks, versions
from .clock import Clock, SystemClock
from .config import Config
from .cookies import KEEP, CookieAction, decide
from .errors import ReplicationUnavailable, SessionTooLarge, SessionUnavailable, SessionValueError
from .listeners import DestroyReason, SessionEvent, SessionListener
from .pacing import Slicer
from .session import Entry, Session
from .stats import Stats
from .store import LocalStore

if TYPE_CHECKING:  # pragma: no cover
    from .cluster.health import Health
    from .cluster.transport import Transport

log = logging.getLogger("clustersess")


class Replicator(Protocol):
    """What the manager needs from the cluster layer (``None`` on a single node);
    :class:`clustersess.cluster.ClusterNode` implements it."""

    def start_tasks(self, tg: asyncio.TaskGroup) -> None: ...
    async def wait_ready(self) -> None: ...
    async def stop(self) -> None: ...
    async def acquire(self, token: str) -> Entry | None: ...
    async def peek(self, token: str) -> Entry | None: ...
    async def replicate(self, entry: Entry) -> bool: ...
    def can_replicate(self, token: str | None = None) -> bool: ...
    def buried(self, tokens: dict[str, str | None]) -> None: ...
    async def settle(self) -> bool: ...
    def reclaim(self, entry: Entry) -> None: ...
    def requeue(self, entry: Entry) -> None: ...
    def health(self) -> Health: ...
    def status(self) -> dict[str, Any]: ...
    #: logouts waiting for acknowledgement; :meth:`settle` waits for them. Changed only
    #: in place: the manager binds the list once and checks it on every request.
    unsettled: list[Any]


@dataclasses.dataclass(slots=True, eq=False)
class Handle:
    """One request's view of its session."""

    session: Session
    cookie_in: str | None
    #: the cookie was signed with an older key: re-issue it even if nothing changed
    resign: bool
    closed: bool = False
    #: set when ``cookie_in`` is exactly the cookie this node issues for the session
    #: (current key, routed here): the session's token then; while ``entry.token`` is
    #: still this very object and the entry is still ours, no cookie needs sending
    token: str | None = None
    #: the session is a copy read from its owner elsewhere (lazy ownership): taken over
    #: at the end of the request only if the request used it
    lazy: bool = False
    #: the adapter answered 503 instead of the app's response (its body is dropped)
    refused: bool = False


_new_handle = object.__new__


class SessionManager:
    """Holds this node's sessions. One per node (per process).

    Arguments:
        config: the validated :class:`Config`.
        clock: time source (tests inject :class:`FakeClock`).
        transport: cluster transport; default is Redis when ``config.redis_url`` is set.
        listeners: :class:`SessionListener` objects.
    """

    def __init__(
        self,
        config: Config,
        *,
        clock: Clock | None = None,
        transport: Transport | None = None,
        listeners: list[SessionListener] | None = None,
    ) -> None:
        self.config = config
        self.node = config.node_name
        self.clock: Clock = clock or SystemClock()
        self.stats = Stats()
        self.store = LocalStore()
        self.signer = ids.CookieSigner(config.secret_key, route=config.node_name)
        self.listeners = list(listeners or [])
        self.cluster: Replicator | None = None
        if transport is not None or config.redis_url is not None:
            from .cluster.node import ClusterNode

            self.cluster = ClusterNode(
                config, stats=self.stats, store=self.store, events=_Events(self), clock=self.clock, transport=transport
            )
        self._refuse = config.on_replication_failure == "refuse"
        #: with gc_freeze, the sessions stay out of full collections too (see heap.py)
        self._heap = heap.SessionHeap(self.clock.monotonic) if config.gc_freeze else None
        self.tasks: dict[str, tasks.TaskInfo] = {}
        #: the task group's task, on the event loop that started it (see start())
        self._runner: asyncio.Task[None] | None = None
        # Looked up on every request: bound once (LocalStore never rebinds its dicts).
        self._current_token = self.signer.current_token
        self._owned = self.store.owned
        self._time = self.clock.time
        self._max_inactive = config.max_inactive
        self._max_size = config.max_session_size
        self._refresh_on_write = config.max_age is not None
        #: the cluster's invalidations not yet published (a single node has none): while
        #: there are any, requests take the full close() path, which waits for them
        self._unsettled: list[Any] = self.cluster.unsettled if self.cluster is not None else []

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Start the background tasks (sweeper; cluster receiver and heartbeat) on the
        running event loop.

        Idempotent on one loop. Tasks left on another loop (a test client's, closed since)
        are dropped and started again here: each ``with TestClient(app)`` has a loop of
        its own. Raises whatever stops the start (:class:`DuplicateNodeError`, ...) and
        then leaves no task behind.
        """
        loop = asyncio.get_running_loop()
        if self._runner is not None:
            if self._runner.get_loop() is loop and not self._runner.done():
                return
            self._drop_foreign_runner()
        ready = asyncio.Event()
        runner = self._runner = loop.create_task(self._run(ready), name="clustersess")
        waiter = loop.create_task(ready.wait())
        try:
            # A task group that fails before it is ready must not leave start() waiting.
            await asyncio.wait({waiter, runner}, return_when=asyncio.FIRST_COMPLETED)
            if runner.done():
                runner.result()  # raises why it stopped
                raise RuntimeError("clustersess: the background tasks ended during start-up")
            if self.cluster is not None:
                await self.cluster.wait_ready()
        except BaseException:
            # Do not leave background tasks behind a failed start.
            waiter.cancel()
            runner.cancel()
            await asyncio.wait({runner})
            self._runner = None
            raise

    def _drop_foreign_runner(self) -> None:
        """Forget background tasks started on another event loop (cancelled there if it
        still runs). A single node loses nothing; a cluster node did not hand over."""
        runner = self._runner
        assert runner is not None
        self._runner = None
        other = runner.get_loop()
        if not other.is_closed() and not runner.done():
            other.call_soon_threadsafe(runner.cancel)
        if self.cluster is not None:
            log.warning(
                "clustersess: node %s was started on an event loop that is gone; starting it again "
                "on this one (in tests, enter the TestClient with 'with' so the node joins once)",
                self.node,
            )

    def app_started(self) -> None:
        """Adapters call this once the application has started (after its own start-up
        code): with ``config.gc_freeze``, the start-up heap leaves the cyclic GC's care
        (see :mod:`clustersess.heap`)."""
        if self.config.gc_freeze:
            heap.freeze_once()

    async def stop(self) -> None:
        """Hand sessions over (when clustered) and stop every background task."""
        if self._runner is None:
            return
        if self._runner.get_loop() is not asyncio.get_running_loop():
            self._drop_foreign_runner()  # nothing to await here: its loop is another one
            return
        if self.cluster is not None:
            await self.cluster.stop()
        runner = self._runner
        runner.cancel()
        # asyncio.wait does not raise the runner's CancelledError, and a cancellation of
        # stop() itself still propagates; bounded so a stuck task cannot hang shutdown.
        done, _ = await asyncio.wait({runner}, timeout=5.0)
        if not done:
            log.error("clustersess: background tasks did not stop within 5 s: %s", runner.get_stack())
        elif not runner.cancelled() and runner.exception() is not None:
            log.error("clustersess: background task failed", exc_info=runner.exception())
        self._runner = None

    async def _run(self, ready: asyncio.Event) -> None:
        # One task group owns every background task; cancelling it is the shutdown path.
        # Each task is supervised: an error restarts it (logged, counted, in status()).
        async with asyncio.TaskGroup() as tg:
            info = self.tasks["sweeper"] = tasks.TaskInfo("sweeper")
            tg.create_task(tasks.supervise(info, self._sweeper, on_error=self._task_failed), name="clustersess-sweeper")
            if self.cluster is not None:
                self.cluster.start_tasks(tg)
            ready.set()

    def _task_failed(self) -> None:
        self.stats.task_restarts += 1

    async def _sweeper(self) -> None:
        # Sessions idle for a quarter of max_inactive (at most a minute) drop their decoded
        # object: a node's memory is then about the stored JSON of its sessions, and a
        # session in use keeps its object (the read fast path needs no decoding).
        while True:
            await asyncio.sleep(self.config.sweep_every)
            await self.sweep_pass()

    async def sweep_pass(self, release_after: float | None = None) -> None:
        """One pass of the sweeper, in slices: expire idle sessions and copies, and drop the
        decoded object of sessions idle for ``release_after`` (by default a quarter of
        ``max_inactive``, at most a minute)."""
        if release_after is None:
            release_after = min(60.0, self.config.max_inactive / 4)
        expired, copies = await self.store.sweep_chunked(
            self.clock.time(), self.config.max_inactive, release_after, self.clock.monotonic
        )
        # Told and let go in slices too: a listener decodes each expired session for its
        # event, and 50,000 of them in one piece held the loop for 1.8 s (a Recorder);
        # and their last references going at once (the pass's lists) is another 4 ms per
        # 25,000 copies.
        slicer = Slicer(self.clock.monotonic)
        for _ in self._expired(expired, copies):
            if slicer.due():
                await slicer.pause()
        if self._heap is not None:
            self._heap.after_sweep(len(self.store.owned) + len(self.store.backups))

    def sweep(self) -> None:
        """Expire idle sessions and copies now (the sweeper calls this periodically).

        Expiry needs no cluster-wide tombstone: idle times travel as durations, so every
        copy of a session expires by itself, and none can come back.
        """
        for _ in self._expired(*self.store.sweep(self.clock.time(), self.config.max_inactive)):
            pass

    def _expired(self, expired: list[Entry], copies: list[Entry]) -> Iterator[None]:
        """Tell of each expired session (and copy, if listeners hear of copies), emptying
        the lists as it goes; yields after each (where a pass may give the loop back)."""
        notify_copies = self.config.notify_listeners_on_replication
        for entries, replicated, notify in ((expired, False, True), (copies, True, notify_copies)):
            entries.reverse()
            while entries:
                entry = entries.pop()
                if notify:
                    self._destroyed(entry, "expired", replicated=replicated)
                yield

    def health(self) -> Health:
        """Readiness for a load balancer: ``ok`` while this node may take traffic.

        A single node is always ok. A clustered node is not while it is fenced (cut off
        from Redis or from its own heartbeats, lease not held), joining, rejoining after
        its sessions were adopted, or stopping; ``reason`` says which.
        """
        if self.cluster is None:
            from .cluster.health import Health

            return Health(True, "single")
        return self.cluster.health()

    def status(self) -> dict[str, Any]:
        """A JSON-able snapshot for status pages: this node, its members and counters."""
        info: dict[str, Any] = {
            "node": self.node,
            "clustered": self.cluster is not None,
            "replication": self.config.replication if self.cluster is not None else None,
            "sessions_owned": len(self.store.owned),
            "sessions_backed_up": len(self.store.backups),
            "tombstones": len(self.store.tombstones),
            "members": [],
            "stats": self.stats.as_dict(),
            # objects frozen out of the cyclic GC at start-up, and how often a big node
            # froze its sessions since (gc_freeze; 0 when off; see heap.py)
            "gc_frozen_objects": heap.frozen_at_startup(),
            "gc_session_freezes": heap.session_freezes(),
            "health": self.health().as_dict(),
        }
        if self.cluster is not None:
            info.update(self.cluster.status())
            info["tasks"] = {**{n: t.as_dict() for n, t in self.tasks.items()}, **info["tasks"]}
        else:
            info["tasks"] = {n: t.as_dict() for n, t in self.tasks.items()}
        return info

    # -- request path -------------------------------------------------------------------
    async def open(self, cookie: str | None, *, lazy: bool = False) -> Handle:
        """The session for a request that carried ``cookie`` (its raw value, or None).

        Never raises for bad input: a forged, malformed, unknown, expired or invalidated
        cookie gets a fresh session (strict mode: the presented ID is never adopted).

        With ``lazy`` (the ASGI adapter, where Starlette marks a session as used), a
        session owned by another node is only read (one round trip, ownership stays):
        :meth:`close` takes it over if the request used it, and does nothing otherwise,
        so a health check, a static file or a status page never moves a session.

        Raises:
            SessionUnavailable: refuse mode, and the session may be on a member that did
                not answer.
        """
        if cookie:
            handle = self.open_local(cookie)
            if handle is not None:
                return handle
        entry: Entry | None = None
        verified = self.signer.verify(cookie) if cookie else None
        if cookie and verified is None:
            self.stats.rejected_cookies += 1
        if verified is not None and lazy and self.cluster is not None:
            handle = await self._open_lazy(cookie, verified.token, verified.resign)
            if handle is not None:
                return handle
        if verified is not None:
            entry = await self._find(verified.token, verified.route)
            if entry is None:
                self.stats.unknown_sessions += 1
        if entry is None:
            now = self.clock.time()
            entry = Entry(token=ids.new_token(), owner=self.node, created=now, last_accessed=now)
            session = Session(entry, self)
            entry.session = session
            entry.inflight = 1
            return Handle(session, cookie, resign=False)
        assert verified is not None  # an entry is only found for a verified cookie
        current = not verified.resign and verified.route == self.node and entry.token == verified.token
        return Handle(self._live(entry), cookie, verified.resign, False, entry.token if current else None)

    async def _open_lazy(self, cookie: str | None, token: str, resign: bool) -> Handle | None:
        """A read-only copy of a session another node owns; None: take the usual path."""
        assert self.cluster is not None
        if token in self.store.owned or self.store.is_dead(token, self.clock.time()):
            return None
        try:
            copy = await self.cluster.peek(token)
        except SessionUnavailable as exc:
            self._unavailable(exc)
            return None
        if copy is None or self.store.owned.get(token) is copy:
            return None
        if self.clock.time() - copy.last_accessed > self.config.max_inactive:
            return None
        # The copy reads as ours (its ID names this node, as the cookie will once the
        # request uses it); it is stored nowhere until then.
        copy.owner = self.node
        session = Session(copy, self, codec.decode(copy.payload))
        session._settle_clean()
        copy.session = session
        copy.inflight = 1
        return Handle(session, cookie, resign, False, None, True)

    def _unavailable(self, exc: SessionUnavailable) -> None:
        """A request's session may be on a member that did not answer: refuse mode
        answers 503 (re-raises), serve mode goes on with a fresh session."""
        if self._refuse:
            self.stats.writes_refused += 1
            raise exc

    async def _close_lazy(self, handle: Handle) -> CookieAction:
        """End a request that read a copy: take the session over if it was used (its
        changes go on top of the newest data), or let it be."""
        session = handle.session
        copy = session._entry
        handle.closed = True
        copy.inflight -= 1
        if session._killed or copy.dirty:
            # invalidate() or rotate(): done on the copy already (the tombstone reaches the
            # owner); what remains is a plain new session of ours
            handle.closed = False
            copy.inflight += 1
            handle.lazy = False
            return await self.close(handle)
        changed = not session._clean and _differs(session, copy.payload)
        if not session.accessed and not changed:
            return KEEP  # unused: nothing moved, no cookie
        assert self.cluster is not None
        entry = await self.cluster.acquire(copy.token)
        if entry is None:
            return KEEP  # gone meanwhile (logged out): its write goes with it
        self.stats.lazy_takeovers += 1
        live = self._live(entry)
        if changed:
            # The request's changes, on top of what the session holds now (someone may
            # have written since the copy was read): keys it set or deleted.
            base = codec.decode(copy.payload)
            for key in set(base) | set(session):
                if key not in session:
                    live.pop(key, None)
                elif key not in base or base[key] != session[key]:
                    live[key] = session[key]
        live.accessed = True
        owned = Handle(live, handle.cookie_in, handle.resign, False, None)
        action = await self.close(owned)
        handle.session = live  # the cookie to send names the session as we own it now
        return action

    def open_local(self, cookie: str) -> Handle | None:
        """The fast path of :meth:`open`, without awaiting: a cookie verified before, for
        a live session this node owns. ``None`` means "take the full path"."""
        token = self._current_token(cookie)
        if token is None:
            return None
        entry = self._owned.get(token)
        if entry is None:
            return None
        now = self._time()
        if now - entry.last_accessed > self._max_inactive:
            return None
        entry.last_accessed = now  # the cluster sends it to the backup (coalesced)
        session = entry.session  # self._live(entry), inlined
        if session is None:
            session = self._load(entry)
        if not entry.inflight:
            session.accessed = session.modified = False
        entry.inflight += 1
        # Handle(session, cookie, False, False, entry.token) without the Python-level
        # __init__ call, which costs as much as the rest of this method.
        handle = _new_handle(Handle)
        handle.session = session
        handle.cookie_in = cookie
        handle.resign = handle.closed = handle.lazy = handle.refused = False
        handle.token = entry.token
        return handle

    def _live(self, entry: Entry) -> Session:
        """The one live session object of ``entry``, counted as in use.

        The first request to hold it starts with ``accessed`` and ``modified`` reset;
        requests that overlap share them (so a response may get a Vary it could have
        done without, never the other way round)."""
        session = entry.session
        if session is None:
            session = self._load(entry)
        if not entry.inflight:
            session.accessed = session.modified = False
        entry.inflight += 1
        return session

    def _load(self, entry: Entry) -> Session:
        session = entry.session = Session(entry, self, codec.decode(entry.payload))
        session._settle_clean()
        return session

    async def _find(self, token: str, route: str) -> Entry | None:
        now = self.clock.time()
        if self.store.is_dead(token, now):
            return None
        entry = self.store.owned.get(token)
        if entry is None or route != self.node:
            # Not ours (or the client's cookie names another owner): the cluster may hold
            # a newer copy. On a single node, a local copy is the only copy.
            if self.cluster is not None:
                try:
                    entry = await self.cluster.acquire(token)
                except SessionUnavailable as exc:
                    self._unavailable(exc)
                    entry = None  # serve: a fresh session (the real one comes back on heal)
            elif entry is None:
                return None
        if entry is None:
            return None
        if now - entry.last_accessed > self.config.max_inactive:
            if entry.inflight == 0:
                self.store.owned.pop(token, None)
                self._destroyed(entry, "expired")
            return None
        entry.last_accessed = now
        return entry

    async def close(self, handle: Handle) -> CookieAction:
        """Commit the request's changes; returns what the response does with the cookie.

        For :data:`~clustersess.cookies.SET`, :meth:`cookie_value` is the value to send.
        When clustered, a change is replicated first (and, in sync mode, acknowledged by
        the backup) before this returns.

        Raises:
            SessionValueError: a value is not JSON-serializable; nothing is stored and
                the session keeps its last committed state.
            SessionTooLarge: the session is over ``max_session_size``; likewise.
        """
        if self.close_local(handle):
            return KEEP
        if handle.lazy:
            return await self._close_lazy(handle)
        cluster = self.cluster
        if (
            cluster is not None
            and self._refuse
            and not cluster.can_replicate(handle.session._entry.token)
            and self._would_change(handle)
        ):
            # Fenced, and configured to refuse: nothing is stored, the request gets 503.
            self.abandon(handle)  # (a rotation in it is undone there)
            self.stats.writes_refused += 1
            action = self._cookie_out(handle, False)
            raise ReplicationUnavailable("this node is fenced: " + cluster.health().reason, action)
        # a logout or rotation in this request: its tombstone must be acknowledged too
        session = handle.session
        buried = session._killed or session._entry.dirty
        changed = self._commit_rotation(handle)
        if cluster is None:
            self._end_rotation(session)
        else:
            ok = True
            if changed:
                try:
                    ok = await cluster.replicate(session._entry)
                except BaseException:
                    # (cancelled: the client is gone, and never got the new ID)
                    rotated = self._end_rotation(session)
                    if rotated is not None:
                        self._unrotate(session._entry, rotated)
                    raise
            # The old ID stays *rotating* until here: the cluster learns of it only now.
            rotated = self._end_rotation(session)
            if rotated is not None:
                if ok or not self._refuse:
                    cluster.buried({rotated[0]: rotated[1]})
                else:
                    # Refuse mode, and the new ID did not reach the backup: the rotation
                    # does not happen (nothing about it has left this node).
                    self._unrotate(session._entry, rotated)
                    self.stats.writes_unreplicated += 1
                    self.stats.writes_refused += 1
                    raise ReplicationUnavailable("the backup did not confirm the new ID", KEEP)
            if self._unsettled:
                # Every request waits for the logouts sent so far (sync mode), but only the
                # one that logged out fails if they were not acknowledged.
                settled = await cluster.settle()
                ok = ok and (settled or not buried)
            if not ok:
                self.stats.writes_unreplicated += 1
                if self._refuse:
                    self.stats.writes_refused += 1
                    raise ReplicationUnavailable("the backup did not confirm it", self._cookie_out(handle, changed))
        return self._cookie_out(handle, changed)

    def _would_change(self, handle: Handle) -> bool:
        """Whether committing ``handle`` might store something (cheap, conservative)."""
        session = handle.session
        entry = session._entry
        if session._killed or entry.dirty:
            return True
        if entry.version == 0:
            return bool(session)
        return not session._clean

    def close_nowait(self, handle: Handle) -> CookieAction:
        """:meth:`close` for a node without a cluster, where nothing needs awaiting.

        Same result and errors as :meth:`close`; adapters call it when ``self.cluster``
        is ``None`` to save the coroutine on every write.
        """
        if self.cluster is not None:
            raise RuntimeError("close_nowait() is for a node without a cluster; await close()")
        if handle.session._rotated_from is None:
            changed = self._commit(handle)
        else:
            changed = self._commit_rotation(handle)
            self._end_rotation(handle.session)
        entry = handle.session._entry
        if entry.token is handle.token and entry.owner == self.node and not self._refresh_on_write:
            return KEEP  # _cookie_out()'s common case, inlined: the request's cookie is right
        return self._cookie_out(handle, changed)

    def _cookie_out(self, handle: Handle, changed: bool) -> CookieAction:
        session = handle.session
        entry = session._entry
        stored = entry.version > 0
        # handle.token is set only for a cookie that was current when the request began;
        # the same token object still on our entry means it still is (see close_local).
        current = stored and (
            (entry.token is handle.token and entry.owner == self.node)
            or (not handle.resign and handle.cookie_in == self._cookie_for(entry))
        )
        return decide(
            stored=stored,
            ended=session._killed,
            had_cookie=handle.cookie_in is not None,
            current=current,
            refresh=changed and self._refresh_on_write,
        )

    def cookie_value(self, handle: Handle) -> str:
        """The cookie that names ``handle``'s session now (what a SET sends)."""
        return self._cookie_for(handle.session._entry)

    def close_local(self, handle: Handle) -> bool:
        """The fast path of :meth:`close`: nothing changed and the cookie is current.

        Returns True when the request is done (the handle is closed, no cookie to send);
        False means "await :meth:`close`".
        """
        session = handle.session
        entry = session._entry
        # rotate() replaces the token (and unsettles the session) and invalidate() the
        # entry, so an unchanged token object means the request's cookie is still right.
        if not session._clean or handle.closed or entry.token is not handle.token or entry.owner != self.node:
            return False
        if self._unsettled:
            return False
        handle.closed = True
        entry.inflight -= 1
        return True

    def abandon(self, handle: Handle) -> None:
        """The request failed before its response: release without committing."""
        if handle.closed:
            return
        handle.closed = True
        rotated = self._end_rotation(handle.session)
        if rotated is not None:
            self._unrotate(handle.session._entry, rotated)
        entry = handle.session._entry
        entry.inflight -= 1
        if entry.inflight == 0 and entry.version > 0:
            # Nobody else is using the object: drop the failed request's changes. Its
            # contents are the committed JSON again (a read after this stays a read).
            handle.session.replace_all(codec.decode(entry.payload))
            handle.session._settle_clean()

    def _commit_rotation(self, handle: Handle) -> bool:
        """:meth:`_commit`; a rotation in a request whose value cannot be stored is undone
        (the client keeps its cookie, and its session)."""
        try:
            return self._commit(handle)
        except (SessionValueError, SessionTooLarge):
            rotated = self._end_rotation(handle.session)
            if rotated is not None:
                self._unrotate(handle.session._entry, rotated)
            raise

    def _end_rotation(self, session: Session) -> tuple[str, str | None, bool] | None:
        rotated, session._rotated_from = session._rotated_from, None
        if rotated is not None:
            self.store.rotating.pop(rotated[0], None)
        return rotated

    def _commit(self, handle: Handle) -> bool:
        """Release the handle and store the session's new state locally if it changed;
        True if it did (the caller then replicates it)."""
        assert not handle.closed, "close() called twice for one request"
        handle.closed = True
        session = handle.session
        entry = session._entry
        entry.inflight -= 1
        if entry.version == 0 and not session:
            return False
        if not session:
            # Emptied by this request: the session ends (tombstone, cookie deleted), as an
            # empty cookie session does in Starlette and Flask.
            self.invalidate(session)
            return False
        if session._clean and not entry.dirty and entry.version > 0:
            return False  # provably unchanged: skip the encode
        scalars = not session._deep or session.only_scalars()
        try:
            payload = codec.encode(session, limit=self._max_size, scalars=scalars)
        except (SessionValueError, SessionTooLarge) as exc:
            if isinstance(exc, SessionTooLarge):
                self.stats.too_large += 1
            else:
                self.stats.bad_values += 1
            session.replace_all(codec.decode(entry.payload))
            raise
        # The contents now equal the committed JSON (session._settle_clean(), inlined).
        session._clean = scalars
        if payload == entry.payload and entry.version > 0 and not entry.dirty:
            return False
        entry.dirty = False
        if entry.version > 0 and entry.token not in self._owned and self.cluster is not None:
            # Ownership moved away while this request ran: adopt it again so the write
            # is not lost; the cluster resolves the order by epoch.
            self.cluster.reclaim(entry)
        entry.payload = payload
        entry.version += 1
        entry.vv = versions.bump(entry.vv, self.node)
        self.stats.commits += 1
        if entry.version == 1:
            self.store.owned[entry.token] = entry
            self.stats.sessions_created += 1
            if self.listeners:
                self._fire("created", entry)
        elif self.listeners:
            self._fire("changed", entry)
        return True

    def _cookie_for(self, entry: Entry) -> str:
        return self.signer.cookie_value(entry.token, entry.owner)

    # -- lifecycle calls from the session object ---------------------------------------
    def _refuse_if_fenced(self, entry: Entry) -> None:
        """Refuse mode: a logout or login on a fenced node fails before it changes anything
        (its tombstone could not reach the cluster)."""
        cluster = self.cluster
        if self._refuse and cluster is not None and entry.version > 0 and not cluster.can_replicate(entry.token):
            self.stats.writes_refused += 1
            raise ReplicationUnavailable("this node is fenced: " + cluster.health().reason, KEEP)

    def rotate(self, session: Session) -> None:
        entry = session._entry
        self._refuse_if_fenced(entry)
        old = entry.token
        entry.token = ids.new_token()
        self.stats.sessions_rotated += 1
        if entry.version > 0:
            was_owned = self.store.owned.pop(old, None) is entry
            self.store.bury(old, self._tombstone_until())
            entry.session = session  # (a copy read from its owner, lazily, is ours now)
            self.store.owned[entry.token] = entry
            # Commit at request end even if the data is unchanged: the new token must
            # reach the backup.
            entry.dirty = True
            session._clean = False
            # The cluster hears of the old ID's death at commit, once the new ID has
            # reached the backup: a rotation then either happens or (refuse mode) does not.
            if session._rotated_from is None:
                session._rotated_from = (old, entry.backup, was_owned)
                if was_owned:
                    self.store.rotating[old] = entry

    def _unrotate(self, entry: Entry, rotated: tuple[str, str | None, bool]) -> None:
        """Undo a rotation the cluster was never told of (its request did not commit)."""
        old, _, was_owned = rotated
        self.store.owned.pop(entry.token, None)
        self.store.tombstones.pop(old, None)
        entry.token = old
        if was_owned:
            self.store.owned[old] = entry
            if self.cluster is not None and entry.version > 0:
                # what the request committed goes to the backup under the old ID (its
                # answer, 503, said it may or may not persist)
                self.cluster.requeue(entry)
        self.stats.sessions_rotated -= 1

    def invalidate(self, session: Session) -> None:
        entry = session._entry
        self._refuse_if_fenced(entry)
        if entry.version > 0:
            self.store.bury(entry.token, self._tombstone_until())
            self.stats.sessions_invalidated += 1
            self._destroyed(entry, "invalidated", dict(session))
            if self.cluster is not None:
                self.cluster.buried({entry.token: entry.backup})
        # The object starts over as a brand-new session with a fresh token.
        now = self.clock.time()
        fresh = Entry(token=ids.new_token(), owner=self.node, created=now, last_accessed=now)
        fresh.session = session
        fresh.inflight = entry.inflight
        entry.session = None
        session._entry = fresh
        session.replace_all({})
        session._killed = True

    def _tombstone_until(self) -> float:
        return self.clock.time() + self.config.max_inactive + 60.0

    # -- listeners ---------------------------------------------------------------------
    def _fire(self, hook: str, entry: Entry, data: dict[str, Any] | None = None, *, replicated: bool = False) -> None:
        if not self.listeners:
            return
        if data is None:
            data = dict(entry.session) if entry.session is not None else codec.decode(entry.payload)
        event = SessionEvent(entry.session_id, self.node, replicated, data)
        for listener in self.listeners:
            try:
                getattr(listener, hook)(event)
            except Exception:
                self.stats.listener_errors += 1
                log.exception("session listener %r failed in %s()", listener, hook)

    def _destroyed(
        self, entry: Entry, reason: DestroyReason, data: dict[str, Any] | None = None, *, replicated: bool = False
    ) -> None:
        if reason == "expired" and not replicated:
            self.stats.sessions_expired += 1
        if not self.listeners:
            return
        if data is None:
            data = codec.decode(entry.payload) if entry.payload else {}
        event = SessionEvent(entry.session_id, self.node, replicated, data)
        for listener in self.listeners:
            try:
                listener.destroyed(event, reason)
            except Exception:
                self.stats.listener_errors += 1
                log.exception("session listener %r failed in destroyed()", listener)


def _differs(session: Session, payload: bytes) -> bool:
    """Whether ``session`` holds something else than the JSON ``payload``."""
    try:
        return codec.encode(session) != payload
    except (SessionValueError, SessionTooLarge):
        return True


class _Events:
    """The manager's side of :class:`clustersess.cluster.context.SessionEvents`."""

    __slots__ = ("_manager",)

    def __init__(self, manager: SessionManager) -> None:
        self._manager = manager

    def replicated(self, copy: Entry, created: bool) -> None:
        mg = self._manager
        if mg.config.notify_listeners_on_replication:
            mg._fire("created" if created else "changed", copy, replicated=True)

    def destroyed(self, entry: Entry, reason: DestroyReason) -> None:
        mg = self._manager
        if mg.config.notify_listeners_on_replication:
            mg._destroyed(entry, reason, replicated=True)

    def conflict(self, winner: Entry, discarded: list[bytes]) -> None:
        mg = self._manager
        if not mg.listeners:
            return
        data = codec.decode(winner.payload)
        event = SessionEvent(winner.session_id, mg.node, False, data)
        lost = [codec.decode(p) for p in discarded]
        for listener in mg.listeners:
            try:
                listener.conflict(event, lost)
            except Exception:
                mg.stats.listener_errors += 1
                log.exception("session listener %r failed in conflict()", listener)
