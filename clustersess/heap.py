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
"""

from __future__ import annotations

import gc
import logging
import threading

log = logging.getLogger("clustersess")

_lock = threading.Lock()
_frozen = False


def freeze_once() -> bool:
    """Collect, then freeze every object that survives; once per process.

    Returns whether this call froze the heap (``False`` when an earlier call did).
    """
    global _frozen
    with _lock:
        if _frozen:
            return False
        _frozen = True
    gc.collect()
    gc.freeze()
    log.debug("clustersess: froze %d start-up objects out of the cyclic GC", gc.get_freeze_count())
    return True
