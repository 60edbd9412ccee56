"""Keep the cyclic garbage collector off the application's start-up heap.

A sync-replicated write waits for its ack across event-loop iterations, so with tens of
writes in flight their objects survive young collections, and CPython then runs full
collections several times a second; each walks every object the process has, modules
and the application's code included (about 10 ms per collection measured on a 2-core
VM, which became the writes' p99 latency). Freezing the heap once the application has
started (:func:`gc.freeze`, as CPython's documentation suggests for long-lived objects)
leaves the full collections only the objects made since, which makes them cheap.

The cost: objects alive at that moment are never examined by the cyclic collector
again, so cycles that only become garbage later are not reclaimed. Start-up objects
(modules, classes, routes, configuration) live as long as the process anyway; a
collection just before freezing reclaims whatever start-up left behind. Turn it off
with ``gc_freeze=False`` (``CLUSTERSESS_GC_FREEZE=0``).

**The sessions, too.** A node holding 200,000 sessions has at least as many tracked
objects (an :class:`~clustersess.session.Entry` each, and the decoded session of those in
use), and a full collection walks all of them: 30 to 150 ms on a 2-core VM, during which
no request is served. CPython runs one whenever the objects that survived since the last
one number a quarter of those it already holds, which an adoption or a rebalance of
100,000 sessions does several times. So once a node holds ``FREEZE_FROM`` sessions,
:class:`SessionHeap` freezes the heap again (:func:`gc.freeze` costs no walk) after each
pass of the sweeper and right after any full collection that took ``SLOW_COLLECTION`` or
longer: full collections then walk only what is newer than that.

Cycles among frozen objects that become garbage later are not reclaimed until the heap
is thawed: an entry and its decoded session refer to each other, so a session dropped
while decoded (logged out while in use, say) is such a cycle. Every ``THAW_EVERY``
seconds the sweeper thaws the heap and runs one full collection (one pause of that
length, instead of several per pass), which reclaims them.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("clustersess")

_lock = threading.Lock()
_frozen = False
#: objects frozen at start-up, and how often the sessions were frozen since: counted
#: here because gc.get_freeze_count() walks the whole frozen list (tens of ms on a big
#: node), too slow for a status page
_startup_frozen = 0
_session_freezes = 0


def frozen_at_startup() -> int:
    """How many objects :func:`freeze_once` froze (0 before it ran, or with gc_freeze off)."""
    return _startup_frozen


def session_freezes() -> int:
    """How many times a big node froze its sessions (after sweeps and slow collections)."""
    return _session_freezes


def freeze_once() -> bool:
    """Collect, then freeze every object that survives; once per process.

    Returns whether this call froze the heap (``False`` when an earlier call did).
    """
    global _frozen, _startup_frozen
    with _lock:
        if _frozen:
            return False
        _frozen = True
    gc.collect()
    gc.freeze()
    _startup_frozen = gc.get_freeze_count()  # (a small heap yet: a cheap walk)
    log.debug("clustersess: froze %d start-up objects out of the cyclic GC", _startup_frozen)
    return True


#: how often the sweeper thaws the frozen heap and collects it (seconds)
THAW_EVERY = 3600.0
#: sessions held (owned and copies) from which full collections cost more than a few
#: milliseconds, and the heap is frozen after each sweep
FREEZE_FROM = 10_000
#: a full collection this long (seconds) freezes what survived it, once a node is that big
SLOW_COLLECTION = 0.005

_collection_started = 0.0
_watching = False


#: a node holding FREEZE_FROM sessions freezes the heap after every this many copies it
#: takes in (a rebalance or an adoption sends it 100,000 at once)
FREEZE_BATCH = 10_000
_taken = 0


def _freeze_sessions() -> None:
    global _session_freezes
    gc.freeze()
    _session_freezes += 1


def took_copy(holds: int) -> None:
    """A copy of another node's session was stored; this node holds ``holds`` sessions."""
    global _taken
    _taken += 1
    if _taken >= FREEZE_BATCH:
        _taken = 0
        if _frozen and holds >= FREEZE_FROM:
            _freeze_sessions()


def _after_collection(phase: str, info: dict[str, int]) -> None:
    global _collection_started
    if info["generation"] != 2:
        return
    if phase == "start":
        _collection_started = time.perf_counter()
    elif time.perf_counter() - _collection_started >= SLOW_COLLECTION:
        _freeze_sessions()  # (the collection is over: what it left is alive)


def _watch_collections() -> None:
    """Freeze after every slow full collection, from now on (once per process)."""
    global _watching
    with _lock:
        if _watching:
            return
        _watching = True
    gc.callbacks.append(_after_collection)


class SessionHeap:
    """Keeps the sessions out of the cyclic GC's full collections (see above)."""

    def __init__(self, mono: Callable[[], float]) -> None:
        self._mono = mono
        self._thawed = mono()
        self.freezes = 0

    def after_sweep(self, sessions: int) -> None:
        """The sweeper's pass is done, and this node holds ``sessions``: freeze what is
        alive, if that many are worth it (thawing and collecting first, every
        ``THAW_EVERY``)."""
        if sessions < FREEZE_FROM and not self.freezes:
            return
        _watch_collections()
        now = self._mono()
        if self.freezes and now - self._thawed >= THAW_EVERY:
            self._thawed = now
            gc.unfreeze()
            gc.collect()
        _freeze_sessions()
        self.freezes += 1
