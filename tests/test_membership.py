"""Membership: rendezvous backups, incarnations, expiry; then the same through live nodes."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import AsyncIterator

import pytest

from clustersess import Config, DuplicateNodeError, SessionManager, ids
from clustersess.cluster import messages as m
from clustersess.cluster.membership import RETIRED_LIMIT, Membership, new_incarnation, pick_backup
from tests.memcluster import FAST, Cluster, Peer, eventually, read, token_of, write

TOKENS = [ids.new_token() for _ in range(10_000)]
NODES = ["n1", "n2", "n3", "n4"]


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with Cluster() as c:
        yield c


def members(me: str, others: list[str], now: float = 0.0) -> Membership:
    table = Membership(me)
    for name in others:
        table.admit(name, "inc-" + name, now)
    return table


# -- rendezvous backups ---------------------------------------------------------------------
def test_backup_is_deterministic_whatever_the_order_of_members() -> None:
    rng = random.Random(7)
    for token in TOKENS[:500]:
        shuffled = NODES[:]
        rng.shuffle(shuffled)
        assert pick_backup(token, shuffled) == pick_backup(token, NODES) == pick_backup(token, reversed(NODES))
    assert pick_backup(TOKENS[0], []) is None


def test_every_node_computes_the_same_backup_and_never_the_owner() -> None:
    tables = {me: members(me, [n for n in NODES if n != me]) for me in NODES}
    for token in TOKENS[:2000]:
        for owner in NODES:
            chosen = tables[owner].backup_for(token)
            assert chosen is not None and chosen != owner
            # any other node, asked on the owner's behalf (as in adoption), agrees
            for other in NODES:
                if other != owner:
                    view = set(tables[other].live()) | {other}
                    assert pick_backup(token, view - {owner}) == chosen


def test_backups_spread_evenly_over_four_nodes() -> None:
    counts = Counter(pick_backup(t, NODES) for t in TOKENS)
    even = len(TOKENS) / len(NODES)
    assert set(counts) == set(NODES)
    for n in counts.values():
        assert 0.8 * even <= n <= 1.2 * even, counts
    # and from each owner's view (three candidates each)
    for owner in NODES:
        counts = Counter(pick_backup(t, [n for n in NODES if n != owner]) for t in TOKENS)
        assert all(0.8 * len(TOKENS) / 3 <= n <= 1.2 * len(TOKENS) / 3 for n in counts.values()), (owner, counts)


def test_a_joining_member_takes_only_its_share() -> None:
    before = {t: pick_backup(t, NODES) for t in TOKENS}
    after = {t: pick_backup(t, [*NODES, "n5"]) for t in TOKENS}
    moved = [t for t in TOKENS if before[t] != after[t]]
    assert all(after[t] == "n5" for t in moved)  # nothing moves between the old members
    assert 0.8 * len(TOKENS) / 5 <= len(moved) <= 1.2 * len(TOKENS) / 5


def test_a_leaving_member_moves_only_its_own_backups() -> None:
    before = {t: pick_backup(t, NODES) for t in TOKENS}
    after = {t: pick_backup(t, ["n1", "n2", "n4"]) for t in TOKENS}
    assert {t for t in TOKENS if before[t] != after[t]} == {t for t in TOKENS if before[t] == "n3"}


def test_unreachable_suspected_and_leaving_members_are_skipped_until_heard_again() -> None:
    table = members("n1", ["n2", "n3"])
    token = next(t for t in TOKENS if table.backup_for(t) == "n2")
    n2 = table.members["n2"]
    for flag in ("unreachable", "suspected"):
        setattr(n2, flag, True)
        assert table.backup_for(token) == "n3"
        table.heard(n2, 1.0)  # a sign of life clears both
        assert table.backup_for(token) == "n2"
    n2.leaving = True  # a member handing its sessions over is never chosen again
    table.heard(n2, 2.0)
    assert table.backup_for(token) == "n3"
    assert table.backup_for(token, exclude=["n2", "n3"]) is None


# -- incarnations and silence ----------------------------------------------------------------
def test_incarnations_are_random_and_ordered_only_by_admission() -> None:
    assert len({new_incarnation() for _ in range(100)}) == 100
    table = Membership("n1")
    first, _ = table.admit("n2", "aaaa", 10.0)
    assert table.current("n2", "aaaa") is first
    # a newer life (admitted because Redis names it as the claim's holder) replaces it,
    # whatever its host clock said: the old one is retired, and stays refused
    second, replaced = table.admit("n2", "0000", 11.0)
    assert replaced is first and table.current("n2", "0000") is second
    assert table.current("n2", "aaaa") is None and table.is_retired("n2", "aaaa")


def test_a_retired_incarnation_stays_retired_and_the_table_is_bounded() -> None:
    table = members("n1", ["n2"])
    assert table.retire("n2", "inc-n2") is not None
    assert table.is_retired("n2", "inc-n2") and table.live() == []
    for i in range(RETIRED_LIMIT + 10):
        table.retire("x", str(i))
    assert len(table.retired) == RETIRED_LIMIT


def test_silence_counts_only_while_we_were_connected() -> None:
    table = members("n1", ["n2", "n3"], now=100.0)
    table.heard(table.members["n3"], 102.0)
    assert table.silent(103.0, connected_since=0.0, drop_time=3.0) == []  # exactly drop_time: alive
    assert [x.name for x in table.silent(103.01, connected_since=0.0, drop_time=3.0)] == ["n2"]
    # we were cut off ourselves until 200: what we did not hear before proves nothing
    assert table.silent(202.0, connected_since=200.0, drop_time=3.0) == []
    assert {x.name for x in table.silent(203.5, connected_since=200.0, drop_time=3.0)} == {"n2", "n3"}


# -- through live nodes ---------------------------------------------------------------------
async def test_nodes_discover_each_other_and_adopt_a_silent_one_after_its_lease(cluster: Cluster) -> None:
    n1, n2, n3 = await cluster.start("n1", "n2", "n3", drop_time=0.3)
    status = n1.status()
    assert [x["name"] for x in status["members"]] == ["n1", "n2", "n3"]
    assert [x["state"] for x in status["members"]] == ["up", "up", "up"]
    assert status["health"]["ok"]
    cookie = await write(n3, None, a=1)
    token = token_of(n3, cookie)
    backup = cluster.nodes[n3.store.owned[token].backup]  # type: ignore[index]
    await cluster.crash("n3")
    await eventually(lambda: "n3" not in n1.cluster.members.members and "n3" not in n2.cluster.members.members)
    # it was adopted only once its lease (the claim in Redis) had lapsed
    assert cluster.bus.get("clustersess:claim:{n3}") is None
    await eventually(lambda: token in backup.store.owned, what="adoption")
    assert n1.cluster.members.live() == ["n2"]


async def test_leave_removes_a_member_at_once(cluster: Cluster) -> None:
    n1, _ = await cluster.start("n1", "n2", drop_time=5.0)
    await cluster.stop("n2")
    await eventually(lambda: n1.cluster.members.live() == [], timeout=1.0)
    await asyncio.sleep(0.1)
    assert n1.cluster.members.live() == []


async def test_an_incarnation_that_does_not_hold_its_name_is_never_a_member(cluster: Cluster) -> None:
    [n1] = await cluster.start("n1")
    old, new = Peer(cluster.bus, "p"), Peer(cluster.bus, "p")  # the later one holds the claim
    await new.send(new.all, new.heartbeat())
    token = ids.new_token()
    state = m.SessionState(token, "p", 0, ("p", 1), 1.0, 0.0, b"{}")
    await old.send(old.all, old.heartbeat())
    await old.send(n1.cluster.ch_me, m.Replicate((state,)))
    await eventually(lambda: n1.stats.messages_dropped_unknown_member == 2)
    assert token not in n1.store.backups
    member = n1.cluster.members.members["p"]
    assert (member.incarnation, member.address) == (new.incarnation, "peer:1")


async def test_a_newer_incarnation_replaces_the_member_and_its_sessions_are_adopted(cluster: Cluster) -> None:
    n1, n2, n3 = await cluster.start("n1", "n2", "n3", drop_time=5.0)  # no suspicion during the test
    cookies = [await write(n2, None, i=i) for i in range(20)]
    tokens = [token_of(n2, c) for c in cookies]
    backed_up_on = {t: n2.store.owned[t].backup for t in tokens}
    old_inc = n2.cluster.incarnation
    await cluster.crash("n2")
    cluster.bus.keys.pop("clustersess:claim:{n2}", None)  # rather than waiting out its 5 s lease
    n2 = await cluster.add("n2", drop_time=5.0)  # restarted under the same name, memory empty
    assert n2.cluster.incarnation != old_inc
    await eventually(
        lambda: all(mg.cluster.members.members["n2"].incarnation == n2.cluster.incarnation for mg in (n1, n3))
    )
    # the old life's sessions are adopted by the backups it chose, and get a new backup
    adopted = lambda: [t for t in tokens if t in cluster.nodes[backed_up_on[t]].store.owned]
    await eventually(lambda: len(adopted()) == len(tokens), what=f"adoption ({len(adopted())} of {len(tokens)})")
    assert n1.stats.adopted + n3.stats.adopted == 20
    await eventually(lambda: all(len(cluster.holders(t)) == 2 for t in tokens), what="new backups")
    for i, cookie in enumerate(cookies):
        data, _, _ = await read(n2, cookie)
        assert data == {"i": i}


async def test_a_second_live_node_with_the_same_name_is_refused(cluster: Cluster) -> None:
    await cluster.start("n1")
    twin = SessionManager(Config(node_name="n1", **FAST), transport=cluster.bus.transport())
    started = time.perf_counter()
    with pytest.raises(DuplicateNodeError, match="CLUSTERSESS_NODE"):
        await twin.start()
    assert time.perf_counter() - started < FAST["drop_time"] + FAST["heartbeat_interval"] + 0.5
    assert twin._runner is None  # a failed start leaves no background task behind
    assert not any(twin.cluster._on_message in subs for subs in cluster.bus.subscribers.values())  # type: ignore[union-attr]


async def test_stop_without_the_bus_returns_at_once(cluster: Cluster) -> None:
    n1, n2 = await cluster.start("n1", "n2")
    cookie = await write(n1, None, a=1)
    cluster.bus.down = True
    await eventually(lambda: not n1.cluster.transport.connected)  # type: ignore[union-attr]
    started = time.perf_counter()
    await cluster.stop("n1")
    assert time.perf_counter() - started < 0.2
    assert n1.stats.handed_over == 0
    cluster.bus.down = False
    # n2 never heard a LEAVE: it finds out after the drop time and adopts from its copy
    await eventually(lambda: token_of(n2, cookie) in n2.store.owned, what="adoption")
