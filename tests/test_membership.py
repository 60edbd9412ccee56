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
from clustersess.cluster.membership import Membership, new_incarnation, pick_backup
from tests.memcluster import FAST, Cluster, Peer, eventually, read, token_of, write

TOKENS = [ids.new_token() for _ in range(10_000)]
NODES = ["n1", "n2", "n3", "n4"]


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with Cluster() as c:
        yield c


def members(me: str, others: list[str], now: float = 0.0) -> Membership:
    table = Membership(me, drop_time=3.0)
    for name in others:
        table.heard(name, "1700000000000-00000000", now)
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


def test_suspect_members_are_skipped_until_heard_again() -> None:
    table = members("n1", ["n2", "n3"])
    token = next(t for t in TOKENS if table.backup_for(t) == "n2")
    table.members["n2"].suspect = True
    assert table.backup_for(token) == "n3"
    table.heard("n2", "1700000000000-00000000", 1.0)
    assert table.backup_for(token) == "n2"
    assert table.backup_for(token, exclude=["n2", "n3"]) is None


# -- incarnations and expiry ----------------------------------------------------------------
def test_incarnations_sort_by_start_time() -> None:
    first = new_incarnation()
    time.sleep(0.002)
    second = new_incarnation()
    assert first < second
    assert len({new_incarnation() for _ in range(100)}) == 100  # the random tail


def test_incarnation_ordering() -> None:
    old, new, newer = "1700000000000-aaaaaaaa", "1700000000500-00000000", "1700000001000-00000000"
    table = Membership("n1", drop_time=3.0)
    assert table.heard("n2", new, 10.0) == (True, None)
    # a message from an older life is no sign of life
    assert table.heard("n2", old, 11.0) == (False, None)
    assert not table.is_current("n2", old) and table.is_current("n2", new)
    assert table.members["n2"].last_seen == 10.0 and table.members["n2"].incarnation == new
    # the same life refreshes
    assert table.heard("n2", new, 12.0) == (False, None)
    assert table.members["n2"].last_seen == 12.0
    # a newer life replaces the member: the caller treats the old one as lost
    is_new, replaced = table.heard("n2", newer, 13.0)
    assert is_new and replaced is not None and replaced.incarnation == new
    assert table.members["n2"].incarnation == newer
    assert not table.is_current("n2", new)


def test_a_member_that_left_is_not_revived_by_its_late_messages() -> None:
    table = members("n1", ["n2"])
    inc = table.members["n2"].incarnation
    assert table.leave("n2", inc) is not None
    assert table.heard("n2", inc, 5.0) == (False, None)
    assert table.live() == []
    assert table.heard("n2", inc[:-1] + "1", 6.0) == (True, None)  # a new life may join


def test_members_expire_after_drop_time() -> None:
    table = members("n1", ["n2", "n3"], now=100.0)
    table.heard("n3", "1700000000000-00000000", 102.0)
    assert table.expire(103.0) == []  # exactly drop_time is still alive
    assert [x.name for x in table.expire(103.01)] == ["n2"]
    assert table.live() == ["n3"]
    # after our own outage we heard nothing, which is no evidence of death
    table.refresh_all(200.0)
    assert table.expire(202.0) == []
    assert [x.name for x in table.expire(203.5)] == ["n3"]


# -- through live nodes ---------------------------------------------------------------------
async def test_nodes_discover_each_other_and_expire_a_silent_one(cluster: Cluster) -> None:
    n1, n2, _ = await cluster.start("n1", "n2", "n3", drop_time=0.3)
    status = n1.status()
    assert [x["name"] for x in status["members"]] == ["n1", "n2", "n3"]
    assert [x["state"] for x in status["members"]] == ["up", "up", "up"]
    await cluster.crash("n3")
    # When each survivor last heard n3 (monotonic, the clock membership uses): nothing
    # from n3 arrives after the crash.
    last_heard = {node: node.cluster.members.members["n3"].last_seen for node in (n1, n2)}
    await eventually(
        lambda: "n3" not in n1.cluster.members.live() and "n3" not in n2.cluster.members.live(),
        timeout=10.0,
    )
    dropped = time.monotonic()
    # Never dropped before drop_time of silence. No upper bound but the generous timeout:
    # on a loaded machine the check can run late, and that is not a protocol failure.
    for node, heard in last_heard.items():
        assert dropped - heard > 0.3, (node.node, dropped - heard)
    assert n1.cluster.members.live() == ["n2"]


async def test_leave_removes_a_member_at_once(cluster: Cluster) -> None:
    n1, _ = await cluster.start("n1", "n2", drop_time=5.0)
    await cluster.stop("n2")
    await eventually(lambda: n1.cluster.members.live() == [], timeout=1.0)
    await asyncio.sleep(0.1)
    assert n1.cluster.members.live() == []


async def test_a_message_from_an_older_incarnation_is_refused(cluster: Cluster) -> None:
    [n1] = await cluster.start("n1")
    old, new = Peer(cluster.bus, "p"), Peer(cluster.bus, "p")
    old.incarnation, new.incarnation = "1700000000000-00000000", "1700000005000-00000000"
    await new.send(new.all, m.Heartbeat("new", 0, 0))
    token = ids.new_token()
    await old.send(old.all, m.Heartbeat("old", 0, 0))
    await old.send(n1.cluster.ch_me, m.Replicate((m.SessionState(token, "p", 0, 1, 1.0, 1.0, "{}"),)))
    assert n1.stats.messages_dropped_stale == 2
    assert token not in n1.store.backups
    member = n1.cluster.members.members["p"]
    assert (member.incarnation, member.address) == (new.incarnation, "new")


async def test_a_newer_incarnation_replaces_the_member_and_its_sessions_are_adopted(cluster: Cluster) -> None:
    n1, n2, n3 = await cluster.start("n1", "n2", "n3", drop_time=5.0)  # no expiry during the test
    cookies = [await write(n2, None, i=i) for i in range(20)]
    tokens = [token_of(n2, c) for c in cookies]
    backed_up_on = {t: n2.store.owned[t].backup for t in tokens}
    old_inc = n2.cluster.incarnation
    await cluster.crash("n2")
    cluster.bus.keys.pop("clustersess:claim:n2", None)  # the claim's TTL, which the bus does not model
    n2 = await cluster.add("n2", drop_time=5.0)  # restarted under the same name, memory empty
    assert n2.cluster.incarnation > old_inc
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
