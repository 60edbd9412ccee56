"""Replication, takeover, invalidation, hand-off and adoption, in memory and fast.

Several real :class:`SessionManager` instances are wired through
:class:`clustersess.cluster.MemoryBus` (the same transport interface as Redis) with short
heartbeat and drop times, and share a :class:`FakeClock` where session time matters.
They complement, not replace, the real-process tests in ``test_cluster.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Any

import pytest

from clustersess import SessionManager, versions
from clustersess.cluster import messages as m
from clustersess.cluster.membership import pick_backup
from clustersess.cluster.wire import Codec
from clustersess.session import Entry
from tests.listeners import Recorder
from tests.memcluster import FAST, Cluster, Peer, cluster, delivered, eventually, read, route_of, token_of, write
from tests.utils import DELETED, cookie_after

pytestmark = pytest.mark.timeout(30)

__all__ = ["cluster"]  # the fixture


# -- replication ----------------------------------------------------------------------------
async def test_commit_replicates_full_state_to_the_one_rendezvous_backup(cluster: Cluster) -> None:
    n1, _, _ = await cluster.start("n1", "n2", "n3")
    cookie = await write(n1, None, cart=[1, 2], user="ann")
    token = token_of(n1, cookie)
    backup = pick_backup(token, ["n2", "n3"])
    # sync mode: when close() returns the backup has applied it
    assert cluster.holders(token) == {"n1": "owned", backup: "backup"}
    copy = cluster.nodes[backup].store.backups[token]
    assert (copy.owner, copy.epoch, copy.version) == ("n1", 0, 1)
    assert json.loads(copy.payload) == {"cart": [1, 2], "user": "ann"}
    assert n1.store.owned[token].backup == backup

    await write(n1, cookie, user="bob")
    copy = cluster.nodes[backup].store.backups[token]
    assert copy.version == 2 and json.loads(copy.payload) == {"cart": [1, 2], "user": "bob"}
    # a read-only request sends no REPLICATE
    sent = n1.stats.replications_sent
    assert (await read(n1, cookie))[0]["user"] == "bob"
    assert n1.stats.replications_sent == sent


def delay_deliveries(cluster: Cluster, name: str, seconds: float | None) -> None:
    """Deliver messages to ``name``'s own channel late (``None``: never)."""
    channel = cluster.nodes[name].cluster.ch_me  # type: ignore[union-attr]
    subs = cluster.bus.subscribers[channel]
    [real] = subs
    loop = asyncio.get_running_loop()

    def late(ch: str, data: bytes) -> None:
        if seconds is not None:
            loop.call_later(seconds, real, ch, data)

    subs[:] = [late]


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_sync_mode_waits_for_the_ack_async_does_not(cluster: Cluster, mode: str) -> None:
    n1, n2 = await cluster.start("n1", "n2", replication=mode, ack_timeout=2.0)
    delay_deliveries(cluster, "n2", 0.15)
    started = time.perf_counter()
    cookie = await write(n1, None, a=1)
    took = time.perf_counter() - started
    token = token_of(n1, cookie)
    if mode == "sync":
        assert 0.15 <= took < 1.0, took
        assert token in n2.store.backups  # the ack came after the copy was applied
    else:
        assert took < 0.1, took
        assert token not in n2.store.backups
        await eventually(lambda: token in n2.store.backups, what="async replication")
    assert n1.stats.ack_timeouts == 0


async def test_a_write_cancelled_while_waiting_for_its_ack_leaves_nothing_behind(cluster: Cluster) -> None:
    n1, n2 = await cluster.start("n1", "n2", ack_timeout=0.3)
    delay_deliveries(cluster, "n2", 0.1)
    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
    task = asyncio.create_task(write(n1, None, a=1))
    await asyncio.sleep(0.02)  # committed locally, waiting for the ack
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (entry,) = n1.store.owned.values()
    # The copy still arrives and is acknowledged; the cancelled wait's timer never fires.
    await eventually(lambda: entry.token in n2.store.backups, what="the copy on the backup")
    await asyncio.sleep(0.4)
    assert n1.stats.ack_timeouts == 0 and errors == []
    cookie = n1.signer.cookie_value(entry.token, "n1")
    assert (await read(n1, cookie))[0] == {"a": 1}


async def test_missing_ack_returns_after_ack_timeout_and_requeues(cluster: Cluster) -> None:
    n1, n2 = await cluster.start("n1", "n2", ack_timeout=0.2)
    delay_deliveries(cluster, "n2", None)  # subscribed, but drops everything sent to it
    started = time.perf_counter()
    cookie = await write(n1, None, a=1)
    took = time.perf_counter() - started
    assert 0.2 <= took < 0.2 + 0.25, took
    assert n1.stats.ack_timeouts == 1
    token = token_of(n1, cookie)
    assert token not in n2.store.backups
    # once messages flow again the heartbeat re-sends it
    cluster.bus.subscribers[n2.cluster.ch_me][:] = [n2.cluster._on_message]  # type: ignore[union-attr]
    await eventually(lambda: token in n2.store.backups, what="re-replication after a missed ack")


async def test_a_write_whose_ack_was_lost_in_a_resubscribe_is_sent_again_at_once(cluster: Cluster) -> None:
    """Invariant: an ACK published while our subscription was down is lost for good; on
    re-subscribing we send every unanswered REPLICATE again, so a sync write waiting for
    one finishes (replicated) instead of waiting out its ack timeout."""
    n1, n2 = await cluster.start("n1", "n2", ack_timeout=3.0)
    cookie = await write(n1, None, v=1)
    token = token_of(n1, cookie)
    delay_deliveries(cluster, "n1", None)  # n1 hears nothing on its channel: the ACK is lost
    started = time.perf_counter()
    pending = asyncio.ensure_future(write(n1, cookie, v=2))
    await eventually(lambda: n2.store.backups[token].version == 2, what="the backup applied it")
    await asyncio.sleep(0.05)
    assert not pending.done()  # waiting for the ACK that was dropped
    n1.cluster.transport.reset()  # type: ignore[union-attr]  # re-subscribe (the dropper stays, unheard)
    await asyncio.wait_for(pending, 1.5)
    assert time.perf_counter() - started < 1.5
    assert n1.stats.ack_timeouts == 0 and n1.stats.writes_unreplicated == 0
    assert n2.store.backups[token].version == 2


async def test_bus_down_commit_is_prompt_and_session_rereplicated_after(cluster: Cluster) -> None:
    n1, n2 = await cluster.start("n1", "n2", ack_timeout=0.3)
    cookie = await write(n1, None, v=1)
    token = token_of(n1, cookie)
    assert n2.store.backups[token].version == 1

    cluster.bus.down = True
    for when in ("at once", "once disconnected"):
        started = time.perf_counter()
        await write(n1, cookie, v=when)
        took = time.perf_counter() - started
        assert took < 0.3 + 0.1, (when, took)
        await eventually(lambda: not n1.cluster.transport.connected)  # type: ignore[union-attr]
    started = time.perf_counter()
    other = await write(n1, None, new=True)  # a session born during the outage
    assert time.perf_counter() - started < 0.4
    assert n1.store.owned[token].version == 3
    assert n2.store.backups[token].version == 1  # nothing got through
    assert n1.stats.publish_errors >= 1

    cluster.bus.down = False
    await eventually(lambda: token in n2.store.backups and n2.store.backups[token].version == 3, what="resend")
    assert json.loads(n2.store.backups[token].payload) == {"v": "once disconnected"}
    await eventually(lambda: token_of(n1, other) in n2.store.backups, what="resend of the session born offline")
    assert n1.stats.redis_reconnects == 1


async def test_listeners_fire_on_the_backup_only_when_asked(cluster: Cluster) -> None:
    heard, quiet = Recorder(), Recorder()
    n1 = await cluster.add("n1", notify_listeners_on_replication=True)
    await cluster.add("n2", listeners=[heard], notify_listeners_on_replication=True)
    await cluster.add("n3", listeners=[quiet])  # default: no events for copies
    await cluster.joined()
    # one session backed up on each of n2 and n3
    cookies: dict[str, str] = {}
    while len(cookies) < 2:
        cookie = await write(n1, None, step=1)
        cookies.setdefault(pick_backup(token_of(n1, cookie), ["n2", "n3"]), cookie)
    await write(n1, cookies["n2"], step=2)
    await write(n1, cookies["n3"], step=2)
    for cookie in cookies.values():
        handle = await n1.open(cookie)
        handle.session.invalidate()
        assert await cookie_after(n1, handle) == DELETED

    session_id = f"{token_of(n1, cookies['n2'])}.n1"
    # (the loop above may have made extra sessions; follow the one backed up on n2)
    mine = [(kind, e.session_id, e.node, e.replicated, e.data, why) for kind, e, why in heard.events]
    assert [event for event in mine if event[1] == session_id] == [
        ("created", session_id, "n2", True, {"step": 1}, None),
        ("changed", session_id, "n2", True, {"step": 2}, None),
        ("destroyed", session_id, "n2", True, {"step": 2}, "invalidated"),
    ]
    assert quiet.events == []


# -- takeover -------------------------------------------------------------------------------
def copy_of(
    cluster: Cluster, token: str, owner: str, epoch: int, vv: dict[str, int], data: dict[str, Any]
) -> Entry:
    now = cluster.clock.time()
    return Entry(
        token=token, owner=owner, created=now - 10, last_accessed=now, epoch=epoch, version=sum(vv.values()),
        payload=json.dumps(data, separators=(",", ":")).encode(), vv=versions.from_dict(vv),
    )


@pytest.mark.parametrize(
    "copies, winner, conflicts",
    [
        # node: (table, epoch, version vector)
        ({"n2": ("owned", 2, {"n2": 5}), "n3": ("backups", 2, {"n2": 4})}, "n2", 0),  # more writes
        # an adoption (epoch 2, no write) never outranks a newer write (epoch 1)
        ({"n2": ("backups", 1, {"n1": 9}), "n3": ("backups", 2, {"n1": 3})}, "n2", 0),
        ({"n1": ("backups", 3, {"n1": 2, "n2": 8}), "n2": ("owned", 2, {"n2": 8})}, "n1", 0),  # ours is newest
        # writes on both sides of a split: the later owner (epoch) wins, reported as a conflict
        ({"n2": ("owned", 1, {"n1": 3, "n2": 2}), "n3": ("owned", 2, {"n1": 3, "n3": 1})}, "n3", 1),
    ],
    ids=["version", "adoption-never-beats-a-write", "local", "conflict"],
)
async def test_takeover_picks_the_copy_with_the_newest_writes(
    cluster: Cluster, copies: dict[str, tuple[str, int, dict[str, int]]], winner: str, conflicts: int
) -> None:
    n1, _, _ = await cluster.start("n1", "n2", "n3")
    token = token_of(n1, await write(n1, None, probe=1))
    for mg in cluster.nodes.values():  # forget the probe; plant the crafted copies
        mg.store.owned.pop(token, None)
        mg.store.backups.pop(token, None)
    for node, (table, epoch, vv) in copies.items():
        entry = copy_of(cluster, token, node, epoch, vv, {"from": node, "e": epoch})
        getattr(cluster.nodes[node].store, table)[token] = entry
    cookie = n1.signer.cookie_value(token, "n2")  # the client was last served by n2

    data, new, cookie = await read(n1, cookie)
    _, epoch, vv = copies[winner]
    assert not new
    assert data == {"from": winner, "e": epoch}
    assert route_of(cookie) == "n1"
    entry = n1.store.owned[token]
    merged = versions.merge(versions.from_dict(c[2]) for c in copies.values())
    assert entry.vv == (merged if conflicts else versions.from_dict(vv))
    assert (entry.epoch, entry.owner) == (max(c[1] for c in copies.values()) + 1, "n1")
    assert n1.stats.conflicts == conflicts
    assert n1.stats.takeovers == 1
    # the others gave up ownership; the new backup gets the new epoch
    assert [n for n, mg in cluster.nodes.items() if token in mg.store.owned] == ["n1"]
    backup = cluster.nodes[entry.backup]  # type: ignore[index]
    await eventually(lambda: token in backup.store.backups and backup.store.backups[token].epoch == entry.epoch)
    # and a write there lands on top of the winner's data
    await write(n1, cookie, more=True)
    assert json.loads(backup.store.backups[token].payload) == {"from": winner, "e": epoch, "more": True}


async def test_request_on_another_node_takes_over_and_round_robin_keeps_counting(cluster: Cluster) -> None:
    nodes = await cluster.start("n1", "n2", "n3")
    cookie = await write(nodes[0], None, n=0)
    for i in range(1, 13):
        node = nodes[i % 3]
        handle = await node.open(cookie)
        assert not handle.session.is_new
        handle.session["n"] += 1
        cookie = await cookie_after(node, handle) or cookie
        assert route_of(cookie) == node.node
    assert (await read(nodes[0], cookie))[0] == {"n": 12}
    token = token_of(nodes[0], cookie)
    assert sum(token in mg.store.owned for mg in nodes) == 1


# -- invalidation and expiry ----------------------------------------------------------------
async def test_invalidate_tombstones_everywhere_and_late_replicate_is_dropped(cluster: Cluster) -> None:
    n1, n2, n3 = await cluster.start("n1", "n2", "n3")
    cookie = await write(n1, None, secret="x")
    token = token_of(n1, cookie)
    assert len(cluster.holders(token)) == 2
    handle = await n1.open(cookie)
    handle.session.invalidate()
    assert await cookie_after(n1, handle) == DELETED
    # sync mode: the INVALIDATE is published before close() returns; delivery is immediate
    await delivered()
    now = cluster.clock.time()
    for mg in (n1, n2, n3):
        assert mg.store.is_dead(token, now), mg.node
    assert cluster.holders(token) == {}

    # a REPLICATE that was in flight (or replayed by someone with the key) arrives late
    peer = Peer(cluster.bus)
    late = m.SessionState(token, "n1", 7, ("n1", 9), 5.0, 0.0, b'{"secret":"x"}')
    for mg in (n1, n2, n3):
        stale = mg.stats.messages_dropped_stale
        await peer.send(peer.channel(mg.node), m.Replicate((late,)))
        assert mg.stats.messages_dropped_stale == stale + 1
    assert cluster.holders(token) == {}
    # ...and so does a handed-off copy
    await peer.send(peer.channel("n2"), m.Replicate((late,), handoff=True))
    assert cluster.holders(token) == {}

    # the old cookie gets a fresh, empty session on every node
    for mg in (n1, n2, n3):
        data, new, _ = await read(mg, cookie)
        assert new and data == {}, mg.node

    # tombstones outlive max_inactive, then the sweeper clears them
    cluster.clock.advance(600.0 + 59.0)
    for mg in (n1, n2, n3):
        mg.sweep()
        assert token in mg.store.tombstones
    cluster.clock.advance(2.0)
    for mg in (n1, n2, n3):
        mg.sweep()
        assert token not in mg.store.tombstones


async def test_rotate_kills_the_old_token_on_every_node(cluster: Cluster) -> None:
    n1, n2, n3 = await cluster.start("n1", "n2", "n3")
    old = await write(n1, None, user="ann")
    handle = await n1.open(old)
    handle.session.rotate()
    new = await cookie_after(n1, handle)
    assert new and token_of(n1, new) != token_of(n1, old)
    await delivered()
    for mg in (n1, n2, n3):
        assert mg.store.is_dead(token_of(n1, old), cluster.clock.time())
    assert len(cluster.holders(token_of(n1, new))) == 2
    assert (await read(n2, new))[0] == {"user": "ann"}
    data, is_new, _ = await read(n3, old)
    assert is_new and data == {}


async def test_expiry_needs_no_broadcast_and_reads_keep_the_backup_alive(cluster: Cluster) -> None:
    listener = Recorder()
    # max_inactive is fake time; the owner's coalesced ACCESSED flush runs every 50 ms
    n1 = await cluster.add("n1", max_inactive=0.4, sweep_interval=3600)
    n2 = await cluster.add("n2", max_inactive=0.4, sweep_interval=3600, listeners=[listener],
                           notify_listeners_on_replication=True)
    await cluster.joined()
    cookie = await write(n1, None, a=1)
    token = token_of(n1, cookie)
    for _ in range(3):  # 0.9 s of fake time, read every 0.3 s: never idle for 0.4 s
        cluster.clock.advance(0.3)
        await read(n1, cookie)
        accessed = cluster.clock.time()
        await eventually(lambda at=accessed: n2.store.backups[token].last_accessed == at, what="ACCESSED")
        n2.sweep()
        assert token in n2.store.backups
    cluster.clock.advance(0.5)
    published = len(cluster.bus.published)
    n1.sweep()  # the owner expires it...
    n2.sweep()  # ...and the backup its copy, by itself: idle times travel as durations
    await delivered()
    assert token not in n1.store.owned and token not in n2.store.backups
    codec = Codec((FAST["secret_key"],), "clustersess")
    sent = [codec.decode(ch, raw).body for ch, raw in cluster.bus.published[published:]]
    assert not [b for b in sent if isinstance(b, m.Invalidate)]  # no cluster-wide tombstone for an expiry
    assert not n1.store.tombstones and not n2.store.tombstones
    assert [(k, why) for k, _, why in listener.events] == [("created", None), ("destroyed", "expired")]
    assert (await read(n2, cookie))[1]  # new session


async def test_one_pass_sends_access_times_of_the_sessions_used_since_the_last(cluster: Cluster) -> None:
    # max_inactive of an hour: the periodic pass (every 30 s) stays out of the way
    n1 = await cluster.add("n1", max_inactive=3600, sweep_interval=3600)
    n2 = await cluster.add("n2", max_inactive=3600, sweep_interval=3600)
    await cluster.joined()
    used, idle = await write(n1, None, a=1), await write(n1, None, b=2)
    await eventually(lambda: len(n2.store.backups) == 2, what="both backed up")
    cluster.clock.advance(10)
    since = cluster.clock.time()
    assert await n1.cluster.replication.send_accesses(since) == 0  # nothing used yet: nothing sent
    await read(n1, used)
    assert await n1.cluster.replication.send_accesses(since) == 1
    await eventually(lambda: n2.store.backups[token_of(n1, used)].last_accessed == since, what="ACCESSED")
    assert n2.store.backups[token_of(n1, idle)].last_accessed == since - 10


async def test_a_backup_copy_expires_by_itself_when_the_owner_is_silent(cluster: Cluster) -> None:
    n1, n2 = await cluster.start("n1", "n2", max_inactive=10.0, sweep_interval=3600)
    token = token_of(n1, await write(n1, None, a=1))
    cluster.clock.advance(9.0)
    n2.sweep()
    assert token in n2.store.backups
    cluster.clock.advance(2.0)
    n2.sweep()
    assert token not in n2.store.backups


# -- hand-off and adoption ------------------------------------------------------------------
async def test_stop_hands_every_session_to_its_backup(cluster: Cluster) -> None:
    n1, n2, n3 = await cluster.start("n1", "n2", "n3")
    cookies = [await write(n1, None, i=i) for i in range(12)]
    tokens = [token_of(n1, c) for c in cookies]
    backups = {t: n1.store.owned[t].backup for t in tokens}
    started = time.perf_counter()
    await cluster.stop("n1")
    assert time.perf_counter() - started < 0.5
    assert n1.stats.handed_over == 12
    await eventually(lambda: all(t in cluster.nodes[backups[t]].store.owned for t in tokens), what="adoption")  # type: ignore[index]
    for t in tokens:
        owner = cluster.nodes[backups[t]]  # type: ignore[index]
        assert owner.store.owned[t].epoch == 1
        assert owner.store.owned[t].backup != "n1"  # never the node that is leaving
        other = n3 if owner is n2 else n2
        await eventually(lambda t=t, o=other: t in o.store.backups and o.store.backups[t].epoch == 1, what="backup")
    assert n2.stats.adopted + n3.stats.adopted == 12
    for i, cookie in enumerate(cookies):
        owner = cluster.nodes[backups[tokens[i]]]  # type: ignore[index]
        data, new, after = await read(owner, cookie)
        assert (data, new) == ({"i": i}, False)
        assert route_of(after) == owner.node  # the cookie names the new owner
    assert "n1" not in n2.cluster.members.live()  # type: ignore[union-attr]


async def test_backup_adopts_the_sessions_of_a_dead_owner_and_survives_a_second_failure(cluster: Cluster) -> None:
    n1, n2, n3 = await cluster.start("n1", "n2", "n3")
    cookies = [await write(n1, None, i=i) for i in range(12)]
    tokens = [token_of(n1, c) for c in cookies]
    await cluster.crash("n1")
    started = time.perf_counter()
    await eventually(lambda: all(t in n2.store.owned or t in n3.store.owned for t in tokens), what="adoption")
    took = time.perf_counter() - started
    assert 0.1 < took < 1.5, took  # noticed after the drop time (0.2 s), not at once
    assert n2.stats.adopted + n3.stats.adopted == 12
    assert n2.stats.adopted and n3.stats.adopted
    # each adopted session got a backup on the other survivor
    await eventually(lambda: all(len(cluster.holders(t)) == 2 for t in tokens), what="new backups")
    await cluster.crash("n2")
    await eventually(lambda: all(t in n3.store.owned for t in tokens), what="second adoption")
    for i, cookie in enumerate(cookies):
        data, new, after = await read(n3, cookie)
        assert (data, new, route_of(after)) == ({"i": i}, False, "n3")


async def test_new_member_gets_only_the_backups_rendezvous_moves_to_it(cluster: Cluster) -> None:
    n1, n2 = await cluster.start("n1", "n2")
    tokens = [token_of(n1, await write(n1, None, i=i)) for i in range(60)]
    assert all(n1.store.owned[t].backup == "n2" for t in tokens)
    n3 = await cluster.add("n3")
    await cluster.joined()
    moving = [t for t in tokens if pick_backup(t, ["n2", "n3"]) == "n3"]
    assert 10 < len(moving) < 50
    await eventually(lambda: all(t in n3.store.backups for t in moving), what="rebalance")
    assert {t: n1.store.owned[t].backup for t in tokens} == {t: pick_backup(t, ["n2", "n3"]) for t in tokens}
    await asyncio.sleep(0.1)
    assert set(n3.store.backups) == set(moving)  # nothing else was moved
    # and the old backup drops exactly the copies that moved (DROPs, trickled)
    staying = set(tokens) - set(moving)
    await eventually(lambda: not set(moving) & set(n2.store.backups), what="the moved copies dropped")
    assert staying <= set(n2.store.backups)


# -- outages and races ------------------------------------------------------------------------
async def test_logout_during_an_outage_reaches_the_backup_afterwards(cluster: Cluster) -> None:
    """Otherwise the backup keeps a live copy, and adopts it (logged in again) if the owner dies."""
    n1, n2 = await cluster.start("n1", "n2")
    cookie = await write(n1, None, user="ann")
    token = token_of(n1, cookie)
    cluster.bus.down = True
    await eventually(lambda: not n1.cluster.transport.connected)  # type: ignore[union-attr]
    handle = await n1.open(cookie)
    handle.session.invalidate()
    assert await cookie_after(n1, handle) == DELETED
    cluster.bus.down = False
    await eventually(lambda: n2.store.is_dead(token, cluster.clock.time()), what="tombstone on the backup")
    assert cluster.holders(token) == {}
    await cluster.crash("n1")
    await eventually(lambda: n2.cluster.members.live() == [])  # type: ignore[union-attr]
    data, new, _ = await read(n2, cookie)
    assert new and data == {}


async def test_logout_missed_by_a_disconnected_backup_reaches_it_on_resync(cluster: Cluster) -> None:
    n1, n2 = await cluster.start("n1", "n2")
    cookie = await write(n1, None, user="ann")
    token = token_of(n1, cookie)
    # n2 alone loses its subscriptions for a while (its Redis connection dropped)
    mine = n2.cluster
    subscribers = cluster.bus.subscribers.items()
    cut = {ch: [cb for cb in cbs if getattr(cb, "__self__", None) is mine] for ch, cbs in subscribers}
    for ch, cbs in cut.items():
        for cb in cbs:
            cluster.bus.subscribers[ch].remove(cb)
    handle = await n1.open(cookie)
    handle.session.invalidate()
    await cookie_after(n1, handle)
    await delivered()
    assert token in n2.store.backups  # it missed the INVALIDATE
    for ch, cbs in cut.items():
        cluster.bus.subscribers[ch].extend(cbs)
    await n2.cluster._on_connect(False)  # type: ignore[union-attr]  # what the transport reports on re-subscribe
    await eventually(lambda: n2.store.is_dead(token, cluster.clock.time()), what="tombstone after RESYNC")
    assert cluster.holders(token) == {}


async def test_a_resync_prunes_every_differing_bucket_in_bounded_messages(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PRUNE lists whole buckets, at most PRUNE_TOKENS tokens per message: one PRUNE for
    all 64 buckets of a big node listed more tokens than a receiver takes, was dropped as
    malformed, and the asker (seeing a gap) asked again and again."""
    from clustersess.cluster import replication

    monkeypatch.setattr(replication, "PRUNE_TOKENS", 3)
    n1, n2 = await cluster.start("n1", "n2")
    cookies = [await write(n1, None, i=i) for i in range(40)]
    live = {token_of(n1, c) for c in cookies}
    assert live <= set(n2.store.backups)
    # copies n1 no longer has, in many buckets (their logouts missed, say)
    stale = []
    for i, first in enumerate("ABCDEFGHIJKLMNOP"):
        token = f"{first}{i:023d}"
        n2.store.backups[token] = dataclasses.replace(n2.store.backups[next(iter(live))], token=token)
        stale.append(token)
    sent_before = len(cluster.bus.published)
    await n2.cluster._on_connect(False)  # type: ignore[union-attr]  # a gap: RESYNC, DIGEST, NEED, PRUNE
    await eventually(lambda: not set(stale) & set(n2.store.backups), what="the stale copies pruned")
    assert live <= set(n2.store.backups)  # and every live copy kept
    codec = n1.cluster.ctx.codec  # type: ignore[union-attr]
    prunes = [
        env.body
        for ch, data in cluster.bus.published[sent_before:]
        if isinstance((env := codec.decode(ch, data)).body, m.Prune)
    ]
    assert len(prunes) > 1 and n2.stats.messages_dropped_malformed == 0
    assert all(len(p.tokens) <= 3 or len(p.buckets) == 1 for p in prunes)
    assert len({b for p in prunes for b in p.buckets}) == sum(len(p.buckets) for p in prunes)  # each bucket once


def resent_tokens(cluster: Cluster, node: SessionManager, since: int) -> list[str]:
    """Tokens of the session states ``node`` published after ``since`` messages on the bus."""
    codec = node.cluster.ctx.codec  # type: ignore[union-attr]
    out = []
    for ch, data in cluster.bus.published[since:]:
        env = codec.decode(ch, data)
        if env.src == node.node and isinstance(env.body, m.Replicate):
            out.extend(s.token for s in env.body.sessions)
    return out


async def test_a_resync_whose_every_bucket_differs_sends_only_what_the_backup_lacks(cluster: Cluster) -> None:
    """Buckets differ for more than loss: a digest taken while a rebalance moves backups
    away from the asker (its copies not dropped yet) differs in every bucket. The owner
    lists the buckets' sessions with their states and sends only those the asker asks
    for; before, it sent every session of every differing bucket again (100,000 in a
    rebalance at 200,000 sessions, sometimes twice)."""
    n1, n2 = await cluster.start("n1", "n2")
    cookies = [await write(n1, None, i=i) for i in range(40)]
    await delivered()
    by_token = {token_of(n1, c): c for c in cookies}
    live = sorted(by_token)
    backups = n2.store.backups
    assert set(live) <= set(backups)
    lost, older = live[:3], live[3:5]
    for token in lost:
        del backups[token]  # never arrived
    before = {t: backups[t] for t in older}
    for token in older:
        await write(n1, by_token[token], later=True)
    await delivered()
    backups.update(before)  # writes n2 missed
    assert all(backups[t].version < n1.store.owned[t].version for t in older)
    # copies n1 no longer has, one in every bucket: every bucket's hash differs
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    stale = [f"{c}{i:023d}" for i, c in enumerate(alphabet)]
    for token in stale:
        backups[token] = dataclasses.replace(backups[live[-1]], token=token)
    sent_before = len(cluster.bus.published)
    await n2.cluster._on_connect(False)  # type: ignore[union-attr]  # a gap: RESYNC, DIGEST, NEED, PRUNE, WANT
    await eventually(lambda: not set(stale) & set(backups), what="the stale copies pruned")
    await eventually(
        lambda: all(t in backups and backups[t].version == n1.store.owned[t].version for t in live),
        what="every copy current",
    )
    resent = resent_tokens(cluster, n1, sent_before)
    assert sorted(resent) == sorted(lost + older)
    assert n2.stats.messages_dropped_malformed == 0 and n1.stats.handler_errors == 0


def sent_by(cluster: Cluster, node: SessionManager, since: int) -> list[tuple[str, m.Body]]:
    """(channel, body) of the messages ``node`` published after ``since`` messages on the bus."""
    codec = node.cluster.ctx.codec  # type: ignore[union-attr]
    return [
        (ch, env.body) for ch, data in cluster.bus.published[since:] if (env := codec.decode(ch, data)).src == node.node
    ]


async def test_a_resync_during_a_rebalance_is_answered_once_the_moves_settle(cluster: Cluster) -> None:
    """While a rebalance moves sessions away from a backup, it keeps their copies until
    the DROPs come; a digest taken then differs in every bucket, and the NEED that
    follows lists and checks every session it backs up, in the middle of the rebalance
    (at 200,000 sessions, 110,000 listed and a burst of slow requests). The owner waits
    until nothing moves away from the asker, then takes the digest: nothing differs."""
    n1, n2 = await cluster.start("n1", "n2")
    cookies = [await write(n1, None, i=i) for i in range(300)]
    await delivered()
    tokens = [token_of(n1, c) for c in cookies]
    assert set(tokens) <= set(n2.store.backups)
    await asyncio.sleep(1.0)  # (a resync interval after the answer to n2's join)
    since = len(cluster.bus.published)
    joining = asyncio.create_task(cluster.add("n3"))
    owned = n1.store.owned
    await eventually(lambda: any(e.backup == "n3" for e in owned.values()), what="the rebalance under way")
    ctx = n2.cluster.ctx  # type: ignore[union-attr]
    ctx.outbox.send(ctx.ch_all, m.Resync(0.0))  # n2 asks meanwhile (it reconnected, say)
    await joining
    moving = {t for t in tokens if pick_backup(t, ["n2", "n3"]) == "n3"}
    assert len(moving) > 50
    await eventually(lambda: not moving & set(n2.store.backups), what="the moved copies dropped")
    await eventually(
        lambda: any(isinstance(b, m.Digest) and ch.endswith(":n2") for ch, b in sent_by(cluster, n1, since)),
        what="the digest",
    )
    await asyncio.sleep(0.2)  # (time for a NEED, had the digest differed)
    by_n1 = sent_by(cluster, n1, since)
    drops = [i for i, (ch, b) in enumerate(by_n1) if isinstance(b, m.Drop) and ch.endswith(":n2")]
    digest = next(i for i, (ch, b) in enumerate(by_n1) if isinstance(b, m.Digest) and ch.endswith(":n2"))
    assert drops and digest > max(drops)  # taken after the last DROP left
    assert [b for _, b in sent_by(cluster, n2, since) if isinstance(b, m.Need)] == []
    assert set(n2.store.backups) >= set(tokens) - moving


async def test_a_resync_answer_that_waited_still_covers_the_whole_gap(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The answer sends again the access times and logouts of the gap's length. When it
    waits for moves to settle (up to SETTLE_FOR), the gap runs until the answer: counted
    from the request instead, a wait longer than the margin left out what was used or
    logged out during the gap."""
    from clustersess.cluster import replication

    n1, n2 = await cluster.start("n1", "n2")
    await asyncio.sleep(1.1)  # (a resync interval after the answer to n2's join)
    windows: list[float] = []
    send_accesses = replication.Replication.send_accesses

    async def noted(self: replication.Replication, since: float, only: str | None = None) -> int:
        if only == "n2":
            windows.append(since)
        return await send_accesses(self, since, only)

    settled = asyncio.Event()
    monkeypatch.setattr(replication.Replication, "send_accesses", noted)
    monkeypatch.setattr(replication.Replication, "_moving_away", lambda self, name: not settled.is_set())
    ctx = n2.cluster.ctx  # type: ignore[union-attr]
    ctx.outbox.send(ctx.ch_all, m.Resync(2.0))  # a gap of 2 s just ended
    await asyncio.sleep(0.5)
    assert windows == []  # waiting for the moves
    settled.set()
    await eventually(lambda: windows, what="the answer")
    timing = n1.cluster.ctx.timing  # type: ignore[union-attr]
    margin = timing.access_every + timing.heartbeat
    assert windows == [pytest.approx(cluster.clock.time() - 2.5 - margin, abs=0.4)]


async def test_status_tells_whether_a_rebalance_runs(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between a rebalance's slices every resend may be acknowledged: ``pending_replication``
    alone took a rebalance at 40,000 of its 110,000 sessions for settled."""
    from clustersess.cluster import replication

    n1, _ = await cluster.start("n1", "n2")
    for i in range(20):
        await write(n1, None, i=i)
    await delivered()
    assert n1.status()["rebalancing"] is False
    seen: list[bool] = []
    rebalance = replication.Replication._rebalance

    async def observed(self: replication.Replication, refill: set[str]) -> None:
        seen.append(n1.status()["rebalancing"])
        await rebalance(self, refill)

    monkeypatch.setattr(replication.Replication, "_rebalance", observed)
    await cluster.add("n3")
    await cluster.joined()
    await eventually(lambda: seen and not n1.status()["rebalancing"], what="the pass over")
    assert seen[0] is True


async def test_a_resync_answer_waits_for_moves_only_so_long(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sessions that never stop moving (a new backup that never answers) delay the
    answer by SETTLE_FOR at most: a backup that missed writes gets them all the same."""
    from clustersess.cluster import replication

    n1, n2 = await cluster.start("n1", "n2")
    cookie = await write(n1, None, i=0)
    await delivered()
    token = token_of(n1, cookie)
    n2.store.backups.pop(token)  # a copy it lost
    monkeypatch.setattr(replication, "SETTLE_FOR", 0.3)
    monkeypatch.setattr(replication.Replication, "_moving_away", lambda self, name: True)
    started = time.monotonic()
    await n2.cluster._on_connect(False)  # type: ignore[union-attr]
    await eventually(lambda: token in n2.store.backups, what="the lost copy sent again")
    assert 0.3 <= time.monotonic() - started < 2.0


async def test_a_copy_that_arrives_between_the_owners_listing_and_its_prune_stays(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The owner lists its sessions for a PRUNE over many slices (110,000 in a rebalance);
    a session made meanwhile is not listed, but its copy can reach the backup before the
    PRUNE does. The backup must keep it: it was acknowledged, and the owner's death would
    otherwise lose it. (The backup keeps what it applied since it sent the NEED.)"""
    from clustersess.cluster import replication

    n1, n2 = await cluster.start("n1", "n2")
    cookies = [await write(n1, None, i=i) for i in range(10)]
    await delivered()
    assert {token_of(n1, c) for c in cookies} <= set(n2.store.backups)
    made: list[str] = []
    listing = replication._prune_of

    async def listing_then_a_new_session(*args: Any) -> m.Prune:
        prune = await listing(*args)
        if not made:
            made.append(await write(n1, None, late=True))  # acknowledged by n2 before the PRUNE leaves
        return prune

    pruned: list[str] = []
    prune = replication.Replication._prune

    async def prune_then_note(
        self: replication.Replication, owner: str, body: m.Prune, held: list[Entry], fresh: set[str]
    ) -> None:
        await prune(self, owner, body, held, fresh)
        pruned.append(owner)

    monkeypatch.setattr(replication, "_prune_of", listing_then_a_new_session)
    monkeypatch.setattr(replication.Replication, "_prune", prune_then_note)
    # n2's digest differs from n1's in every bucket: NEED (listing), PRUNE
    await n2.cluster.replication._compare_digest("n1", (1,) * m.DIGEST_BUCKETS)  # type: ignore[union-attr]
    await eventually(lambda: pruned == ["n1"], what="the PRUNE applied")
    assert made, "no session was made while the owner listed"
    token = token_of(n1, made[0])
    assert token in n1.store.owned and n1.store.owned[token].backup == "n2"
    assert token in n2.store.backups, "the acknowledged copy was pruned"
    assert {token_of(n1, c) for c in cookies} <= set(n2.store.backups)


async def test_a_need_without_a_listing_gets_its_buckets_again_whole(cluster: Cluster) -> None:
    """A node from before listings sends NEED without ``l`` and no WANT: the owner answers
    as it did then, a PRUNE without states and every session of those buckets again."""
    n1, n2 = await cluster.start("n1", "n2")
    cookies = [await write(n1, None, i=i) for i in range(20)]
    await delivered()
    live = {token_of(n1, c) for c in cookies}
    sent_before = len(cluster.bus.published)
    ctx = n2.cluster.ctx  # type: ignore[union-attr]
    ctx.outbox.send(ctx.channel("n1"), m.Need(tuple(range(m.DIGEST_BUCKETS))))
    await eventually(lambda: set(resent_tokens(cluster, n1, sent_before)) >= live, what="every session sent again")
    codec = n1.cluster.ctx.codec  # type: ignore[union-attr]
    prunes = [
        env.body
        for ch, data in cluster.bus.published[sent_before:]
        if isinstance((env := codec.decode(ch, data)).body, m.Prune)
    ]
    assert prunes and all(p.epochs is None and p.versions is None for p in prunes)
    assert live <= set(n2.store.backups)


async def test_a_request_on_a_third_node_before_the_drop_time_takes_over_once(cluster: Cluster) -> None:
    n1, n2, n3 = await cluster.start("n1", "n2", "n3", drop_time=0.5)
    cookie = await write(n1, None, a=1)
    token = token_of(n1, cookie)
    other = n3 if n1.store.owned[token].backup == "n2" else n2
    await cluster.crash("n1")
    data, new, cookie = await read(other, cookie)  # n1 still counts as a member here
    assert (data, new, route_of(cookie)) == ({"a": 1}, False, other.node)
    cookie = await write(other, cookie, b=2)
    await eventually(lambda: all("n1" not in mg.cluster.members.live() for mg in (n2, n3)))  # type: ignore[union-attr]
    await asyncio.sleep(0.1)
    assert [n for n, role in cluster.holders(token).items() if role == "owned"] == [other.node]
    assert len(cluster.holders(token)) == 2
    assert (await read(other, cookie))[0] == {"a": 1, "b": 2}


async def test_concurrent_takeovers_on_two_nodes_leave_one_owner(cluster: Cluster) -> None:
    """After a failover a browser's parallel requests may be spread over several nodes."""
    n1, n2, n3 = await cluster.start("n1", "n2", "n3")
    cookie = await write(n1, None, n=0)
    token = token_of(n1, cookie)

    async def increment(manager: SessionManager) -> None:
        handle = await manager.open(cookie)
        handle.session["n"] += 1
        await cookie_after(manager, handle)

    await asyncio.gather(increment(n2), increment(n3))
    await asyncio.sleep(0.2)
    owners = [n for n, role in cluster.holders(token).items() if role == "owned"]
    assert len(owners) == 1, f"{owners} all own {token} at epoch " + str(
        {n: cluster.nodes[n].store.owned[token].order() for n in owners}
    )
    # The two takeovers ran one after the other: both increments landed.
    assert (await read(cluster.nodes[owners[0]], cookie))[0] == {"n": 2}


async def test_a_takeover_during_a_rotation_waits_for_it_and_an_undone_rotation_keeps_the_session(
    cluster: Cluster,
) -> None:
    # The old ID's death is not known outside the rotating node until its request commits:
    # a FETCH or a peek in between must neither be told "dead" (the rotation may be undone)
    # nor take the session away mid-request.
    n1, n2, n3 = await cluster.start("n1", "n2", "n3")
    cookie = await write(n1, None, user="ann")
    token = token_of(n1, cookie)
    handle = await n1.open(cookie)
    handle.session.rotate()
    peeked = await n3.cluster.ownership.peek(token)
    assert peeked is not None and not n3.store.is_dead(token, cluster.clock.time())
    taking = asyncio.ensure_future(n2.cluster.acquire(token))
    await delivered()
    assert not taking.done() and token in n1.store.rotating  # the holder waits for the request
    n1.abandon(handle)  # the request failed: no login happened
    assert token not in n1.store.rotating
    entry = await taking
    assert entry is not None and entry.owner == "n2" and json.loads(entry.payload) == {"user": "ann"}
    data, is_new, _ = await read(n1, cookie)
    assert not is_new and data == {"user": "ann"}


async def test_a_stale_claim_steps_down_when_only_a_newer_copy_can_answer(cluster: Cluster) -> None:
    # A node rejoining after a cut-off announces what it held (OWNED, older epoch). If the
    # newer owner cannot answer right now, a holder of the newer owner's copy does.
    n1, n2, n3 = await cluster.start("n1", "n2", "n3")
    cookie = await write(n1, None, user="ann")
    token = token_of(n1, cookie)
    await write(n2, cookie, user="bob")  # taken over by n2: epoch 1
    await delivered()
    entry = n2.store.owned[token]
    assert entry.epoch == 1 and entry.backup is not None
    holder = cluster.nodes[entry.backup]
    claimant = n3 if holder is n1 else n1
    copy = holder.store.backups[token]
    stale = Entry(
        token=token, owner=claimant.node, created=copy.created, last_accessed=copy.last_accessed,
        epoch=0, version=1, payload=b'{"user":"ann"}', vv=("n1", 1),
    )  # fmt: skip
    await cluster.crash("n2")  # silent, and not yet dropped
    claimant.store.backups.pop(token, None)
    claimant.store.owned[token] = stale
    claimant.cluster.ownership.announce(stale)
    await eventually(lambda: token not in claimant.store.owned, what="the stale claimant steps down")
    assert claimant.store.backups[token] is stale and holder.store.backups[token].owner == "n2"
    assert claimant.stats.stepped_down == 1


async def test_a_rejoining_claim_on_a_logged_out_session_is_told_it_is_dead(cluster: Cluster) -> None:
    # The logout's broadcast did not reach a node that was cut off and still holds the
    # session; when it rejoins and announces what it holds, members that buried it say so.
    n1, _n2, n3 = await cluster.start("n1", "n2", "n3")
    cookie = await write(n1, None, user="ann")
    token = token_of(n1, cookie)
    await delivered()
    stale = dataclasses.replace(n1.store.owned[token], owner="n3", session=None, inflight=0)
    handle = await n1.open(cookie)
    handle.session.invalidate()
    assert await cookie_after(n1, handle) == DELETED
    await delivered()
    assert n3.store.is_dead(token, cluster.clock.time())
    n3.store.tombstones.pop(token)  # as if n3 never heard of the logout
    n3.store.backups.pop(token, None)
    n3.store.owned[token] = stale
    n3.cluster.ownership.announce(stale)
    await eventually(lambda: n3.store.is_dead(token, cluster.clock.time()), what="the claimant buries it")
    assert token not in n3.store.owned
    data, is_new, _ = await read(n3, cookie)
    assert is_new and data == {}


async def test_a_copy_follows_its_session_to_a_new_owner(cluster: Cluster) -> None:
    # A holder whose copy the new owner's data dominates keeps it (until DROP), as a copy
    # of the new owner's: if the former owner is found dead later, nobody adopts it from
    # there while the new owner holds it.
    n1, n2, n3 = await cluster.start("n1", "n2", "n3")
    cookie = await write(n1, None, user="ann")
    token = token_of(n1, cookie)
    await delivered()
    backup = n1.store.owned[token].backup
    assert backup is not None
    holder = cluster.nodes[backup]
    taker = n3 if holder is n2 else n2
    await write(taker, cookie, user="bob")
    await delivered()
    assert token in taker.store.owned
    copy = holder.store.backups.get(token)
    assert copy is not None and copy.owner == taker.node
    assert await holder.cluster.ownership.adopt_from("n1") == 0
