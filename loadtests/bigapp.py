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
  than ``max_inactive``, as if nobody had used them since, then runs the manager's own
  sweep, ``SessionManager.sweep()``, on the next turn of the event loop: the pass the
  sweeper task runs every ``sweep_every``, only at a chosen moment. Called on every
  node, it is what idle expiry looks like: the owner and the backup both find them idle.
"""

from __future__ import annotations

import asyncio
import gc
import os
import tracemalloc
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from clustersess import ClusterSessionMiddleware
from demo_app import routes as demo_routes


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
        for entry in table.values():
            if lo <= entry.created <= hi:
                entry.last_accessed = idle_since
                counts[kind] += 1
    asyncio.get_running_loop().call_soon(manager.sweep)
    return JSONResponse(counts)


async def release(request: Request) -> Response:
    manager = _manager(request)
    before = sum(1 for e in manager.store.owned.values() if e.session is not None)
    # the sweeper's own pass, with "idle for 0 s" as the release threshold
    await manager.store.sweep_chunked(manager.clock.time(), manager.config.max_inactive, 0.0)
    after = sum(1 for e in manager.store.owned.values() if e.session is not None)
    return JSONResponse({"released": before - after})


routes = [
    *demo_routes,
    Route("/debug/release", release, methods=["POST"]),
    Route("/debug/memory", memory),
    Route("/debug/tracemalloc", trace, methods=["POST"]),
    Route("/debug/expire", expire, methods=["POST"]),
]

app = Starlette(routes=routes, middleware=[Middleware(ClusterSessionMiddleware)])
