"""Prometheus metrics: every Stats field, the gauges, the ack histogram; scraped and parsed.

In memory for what is exported, then real processes: the Starlette demo under uvicorn and
the Flask demo under waitress, scraped over HTTP and parsed with prometheus_client's own
text-format parser.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any

import httpx
import pytest

try:
    import prometheus_client  # noqa: F401
except ImportError:
    from tests.utils import missing

    missing("prometheus_client", install="pip install 'clustersess[metrics]'")

from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from clustersess import ClusterSessionMiddleware, ClusterSessionWSGIMiddleware, metrics
from clustersess.stats import Stats
from tests.memcluster import Cluster, cluster, write
from tests.utils import TEST_SECRET, NodeProcess, RedisServer, ServerProcess, base_env, free_port

__all__ = ["cluster"]  # the fixture

Families = dict[str, Any]


def parse(text: str) -> Families:
    """name -> family, from the text format, with prometheus_client's parser."""
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(families: Families, name: str, sample: str | None = None, **labels: str) -> float:
    family = families[name]
    for s in family.samples:
        if s.name == (sample or name) and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    raise KeyError(f"{sample or name}{labels} not in {family.samples}")


def render(manager: Any) -> Families:
    body, content_type = metrics.exposition(manager)
    assert content_type.startswith("text/plain")
    return parse(body.decode())


# -- what is exported --------------------------------------------------------------------------


async def test_every_stats_counter_and_the_gauges_are_exported(cluster: Cluster) -> None:
    n1, n2 = await cluster.start("n1", "n2", zone="z1")
    for i in range(3):
        await write(n1, None, i=i)
    families = render(n1)
    counters = n1.stats.as_dict()
    for field, count in counters.items():
        if field.startswith("messages_dropped_"):
            assert value(families, "clustersess_messages_dropped", "clustersess_messages_dropped_total",
                         cause=field.removeprefix("messages_dropped_")) == count  # fmt: skip
        else:
            assert families[f"clustersess_{field}"].type == "counter"
            assert value(families, f"clustersess_{field}", f"clustersess_{field}_total") == count, field
    assert value(families, "clustersess_commits", "clustersess_commits_total") == 3
    assert value(families, "clustersess_bytes_sent", "clustersess_bytes_sent_total") > 0
    assert value(families, "clustersess_sessions_owned") == 3
    assert value(families, "clustersess_sessions_backed_up") == 0
    assert value(render(n2), "clustersess_sessions_backed_up") == 3
    assert value(families, "clustersess_members", state="up") == 2
    assert value(families, "clustersess_zones") == 1  # both in z1: no backup can leave it
    assert value(families, "clustersess_redis_connected") == 1 and value(families, "clustersess_healthy") == 1
    assert value(families, "clustersess_rebalancing") == 0  # (settled: nothing moving)
    assert value(families, "clustersess_node_info", node="n1", zone="z1", replication="sync") == 1
    # The ack latency: one observation per acked REPLICATE, cumulative buckets, +Inf = count.
    hist = families["clustersess_ack_latency_seconds"]
    assert hist.type == "histogram"
    acks = n1.stats.ack_latency.count
    assert acks >= 3
    assert value(families, "clustersess_ack_latency_seconds", "clustersess_ack_latency_seconds_count") == acks
    inf = value(families, "clustersess_ack_latency_seconds", "clustersess_ack_latency_seconds_bucket", le="+Inf")
    assert inf == acks
    buckets = [s.value for s in hist.samples if s.name.endswith("_bucket")]
    assert buckets == sorted(buckets)


async def test_a_counter_added_to_stats_appears_without_an_edit(cluster: Cluster) -> None:
    @dataclasses.dataclass
    class Later(Stats):
        fencing_rejections: int = 0
        messages_dropped_fenced: int = 0

    [n1] = await cluster.start("n1")
    n1.stats = Later(fencing_rejections=4, messages_dropped_fenced=2)
    families = render(n1)
    assert value(families, "clustersess_fencing_rejections", "clustersess_fencing_rejections_total") == 4
    assert value(families, "clustersess_messages_dropped", "clustersess_messages_dropped_total", cause="fenced") == 2


def test_a_single_node_is_healthy_and_has_no_redis_gauge() -> None:
    from clustersess import Config, SessionManager

    manager = SessionManager(Config(secret_key=TEST_SECRET, node_name="solo"))
    families = render(manager)
    assert value(families, "clustersess_healthy") == 1
    assert "clustersess_redis_connected" not in families
    assert value(families, "clustersess_members", state="up") == 1
    assert value(families, "clustersess_node_info", node="solo", replication="none") == 1


# -- the apps, in process -------------------------------------------------------------------------


def starlette_app(**options: Any) -> Starlette:
    async def write_view(request: Request) -> Response:
        request.session["n"] = request.session.get("n", 0) + 1
        return PlainTextResponse("ok")

    routes = [Route("/write", write_view), Route("/metrics", metrics.asgi_app(registry=None))]
    middleware = [Middleware(ClusterSessionMiddleware, secret_key=TEST_SECRET, **options)]
    return Starlette(routes=routes, middleware=middleware)


async def test_the_asgi_app_finds_the_node_in_the_scope_and_gzips_on_request() -> None:
    app = starlette_app(node_name="asgi1", gc_freeze=False)
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        # httpx's ASGITransport sends no lifespan; Starlette's middleware starts on first use
        await client.get("/write")
        response = await client.get("/metrics", headers={"Accept-Encoding": "gzip"})
    assert response.status_code == 200 and response.headers["content-encoding"] == "gzip"
    families = parse(response.text)  # httpx decompressed it
    assert value(families, "clustersess_sessions_created", "clustersess_sessions_created_total") == 1
    assert "process_cpu_seconds" not in families  # registry=None: clustersess's own only


async def test_the_asgi_app_outside_the_middleware_says_how_to_fix_it() -> None:
    app = metrics.asgi_app()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        response = await client.get("/")
    assert response.status_code == 500 and "inside the session middleware" in response.text


def test_the_wsgi_app_takes_the_node_from_the_environ_or_a_bound_source() -> None:
    def inner(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        return metrics_app(environ, start_response)

    metrics_app = metrics.wsgi_app()
    wrapped = ClusterSessionWSGIMiddleware(inner, secret_key=TEST_SECRET, node_name="wsgi1", gc_freeze=False)
    try:
        response = httpx.Client(transport=httpx.WSGITransport(app=wrapped), base_url="http://t").get("/")
        assert response.status_code == 200
        families = parse(response.text)
        assert value(families, "clustersess_node_info", node="wsgi1") == 1
        assert "process_cpu_seconds" in families or sys.platform != "linux"  # the default registry too
        # Mounted outside the middleware, bound to the middleware itself.
        bound = metrics.wsgi_app(registry=None).bind(wrapped)
        response = httpx.Client(transport=httpx.WSGITransport(app=bound), base_url="http://t").get("/")
        assert value(parse(response.text), "clustersess_node_info", node="wsgi1") == 1
    finally:
        wrapped.close()


# -- real servers, scraped over HTTP -------------------------------------------------------------


def scrape(url: str) -> Families:
    response = httpx.get(url + "/metrics", timeout=5)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(response.text)


@pytest.mark.timeout(60)
def test_the_demo_nodes_serve_metrics_under_uvicorn_and_waitress(
    redis_server: RedisServer,
    node_factory: Callable[..., NodeProcess],
    process_factory: Callable[..., ServerProcess],
) -> None:
    star = node_factory("star1", redis_url=redis_server.url)
    port = free_port()
    env = base_env(
        {"CLUSTERSESS_SECRET": TEST_SECRET, "CLUSTERSESS_NODE": "flask1", "CLUSTERSESS_REDIS_URL": redis_server.url}
    )
    cmd = [sys.executable, "-m", "waitress", f"--port={port}", "demo_app.wsgi:app"]
    flask = process_factory(cmd, port=port, env=env)
    for _ in range(5):
        httpx.post(star.url + "/api/session/incr/n", timeout=5)
    families = scrape(star.url)
    assert value(families, "clustersess_sessions_owned") == 5
    assert value(families, "clustersess_node_info", node="star1") == 1
    assert value(families, "clustersess_replications_sent", "clustersess_replications_sent_total") >= 5
    assert value(families, "clustersess_ack_latency_seconds", "clustersess_ack_latency_seconds_count") >= 5
    assert "process_cpu_seconds" in families  # prometheus_client's default registry rides along
    flask_families = scrape(flask.url)
    assert value(flask_families, "clustersess_sessions_backed_up") == 5  # flask1 is star1's only member
    assert value(flask_families, "clustersess_members", state="up") == 2


@pytest.mark.timeout(90)
@pytest.mark.parametrize("server", ["uvicorn", "gunicorn"], ids=["uvicorn --workers 2", "gunicorn -w 2 gthread Flask"])
def test_multiprocess_mode_answers_for_every_worker_of_one_port(
    server: str, redis_server: RedisServer, process_factory: Callable[..., ServerProcess], tmp_path: Any
) -> None:
    """Two workers on one port: whichever worker a scrape reaches reports both."""
    import os
    import re
    import signal
    import time

    from tests.utils import wait_until

    shared = tmp_path / "prom"
    shared.mkdir()
    port = free_port()
    env = base_env({
        "CLUSTERSESS_SECRET": TEST_SECRET, "CLUSTERSESS_REDIS_URL": redis_server.url, "CLUSTERSESS_NODE": "node1",
        "CLUSTERSESS_HEARTBEAT": "0.2", "CLUSTERSESS_DROP_TIME": "1.0", "PROMETHEUS_MULTIPROC_DIR": str(shared),
    })  # fmt: skip
    if server == "uvicorn":
        cmd = [sys.executable, "-m", "uvicorn", "demo_app:app", "--workers", "2", "--port", str(port)]
    else:
        cmd = [sys.executable, "-m", "gunicorn", "-w", "2", "-k", "gthread", "--threads", "4",
               "-b", f"127.0.0.1:{port}", "demo_app.wsgi:app"]  # fmt: skip
    proc = process_factory(cmd, port=port, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(12):  # new connections: the kernel spreads them over both workers
        assert httpx.post(url + "/api/session/incr/n", timeout=5).status_code == 200

    def workers_reported() -> Families | None:
        families = scrape(url)
        info = [s for s in families["clustersess_node_info"].samples if s.value == 1]
        return families if len(info) == 2 else None

    families = wait_until(workers_reported, timeout=15, what="both workers in the shared metrics")
    info = families["clustersess_node_info"].samples
    assert all(re.fullmatch(r"node1_w\d+", s.labels["node"]) for s in info)
    assert {s.labels["pid"] for s in info} == {s.labels["node"].rsplit("_w", 1)[1] for s in info}

    def settled() -> Families | None:
        families = scrape(url)
        created = value(families, "clustersess_sessions_created", "clustersess_sessions_created_total")
        owned = value(families, "clustersess_sessions_owned")
        return families if created == 12 and owned == 12 else None

    # Counters summed over the workers, sessions summed over the live ones: the machine's totals.
    families = wait_until(settled, timeout=15, what="12 sessions created and owned in total")
    assert value(families, "clustersess_members", state="up") == 2

    # A worker that dies leaves the live gauges (the server starts a new one; nothing calls
    # prometheus_client's mark_process_dead for it: the exporter reaps it at a scrape).
    dead = int(info[0].labels["pid"])
    os.kill(dead, signal.SIGKILL)
    time.sleep(0.5)

    def forgotten() -> bool:
        return str(dead) not in {s.labels.get("pid") for s in scrape(url)["clustersess_node_info"].samples}

    wait_until(forgotten, timeout=20, what="the dead worker's live gauges reaped")
    assert proc.running
