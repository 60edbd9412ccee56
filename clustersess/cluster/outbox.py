"""Everything a node sends: sequence numbers, coalesced replication, awaited acks.

One flusher task publishes, one batch at a time, so messages leave in sequence order
(receivers treat a lower sequence number as a replay). Replication requests made by
concurrent requests are coalesced: one REPLICATE per backup per flush, all of a flush in
one pipelined round trip, which is what keeps sync replication cheap under load.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from ..session import Entry
from ..stats import Stats
from ..store import LocalStore
from . import messages as m
from .transport import Transport, TransportError
from .wire import Codec

BATCH = 200  # sessions per REPLICATE message


class NoReceiver(Exception):
    """Nobody was subscribed to the backup's channel (dead, or disconnected from Redis)."""


class RateLimitedLog:
    """At most one warning per kind per second: a flood of bad messages must not flood logs."""

    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        self._last: dict[str, float] = {}

    def warning(self, kind: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, 0.0) >= 1.0:
            self._last[kind] = now
            self._log.warning(msg, *args)


@dataclasses.dataclass(slots=True, eq=False)
class _AckWait:
    waiters: list[asyncio.Future[None]]
    versions: dict[str, int]
    sent: float


def state_of(entry: Entry) -> m.SessionState:
    return m.SessionState(
        entry.token,
        entry.owner,
        entry.epoch,
        entry.version,
        entry.created,
        entry.last_accessed,
        entry.payload.decode("utf-8"),
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
        on_unreachable: Callable[[str], None],
    ) -> None:
        self._name = name
        self._incarnation = incarnation
        self._codec = codec
        self._transport = transport
        self._stats = stats
        self._store = store
        self._warn = warn
        self._on_unreachable = on_unreachable
        self._seq: dict[str, int] = {}
        self._messages: list[tuple[str, m.Body, asyncio.Future[int] | None]] = []
        self._pending: dict[tuple[str, bool], dict[str, Entry]] = {}
        self._pending_waiters: dict[tuple[str, bool], list[asyncio.Future[None]]] = {}
        self._acks: dict[tuple[str, int], _AckWait] = {}
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        #: tokens of owned sessions whose latest version still has to reach a backup
        self.requeue: set[str] = set()

    def send(self, channel: str, body: m.Body, *, counted: bool = False) -> asyncio.Future[int] | None:
        """Queue a message; with ``counted``, a future of how many subscribers got it."""
        fut = asyncio.get_running_loop().create_future() if counted else None
        self._messages.append((channel, body, fut))
        self._wake.set()
        return fut

    def replicate(self, channel: str, entry: Entry, *, handoff: bool = False) -> asyncio.Future[None]:
        """Queue ``entry``'s state for the backup on ``channel``; the future is its ack."""
        key = (channel, handoff)
        self._pending.setdefault(key, {})[entry.token] = entry
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending_waiters.setdefault(key, []).append(fut)
        self._wake.set()
        return fut

    def acked(self, channel: str, seq: int) -> None:
        wait = self._acks.pop((channel, seq), None)
        if wait is None:
            return
        self._stats.ack_latency.observe(time.monotonic() - wait.sent)
        for w in wait.waiters:
            if not w.done():
                w.set_result(None)

    def expire_acks(self, cutoff: float) -> None:
        """Give up on acks for messages sent before ``cutoff`` (monotonic); requeue them."""
        for key in [k for k, w in self._acks.items() if w.sent < cutoff]:
            self._fail(key, TimeoutError())

    def pending(self) -> int:
        """Sessions whose latest version is not yet acknowledged by a backup."""
        waiting = sum(len(w.versions) for w in self._acks.values())
        return len(self.requeue) + sum(len(p) for p in self._pending.values()) + waiting

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
        items: list[tuple[str, bytes]] = []
        results: list[Any] = []  # per item: Future[int] | (channel, seq) | None
        # Control messages go first: a LEAVE must reach the others before the sessions
        # handed over with it, or they would pick the leaving node as the new backup.
        for channel, body, fut in messages:
            items.append((channel, self._encode(self._next_seq(channel), body)))
            results.append(fut)
        owned = self._store.owned
        for (channel, handoff), entries in pending.items():
            states = [state_of(e) for e in entries.values() if e.token in owned and e.version > 0]
            ws = waiters.get((channel, handoff), [])
            if not states:
                for w in ws:
                    if not w.done():
                        w.set_result(None)
                continue
            for i in range(0, len(states), BATCH):
                chunk = states[i : i + BATCH]
                seq = self._next_seq(channel)
                last = i + BATCH >= len(states)
                self._acks[(channel, seq)] = _AckWait(
                    ws if last else [], {s.token: s.version for s in chunk}, time.monotonic()
                )
                items.append((channel, self._encode(seq, m.Replicate(tuple(chunk), handoff))))
                results.append((channel, seq))
                self._stats.replications_sent += len(chunk)
        if not items:
            return
        try:
            counts = await self._transport.publish(items)
        except TransportError as exc:
            self._stats.publish_errors += 1
            self._warn.warning("publish", "clustersess: %s; serving from memory, will re-replicate", exc)
            for r in results:
                self._fail(r, exc)
            return
        self._stats.messages_sent += len(items)
        self._stats.bytes_sent += sum(len(raw) for _, raw in items)
        for r, n in zip(results, counts):
            if isinstance(r, tuple) and n == 0:
                self._on_unreachable(r[0])
                self._fail(r, NoReceiver())
            elif isinstance(r, asyncio.Future) and not r.done():
                r.set_result(n)

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
            self.requeue.update(wait.versions)
            self._stats.requeued += len(wait.versions)
            for w in wait.waiters:
                if not w.done():
                    w.set_exception(exc)
                    consume(w)

    def _next_seq(self, channel: str) -> int:
        seq = self._seq.get(channel, 0) + 1
        self._seq[channel] = seq
        return seq

    def _encode(self, seq: int, body: m.Body) -> bytes:
        return self._codec.encode(m.Envelope(self._name, self._incarnation, seq, body))
