"""The demo app plus the debug endpoints that ``bigcluster.py`` measures a node through.

Only for the measurement: never serve these routes in production (they expose the
node's memory figures and can expire sessions on demand).

* ``GET /debug/memory`` (``?collect=1`` runs ``gc.collect()`` first): the process's RSS,
  tracemalloc's traced bytes (null when not tracing), how many sessions the node owns
  and backs up, and the bytes of their stored JSON payloads.
* ``POST /debug/tracemalloc?on=1`` starts tracemalloc, ``?on=0`` stops it (and frees
  its traces); answers the traced bytes at that moment.
* ``POST /debug/release`` runs the sweeper's release pass now: sessions not in use drop
  their decoded object and keep only their stored JSON (the sweeper task does this to
  sessions idle for ``min(60 s, max_inactive / 4)``); answers how many it released.
* ``POST /debug/expire?created_from=T0&created_to=T1`` makes every session this node
  owns or backs up that was created in [T0, T1] (this host's wall clock) idle for longer
  than ``max_inactive``, as if nobody had used them since, then starts the manager's own
  sweep, ``SessionManager.sweep_pass()``: the pass the sweeper task runs every
  ``sweep_every``, only at a chosen moment. Called on every
  node, it is what idle expiry looks like: the owner and the backup both find them idle.
* ``GET /debug/lag?since=T``: the event loop's stalls since ``T`` (``time.monotonic()``,
  which is one clock for every process of the host): a task asks to be woken every
  ``LAG_TICK`` seconds and records each wake-up later than ``LAG_REPORT`` as
  ``[when, seconds late]``. A stall is time no request could be served, as opposed to
  a request waiting for Redis or a backup. Also the cyclic garbage collector's passes
  longer than ``LAG_REPORT`` as ``[when, seconds, generation]``, and what the loop
  thread was running during stalls of ``STACK_AFTER`` or longer (a watchdog thread
  records its stack) as ``[when, seconds into the stall, stack]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import sys
import threading
import time
import traceback
import tracemalloc
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from clustersess import ClusterSessionMiddleware
from clustersess.pacing import paced
from demo_app import routes as demo_routes

#: how often the lag probe asks to be woken, and the lateness it records
LAG_TICK = 0.005
LAG_REPORT = 0.002
_stalls: deque[tuple[float, float]] = deque(maxlen=100_000)


#: a stall this long has the event loop thread's stack recorded (by a watchdog thread)
STACK_AFTER = 0.010
_last_tick = [time.monotonic()]
#: [when, seconds into the stall, the loop thread's innermost frames]
_stacks: deque[tuple[float, float, str]] = deque(maxlen=2_000)


async def _probe_lag() -> None:
    while True:
        due = time.monotonic() + LAG_TICK
        await asyncio.sleep(LAG_TICK)
        now = _last_tick[0] = time.monotonic()
        if now - due > LAG_REPORT:
            _stalls.append((now, now - due))


def _watchdog(loop_thread: int) -> None:
    """Records what the event loop thread runs while it is stalled (every STACK_AFTER)."""
    seen = 0.0
    while True:
        time.sleep(0.002)
        now = time.monotonic()
        late = now - _last_tick[0] - LAG_TICK
        if late >= STACK_AFTER and late - seen >= STACK_AFTER:
            seen = late
            frame = sys._current_frames().get(loop_thread)
            if frame is not None:
                lines = traceback.format_stack(frame, limit=14)
                _stacks.append((now, late, "".join(lines)))
        elif late < STACK_AFTER:
            seen = 0.0


_gc_started = 0.0
#: the cyclic GC's collections that took longer than LAG_REPORT: [when, seconds, generation]
_collections: deque[tuple[float, float, int]] = deque(maxlen=100_000)


def _on_gc(phase: str, info: dict[str, int]) -> None:
    global _gc_started
    if phase == "start":
        _gc_started = time.monotonic()
    else:
        took = time.monotonic() - _gc_started
        if took > LAG_REPORT:
            _collections.append((time.monotonic(), took, info["generation"]))


gc.callbacks.append(_on_gc)


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    task = asyncio.get_running_loop().create_task(_probe_lag())
    threading.Thread(target=_watchdog, args=(threading.get_ident(),), daemon=True).start()
    try:
        yield
    finally:
        task.cancel()


async def lag(request: Request) -> Response:
    since = float(request.query_params.get("since", "0"))
    return JSONResponse(
        {
            "stalls": [s for s in _stalls if s[0] >= since],
            "collections": [c for c in _collections if c[0] >= since],
            "stacks": [st for st in _stacks if st[0] >= since],
        }
    )


def _manager(request: Request) -> Any:
    return request.scope["clustersess.manager"]


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of a process (this one by default), from /proc."""
    with open(f"/proc/{pid or os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


async def memory(request: Request) -> Response:
    if request.query_params.get("collect") == "1":
        gc.collect()
    store = _manager(request).store
    return JSONResponse(
        {
            "rss": rss_bytes(),
            "traced": tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else None,
            "owned": len(store.owned),
            "backups": len(store.backups),
            "tombstones": len(store.tombstones),
            "payload_owned": sum(len(e.payload) for e in store.owned.values()),
            "payload_backups": sum(len(e.payload) for e in store.backups.values()),
        }
    )


async def trace(request: Request) -> Response:
    if request.query_params.get("on") == "1":
        if not tracemalloc.is_tracing():
            tracemalloc.start()
        gc.collect()
        return JSONResponse({"traced": tracemalloc.get_traced_memory()[0]})
    gc.collect()
    traced = tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else None
    tracemalloc.stop()
    return JSONResponse({"traced": traced})


async def expire(request: Request) -> Response:
    manager = _manager(request)
    lo = float(request.query_params["created_from"])
    hi = float(request.query_params["created_to"])
    idle_since = manager.clock.time() - manager.config.max_inactive - 1.0
    counts = {}
    for kind, table in (("owned", manager.store.owned), ("backups", manager.store.backups)):
        counts[kind] = 0
        # in slices too: this endpoint must not stall the node it measures
        async for entry in paced(list(table.values()), time.monotonic):
            if lo <= entry.created <= hi:
                entry.last_accessed = idle_since
                counts[kind] += 1
    asyncio.get_running_loop().create_task(manager.sweep_pass())
    return JSONResponse(counts)


async def release(request: Request) -> Response:
    manager = _manager(request)
    before = sum(1 for e in manager.store.owned.values() if e.session is not None)
    # the sweeper's own pass, with "idle for 0 s" as the release threshold
    await manager.sweep_pass(release_after=0.0)
    after = sum(1 for e in manager.store.owned.values() if e.session is not None)
    return JSONResponse({"released": before - after})


routes = [
    *demo_routes,
    Route("/debug/release", release, methods=["POST"]),
    Route("/debug/memory", memory),
    Route("/debug/tracemalloc", trace, methods=["POST"]),
    Route("/debug/expire", expire, methods=["POST"]),
    Route("/debug/lag", lag),
]

app = Starlette(routes=routes, middleware=[Middleware(ClusterSessionMiddleware)], lifespan=lifespan)
