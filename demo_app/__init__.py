"""The test.jsp demo: a Starlette app that shows which node served you and your session.

``demo_app:app`` is configured from ``CLUSTERSESS_*`` environment variables.
"""

from __future__ import annotations

import html
import json
import os
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from clustersess import ClusterSessionMiddleware

NODE = os.environ.get("CLUSTERSESS_NODE", "node1")


def _node(request: Request) -> str:
    """This node's name: the configured one, or this worker's route under a server that
    runs several workers on one port (node1_w<pid>)."""
    manager = request.scope.get("clustersess.manager")
    return str(manager.node) if manager is not None else NODE


def _local_address(request: Request) -> str:
    server = request.scope.get("server") or ("unknown", 0)
    host, port = server[0], server[1]
    return f"{host}:{port}"


async def test_jsp(request: Request) -> Response:
    session = request.session
    session["hits"] = int(session.get("hits", 0)) + 1
    body = (
        "<!DOCTYPE html>\n<html>\n<head><title>Cluster app test</title></head>\n<body>\n"
        "    Server info:\n"
        f"{html.escape(_local_address(request))}<br>"
        f"<br>ID {html.escape(session.id)} <br>\n"
        f"Node {html.escape(_node(request))} <br>\n"
        f"Hits {session['hits']} <br>\n"
        "</body>\n</html>\n"
    )
    return HTMLResponse(body)


def _view(request: Request) -> dict[str, object]:
    session = request.session
    return {"id": session.id, "node": _node(request), "new": session.is_new, "data": dict(session)}


async def get_session(request: Request) -> Response:
    return JSONResponse(_view(request))


async def post_session(request: Request) -> Response:
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        return JSONResponse({"error": "body must be a JSON object"}, status_code=400)
    if not isinstance(body, dict):
        return JSONResponse({"error": "body must be a JSON object"}, status_code=400)
    request.session.update(body)
    return JSONResponse(_view(request))


async def incr(request: Request) -> Response:
    key = request.path_params["key"]
    value = request.session.get(key, 0)
    if not isinstance(value, int) or isinstance(value, bool):
        return JSONResponse({"error": f"session[{key!r}] is not an integer"}, status_code=409)
    request.session[key] = value + 1
    return JSONResponse(_view(request))


async def rotate(request: Request) -> Response:
    request.session.rotate()
    return JSONResponse(_view(request))


async def delete_session(request: Request) -> Response:
    request.session.invalidate()
    return JSONResponse(_view(request))


async def health(request: Request) -> Response:
    """Readiness for the load balancer: 503 while this node is fenced (cut off from
    Redis or from its own heartbeats, lease not held), joining or stopping."""
    verdict = request.scope["clustersess.manager"].health()
    if verdict.ok:
        return PlainTextResponse("ok")
    return PlainTextResponse(f"{verdict.state}: {verdict.reason}", status_code=503)


def _status(request: Request) -> dict[str, Any]:
    status: dict[str, Any] = request.scope["clustersess.manager"].status()
    return status


async def cluster_json(request: Request) -> Response:
    """This node's view of the cluster (what ``clustersess demo`` polls)."""
    return JSONResponse(_status(request))


def _table(rows: list[dict[str, Any]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(row.get(c, '')))}</td>" for c in columns) + "</tr>" for row in rows
    )
    return f"<table>\n<tr>{head}</tr>\n{body}\n</table>"


async def cluster_page(request: Request) -> Response:
    """A small status page in the spirit of Tomcat's manager: members, sessions, counters."""
    status = _status(request)
    members = [m if isinstance(m, dict) else {"member": m} for m in status.get("members") or []]
    stats = status.get("stats") or {}
    summary = {k: v for k, v in status.items() if k not in ("members", "stats")}
    body = (
        "<!DOCTYPE html>\n<html>\n<head><title>Cluster status</title>"
        '<meta http-equiv="refresh" content="2">'
        "<style>body{font-family:sans-serif} table{border-collapse:collapse;margin-bottom:1em}"
        " td,th{border:1px solid #999;padding:2px 8px;text-align:left}</style></head>\n<body>\n"
        f"<h1>Node {html.escape(str(status.get('node', NODE)))}</h1>\n"
        f"{_table([summary])}\n"
        "<h2>Members seen by this node</h2>\n"
        f"{_table(members) if members else '<p>none (single node, or no other member heard yet)</p>'}\n"
        "<h2>Counters</h2>\n"
        f"{_table([{'counter': k, 'value': v} for k, v in stats.items()])}\n"
        '<p><a href="/cluster.json">JSON</a> &middot; <a href="/test.jsp">test.jsp</a></p>\n'
        "</body>\n</html>\n"
    )
    return HTMLResponse(body)


def _metrics_endpoint() -> ASGIApp:
    """Prometheus metrics at /metrics (needs prometheus_client: the ``metrics`` extra)."""
    try:
        from clustersess import metrics
    except ImportError as exc:
        return PlainTextResponse(f"{exc}\n", status_code=501)
    return metrics.asgi_app()


metrics_endpoint = _metrics_endpoint()

routes = [
    Route("/test.jsp", test_jsp),
    Route("/api/session", get_session, methods=["GET"]),
    Route("/api/session", post_session, methods=["POST"]),
    Route("/api/session", delete_session, methods=["DELETE"]),
    Route("/api/session/incr/{key}", incr, methods=["POST"]),
    Route("/api/session/rotate", rotate, methods=["POST"]),
    Route("/health", health),
    Route("/cluster", cluster_page),
    Route("/cluster.json", cluster_json),
    # Inside the session middleware: it hands the node to the metrics app in the scope.
    Route("/metrics", metrics_endpoint),
]

app = Starlette(routes=routes, middleware=[Middleware(ClusterSessionMiddleware)])
if hasattr(metrics_endpoint, "bind"):
    # prometheus_client's multiprocess mode (several workers on one port): each worker
    # mirrors its own values from its start, not from the first scrape it happens to get.
    metrics_endpoint.bind(app)
