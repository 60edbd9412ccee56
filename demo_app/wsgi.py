"""The test.jsp demo as a Flask app: the same routes as ``demo_app:app``, on WSGI.

``demo_app.wsgi:app`` is configured from ``CLUSTERSESS_*`` environment variables; run it
under a real WSGI server, e.g.::

    CLUSTERSESS_SECRET=... CLUSTERSESS_NODE=node3 waitress-serve --port 9093 demo_app.wsgi:app

It joins the same cluster as the Starlette nodes and serves the same sessions.
"""

from __future__ import annotations

import html
from typing import Any

from flask import Flask, jsonify, request, session

from clustersess.flask_ext import ClusterSession

app = Flask(__name__)
# The cookie the Starlette nodes use (Tomcat's name), so this node serves their sessions;
# CLUSTERSESS_COOKIE, if set, wins over it on every node.
app.config["SESSION_COOKIE_NAME"] = "JSESSIONID"
clustersess = ClusterSession(app)


def _view() -> dict[str, Any]:
    return {"id": session.id, "node": clustersess.manager.node, "new": session.is_new, "data": dict(session)}


@app.get("/test.jsp")
def test_jsp() -> Any:
    session["hits"] = int(session.get("hits", 0)) + 1
    local = f"{request.environ.get('SERVER_NAME', 'unknown')}:{request.environ.get('SERVER_PORT', 0)}"
    body = (
        "<!DOCTYPE html>\n<html>\n<head><title>Cluster app test</title></head>\n<body>\n"
        "    Server info:\n"
        f"{html.escape(local)}<br>"
        f"<br>ID {html.escape(session.id)} <br>\n"
        f"Node {html.escape(clustersess.manager.node)} <br>\n"
        f"Hits {session['hits']} <br>\n"
        "</body>\n</html>\n"
    )
    return body, 200, {"Content-Type": "text/html; charset=utf-8"}


@app.get("/api/session")
def get_session() -> Any:
    return jsonify(_view())


@app.post("/api/session")
def post_session() -> Any:
    body = request.get_json(force=True, silent=True) if request.get_data() else {}
    if not isinstance(body, dict):
        return jsonify({"error": "body must be a JSON object"}), 400
    session.update(body)
    return jsonify(_view())


@app.delete("/api/session")
def delete_session() -> Any:
    session.invalidate()
    return jsonify(_view())


@app.post("/api/session/incr/<key>")
def incr(key: str) -> Any:
    value = session.get(key, 0)
    if not isinstance(value, int) or isinstance(value, bool):
        return jsonify({"error": f"session[{key!r}] is not an integer"}), 409
    session[key] = value + 1
    return jsonify(_view())


@app.post("/api/session/rotate")
def rotate() -> Any:
    session.rotate()
    return jsonify(_view())


@app.get("/health")
def health() -> Any:
    """Readiness for the load balancer: 503 while this node is fenced, joining or stopping."""
    verdict = clustersess.manager.health()
    status = 200 if verdict.ok else 503
    text = "ok" if verdict.ok else f"{verdict.state}: {verdict.reason}"
    return text, status, {"Content-Type": "text/plain; charset=utf-8"}


@app.get("/cluster.json")
def cluster_json() -> Any:
    return jsonify(clustersess.manager.status())


try:
    from clustersess import metrics
except ImportError as exc:  # prometheus_client (the ``metrics`` extra) is not installed
    metrics_missing = str(exc)
else:
    # Bound to this worker's node now, so in prometheus_client's multiprocess mode every
    # worker mirrors its values from its start, not from the first scrape it gets.
    metrics_app = metrics.wsgi_app(clustersess.manager)


@app.get("/metrics")
def prometheus_metrics() -> Any:
    """Prometheus metrics (needs prometheus_client: the ``metrics`` extra)."""
    if "metrics_app" not in globals():
        return f"{metrics_missing}\n", 501, {"Content-Type": "text/plain; charset=utf-8"}
    body, content_type = metrics_app.render(request.headers.get("Accept"))
    return body, 200, {"Content-Type": content_type}
