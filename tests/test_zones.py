"""Zones on the wire and in the member table: backups leave the owner's zone.

In memory (real managers on one MemoryBus); the real-process version, with both members
of a zone SIGKILLed at once, is ``test_zone_failover.py``.
"""

from __future__ import annotations

import pytest

from clustersess.cluster import messages as m
from clustersess.cluster.membership import Membership
from clustersess.cluster.placement import choose_backup
from tests.memcluster import Cluster, Peer, cluster, eventually, read, token_of, write

pytestmark = pytest.mark.timeout(30)

__all__ = ["cluster"]  # the fixture

ZONES = {"a1": "zoneA", "a2": "zoneA", "b1": "zoneB", "b2": "zoneB"}


def test_heartbeat_carries_the_zone_and_older_heartbeats_still_parse() -> None:
    beat = m.Heartbeat("host:1", 3, 4, False, "rack-1")
    assert m.Heartbeat.from_json(beat.to_json()) == beat
    old = {"addr": "host:1", "owned": 3, "backups": 4, "hello": False}  # a node of an older release
    assert m.Heartbeat.from_json(old).zone == ""
    for bad in (7, "rack 1", "x" * 300):
        with pytest.raises(m.Malformed):
            m.Heartbeat.from_json({**old, "zone": bad})


def test_membership_remembers_zones_and_answers_for_a_dead_owner() -> None:
    table = Membership("a1", 3.0, zone="zoneA")
    table.heard("a2", "i1", 0.0, zone="zoneA")
    table.heard("b1", "i1", 0.0, zone="zoneB")
    table.heard("b2", "i1", 0.0)  # not a heartbeat: zone not known yet
    assert table.members["b2"].zone == ""
    table.heard("b2", "i1", 0.1, zone="zoneB")  # remembered; the node updates the member (and rebalances)
    assert table.zone_of("b2") == "zoneB" and table.members["b2"].zone == ""
    table.members["b2"].zone = "zoneB"
    assert [table.zone_of(n) for n in ("a1", "a2", "b1")] == ["zoneA", "zoneA", "zoneB"]
    tokens = [f"{i:032x}" for i in range(300)]
    assert all(table.backup_for(t) in ("b1", "b2") for t in tokens)
    # b1 is dead and gone from the table; its zone is still known, so a survivor computes
    # the backup b1 had chosen among the members it saw.
    table.remove("b1")
    view = {"a1", "a2", "b1", "b2"}
    for t in tokens:
        expected = choose_backup(t, "zoneB", {n: ZONES[n] for n in view - {"b1"}})
        assert table.backup_chosen_by("b1", t, view) == expected
    # A restarted member is known by its zone before its first heartbeat of the new life.
    table.heard("b1", "i2", 1.0)
    assert table.members["b1"].zone == "zoneB"


async def start_zoned(cluster: Cluster) -> None:
    for name, zone in ZONES.items():
        await cluster.add(name, zone=zone)
    await cluster.joined()


async def test_every_backup_is_in_the_other_zone_and_a_whole_zone_can_die(cluster: Cluster) -> None:
    await start_zoned(cluster)
    sessions = []
    for i in range(40):
        owner = cluster.nodes[list(ZONES)[i % 4]]
        cookie = await write(owner, None, n=i)
        sessions.append((cookie, token_of(owner, cookie), i))
    for _, token, _ in sessions:
        holders = cluster.holders(token)
        assert len(holders) == 2 and {ZONES[n] for n in holders} == {"zoneA", "zoneB"}, holders
    # Both members of zone B crash at the same moment: every session survives in zone A.
    await cluster.crash("b1")
    await cluster.crash("b2")
    for cookie, _, i in sessions:
        data, new, _ = await read(cluster.nodes["a1"], cookie)
        assert (data, new) == ({"n": i}, False)


async def test_a_member_first_heard_without_its_zone_is_rebalanced_when_it_announces_one(cluster: Cluster) -> None:
    a1 = await cluster.add("a1", zone="zoneA")
    # A peer in a1's own zone, first heard through a non-heartbeat message.
    peer = Peer(cluster.bus, "a2", auto_ack=True)
    await peer.send(peer.all, m.Resync())
    assert a1.cluster is not None and a1.cluster.members.members["a2"].zone == ""
    cookie = await write(a1, None, x=1)
    token = token_of(a1, cookie)
    assert a1.store.owned[token].backup == "a2"  # the only member; zone unknown yet
    b1 = await cluster.add("b1", zone="zoneB")
    await peer.send(peer.all, m.Heartbeat("a2:1", 0, 0, False, "zoneA"))
    # Now a2 is known to share a1's zone: the session's backup moves to zone B.
    await eventually(lambda: a1.store.owned[token].backup == "b1" and token in b1.store.backups)
