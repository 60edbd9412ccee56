"""``clustersess demo --workers 2``: supervised workers, lb-config's HAProxy, /metrics; real run."""

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

from clustersess import lb
from tests.test_demo import _descendants, _exists, _free_base
from tests.utils import base_env, http_get, missing, wait_until

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads child processes from /proc (Linux)"),
]


def test_demo_with_workers_uses_the_supervisor_and_lb_config() -> None:
    if lb.find("haproxy") is None:
        missing("haproxy", install="on Debian: apt-get install -y haproxy")
    for _attempt in range(3):
        # (free when _free_base looked; another process may take one before the demo
        # checks it, which the demo reports as "in use", or before a worker binds it,
        # which uvicorn reports as "address already in use": then another base)
        base = _free_base(4)
        cmd = [sys.executable, "-m", "clustersess.cli", "demo", "--nodes", "2", "--workers", "2", "--lb", "haproxy",
               "--port-base", str(base)]  # fmt: skip
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=base_env(), text=True
        )
        lines: list[str] = []
        ready = threading.Event()

        def read(proc: subprocess.Popen[str] = proc, lines: list[str] = lines, ready: threading.Event = ready) -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                if line.startswith("Ready."):
                    ready.set()
            ready.set()  # (it exited)

        threading.Thread(target=read, daemon=True).start()
        ready.wait(60)
        if proc.poll() is not None and ("are in use" in "".join(lines) or "address already in use" in "".join(lines)):
            proc.wait()
            continue
        break
    try:
        assert any(line.startswith("Ready.") for line in lines), "demo did not get ready:\n" + "".join(lines)
        out = "".join(lines)
        routes = re.findall(r"^  (node\d_w\d): http://localhost:(\d+)/test\.jsp", out, re.MULTILINE)
        assert routes == [("node1_w1", str(base + 1)), ("node1_w2", str(base + 2)),
                          ("node2_w1", str(base + 3)), ("node2_w2", str(base + 4))], out  # fmt: skip
        [config_line] = [line for line in lines if "its config: clustersess lb-config --lb haproxy" in line]
        assert all(f"{route}=127.0.0.1:{port}" in config_line for route, port in routes)
        assert "clustersess node --workers 2" in out

        # Through HAProxy: a new session sticks to the worker that created it.
        status, headers, body = http_get(f"http://127.0.0.1:{base}/test.jsp")
        assert status == 200
        cookie = headers["set-cookie"].split(";", 1)[0]
        owner = re.search(rb"Node (node\d_w\d)", body).group(1)  # type: ignore[union-attr]
        for hits in range(2, 5):
            _, _, body = http_get(f"http://127.0.0.1:{base}/test.jsp", headers={"Cookie": cookie})
            assert re.search(rb"Node (node\d_w\d)", body).group(1) == owner  # type: ignore[union-attr]
            assert f"Hits {hits}".encode() in body
        # Each node is a zone of its own: the live view shows four members in two zones.
        status, _, metrics = http_get(f"http://127.0.0.1:{base + 1}/metrics")
        assert status == 200 and b"clustersess_zones 2.0" in metrics
        assert b'clustersess_members{state="up"} 4.0' in metrics
        wait_until(lambda: len(re.findall(r"node\d_w\d\s+\d+\s+up", "".join(lines))) >= 4, timeout=15)

        children = _descendants(proc.pid)
        assert len(children) >= 8, children  # redis, 2 supervisors, 4 workers, haproxy
        proc.send_signal(signal.SIGINT)
        assert proc.wait(40) == 0
        time.sleep(0.2)
        assert "stopped 4 processes" in "".join(lines)  # redis, two supervisors, haproxy
        leftovers = [pid for pid in children if _exists(pid)]
        assert not leftovers, f"processes left running: {leftovers}"
    finally:
        if proc.poll() is None:
            for pid in _descendants(proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.kill()
            proc.wait()
