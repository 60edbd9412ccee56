"""Zones on the wire and in the member table: backups leave the owner's zone.

In memory (real managers on one MemoryBus); the real-process version, with both members
of a zone SIGKILLed at once, is ``test_zone_failover.py``.
"""

from __future__ import annotations

import time

import pytest

from clustersess.cluster import messages as m
from clustersess.cluster.membership import Membership
from tests.memcluster import Cluster, Peer, cluster, eventually, read, token_of, write

pytestmark = pytest.mark.timeout(30)

__all__ = ["cluster"]  # the fixture

ZONES = {"a1": "zoneA", "a2": "zoneA", "b1": "zoneB", "b2": "zoneB"}


def test_the_member_table_places_backups_in_another_zone() -> None:
    table = Membership("a1", zone="zoneA")
    for name in ("a2", "b1", "b2"):
        member, _ = table.admit(name, "i1", 0.0)
        member.zone = ZONES[name]
    tokens = [f"{i:032x}" for i in range(300)]
    assert all(table.backup_for(t) in ("b1", "b2") for t in tokens)
    assert {table.backup_for(t) for t in tokens} == {"b1", "b2"}  # and spread over both
    # Zone B unreachable: a backup next door is better than none.
    for name in ("b1", "b2"):
        table.members[name].unreachable = True
    assert {table.backup_for(t) for t in tokens} == {"a2"}


async def start_zoned(cluster: Cluster) -> None:
    for name, zone in ZONES.items():
        await cluster.add(name, zone=zone)
    await cluster.joined()


async def test_every_backup_is_in_the_other_zone_and_a_whole_zone_can_die(cluster: Cluster) -> None:
    await start_zoned(cluster)
    for name, manager in cluster.nodes.items():
        assert manager.cluster is not None
        await eventually(lambda mg=manager: all(mm.zone for mm in mg.cluster.members.members.values()))  # type: ignore[union-attr]
        assert manager.status()["members"][0]["zone"] == ZONES[name]
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


async def test_a_member_whose_zone_becomes_known_gets_its_backups_moved(cluster: Cluster) -> None:
    a1 = await cluster.add("a1", zone="zoneA")
    b1 = await cluster.add("b1", zone="zoneB")
    await cluster.joined()
    peer = Peer(cluster.bus, "a2", auto_ack=True)
    await peer.send(peer.all, m.Heartbeat("a2:1", 0, 0, time.time(), True, ""))  # zone not known yet
    assert a1.cluster is not None
    await eventually(lambda: "a2" in a1.cluster.members.members)  # type: ignore[union-attr]
    tokens = []
    for _ in range(30):
        tokens.append(token_of(a1, await write(a1, None, x=1)))
    on_peer = [t for t in tokens if a1.store.owned[t].backup == "a2"]
    assert on_peer  # an unknown zone counts as another zone than a1's
    # a2 announces that it shares a1's zone: its backups of a1's sessions move to zone B.
    await peer.send(peer.all, m.Heartbeat("a2:1", 0, 0, time.time(), False, "zoneA"))
    await eventually(lambda: all(a1.store.owned[t].backup == "b1" and t in b1.store.backups for t in on_peer))
