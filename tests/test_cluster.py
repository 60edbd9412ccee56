"""Cluster behaviour against a real redis-server and real node processes, killed with real signals."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from tests.cluster_utils import Client, cluster, others, status, wait_members
from tests.redis_topologies import running
from tests.utils import NodeProcess, wait_until

pytestmark = pytest.mark.timeout(90)

#: the Redis deployments the failover scenarios run against (tests/redis_topologies.py)
TOPOLOGIES = ["single", "cluster", "sentinel"]


@pytest.fixture(params=TOPOLOGIES)
def topology(request: pytest.FixtureRequest) -> Iterator[Any]:
    """None for one redis-server started by ``cluster()`` itself (the original setup), or a
    started Redis Cluster (3 primaries, 3 replicas) or Sentinel setup (primary, replica,
    three Sentinels)."""
    if request.param == "single":
        yield None
        return
    with running(request.param) as topo:
        yield topo


def test_round_robin_counter_reads_90() -> None:
    """Every request lands on the next node: each one takes the session over."""
    with cluster(3) as (_, nodes):
        user = Client()
        for i in range(90):
            body = user.incr(nodes[i % 3])
            assert body["node"] == nodes[i % 3].name
            assert user.route == nodes[i % 3].name  # the cookie names the new owner
        assert user.get(nodes[0])["data"]["n"] == 90


def test_sigkill_owner_after_sync_writes_loses_nothing(topology: Any) -> None:
    with cluster(3, redis=topology) as (_, nodes):
        node1 = nodes[0]
        users = [Client() for _ in range(30)]
        for i, user in enumerate(users):
            user.post(node1, {"i": i, "cart": [i]})
            user.request("POST", node1, "/api/session/incr/n")
        node1.kill(signal.SIGKILL)
        started = time.perf_counter()
        for i, user in enumerate(users):
            target = others(nodes, "node1")[i % 2]
            body = user.get(target)
            assert body["data"] == {"i": i, "cart": [i], "n": 1}, body
            assert not body["new"]
            assert user.route == target.name
        per_takeover = (time.perf_counter() - started) / len(users)
        # Takeover costs a few Redis round trips, not the drop time.
        assert per_takeover < 0.5, per_takeover


def test_kill_backup_wait_then_kill_owner_loses_nothing(topology: Any) -> None:
    with cluster(3, redis=topology) as (_, nodes):
        node1 = nodes[0]
        users = [Client() for _ in range(30)]
        for i, user in enumerate(users):
            user.post(node1, {"i": i})
        backups = {m["name"]: m["backups"] for m in status(nodes[1])["members"] if not m.get("self")}
        assert sum(status(n)["sessions_backed_up"] for n in nodes[1:]) == 30, backups
        nodes[1].kill(signal.SIGKILL)  # holds about half of node1's backups
        # After the drop time every session of node1 has a backup on node3.
        wait_until(lambda: status(nodes[2])["sessions_backed_up"] == 30, timeout=10, what="re-replication to node3")
        node1.kill(signal.SIGKILL)
        for i, user in enumerate(users):
            assert user.get(nodes[2])["data"] == {"i": i}


def test_sigterm_hands_sessions_over_promptly(topology: Any) -> None:
    with cluster(3, log_level="info", redis=topology) as (_, nodes):
        node1 = nodes[0]
        users = [Client() for _ in range(30)]
        for i, user in enumerate(users):
            user.post(node1, {"i": i})
        started = time.perf_counter()
        # uvicorn re-raises the signal after its graceful shutdown: -SIGTERM, not a kill
        assert node1.terminate() in (0, -signal.SIGTERM)
        assert "handed 30 of 30 session(s) over" in node1.log_text()
        took = time.perf_counter() - started
        assert took < 3.0, f"graceful stop took {took:.2f}s"
        # The receivers adopted the sessions and gave each a new backup, so even a
        # second failure right away loses nothing.
        wait_until(
            lambda: sum(status(n)["sessions_owned"] for n in nodes[1:]) == 30, timeout=5, what="adoption"
        )
        wait_until(lambda: sum(status(n)["sessions_backed_up"] for n in nodes[1:]) >= 30, timeout=5, what="new backups")
        nodes[1].kill(signal.SIGKILL)
        for i, user in enumerate(users):
            assert user.get(nodes[2])["data"] == {"i": i}


def test_redis_restart_then_node_kill_loses_nothing(topology: Any) -> None:
    """Redis fails mid-traffic: one server is killed and restarted; in a Redis Cluster the
    primary of the broadcast channel's shard is killed and its replica promoted; with
    Sentinel the primary is killed and the replica promoted."""
    with cluster(3, redis=topology) as (server, nodes):
        fail = (lambda: server.stop(signal.SIGKILL)) if topology is None else topology.fail_over
        heal = server.start if topology is None else topology.heal
        node1 = nodes[0]
        before = [Client() for _ in range(10)]
        for i, user in enumerate(before):
            user.post(node1, {"i": i, "phase": "before"})
        fail()
        # During the outage: node1 keeps serving from memory, promptly.
        during = [Client() for _ in range(10)]
        for i, user in enumerate(during):
            started = time.perf_counter()
            user.post(node1, {"i": i, "phase": "during"})
            assert time.perf_counter() - started < 2.0
        for user in before[:5]:
            user.post(node1, {"phase": "updated during"})
        heal()
        wait_until(lambda: all(status(n)["connected"] for n in nodes), timeout=15, what="reconnect")
        wait_members(nodes, 3)
        after = [Client() for _ in range(10)]
        for i, user in enumerate(after):
            user.post(node1, {"i": i, "phase": "after"})
        # Everything written during the outage is re-replicated after the reconnect.
        wait_until(lambda: sum(status(n)["sessions_backed_up"] for n in nodes[1:]) >= 30, timeout=10, what="resync")
        wait_until(lambda: status(node1)["pending_replication"] == 0, timeout=10, what="re-replication acked")
        seen = [status(n) for n in nodes]
        node1.kill(signal.SIGKILL)
        for i, user in enumerate(before):
            phase = "updated during" if i < 5 else "before"
            assert user.get(nodes[1])["data"] == {"i": i, "phase": phase}, (seen, [status(n) for n in nodes[1:]])
        for group, phase in ((during, "during"), (after, "after")):
            for i, user in enumerate(group):
                assert user.get(nodes[2])["data"] == {"i": i, "phase": phase}


def test_forged_tampered_replayed_and_garbage_messages_are_dropped() -> None:
    with cluster(2) as (server, nodes):
        node1, node2 = nodes
        r = redis.Redis.from_url(server.url)
        sniffer = r.pubsub()
        sniffer.subscribe("clustersess:node:node2")
        user = Client()
        user.post(node1, {"v": "first"})
        captured = None
        deadline = time.monotonic() + 5
        while captured is None and time.monotonic() < deadline:
            msg = sniffer.get_message(timeout=0.5)
            if msg and msg["type"] == "message" and b'"replicate"' in msg["data"]:
                captured = msg["data"]
        assert captured is not None, "no replication message seen on node2's channel"
        user.post(node1, {"v": "second"})
        before = status(node2)["stats"]
        # garbage, a forged message (wrong key), a tampered one, and a replay
        r.publish("clustersess:node:node2", b"\x00\xffnot a message")
        r.publish("clustersess:all", b"{}")
        # the frame is b"CS2" + a 32-byte MAC + ...: flip a bit of the MAC
        forged = captured[:3] + bytes([captured[3] ^ 1]) + captured[4:]
        r.publish("clustersess:node:node2", forged)
        tampered = captured.replace(b"first", b"FORGE")
        r.publish("clustersess:node:node2", tampered)
        r.publish("clustersess:node:node2", captured)  # replay of a real, older message
        wait_until(
            lambda: status(node2)["stats"]["messages_received"] >= before["messages_received"] + 5,
            timeout=5,
            what="node2 to receive the injected messages",
        )
        after = status(node2)["stats"]
        # the garbage fails the frame's structure check before any MAC work
        assert after["messages_dropped_malformed"] - before["messages_dropped_malformed"] >= 2
        assert after["messages_dropped_auth"] - before["messages_dropped_auth"] >= 2
        dropped = ("messages_dropped_replay", "messages_dropped_stale")
        assert sum(after[k] for k in dropped) > sum(before[k] for k in dropped)
        assert after["replications_applied"] == before["replications_applied"]
        # The backup still holds the newest version: kill the owner and look.
        node1.kill(signal.SIGKILL)
        assert user.get(node2)["data"] == {"v": "second"}
        sniffer.close()
        r.close()


def test_invalidate_then_owner_death_does_not_resurrect() -> None:
    with cluster(3) as (_, nodes):
        node1 = nodes[0]
        user = Client()
        user.post(node1, {"user": "alice"})
        stolen = user.cookie
        user.request("DELETE", node1, "/api/session")
        assert user.cookie is None
        node1.kill(signal.SIGKILL)
        for node in nodes[1:]:
            late = Client(stolen)
            body = late.get(node)
            assert body["new"] and body["data"] == {}


def test_rotate_kills_old_id_cluster_wide() -> None:
    with cluster(3) as (_, nodes):
        user = Client()
        user.post(nodes[0], {"user": "bob"})
        old = user.cookie
        user.request("POST", nodes[0], "/api/session/rotate")
        assert user.cookie != old
        nodes[0].kill(signal.SIGKILL)
        assert Client(old).get(nodes[1])["new"]
        assert user.get(nodes[2])["data"] == {"user": "bob"}


def test_read_only_session_outlives_max_inactive_on_backup() -> None:
    with cluster(2, env={"CLUSTERSESS_MAX_INACTIVE": "2"}) as (_, nodes):
        node1, node2 = nodes
        user = Client()
        user.post(node1, {"x": 1})
        for _ in range(8):  # 4 s of reads, twice max_inactive, writing nothing
            time.sleep(0.5)
            assert user.get(node1)["data"] == {"x": 1}
        time.sleep(0.6)  # let the coalesced access times reach the backup
        node1.kill(signal.SIGKILL)
        assert user.get(node2)["data"] == {"x": 1}


def test_two_live_nodes_with_one_name_is_an_error() -> None:
    # Default timing (Tomcat's 500 ms / 3 s): a twin must not win just because the first
    # node was starved of CPU for a second on a busy machine.
    timing = {"CLUSTERSESS_DROP_TIME": "3.0", "CLUSTERSESS_HEARTBEAT": "0.5"}
    with cluster(1, env=timing) as (server, nodes):
        twin = NodeProcess("node1", redis_url=server.url, env=timing)
        twin.start(wait=False)
        code = twin.wait(timeout=20)
        assert code != 0
        assert "another live node is already named 'node1'" in twin.log_text()
        assert nodes[0].running


def test_restarted_node_is_a_new_incarnation() -> None:
    with cluster(2) as (_, nodes):
        node1, node2 = nodes
        user = Client()
        user.post(node1, {"k": "v"})
        first = next(m["incarnation"] for m in status(node2)["members"] if m["name"] == "node1")
        node1.kill(signal.SIGKILL)
        node1.start()  # same name, same port: waits out the old claim, then joins
        wait_members(nodes, 2)
        second = next(m["incarnation"] for m in status(node2)["members"] if m["name"] == "node1")
        assert second != first
        # The new life has no copy in memory; it takes the session over from node2.
        assert user.get(node1)["data"] == {"k": "v"}


WATCHED = (
    "takeovers", "takeover_retries", "conflicts", "takeovers_unconfirmed", "writes_after_handoff", "acks_refused",
    "reclaims", "stepped_down",
)  # fmt: skip


def test_parallel_requests_of_one_session_on_two_nodes_lose_nothing() -> None:
    """After a failover a browser's parallel requests may be spread over several nodes."""
    from concurrent.futures import ThreadPoolExecutor

    with cluster(3) as (_, nodes):
        user = Client()
        user.incr(nodes[0])
        cookie = user.cookie

        def incr(node: NodeProcess) -> int:
            return Client(cookie).request("POST", node, "/api/session/incr/n").status_code

        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(incr, [nodes[1 + i % 2] for i in range(40)]))
        statuses = [status(n) for n in nodes]
        counters = {
            s["node"]: {k: s["stats"][k] for k in WATCHED}
            for s in statuses
        }
        assert codes == [200] * 40
        owners = [s["node"] for s in statuses if s["sessions_owned"]]
        assert len(owners) == 1, counters
        assert user.get(nodes[0])["data"] == {"n": 41}, counters


def test_a_request_that_never_uses_its_session_moves_nothing() -> None:
    """Lazy ownership: a health check, a status page or a static file with the cookie of
    a session owned elsewhere fetches, takes over and re-issues nothing; the first request
    that uses the session takes it over (and a GET that writes applies its change)."""
    with cluster(2) as (_, nodes):
        node1, node2 = nodes
        user = Client()
        user.post(node1, {"cart": ["book"]})
        headers = {"Cookie": f"JSESSIONID={user.cookie}"}
        for path in ("/health", "/cluster.json"):
            r = httpx.get(node2.url + path, headers=headers, timeout=10)
            assert r.status_code == 200, (path, r.text)
            assert "set-cookie" not in r.headers and "vary" not in r.headers, (path, r.headers)
        assert status(node1)["sessions_owned"] == 1 and status(node2)["sessions_owned"] == 0
        assert status(node2)["stats"]["takeovers"] == 0
        # the first use moves it, and the cookie names the new owner
        body = user.get(node2)
        assert body["data"] == {"cart": ["book"]} and user.route == "node2"
        assert status(node2)["sessions_owned"] == 1 and status(node1)["sessions_owned"] == 0
        # a GET that writes (test.jsp's hit counter) on the other node applies its change
        r = httpx.get(node1.url + "/test.jsp", headers={"Cookie": f"JSESSIONID={user.cookie}"}, timeout=10)
        assert r.status_code == 200 and ".node1" in r.headers["set-cookie"]
        user.cookie = r.headers["set-cookie"].split(";")[0].split("=", 1)[1]
        assert user.get(node1)["data"]["cart"] == ["book"]
