"""Partial failures with real processes (issue 11): a node cut off from Redis, a node
paused, Redis paused, Redis read-only, a rolling restart; each ends by SIGKILLing the
owner(s) and checking every acknowledged write on the survivors.

Every request is recorded (tests/fault_utils.py ``History``) and the checker there decides.
The rules, by ``CLUSTERSESS_ON_REPLICATION_FAILURE``:

* ``refuse``: a write answered 200 was replicated, so the owner is killed as soon as the
  fault has healed, without waiting; a write that could not be confirmed gets 503.
* ``serve`` (the default): writes are answered 200 from memory even when they cannot be
  replicated; once the fault has healed and the cluster has settled (every node's
  ``/health`` 200 and ``"pending_replication": 0``), an owner's death loses none of them.

Always: the survivors agree on every session, counters never fall below an acknowledged
increment, a logout answered 200 never comes back, and ``/health`` is 503 while a node
is fenced (observable when one node is cut off) and 200 soon after it rejoins.

Timing: the FAST settings (heartbeat 0.2 s, drop time 1 s, ack timeout 1 s); every wait
is for a condition, with a generous timeout; no duration is asserted.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import pytest
import redis

from tests.fault_utils import (
    HEAL_TIMEOUT,
    REFUSE,
    SERVE,
    Client,
    FaultCluster,
    History,
    Mode,
    Verdict,
    Writers,
    check,
    emit,
    finish,
    fresh_members,
    health,
    observe,
    status,
)
from tests.faultproxy import Direction
from tests.utils import free_port

pytestmark = pytest.mark.timeout(150)

MODES = [pytest.param(SERVE, id="serve"), pytest.param(REFUSE, id="refuse")]


def conclude(verdict: Verdict) -> None:
    emit(verdict)
    assert verdict.ok, verdict.report()


@pytest.fixture
def history() -> Iterator[History]:
    yield History()


# -- the checker itself (no processes) ------------------------------------------------------


def _op(history: History, client: str, kind: str, **kw: object) -> None:
    fields: dict[str, object] = {
        "client": client, "node": "node1", "session": "s-" + client, "kind": kind, "key": None, "value": None,
        "status": 200, "data": None, "new": False, "phase": "fault", "start": 0.0, "end": 0.0,
    }  # fmt: skip
    fields.update(kw)
    history.add(**fields)


def test_checker_passes_a_clean_history(history: History) -> None:
    _op(history, "a", "put", key="w1", value=1, data={"w1": 1})
    _op(history, "a", "incr", key="n", value=1, data={"w1": 1, "n": 1})
    _op(history, "a", "put", key="w2", value=2, status=503)  # refused: may or may not persist
    for node in ("node2", "node3"):
        _op(history, "a", "read", node=node, final=True, data={"w1": 1, "n": 1, "w2": 2})
    verdict = check(history.ops, Verdict("clean"))
    assert verdict.ok, verdict.report()
    assert (verdict.acknowledged, verdict.refused, verdict.lost) == (2, 1, 0)


def test_checker_finds_lost_writes_low_counters_and_disagreement(history: History) -> None:
    _op(history, "a", "put", key="w1", value=1, phase="before")
    _op(history, "a", "incr", key="n", value=1)
    _op(history, "a", "put", key="w2", value=2)
    _op(history, "a", "incr", key="n", value=2)
    _op(history, "a", "read", node="node2", final=True, data={"w1": 1, "n": 1})
    _op(history, "a", "read", node="node3", final=True, data={"w1": 1, "w2": 2, "n": 2})
    verdict = check(history.ops, Verdict("lossy"))
    assert not verdict.ok
    assert verdict.lost == 2  # w2, and the second increment (the worst survivor counts)
    assert verdict.lost_by_phase == {"fault": 2}
    assert verdict.disagreements == 1


def test_checker_finds_a_resurrected_logout_a_lost_session_and_a_phantom(history: History) -> None:
    _op(history, "a", "put", key="w1", value=1)
    _op(history, "a", "logout")
    _op(history, "a", "read", node="node2", final=True, data={"w1": 1})
    _op(history, "b", "put", key="w1", value=1)
    _op(history, "b", "read", node="node2", final=True, new=True, data={})
    _op(history, "c", "put", key="w1", value=1)
    _op(history, "c", "read", node="node2", final=True, data={"w1": 1, "w9": 9})
    verdict = check(history.ops, Verdict("bad"))
    assert verdict.resurrected == 1
    assert verdict.sessions_lost == 1 and verdict.lost == 1
    assert any("never written" in p for p in verdict.problems)


def test_checker_leaves_unconfirmed_logouts_and_writes_alone(history: History) -> None:
    _op(history, "a", "put", key="w1", value=1, status=None)  # no answer
    _op(history, "a", "read", node="node2", final=True, data={})
    _op(history, "b", "put", key="w1", value=1)
    _op(history, "b", "logout", status=503)  # may or may not have happened: not checked
    verdict = check(history.ops, Verdict("unknown"))
    assert verdict.ok, verdict.report()
    assert verdict.unanswered == 1


# -- scenarios ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("direction", "mode", "heal"),
    [
        pytest.param("both", SERVE, True, id="both-serve"),
        pytest.param("both", REFUSE, True, id="both-refuse"),
        # A 200 meant "replicated": it must survive even if node1 never comes back.
        pytest.param("both", REFUSE, False, id="both-refuse-killed-while-cut"),
        # node1 is heard by all but hears nobody (not even itself): the zombie subscriber
        pytest.param("s2c", SERVE, True, id="s2c-serve"),
    ],
)
def test_node_cut_off_from_redis_while_its_clients_write(direction: Direction, mode: Mode, heal: bool) -> None:
    """node1's link to Redis is blackholed (both ways, or Redis->node1 only), connections
    kept open, for longer than the drop time, while its users keep writing to it directly
    (and node2's users to node2); then healed (or not). node1 is then SIGKILLed."""
    verdict = Verdict(f"cut-off-{direction}{'' if heal else '-killed-while-cut'}[{mode}]")
    with FaultCluster(3, env=mode.env, proxied=["node1"]) as cl:
        node1, node2, _node3 = cl.nodes
        cut = cl.new_clients(node1, 4, "a") + cl.new_clients(node2, 2, "b")
        leaving = cl.new_clients(node1, 1, "logout")[0]
        with Writers(cut):
            time.sleep(1.0)
            cl.history.phase = "fault"
            cl.proxies["node1"].blackhole(direction)
            seen: dict[str, set[int | None]] = {n.name: set() for n in cl.nodes}
            # each node's /cluster.json "health" "state", if it has one
            states: dict[str, set[str]] = {n.name: set() for n in cl.nodes}

            def fenced() -> bool:
                for node in cl.nodes:
                    seen[node.name].add(health(node, timeout=2.0))
                    verdict_of = (status(node, timeout=2.0) or {}).get("health")
                    if isinstance(verdict_of, dict):
                        states[node.name].add(str(verdict_of.get("state")))
                return 503 in seen["node1"]

            # Longer than drop time plus any lease; longer still until node1 says it is fenced.
            observe(cl, seconds=4.0, until=fenced, max_seconds=8.0)
            # One logout on the cut-off node: if it is answered 200 it must never come back.
            leaving.logout()
            verdict.notes["health_seen_during_cut"] = {k: sorted(map(str, v)) for k, v in seen.items()}
            verdict.notes["health_states_during_cut"] = {k: sorted(v) for k, v in states.items()}
            verdict.require(503 in seen["node1"], f"node1's /health never said 503 while it was cut off: {seen}")
            verdict.require(
                seen["node2"] == {200} and seen["node3"] == {200},
                f"the nodes that were not cut off should stay healthy: {seen}",
            )
            if heal:
                cl.history.phase = "healed"
                cl.proxies["node1"].heal()
                verdict.require(
                    cl.wait_health(node1, 200, HEAL_TIMEOUT),
                    f"node1's /health not 200 within {HEAL_TIMEOUT}s of the heal",
                )
                time.sleep(1.0)
        finish(cl, verdict, mode=mode, victims=[node1])
        conclude(verdict)


@pytest.mark.parametrize("mode", MODES)
def test_node_paused_past_the_drop_time_then_written_to(mode: Mode) -> None:
    """node1 is SIGSTOPped for three drop times (its users' requests wait in the kernel),
    SIGCONTed and written to; node1 is then SIGKILLed."""
    verdict = Verdict(f"node-paused[{mode}]")
    with FaultCluster(3, env=mode.env) as cl:
        node1, node2, _node3 = cl.nodes
        users = cl.new_clients(node1, 6, "a") + cl.new_clients(node2, 2, "b")
        with Writers(users):
            time.sleep(1.0)
            cl.history.phase = "fault"
            cl.pause(node1.pid)
            time.sleep(3 * cl.drop_time)
            # The others have had time to presume it dead (and adopt its sessions).
            verdict.notes["node2_members_during_pause"] = sorted(fresh_members(status(node2) or {}, cl.drop_time))
            cl.history.phase = "resumed"
            cl.resume(node1.pid)
            time.sleep(2.0)
        verdict.require(
            cl.wait_health(node1, 200, HEAL_TIMEOUT), f"node1's /health not 200 within {HEAL_TIMEOUT}s of SIGCONT"
        )
        finish(cl, verdict, mode=mode, victims=[node1])
        conclude(verdict)


@pytest.mark.parametrize("mode", MODES)
def test_redis_paused_with_writes_in_flight(mode: Mode) -> None:
    """Redis is SIGSTOPped for four seconds while users of node1 and node2 write, then
    SIGCONTed (issue 11: "5 of 5 writes answered 200 during the freeze were gone once
    their owner died"); node1 is then SIGKILLed."""
    verdict = Verdict(f"redis-paused[{mode}]")
    with FaultCluster(3, env=mode.env) as cl:
        node1, node2, _node3 = cl.nodes
        users = cl.new_clients(node1, 4, "a") + cl.new_clients(node2, 2, "b")
        with Writers(users):
            time.sleep(1.0)
            cl.history.phase = "fault"
            cl.pause(cl.redis.proc.pid if cl.redis.proc else None)
            time.sleep(4.0)
            cl.history.phase = "healed"
            cl.resume(cl.redis.proc.pid if cl.redis.proc else None)
            time.sleep(1.0)
        for node in cl.nodes:
            verdict.require(
                cl.wait_health(node, 200, HEAL_TIMEOUT),
                f"{node.name}'s /health not 200 within {HEAL_TIMEOUT}s after Redis resumed",
            )
        finish(cl, verdict, mode=mode, victims=[node1])
        conclude(verdict)


def test_redis_read_only_for_a_moment() -> None:
    """The nodes' Redis turns into a replica of a master that does not exist (READONLY for
    every write, as during a Redis failover) for two seconds, then back. Every background
    task must survive: the members stay live and replication works afterwards."""
    mode = SERVE
    verdict = Verdict("redis-readonly[serve]")
    with FaultCluster(3, env=mode.env) as cl:
        node1, node2, _node3 = cl.nodes
        users = cl.new_clients(node1, 4, "a") + cl.new_clients(node2, 2, "b")
        admin = redis.Redis(host=cl.redis.host, port=cl.redis.port, socket_timeout=5.0)
        try:
            with Writers(users):
                time.sleep(0.5)
                cl.history.phase = "fault"
                admin.replicaof("127.0.0.1", str(free_port()))
                time.sleep(2.0)
                cl.history.phase = "healed"
                admin.replicaof("NO", "ONE")
                time.sleep(1.0)
        finally:
            admin.close()
        # Past a few drop times: a node whose heartbeat (or receiver) died would be gone
        # from the others' member lists, and its own list would go stale.
        time.sleep(3 * cl.drop_time)
        try:
            cl.wait_members(timeout=10.0)
        except TimeoutError as exc:
            verdict.problems.append(f"members not live after READONLY: {exc}")
        # Supervised tasks may have restarted meanwhile, but they must be running again.
        deadline = time.monotonic() + 10.0
        while (stuck := cl.tasks_not_running()) and time.monotonic() < deadline:
            time.sleep(0.2)
        verdict.require(not stuck, f"background tasks not running after READONLY: {stuck}")
        cl.history.phase = "after"
        for user in users:
            if user.active:
                for _ in range(3):
                    op = user.write()
                    verdict.require(op.ok, f"a write after the READONLY spell was not answered 200: {op.line()}")
        finish(cl, verdict, mode=mode, victims=[node1])
        conclude(verdict)


def test_rolling_restart_in_async_mode_right_after_writes() -> None:
    """Async replication: a burst of writes to every session, and SIGTERM to one node
    while it lasts, restart it, and on to the next node. Just before the SIGTERM the
    stopping node's link to Redis gets 250 ms of latency each way (a Redis far away, or
    busy), so writes it has answered are still on their way to the backups when it stops;
    the latency starts too late to make the node think it is cut off (its own heartbeats
    would need 4 intervals to go missing) before it is stopping. At the end node3, the
    last one restarted, is SIGKILLed."""
    mode = SERVE
    verdict = Verdict("rolling-restart[async]")
    names = ["node1", "node2", "node3"]
    with FaultCluster(3, env={**mode.env, "CLUSTERSESS_REPLICATION": "async"}, proxied=names) as cl:
        users: list[Client] = []
        for node in cl.nodes:
            users += cl.new_clients(node, 3, f"{node.name}-")
        for node in cl.nodes:
            cl.history.phase = f"burst-before-{node.name}-stops"
            for user in users:
                user.home = cl.node(user.route or user.home.name)  # a sticky balancer's choice
            with Writers(users, pause=0.01):
                time.sleep(0.5)
                cl.proxies[node.name].delay(0.25)
                time.sleep(0.05)
                assert node.proc is not None
                node.proc.send_signal(signal.SIGTERM)
                time.sleep(0.05)
            code = node.wait(timeout=15.0)
            cl.proxies[node.name].heal()
            verdict.require(code in (0, -signal.SIGTERM), f"{node.name} exited with {code} on SIGTERM")
            cl.history.phase = f"{node.name}-restarting"
            node.start()
            cl.wait_members()
        cl.history.phase = "after"
        for user in users:
            user.home = cl.node(user.route or user.home.name)
            user.write()
        finish(cl, verdict, mode=mode, victims=[cl.node("node3")], unanswered_ok=True)
        conclude(verdict)
