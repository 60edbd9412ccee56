"""gc_freeze: the start-up heap leaves the cyclic GC once the application has started.

gc.freeze() is process-wide and happens once per process, so each case runs in a
fresh interpreter (or a real server) of its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

import httpx

from tests.utils import base_env

_SCRIPT = textwrap.dedent(
    """
    import contextlib, gc, json, sys
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient
    from clustersess import ClusterSessionMiddleware

    seen = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        seen["during_app_startup"] = gc.get_freeze_count()
        yield

    async def home(request):
        request.session["n"] = request.session.get("n", 0) + 1
        return PlainTextResponse(str(request.session["n"]))

    app = Starlette(
        routes=[Route("/", home)],
        lifespan=lifespan,
        middleware=[Middleware(ClusterSessionMiddleware, secret_key="k" * 32, gc_freeze=sys.argv[1] == "on")],
    )
    seen["before_start"] = gc.get_freeze_count()
    with TestClient(app) as client:
        seen["after_startup"] = gc.get_freeze_count()
        seen["body"] = [client.get("/").text for _ in range(3)]
    print(json.dumps(seen))
    """
)


def _run(mode: str, script: str = _SCRIPT) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", script, mode], env=base_env(), capture_output=True, text=True, timeout=60, check=True
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def test_the_heap_is_frozen_after_the_apps_own_startup() -> None:
    seen = _run("on")
    assert seen["before_start"] == 0
    # The app's lifespan ran first, with nothing frozen yet; then the heap was frozen.
    assert seen["during_app_startup"] == 0
    assert seen["after_startup"] > 1000
    assert seen["body"] == ["1", "2", "3"]  # sessions work as before


def test_gc_freeze_off_leaves_the_heap_alone() -> None:
    seen = _run("off")
    assert seen["after_startup"] == 0
    assert seen["body"] == ["1", "2", "3"]


def test_real_servers_report_the_frozen_heap(node_factory: Any) -> None:
    on = node_factory("frozen")
    off = node_factory("thawed", env={"CLUSTERSESS_GC_FREEZE": "0"})
    frozen = httpx.get(f"{on.url}/cluster.json", timeout=10).json()["gc_frozen_objects"]
    thawed = httpx.get(f"{off.url}/cluster.json", timeout=10).json()["gc_frozen_objects"]
    assert frozen > 1000 and thawed == 0, (frozen, thawed)


_SESSION_HEAP = textwrap.dedent(
    """
    import gc, json, weakref
    from clustersess.heap import FREEZE_FROM, THAW_EVERY, SessionHeap, session_freezes

    class Node:
        pass

    now = [100.0]
    keeper = SessionHeap(lambda: now[0])
    seen = {}
    keeper.after_sweep(FREEZE_FROM - 1)
    seen["small_node"] = gc.get_freeze_count()

    a, b = Node(), Node()
    a.other, b.other = b, a  # a cycle, like an entry and its decoded session
    alive = weakref.ref(a)
    keeper.after_sweep(FREEZE_FROM)
    seen["big_node"] = gc.get_freeze_count()
    del a, b
    gc.collect()
    seen["frozen_cycle_kept_by_a_full_collection"] = alive() is not None
    now[0] += THAW_EVERY - 1
    keeper.after_sweep(FREEZE_FROM)
    seen["kept_before_the_thaw"] = alive() is not None
    now[0] += 1
    keeper.after_sweep(FREEZE_FROM)
    seen["collected_at_the_thaw"] = alive() is None
    seen["frozen_again"] = gc.get_freeze_count()
    # From now on a slow full collection freezes what survived it: sessions made since
    # the last sweep leave the full collections too.
    before = gc.get_freeze_count()
    newer = [Node() for _ in range(1_000_000)]  # (automatic full collections run meanwhile)
    gc.collect()
    seen["frozen_by_a_slow_collection"] = gc.get_freeze_count() - before
    seen["session_freezes"] = session_freezes()  # what status() reports, without a walk
    print(json.dumps(seen))
    """
)


def test_a_big_node_freezes_its_sessions_after_each_sweep_and_thaws_them_now_and_then() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _SESSION_HEAP], env=base_env(), capture_output=True, text=True, timeout=60, check=True
    )
    seen = json.loads(out.stdout)
    assert seen["small_node"] == 0  # a few thousand sessions: full collections are cheap
    assert seen["big_node"] > 1000
    # The price, bounded: a cycle frozen while alive outlives full collections until the
    # next thaw, which reclaims it and freezes the rest again.
    assert seen["frozen_cycle_kept_by_a_full_collection"]
    assert seen["kept_before_the_thaw"]
    assert seen["collected_at_the_thaw"]
    assert seen["frozen_again"] > 1000
    assert seen["session_freezes"] >= 4  # three sweeps, then at least one slow collection
    assert seen["frozen_by_a_slow_collection"] >= 500_000  # most of the million (the last ones collect fast)


_COPIES = textwrap.dedent(
    """
    import gc, json, sys
    from clustersess import heap

    if sys.argv[1] == "on":
        heap.freeze_once()
    seen = {}
    base = gc.get_freeze_count()
    for _ in range(heap.FREEZE_BATCH - 1):
        heap.took_copy(heap.FREEZE_FROM)
    seen["before_a_batch"] = heap.session_freezes()
    copies = [[] for _ in range(5000)]  # what the batch's copies made (tracked objects)
    heap.took_copy(heap.FREEZE_FROM)
    seen["after_a_batch"] = heap.session_freezes()
    seen["frozen"] = gc.get_freeze_count() - base
    for _ in range(heap.FREEZE_BATCH):
        heap.took_copy(heap.FREEZE_FROM - 1)
    seen["small_node"] = heap.session_freezes()
    print(json.dumps(seen))
    """
)


def test_a_big_node_taking_many_copies_freezes_them_in_batches() -> None:
    """An adoption or a rebalance sends a node 100,000 copies at once; each full collection
    meanwhile walked every copy since the last freeze (13-46 ms at 200,000 sessions).
    Every FREEZE_BATCH copies the heap is frozen again, on a big node with gc_freeze."""
    on = _run("on", _COPIES)
    assert on["before_a_batch"] == 0 and on["after_a_batch"] == 1
    assert on["frozen"] >= 5000  # they are out of the full collections now
    assert on["small_node"] == 1  # a node below FREEZE_FROM leaves its heap alone
    off = _run("off", _COPIES)
    assert off["after_a_batch"] == 0 and off["small_node"] == 0  # gc_freeze off: never
