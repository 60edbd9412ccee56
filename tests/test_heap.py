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


def _run(mode: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, mode], env=base_env(), capture_output=True, text=True, timeout=60, check=True
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
