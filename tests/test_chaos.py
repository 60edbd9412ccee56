"""A short chaos run: real Redis, three real nodes, HAProxy, locust users, one node SIGKILLed.

``loadtests/chaos.py`` runs in a child process: locust monkey-patches the standard library
with gevent on import, which must not happen inside the pytest process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from clustersess import lb
from tests.utils import REPO_ROOT, base_env, missing

CHAOS = REPO_ROOT / "loadtests" / "chaos.py"
SHORT = ["--nodes", "3", "--users", "10", "--duration", "8", "--kill-at", "3", "--restart-at", "5"]


def run_chaos(tmp_path: Path, *args: str) -> tuple[int, str, dict[str, Any]]:
    report = tmp_path / "chaos.json"
    cmd = [sys.executable, str(CHAOS), *SHORT, "--report", str(report), *args]
    # Own process group: on a timeout the run and every process it started are killed.
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=base_env(), cwd=tmp_path, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the chaos run did not finish in 60 s:\n{out.decode(errors='replace')}")
    text = out.decode(errors="replace")
    assert report.exists(), text
    return proc.returncode, text, json.loads(report.read_text())


def check_run(code: int, text: str, report: dict[str, Any]) -> None:
    summary, ledger = report["summary"], report["ledger"]
    assert code == 0, text
    assert text.strip().splitlines()[-1].startswith("chaos: requests "), text
    # Users really ran journeys through the chaos, and every answer was checked.
    assert summary["requests"] > 100, text
    assert summary["sessions"] >= 10, text
    assert ledger["checks"] == summary["requests"] - ledger["failovers"] - ledger["unanswered"], text
    # The victim held sessions when it was killed, and came back.
    killed = report["killed_node_status"]
    assert killed["sessions_owned"] + killed["sessions_backed_up"] > 0, text
    events = [what for _, what in report["timeline"]]
    assert any(e.startswith("SIGKILLed node2") for e in events), text
    assert "node2 is serving again" in events, text
    # Sync replication: nobody lost a session or acknowledged data, no logout was forgotten.
    assert summary["sessions_lost"] == 0, text
    assert ledger["logouts_not_honoured"] == 0, text
    assert ledger["cookie_mismatches"] == 0, text


def test_chaos_behind_haproxy_loses_no_session(tmp_path: Path) -> None:
    if lb.find("haproxy") is None:
        missing("haproxy", install="on Debian: apt-get install -y haproxy")
    code, text, report = run_chaos(tmp_path, "--lb", "haproxy", "--replication", "sync")
    check_run(code, text, report)


def test_chaos_without_balancer_fails_over_and_loses_no_session(tmp_path: Path) -> None:
    code, text, report = run_chaos(tmp_path, "--lb", "none", "--replication", "sync")
    check_run(code, text, report)
    # Journeys that started on the dead node were refused and moved to the next one.
    assert report["ledger"]["failovers"] > 0, text
