"""Everything a node sends: sequence numbers, coalesced replication, awaited acks.

One flusher task publishes, one batch at a time, so messages leave in sequence order
(receivers treat a lower sequence number as a replay). Replication requests made by
concurrent requests are coalesced: one REPLICATE per backup per flush (split at about
``BATCH_BYTES``), all of a flush in one pipelined round trip, which is what keeps sync
replication cheap under load. Each session's waiter learns what the backup did with
*that* session: applied (``None``) or a :class:`~.messages.Refusal`.

Resends of many sessions at once (a resync, a rebalance, an adoption, retries) go in the
*background* lane: requests' writes overtake them, and at most a window of bytes of them
are unacknowledged at a time, ``BACKGROUND_PER_FLUSH`` bytes per flush. So a request's
write never waits behind 100 MB of resends, neither here nor in its backup's inbound
queue; the resend goes as fast as the backup acknowledges, and acknowledgements come back
in time instead of timing out and being resent again.

The window follows the answers' delay (as TCP Vegas does): an answer later than
``BACKGROUND_DELAY`` shows queues building, in a backup's inbound stream or in a busy event
loop on either side, where every request's write and ACK waits too; the window halves (at
most once per such delay, never below ``BACKGROUND_MIN_WINDOW``, so a resend always moves)
and grows back by a batch per prompt answer, up to ``BACKGROUND_WINDOW``. On a 2-core
machine adopting 100,000 sessions in both directions at once, a fixed window kept both
loops saturated and sync writes waited 200 ms to 1 s for their ACKs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from ..pacing import Slicer
from ..session import Entry
from ..stats import Stats
from ..store import LocalStore
from . import messages as m
from .transport import Transport, TransportError
from .wire import BATCH_BYTES, Codec

#: bytes a session adds to a frame beside its data (token, owner, vector, numbers)
_STATE_OVERHEAD = 200
#: one pipelined publish carries at most about this much; a bigger flush goes in parts
PUBLISH_BYTES = 4 * 1024 * 1024
#: background resends unacknowledged at a time, at most and at least, and per flush
#: (bytes of session data); an answer later than BACKGROUND_DELAY shrinks the window
BACKGROUND_WINDOW = 96 * 1024
BACKGROUND_MIN_WINDOW = 16 * 1024
BACKGROUND_PER_FLUSH = 32 * 1024
BACKGROUND_DELAY = 0.005


#: what an ACK that refused nothing refused (shared, never written to)
_NOTHING_REFUSED: dict[str, m.Refusal] = {}


class NoReceiver(Exception):
    """Nobody was subscribed to the backup's channel (dead, or disconnected from Redis)."""


class AnswerLost(NoReceiver):
    """Our subscription was re-established while this message's answer was due: the
    answer may have been published while nobody listened (Redis drops it), so the
    message goes again (a sync write retries at once instead of waiting for its ack
    timeout; the backup applies a state it already holds as a no-op)."""


class NotOwner(Exception):
    """The session stopped being ours before its state was sent."""


class RateLimitedLog:
    """At most one warning per kind per second: a flood of bad messages must not flood logs."""

    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        self._last: dict[str, float] = {}

    def warning(self, kind: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -1e9) >= 1.0:
            self._last[kind] = now
            self._log.warning(msg, *args)


@dataclasses.dataclass(slots=True, eq=False)
class _AckWait:
    #: token -> futures of the requests waiting for that session's fate
    waiters: dict[str, list[asyncio.Future[m.Refusal | None]]]
    #: token -> version sent
    versions: dict[str, int]
    #: futures waiting for the whole message's ACK
    whole: list[asyncio.Future[m.Ack]]
    sent: float
    #: bytes of background resends it carries (counted in the window until answered)
    background: int = 0
    #: the resends it carries, whose answers go to ``Outbox.on_resent``
    resent: dict[str, Entry] | None = None


class _Round:
    """The frames of one pipelined publish, and what each one resolves."""

    __slots__ = ("items", "results", "size")

    def __init__(self) -> None:
        self.items: list[tuple[str, bytes]] = []
        self.results: list[Any] = []  # per item: Future[int] | (channel, seq) | None
        self.size = 0

    def add(self, channel: str, data: bytes, result: Any) -> None:
        self.items.append((channel, data))
        self.results.append(result)
        self.size += len(data)


def state_of(entry: Entry, now: float) -> m.SessionState:
    """``entry`` as it travels; ``now`` is this node's wall clock (times go relative)."""
    return m.SessionState(
        entry.token,
        entry.owner,
        entry.epoch,
        entry.vv,
        max(0.0, now - entry.created),
        max(0.0, now - entry.last_accessed),
        entry.payload,
    )


def consume(fut: asyncio.Future[Any]) -> None:
    """Done-callback for fire-and-forget futures: their exception is expected and counted."""
    if not fut.cancelled():
        fut.exception()


class Outbox:
    def __init__(
        self,
        name: str,
        incarnation: str,
        codec: Codec,
        transport: Transport,
        *,
        stats: Stats,
        store: LocalStore,
        warn: RateLimitedLog,
        wall: Callable[[], float],
        mono: Callable[[], float],
        on_unreachable: Callable[[str], None],
        on_sent: Callable[[str, int, m.Body], None] | None = None,
    ) -> None:
        self._name = name
        self.incarnation = incarnation
        self._codec = codec
        self._transport = transport
        self._stats = stats
        self._store = store
        self._warn = warn
        self._wall = wall
        self._mono = mono
        self._on_unreachable = on_unreachable
        self._on_sent = on_sent
        self._seq: dict[str, int] = {}
        self._messages: list[tuple[str, m.Body, asyncio.Future[Any] | None, bool]] = []
        self._pending: dict[tuple[str, bool], dict[str, Entry]] = {}
        self._pending_waiters: dict[tuple[str, bool], dict[str, list[asyncio.Future[m.Refusal | None]]]] = {}
        #: the background lane: resends by channel (never hand-offs), without a future
        #: each (a resend of 100,000 sessions must not make 100,000 objects that outlive
        #: the young collections); bytes of it sent and not yet answered
        self._background: dict[str, dict[str, Entry]] = {}
        self._background_bytes = 0
        self._window = BACKGROUND_WINDOW
        self._shrunk_at = float("-inf")
        #: resends overtaken by a request's write: their answer comes with the write's
        self._overtaken: dict[str, Entry] = {}
        #: told the backup's answer for each resend (None: applied)
        self.on_resent: Callable[[Entry, m.Refusal | None], None] = lambda entry, refusal: None
        self._acks: dict[tuple[str, int], _AckWait] = {}
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        #: tokens of owned sessions whose latest version still has to reach a backup
        #: (a dict for its order: iteration order must not depend on hash seeds)
        self.requeue: dict[str, None] = {}

    def new_life(self, incarnation: str) -> None:
        """A new incarnation: its sequence numbers start again; what was sent but not
        acknowledged is requeued (nobody will acknowledge it to the old life)."""
        self.incarnation = incarnation
        self._seq.clear()
        self.abandon_acks()

    def abandon_acks(self) -> None:
        """Nobody will acknowledge what this life sent (it was retired): requeue it."""
        for key in list(self._acks):
            self._fail(key, NotOwner())

    def send(self, channel: str, body: m.Body, *, counted: bool = False) -> asyncio.Future[int] | None:
        """Queue a message; with ``counted``, a future of how many subscribers got it."""
        fut: asyncio.Future[int] | None = asyncio.get_running_loop().create_future() if counted else None
        self._messages.append((channel, body, fut, False))
        self._wake.set()
        return fut

    def send_acked(self, channel: str, body: m.Body) -> asyncio.Future[m.Ack]:
        """Queue a message whose receiver answers with an ACK; the future is that ACK."""
        fut: asyncio.Future[m.Ack] = asyncio.get_running_loop().create_future()
        self._messages.append((channel, body, fut, True))
        self._wake.set()
        return fut

    def replicate(self, channel: str, entry: Entry, *, handoff: bool = False) -> asyncio.Future[m.Refusal | None]:
        """Queue ``entry``'s state for the backup on ``channel``; the future says what the
        backup did with it."""
        key = (channel, handoff)
        token = entry.token
        self._pending.setdefault(key, {})[token] = entry
        fut: asyncio.Future[m.Refusal | None] = asyncio.get_running_loop().create_future()
        self._pending_waiters.setdefault(key, {}).setdefault(token, []).append(fut)
        queued = None if handoff else self._background.get(channel)
        if queued is not None and (resend := queued.pop(token, None)) is not None:
            self._overtaken[token] = resend  # the write carries it; its answer is the resend's
        self._wake.set()
        return fut

    def resend(self, channel: str, entry: Entry) -> None:
        """Queue ``entry``'s state for the backup on ``channel`` in the background lane
        (see above); :attr:`on_resent` is told the answer."""
        token = entry.token
        if self._pending and token in self._pending.get((channel, False), ()):
            self._overtaken[token] = entry  # already on its way with a write
        else:
            lane = self._background.get(channel)
            if lane is None:
                lane = self._background[channel] = {}
            lane[token] = entry
        if not self._wake.is_set():
            self._wake.set()

    def acked(self, channel: str, ack: m.Ack) -> None:
        wait = self._acks.pop((channel, ack.ack), None)
        if wait is None:
            return
        if self._background_bytes:
            # A backup answers its channel's messages in order: background resends sent
            # to it before this one and still unanswered were lost (it reconnected, say),
            # and leave the window now; a late answer is still acted on.
            for (ch, seq), lost in self._acks.items():
                if lost.background and ch == channel and seq < ack.ack:
                    self._answered(lost)
        now = self._mono()
        if wait.background:
            self._adapt(now - wait.sent, now)
            self._answered(wait)
        self._stats.ack_latency.observe(now - wait.sent)
        refused = {r.token: r for r in ack.refused} if ack.refused else _NOTHING_REFUSED
        if wait.resent is not None:
            for token, entry in wait.resent.items():
                self.on_resent(entry, refused.get(token))
        for token, futs in wait.waiters.items():
            result = refused.get(token)
            for w in futs:
                if not w.done():
                    w.set_result(result)
        for w2 in wait.whole:
            if not w2.done():
                w2.set_result(ack)
        if refused:
            for token in refused:
                self.requeue.pop(token, None)  # its fate is decided by the refusal's handler

    def _adapt(self, delay: float, now: float) -> None:
        """A background resend was answered after ``delay``: the window follows (see the
        module's docstring)."""
        if delay > BACKGROUND_DELAY:
            if now - self._shrunk_at > delay:  # (the answers of one round trip count once)
                self._window = max(BACKGROUND_MIN_WINDOW, self._window // 2)
                self._shrunk_at = now
        elif self._window < BACKGROUND_WINDOW:
            self._window = min(BACKGROUND_WINDOW, self._window + BACKGROUND_PER_FLUSH // 4)

    def release_window(self, cutoff: float) -> None:
        """Background resends sent before ``cutoff`` (monotonic) and not answered yet stop
        counting in the window (a last resort: lost answers are found by the order of
        the answers that do come and by :meth:`answers_lost`; it is still acted on if it
        comes). Not after an ACK timeout: a backup busy with
        100,000 resends answers late but in order, and a window opened under it only
        deepens its backlog until the resends expire and go again, twice."""
        for wait in self._acks.values():
            if wait.background and wait.sent < cutoff:
                self._answered(wait)

    def release_channel(self, channel: str) -> None:
        """The member on ``channel`` is gone: its unanswered resends leave the window (the
        lane carries on to the others; the resends expire and are requeued as usual)."""
        for (ch, _), wait in self._acks.items():
            if wait.background and ch == channel:
                self._answered(wait)

    def answers_lost(self) -> None:
        """We re-subscribed: every REPLICATE still unanswered is sent again (its waiters
        get :class:`AnswerLost`, its sessions are requeued). Messages others wait on as
        a whole (a hand-off) keep waiting: their senders retry on their own terms."""
        for key in [k for k, w in self._acks.items() if not w.whole]:
            self._fail(key, AnswerLost())

    def expire_acks(self, cutoff: float) -> None:
        """Give up on acks for messages sent before ``cutoff`` (monotonic); requeue them."""
        for key in [k for k, w in self._acks.items() if w.sent < cutoff]:
            self._fail(key, TimeoutError())

    def resending(self) -> bool:
        """Background resends are queued, or sent and not answered yet."""
        return bool(self._background) or self._background_bytes > 0

    def pending(self) -> int:
        """Sessions whose latest version is not yet acknowledged by a backup."""
        waiting = sum(len(w.versions) for w in self._acks.values())
        queued = sum(len(p) for p in self._pending.values()) + sum(len(p) for p in self._background.values())
        return len(self.requeue) + queued + waiting

    def unacknowledged(self) -> list[str]:
        """Tokens sent or queued but not acknowledged yet (in a stable order)."""
        out = dict(self.requeue)
        for p in (*self._pending.values(), *self._background.values()):
            out.update(dict.fromkeys(p))
        for w in self._acks.values():
            out.update(dict.fromkeys(w.versions))
        return list(out)

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            # Let the requests that are already runnable reach their commit first: one
            # loop iteration of delay turns many small publishes into one batch.
            await asyncio.sleep(0)
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        """Publish everything queued so far, in sequence order, in one round trip."""
        async with self._lock:
            await self._flush()

    async def _flush(self) -> None:
        pending, self._pending = self._pending, {}
        waiters, self._pending_waiters = self._pending_waiters, {}
        messages, self._messages = self._messages, []
        out = _Round()
        now = self._mono()
        # Control messages go first, in the order they were queued. Hundreds of them (a
        # resync's access times) are encoded in slices, each slice's published before
        # the next (what is queued meanwhile waits for the next flush: order holds).
        slicer = Slicer(self._mono, check=1, shared=False)
        for channel, body, fut, acked in messages:
            seq = self._next_seq(channel)
            data = self._encode(channel, seq, body)
            if acked:
                assert fut is not None
                self._acks[(channel, seq)] = _AckWait({}, {}, [fut], now)
                out.add(channel, data, (channel, seq))
            else:
                out.add(channel, data, fut)
            if slicer.due():
                await self._publish(out)
                out = _Round()
                await slicer.pause()
        owned = self._store.owned
        wall = self._wall()
        for (channel, handoff), entries in pending.items():
            ws = waiters.get((channel, handoff), {})
            batch: list[m.SessionState] = []
            size = 0
            for e in entries.values():
                if owned.get(e.token) is not e or e.version == 0:
                    self._overtaken.pop(e.token, None)
                    for w in ws.pop(e.token, ()):
                        if not w.done():
                            w.set_exception(NotOwner())
                            consume(w)
                    continue
                batch.append(state_of(e, wall))
                size += len(e.payload) + _STATE_OVERHEAD
                if size >= BATCH_BYTES:
                    self._add_batch(out, channel, handoff, batch, ws, now)
                    batch, size = [], 0
                    if out.size >= PUBLISH_BYTES:
                        # A resend of many sessions goes out in parts, and the event loop
                        # runs between them (requests are served while a node resyncs).
                        await self._publish(out)
                        out = _Round()
            if batch:
                self._add_batch(out, channel, handoff, batch, ws, now)
        if self._background:
            self._take_background(out, now, wall)
        if out.items:
            await self._publish(out)
        if self._background and self._background_bytes < self._window:
            self._wake.set()  # more to resend, and room for it: on the next turn

    def _take_background(self, out: _Round, now: float, wall: float) -> None:
        """Add background resends to this flush, as far as the window allows."""
        room = min(BACKGROUND_PER_FLUSH, self._window - self._background_bytes)
        owned = self._store.owned
        none: dict[str, list[asyncio.Future[m.Refusal | None]]] = {}
        for channel in list(self._background):
            if room <= 0:
                break
            entries = self._background[channel]
            batch: list[m.SessionState] = []
            resent: dict[str, Entry] = {}
            size = 0
            while entries and room > 0:
                token, e = entries.popitem()  # (order does not matter: each is its latest state)
                if owned.get(token) is not e or e.version == 0:
                    continue  # no longer ours (or empty): nothing to resend
                batch.append(state_of(e, wall))
                resent[token] = e
                cost = len(e.payload) + _STATE_OVERHEAD
                size += cost
                room -= cost
                if size >= BATCH_BYTES:
                    self._add_batch(out, channel, False, batch, none, now, background=size, resent=resent)
                    batch, resent, size = [], {}, 0
            if batch:
                self._add_batch(out, channel, False, batch, none, now, background=size, resent=resent)
            if not entries:
                del self._background[channel]

    async def _publish(self, out: _Round) -> None:
        try:
            counts = await self._transport.publish(out.items)
        except TransportError as exc:
            self._stats.publish_errors += 1
            self._warn.warning("publish", "clustersess: %s; serving from memory, will re-replicate", exc)
            for r in out.results:
                self._fail(r, exc)
            return
        self._stats.messages_sent += len(out.items)
        self._stats.bytes_sent += out.size
        for r, n in zip(out.results, counts, strict=True):
            if isinstance(r, tuple) and n == 0:
                self._on_unreachable(r[0])
                self._fail(r, NoReceiver())
            elif isinstance(r, asyncio.Future) and not r.done():
                r.set_result(n)

    def _add_batch(
        self,
        out: _Round,
        channel: str,
        handoff: bool,
        batch: list[m.SessionState],
        ws: dict[str, list[asyncio.Future[m.Refusal | None]]],
        now: float,
        *,
        background: int = 0,
        resent: dict[str, Entry] | None = None,
    ) -> None:
        """``background``: bytes of resends in ``batch`` (all of it is ``resent``)."""
        seq = self._next_seq(channel)
        if resent is None and self._overtaken:
            resent = {s.token: e for s in batch if (e := self._overtaken.pop(s.token, None)) is not None} or None
        self._acks[(channel, seq)] = _AckWait(
            {s.token: ws.pop(s.token, []) for s in batch},
            {s.token: s.version for s in batch},
            [],
            now,
            background,
            resent,
        )
        self._background_bytes += background
        out.add(channel, self._encode(channel, seq, m.Replicate(tuple(batch), handoff)), (channel, seq))
        self._stats.replications_sent += len(batch)

    def _fail(self, r: Any, exc: Exception) -> None:
        if isinstance(r, asyncio.Future):
            if not r.done():
                r.set_exception(exc)
            consume(r)
            return
        if isinstance(r, tuple):
            wait = self._acks.pop(r, None)
            if wait is None:
                return
            self._answered(wait)
            for token in wait.versions:
                if token in self._store.owned:
                    self.requeue[token] = None
            self._stats.requeued += len(wait.versions)
            for futs in wait.waiters.values():
                for w in futs:
                    if not w.done():
                        w.set_exception(exc)
                        consume(w)
            for w2 in wait.whole:
                if not w2.done():
                    w2.set_exception(exc)
                    consume(w2)

    def _answered(self, wait: _AckWait) -> None:
        """A message was answered (or given up on): its background bytes leave the window
        (once: a late answer to a resend released earlier counts nothing again)."""
        if wait.background:
            self._background_bytes -= wait.background
            wait.background = 0
            if self._background:
                self._wake.set()

    def _next_seq(self, channel: str) -> int:
        seq = self._seq.get(channel, 0) + 1
        self._seq[channel] = seq
        return seq

    def _encode(self, channel: str, seq: int, body: m.Body) -> bytes:
        if self._on_sent is not None:
            self._on_sent(channel, seq, body)
        return self._codec.frame(channel, self._name, self.incarnation, seq, body)
