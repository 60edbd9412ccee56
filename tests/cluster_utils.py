"""Helpers for the multi-process cluster tests: a real redis-server and real nodes."""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx

from tests.utils import NodeProcess, RedisServer, wait_until

FAST = {"CLUSTERSESS_HEARTBEAT": "0.2", "CLUSTERSESS_DROP_TIME": "1.0", "CLUSTERSESS_ACK_TIMEOUT": "1.0"}


class Client:
    """A user agent that holds one session cookie, like a browser would (per host)."""

    def __init__(self, cookie: str | None = None) -> None:
        self.cookie = cookie
        self._http = httpx.Client(timeout=10.0)

    def request(self, method: str, node: NodeProcess | str, path: str, **kw: Any) -> httpx.Response:
        base = node if isinstance(node, str) else node.url
        headers = {"Cookie": f"JSESSIONID={self.cookie}"} if self.cookie else {}
        self._http.cookies.clear()
        resp = self._http.request(method, base + path, headers=headers, **kw)
        assert resp.status_code < 500, (resp.status_code, resp.text)
        for value in resp.headers.get_list("set-cookie"):
            name, _, rest = value.partition("=")
            if name == "JSESSIONID":
                val = rest.split(";")[0]
                self.cookie = None if val == "null" else val
        return resp

    def get(self, node: NodeProcess | str) -> dict[str, Any]:
        return self.request("GET", node, "/api/session").json()  # type: ignore[no-any-return]

    def post(self, node: NodeProcess | str, data: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", node, "/api/session", json=data).json()  # type: ignore[no-any-return]

    def incr(self, node: NodeProcess | str, key: str = "n") -> dict[str, Any]:
        return self.request("POST", node, f"/api/session/incr/{key}").json()  # type: ignore[no-any-return]

    @property
    def route(self) -> str | None:
        return self.cookie.rsplit(".", 1)[1] if self.cookie else None

    def close(self) -> None:
        self._http.close()


def status(node: NodeProcess) -> dict[str, Any]:
    return json.loads(httpx.get(node.url + "/cluster.json", timeout=5.0).text)  # type: ignore[no-any-return]


def wait_members(nodes: list[NodeProcess], count: int, timeout: float = 10.0) -> None:
    def ok() -> bool:
        for n in nodes:
            live = [m for m in status(n)["members"] if not m.get("self")]
            if len(live) != count - 1:
                return False
        return True

    wait_until(ok, timeout=timeout, what=f"{count} members seen by every node")


@contextlib.contextmanager
def cluster(
    n: int = 3, *, env: dict[str, str] | None = None, redis: RedisServer | Any = None, log_level: str = "warning"
) -> Iterator[tuple[RedisServer, list[NodeProcess]]]:
    """A real redis-server and ``n`` real demo nodes node1..nodeN, all killed afterwards.

    ``redis`` may be any started deployment with a ``url`` (tests/redis_topologies.py:
    a Redis Cluster, a Sentinel setup); the caller owns it then."""
    own = redis is None
    server = redis or RedisServer().start()
    nodes: list[NodeProcess] = []
    try:
        for i in range(1, n + 1):
            node = NodeProcess(f"node{i}", redis_url=server.url, env={**FAST, **(env or {})}, log_level=log_level)
            nodes.append(node)
            node.start()
        wait_members(nodes, n)
        yield server, nodes
    finally:
        for node in nodes:
            node.kill(signal.SIGKILL)
        if own:
            server.cleanup()


def others(nodes: list[NodeProcess], name: str | None) -> list[NodeProcess]:
    return [n for n in nodes if n.name != name and n.running]


def by_name(nodes: list[NodeProcess], name: str | None) -> NodeProcess:
    return next(n for n in nodes if n.name == name)


def sleep(seconds: float) -> None:
    time.sleep(seconds)
