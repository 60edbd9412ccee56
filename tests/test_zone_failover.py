"""Machine-aware backups with real processes: a whole zone dies at once, nothing is lost.

Two "machines" (zones), each ``clustersess node --workers 2`` (four members), one
``redis-server``. Every session's backup is in the other zone; then both workers of one
zone are SIGKILLed at the same moment (and their supervisor, so nothing restarts), and
every session is still there, on the surviving zone. The same run with one zone for all
four members (rendezvous over everyone, as before zones) loses sessions.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

import httpx
import pytest

from tests.test_supervisor import Supervised, call, status, supervised
from tests.utils import wait_until

pytestmark = pytest.mark.timeout(120)

__all__ = ["supervised"]  # the fixture


@pytest.mark.parametrize("zones", [("zoneA", "zoneB"), ("one", "one")], ids=["two zones", "one zone: the old way"])
def test_both_members_of_a_zone_killed_at_once_lose_no_session(
    zones: tuple[str, str], supervised: Callable[..., Supervised]
) -> None:
    a = supervised("a", 2, CLUSTERSESS_ZONE=zones[0])
    b = supervised("b", 2, CLUSTERSESS_ZONE=zones[1])
    urls = a.urls + b.urls
    wait_until(lambda: all(len(status(u)["members"]) == 4 for u in urls), timeout=20, what="4 members everywhere")
    zone_of = {m["name"]: m["zone"] for m in status(a.urls[0])["members"]}
    assert zone_of == {"a_w1": zones[0], "a_w2": zones[0], "b_w1": zones[1], "b_w2": zones[1]}

    sessions: list[tuple[str, int]] = []
    for i in range(48):
        port = int(urls[i % 4].rsplit(":", 1)[1])
        cookie = None
        for _ in range(i % 3 + 1):
            body, cookie = call(port, "POST", "/api/session/incr/n", cookie)
        assert cookie is not None
        sessions.append((cookie, body["data"]["n"]))

    # Every backup is in the other zone: what zone A backs up is what zone B owns.
    def counts(node: Supervised, key: str) -> int:
        return sum(status(u)[key] for u in node.urls)

    assert counts(a, "sessions_owned") == counts(b, "sessions_owned") == 24
    if zones[0] != zones[1]:
        assert counts(a, "sessions_backed_up") == counts(b, "sessions_backed_up") == 24

    # Zone B's machine dies: both of its workers at the same moment, and its supervisor.
    pids = b.worker_pids()
    for pid in (pids["b_w1"], pids["b_w2"], b.proc.pid):
        os.kill(pid, signal.SIGKILL)
    b.proc.wait(10)

    lost = []
    for i, (cookie, n) in enumerate(sessions):
        port = int(a.urls[i % 2].rsplit(":", 1)[1])
        body, _ = call(port, "GET", "/api/session", cookie)
        if body["data"] != {"n": n} or body["new"]:
            lost.append((cookie, n, body))
    if zones[0] == zones[1]:
        # Without zones the backup of about a third of zone B's sessions was the other
        # worker of zone B (what the issue found on real machines): those are gone.
        assert 0 < len(lost) < 24
        return
    assert not lost, f"{len(lost)} of {len(sessions)} sessions lost: {lost[:3]}"
    assert counts(a, "sessions_owned") == 48
    with pytest.raises(httpx.HTTPError):
        httpx.get(b.urls[0] + "/health", timeout=1)
