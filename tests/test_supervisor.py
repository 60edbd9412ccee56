"""``clustersess node --workers N`` and ``clustersess lb-config``, with real processes.

The fast layout: N supervised workers on N ports behind a real HAProxy rendered by
``lb-config`` from what the supervisor printed; sessions stick to their worker (no
takeovers), a SIGKILLed worker is restarted as a new incarnation and its sessions survive.
And the one-port layout behind the same templates: a server line ``node1`` routes the
cookies of ``uvicorn --workers 2``'s members ``node1_w<pid>``.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from clustersess import lb
from clustersess.supervisor import SupervisorError, WorkerPlan
from tests.utils import TEST_SECRET, RedisServer, ServerProcess, base_env, free_port, missing, wait_until

pytestmark = pytest.mark.timeout(120)

FAST = {"CLUSTERSESS_HEARTBEAT": "0.2", "CLUSTERSESS_DROP_TIME": "1.0"}


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "clustersess.cli", *args],
        capture_output=True, text=True, timeout=timeout, env=env or base_env(), check=False,
    )  # fmt: skip


# -- lb-config and the plan ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", lb.KINDS)
def test_lb_config_renders_the_shipped_templates(kind: lb.Kind, tmp_path: Path) -> None:
    specs = ["node1=10.0.0.11:9091", "node2_w1=10.0.0.12:9091", "node2_w2=10.0.0.12:9092"]
    result = cli("lb-config", "--lb", kind, "--listen", "127.0.0.1:8080" if kind == "haproxy" else "8080", *specs)
    assert result.returncode == 0, result.stderr
    backends = [lb.parse_backend(s) for s in specs]
    listen = "127.0.0.1:8080" if kind == "haproxy" else "8080"
    assert result.stdout == lb.render(kind, backends, listen=listen)
    out = tmp_path / lb.FILES[kind]
    assert cli("lb-config", "--lb", kind, "-o", str(out), *specs).returncode == 0
    assert out.read_text() == lb.render(kind, backends, listen=lb.DEFAULT_LISTEN[kind])
    if kind == "haproxy":
        binary = lb.find("haproxy")
        if binary is not None:
            check = subprocess.run(
                [binary, "-c", "-f", str(out)], capture_output=True, text=True, timeout=30, check=False
            )
            assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize(
    ("specs", "says"),
    [
        (["node1=10.0.0.1"], "is not NAME=HOST:PORT"),
        (["node-1=10.0.0.1:80"], "is not a route"),
        (["node1=10.0.0.1:99999"], "is not a TCP port"),
        (["node1=a:1", "node1=b:2"], "its own name"),
        (["node1=a:1", "node1_w2=b:2"], "would also match the server 'node1'"),
    ],
)
def test_lb_config_says_what_is_wrong(specs: list[str], says: str) -> None:
    result = cli("lb-config", "--lb", "haproxy", *specs)
    assert result.returncode == 2 and says in result.stderr, result.stderr


def test_worker_plan() -> None:
    plan = WorkerPlan(name="web", workers=3, host="127.0.0.1", port=9091)
    assert plan.routes == ["web_w1", "web_w2", "web_w3"] and plan.ports == [9091, 9092, 9093]
    assert [b.address for b in plan.backends()] == ["127.0.0.1:9091", "127.0.0.1:9092", "127.0.0.1:9093"]
    command = plan.command(1)
    assert command[command.index("--name") + 1] == "web_w2" and command[command.index("--port") + 1] == "9092"
    assert command[-1] == "demo_app:app"
    with pytest.raises(SupervisorError, match="shorter --name"):
        WorkerPlan(name="x" * 30, workers=10)
    with pytest.raises(SupervisorError, match="no room"):
        WorkerPlan(name="web", workers=4, port=65534)


def test_node_workers_without_redis_is_refused() -> None:
    env = base_env({"CLUSTERSESS_SECRET": TEST_SECRET})
    result = cli("node", "--workers", "2", "--port", str(free_port()), env=env)
    assert result.returncode == 2 and "CLUSTERSESS_REDIS_URL" in result.stderr, result.stderr


# -- the supervised workers behind HAProxy ------------------------------------------------------------


def _haproxy() -> str:
    binary = lb.find("haproxy")
    if binary is None:
        missing("haproxy", install="on Debian: apt-get install -y haproxy")
    return binary


def _free_run(count: int) -> int:
    import socket

    for _ in range(50):
        base = free_port()
        if base + count >= 65535:
            continue
        ok = True
        for port in range(base, base + count):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no run of free ports")


class Supervised:
    """``clustersess node --workers N`` as a child process; its printed lines parsed."""

    def __init__(self, name: str, workers: int, redis: RedisServer, tmp: Path, **env: str) -> None:
        self.port = _free_run(workers)
        self.name = name
        self.log_path = tmp / f"{name}.log"
        cmd = [sys.executable, "-m", "clustersess.cli", "node", "--name", name, "--workers", str(workers),
               "--port", str(self.port), "--redis-url", redis.url, "--log-level", "warning"]  # fmt: skip
        environment = base_env({"CLUSTERSESS_SECRET": TEST_SECRET, **FAST, **env})
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=environment)
        self.urls = [f"http://127.0.0.1:{self.port + i}" for i in range(workers)]
        wait_until(lambda: "are listening" in self.log(), timeout=30, what=f"{name}'s workers")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def lb_specs(self) -> list[str]:
        [line] = [line for line in self.log().splitlines() if "clustersess lb-config" in line]
        return re.findall(r"\S+=\S+:\d+", line)

    def worker_pids(self) -> dict[str, int]:
        """route -> pid of the live worker, from the supervisor's own lines."""
        pids = {m[0]: int(m[1]) for m in re.findall(r"^  (\S+)\s+\S+:\d+\s+pid (\d+)$", self.log(), re.MULTILINE)}
        pids.update({m[0]: int(m[1]) for m in re.findall(r"restarted (\S+) as pid (\d+)", self.log())})
        return pids

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def supervised(redis_server: RedisServer, tmp_path: Path) -> Iterator[Callable[..., Supervised]]:
    made: list[Supervised] = []

    def make(name: str, workers: int = 2, **env: str) -> Supervised:
        s = Supervised(name, workers, redis_server, tmp_path, **env)
        made.append(s)
        return s

    try:
        yield make
    finally:
        for s in made:
            s.stop()


def lb_from_specs(specs: list[str], tmp_path: Path, make: Callable[..., ServerProcess]) -> ServerProcess:
    port = free_port()
    directory = tmp_path / "haproxy"
    directory.mkdir(exist_ok=True)
    config = directory / "haproxy.cfg"
    result = cli("lb-config", "--lb", "haproxy", "--listen", f"127.0.0.1:{port}", "-o", str(config), *specs)
    assert result.returncode == 0, result.stderr
    return make(lb.command("haproxy", _haproxy(), config), port=port, cwd=directory, log_path=directory / "lb.log")


def call(port: int, method: str, path: str, cookie: str | None = None) -> tuple[dict[str, Any], str | None]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, headers={"Cookie": f"JSESSIONID={cookie}"} if cookie else {})
        resp = conn.getresponse()
        data = resp.read()
        assert resp.status == 200, (resp.status, data[:300])
        new = None
        for name, value in resp.getheaders():
            if name.lower() == "set-cookie" and value.startswith("JSESSIONID="):
                new = value.split(";", 1)[0].split("=", 1)[1]
        import json

        return json.loads(data), new or cookie
    finally:
        conn.close()


def status(url: str) -> dict[str, Any]:
    return httpx.get(url + "/cluster.json", timeout=5).json()  # type: ignore[no-any-return]


def test_supervised_workers_behind_haproxy_stick_and_survive_a_kill(
    supervised: Callable[..., Supervised], tmp_path: Path, process_factory: Callable[..., ServerProcess]
) -> None:
    _haproxy()
    node = supervised("web", 2)
    specs = node.lb_specs()
    assert [s.split("=")[0] for s in specs] == ["web_w1", "web_w2"]
    assert "server web_w1 127.0.0.1:" in node.log() and "use-server web_w2 if" in node.log()
    wait_until(lambda: {m["name"] for m in status(node.urls[0])["members"]} == {"web_w1", "web_w2"}, timeout=15)
    balancer = lb_from_specs(specs, tmp_path, process_factory)
    users: list[tuple[str, str]] = []
    for _ in range(20):
        body, cookie = call(balancer.port, "POST", "/api/session/incr/n")
        assert cookie is not None
        users.append((cookie, body["node"]))
    assert {owner for _, owner in users} == {"web_w1", "web_w2"}  # round-robin for new sessions
    for _ in range(3):  # then every request goes to the worker that owns its session
        for cookie, owner in users:
            body, _ = call(balancer.port, "POST", "/api/session/incr/n", cookie)
            assert body["node"] == owner
    assert sum(status(u)["stats"]["takeovers"] for u in node.urls) == 0

    # SIGKILL one worker: HAProxy sends its users to the other, which takes their sessions
    # over from its backup copies; the supervisor restarts the dead one on its port.
    victim = node.worker_pids()["web_w2"]
    os.kill(victim, signal.SIGKILL)
    # (A request racing the kill itself can get a 502 from a connection the dying process
    # had accepted; the users come back once it is gone.)
    wait_until(lambda: not Path(f"/proc/{victim}").exists(), timeout=10, what="the worker reaped")
    for cookie, _owner in users:
        body, _ = call(balancer.port, "GET", "/api/session", cookie)
        assert body["data"] == {"n": 4}, body
    wait_until(lambda: node.worker_pids()["web_w2"] != victim, timeout=15, what="web_w2 restarted")
    assert f"web_w2 (pid {victim}) was killed by SIGKILL" in node.log()

    def rejoined() -> bool:
        try:
            st = status(node.urls[1])
        except httpx.HTTPError:
            return False
        return st["node"] == "web_w2" and st["incarnation"] and "web_w1" in {m["name"] for m in st["members"]}

    wait_until(rejoined, timeout=20, what="the new web_w2 in the cluster")
    assert node.stop() == 0


def test_a_port_in_use_is_refused_before_any_worker_starts(redis_server: RedisServer) -> None:
    import socket

    port = _free_run(2)
    with socket.socket() as taken:  # the second worker's port is in use
        taken.bind(("127.0.0.1", port + 1))
        taken.listen()
        cmd = ["node", "--name", "web", "--workers", "2", "--port", str(port), "--redis-url", redis_server.url]
        result = cli(*cmd, env=base_env({"CLUSTERSESS_SECRET": TEST_SECRET, **FAST}), timeout=60)
    assert result.returncode == 2
    assert f"port(s) {port + 1} on 127.0.0.1 are in use" in result.stderr and "--port" in result.stderr


def test_a_worker_that_cannot_start_stops_the_supervisor(redis_server: RedisServer) -> None:
    # An app that fails at import: every worker would fail the same way on every restart.
    cmd = ["node", "--name", "web", "--workers", "2", "--port", str(_free_run(2)), "--redis-url", redis_server.url,
           "no_such_module:app"]  # fmt: skip
    result = cli(*cmd, env=base_env({"CLUSTERSESS_SECRET": TEST_SECRET, **FAST}), timeout=60)
    assert result.returncode not in (0, None)
    assert re.search(r"web_w[12] could not start \(exited with status \d+\); stopping", result.stdout), result.stdout
    assert "restarted" not in result.stdout


# -- one port, several workers, one server line ------------------------------------------------------


@pytest.mark.parametrize("kind", lb.KINDS)
def test_one_server_line_routes_every_worker_route_of_its_server(
    kind: lb.Kind, redis_server: RedisServer, tmp_path: Path, process_factory: Callable[..., ServerProcess]
) -> None:
    binary = lb.find(kind)
    if binary is None:
        missing(kind, install=f"on Debian: apt-get install -y {kind}")
    port1, port2 = free_port(), free_port()
    env = {"CLUSTERSESS_SECRET": TEST_SECRET, "CLUSTERSESS_REDIS_URL": redis_server.url, **FAST}
    process_factory(
        [sys.executable, "-m", "uvicorn", "demo_app:app", "--workers", "2", "--port", str(port1)],
        port=port1, env=base_env({**env, "CLUSTERSESS_NODE": "node1"}),
    )  # fmt: skip
    other = process_factory(
        [sys.executable, "-m", "clustersess.cli", "node", "--name", "node2", "--port", str(port2)],
        port=port2, env=base_env(env),
    )  # fmt: skip
    wait_until(lambda: len(status(other.url)["members"]) == 3, timeout=20, what="3 members")
    directory = tmp_path / kind
    directory.mkdir()
    config = directory / lb.FILES[kind]
    listen = free_port()
    specs = [f"node1=127.0.0.1:{port1}", f"node2=127.0.0.1:{port2}"]
    listen_arg = f"127.0.0.1:{listen}"
    assert cli("lb-config", "--lb", kind, "--listen", listen_arg, "-o", str(config), *specs).returncode == 0
    process_factory(lb.command(kind, binary, config), port=listen, cwd=directory, log_path=directory / "lb.log")
    # Sessions born on the one-port server's workers carry node1_w<pid>; through the
    # balancer every one of them goes back to server node1 (one of its workers).
    for _ in range(10):
        body, cookie = call(port1, "POST", "/api/session/incr/n")
        assert re.fullmatch(r"node1_w\d+", body["node"]) and cookie is not None
        for _ in range(2):
            body, cookie = call(listen, "POST", "/api/session/incr/n", cookie)
            assert re.fullmatch(r"node1_w\d+", body["node"]), body  # never node2
        assert body["data"] == {"n": 3}
    assert status(other.url)["stats"]["takeovers"] == 0
