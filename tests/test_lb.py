"""The load balancer configs: the shipped files are the rendered templates, and they work.

HAProxy and nginx run for real (``.ci/run`` installs them) with configs rendered from the
same templates as ``deploy/``, in front of real node processes.
"""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from clustersess import lb
from tests.utils import REPO_ROOT, NodeProcess, RedisServer, ServerProcess, free_port, missing, wait_until

FAST_CLUSTER = {"CLUSTERSESS_HEARTBEAT": "0.2", "CLUSTERSESS_DROP_TIME": "1.0"}


# -- rendering -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", lb.KINDS)
def test_deploy_files_are_the_rendered_templates(kind: lb.Kind) -> None:
    shipped = (REPO_ROOT / "deploy" / lb.FILES[kind]).read_text(encoding="utf-8")
    assert shipped == lb.render_deploy(kind), (
        f"deploy/{lb.FILES[kind]} differs from clustersess/templates/{lb.FILES[kind]} rendered for "
        "node1..node3: regenerate it with `python -m clustersess.lb deploy/`"
    )


@pytest.mark.parametrize("kind", lb.KINDS)
def test_render_repeats_node_lines_and_fills_every_placeholder(kind: lb.Kind) -> None:
    backends = [lb.Backend("alpha", "10.1.1.1", 8001), lb.Backend("beta_2", "10.1.1.2", 8002)]
    text = lb.render(kind, backends, listen="127.0.0.1:7000", cookie="SID")
    assert "{{" not in text and "##" not in text
    for b in backends:
        assert b.address in text
    if kind == "haproxy":
        rules = [line.strip() for line in text.splitlines() if line.strip().startswith("use-server")]
        assert rules == [
            "use-server alpha if { req.cook(SID),field(-1,.) -m reg ^alpha(_w[0-9]+)?$ }",
            "use-server beta_2 if { req.cook(SID),field(-1,.) -m reg ^beta_2(_w[0-9]+)?$ }",
        ]
        assert "bind 127.0.0.1:7000" in text
    else:
        assert "map $cookie_SID $route {" in text
        assert "upstream beta_2 { server 10.1.1.2:8002" in text
        assert "listen 127.0.0.1:7000;" in text


def test_shipped_haproxy_cfg_is_valid() -> None:
    binary = _binary("haproxy")
    # init-addr lets it pass although the docker-compose host names do not resolve here
    result = subprocess.run(
        [binary, "-c", "-f", str(REPO_ROOT / "deploy" / "haproxy.cfg")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- running for real ----------------------------------------------------------------------------


def _binary(kind: lb.Kind) -> str:
    binary = lb.find(kind)
    if binary is None:
        missing(kind, install=f"on Debian: apt-get install -y {kind}")
    return binary


def _request(
    port: int, method: str, path: str, cookie: str | None = None, body: Any = None
) -> tuple[dict[str, Any], str | None]:
    """One request through ``port``: (JSON body, JSESSIONID value set by the response or None)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = {"Cookie": f"JSESSIONID={cookie}"} if cookie else {}
        payload = None if body is None else json.dumps(body)
        if payload is not None:
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=payload, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        assert resp.status == 200, (resp.status, data[:500])
        set_cookie = None
        for name, value in resp.getheaders():
            if name.lower() == "set-cookie" and value.startswith("JSESSIONID="):
                set_cookie = value.split(";", 1)[0].split("=", 1)[1]
        return json.loads(data), set_cookie
    finally:
        conn.close()


def _start_nodes(node_factory: Callable[..., NodeProcess], **kwargs: Any) -> list[NodeProcess]:
    nodes = [node_factory(f"node{i}", start=False, **kwargs) for i in (1, 2, 3)]
    for node in nodes:  # start all three, then wait: they boot in parallel
        node.start(wait=False)
    for node in nodes:
        node.wait_ready()
    return nodes


def _start_balancer(
    kind: lb.Kind, nodes: list[NodeProcess], tmp_path: Path, process_factory: Callable[..., ServerProcess]
) -> ServerProcess:
    binary = _binary(kind)
    port = free_port()
    directory = tmp_path / kind
    directory.mkdir()
    config = directory / lb.FILES[kind]
    backends = [lb.Backend(n.name, "127.0.0.1", n.port) for n in nodes]
    config.write_text(lb.render(kind, backends, listen=f"127.0.0.1:{port}"))
    # ready = GET /health through the balancer answers 200
    return process_factory(lb.command(kind, binary, config), port=port, cwd=directory, log_path=directory / "lb.log")


def _session_on(node: NodeProcess, data: dict[str, Any]) -> str:
    """A session created directly on ``node``; returns its cookie (``...<node name>``)."""
    view, cookie = _request(node.port, "POST", "/api/session", body=data)
    assert view["node"] == node.name and cookie is not None and cookie.endswith("." + node.name)
    return cookie


@pytest.mark.parametrize("kind", lb.KINDS)
def test_routes_on_the_cookie_suffix_and_fails_over(
    kind: lb.Kind,
    tmp_path: Path,
    node_factory: Callable[..., NodeProcess],
    process_factory: Callable[..., ServerProcess],
) -> None:
    _binary(kind)
    nodes = _start_nodes(node_factory)  # single-node mode: no Redis, each node on its own
    _, node2, node3 = nodes
    balancer = _start_balancer(kind, nodes, tmp_path, process_factory)
    port = balancer.port

    cookie2 = _session_on(node2, {"who": "user of node2"})
    cookie3 = _session_on(node3, {"who": "user of node3"})
    for _ in range(5):
        view, _ = _request(port, "GET", "/api/session", cookie2)
        assert view["node"] == "node2" and view["data"] == {"who": "user of node2"}
        view, _ = _request(port, "GET", "/api/session", cookie3)
        assert view["node"] == "node3" and view["data"] == {"who": "user of node3"}
    # No cookie: round-robin over the nodes.
    fresh = {_request(port, "GET", "/api/session")[0]["node"] for _ in range(6)}
    assert len(fresh) >= 2, fresh

    node2.kill(signal.SIGKILL)
    # Right after the crash (before any health check noticed) and after it was marked down,
    # every request naming node2 is answered by another node, reads and writes alike.
    deadline = time.monotonic() + 2.5
    seen = set()
    while time.monotonic() < deadline:
        view, _ = _request(port, "GET", "/api/session", cookie2)
        seen.add(view["node"])
        view, _ = _request(port, "POST", "/api/session", cookie2, body={"x": 1})
        seen.add(view["node"])
        assert view["data"].get("x") == 1  # the POST body reached the other node
        time.sleep(0.2)
    assert seen and seen <= {"node1", "node3"}, seen
    # node3's users are not disturbed.
    view, _ = _request(port, "GET", "/api/session", cookie3)
    assert view["node"] == "node3" and view["data"] == {"who": "user of node3"}


def _member_names(node: NodeProcess) -> set[str]:
    status, _ = _request(node.port, "GET", "/cluster.json")
    names = set()
    for m in status.get("members") or []:
        name = m.get("name") if isinstance(m, dict) else str(m)
        if name and name != node.name and not (isinstance(m, dict) and m.get("self")):
            names.add(name)
    return names


@pytest.mark.parametrize("kind", lb.KINDS)
def test_failover_keeps_the_session_and_reissues_the_cookie_for_the_new_owner(
    kind: lb.Kind,
    tmp_path: Path,
    redis_server: RedisServer,
    node_factory: Callable[..., NodeProcess],
    process_factory: Callable[..., ServerProcess],
) -> None:
    """The issue's full scenario: real Redis, three clustered nodes, node2 SIGKILLed, its
    user keeps the session through the LB."""
    _binary(kind)
    nodes = _start_nodes(node_factory, redis_url=redis_server.url, env=FAST_CLUSTER)
    node2 = nodes[1]
    for node in nodes:
        others = {n.name for n in nodes} - {node.name}
        wait_until(
            lambda node=node, others=others: _member_names(node) >= others,
            timeout=15,
            what=f"{node.name} sees the others",
        )
    balancer = _start_balancer(kind, nodes, tmp_path, process_factory)
    port = balancer.port

    cookie = _session_on(node2, {"cart": ["book"]})
    view, _ = _request(port, "POST", "/api/session/incr/n", cookie)
    assert view["node"] == "node2" and view["data"] == {"cart": ["book"], "n": 1}
    token = view["id"].split(".")[0]

    node2.kill(signal.SIGKILL)
    view, new_cookie = _request(port, "GET", "/api/session", cookie)
    owner = view["node"]
    assert owner in {"node1", "node3"}
    assert view["data"] == {"cart": ["book"], "n": 1}, "the session data survived the crash"
    assert view["id"] == f"{token}.{owner}", "same session, now owned by the node that answered"
    assert new_cookie is not None and new_cookie.endswith("." + owner), "the cookie names the new owner"

    # The new cookie is sticky to the new owner, and writes go on from where they were.
    for expected in (2, 3):
        view, _ = _request(port, "POST", "/api/session/incr/n", new_cookie)
        assert view["node"] == owner and view["data"] == {"cart": ["book"], "n": expected}
