"""Authenticated encoding, and a node's receive path under hostile input.

``Codec.decode`` must raise :class:`WireError` subclasses and nothing else for any bytes;
a node drops (and counts) garbage, forged, tampered, malformed, replayed and stale
messages, asks for a resync when it sees a gap, and keeps working afterwards.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clustersess import ids
from clustersess.cluster import messages as m
from clustersess.cluster.wire import MAC_LEN, MAX_MESSAGE, BadMac, BadMessage, Codec, WireError
from tests.listeners import Recorder
from tests.memcluster import Cluster, Peer, delivered, eventually, token_of, write
from tests.test_messages import ALL_BODIES, JSON
from tests.utils import TEST_SECRET

FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
ENV = m.Envelope("node1", "1700000000000-00ff00ff", 3, m.Heartbeat("h:1", 2, 3))


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with Cluster() as c:
        yield c


def sign(payload: bytes, secret: str = TEST_SECRET) -> bytes:
    """A correctly authenticated message around any payload, as a keyholder could send."""
    key = hmac.new(secret.encode(), b"clustersess.wire.v1", hashlib.sha256).digest()
    return hmac.new(key, payload, hashlib.sha256).hexdigest().encode() + payload


# -- codec ----------------------------------------------------------------------------------
@pytest.mark.parametrize("body", ALL_BODIES, ids=lambda b: type(b).__name__)
def test_every_message_type_round_trips_through_the_codec(body: m.Body) -> None:
    codec = Codec((TEST_SECRET,))
    env = m.Envelope("n1", "1700000000000-00000001", 9, body)
    raw = codec.encode(env)
    assert codec.decode(raw) == env
    assert codec.decode(bytearray(raw)) == env
    assert raw == sign(raw[MAC_LEN:])  # <hex HMAC-SHA256><JSON>, with the derived key
    assert json.loads(raw[MAC_LEN:])["t"] == body.TYPE.value


def test_mac_key_is_derived_not_the_secret_itself() -> None:
    # A cookie signature (keyed by the secret) can never pass as a message MAC.
    raw = Codec((TEST_SECRET,)).encode(ENV)
    plain = hmac.new(TEST_SECRET.encode(), raw[MAC_LEN:], hashlib.sha256).hexdigest().encode()
    assert raw[:MAC_LEN] != plain
    with pytest.raises(BadMac):
        Codec((TEST_SECRET,)).decode(plain + raw[MAC_LEN:])


def test_wrong_key_is_rejected() -> None:
    raw = Codec(("someone else's secret",)).encode(ENV)
    with pytest.raises(BadMac):
        Codec((TEST_SECRET,)).decode(raw)


def test_key_rotation_any_listed_key_verifies_and_the_newest_signs() -> None:
    old, new = "key-2025", "key-2026"
    before = Codec((old,))
    during = Codec((old, new))  # oldest first, as in Config
    after = Codec((new,))
    signed_before = before.encode(ENV)
    assert during.decode(signed_before) == ENV  # nodes not yet rotated are still heard
    signed_during = during.encode(ENV)
    assert after.decode(signed_during) == ENV  # the newest key signs...
    with pytest.raises(BadMac):
        before.decode(signed_during)  # ...so a node without it cannot read it
    with pytest.raises(BadMac):
        after.decode(signed_before)  # a retired key is refused


@pytest.mark.parametrize("where", [0, 1, MAC_LEN - 1, MAC_LEN, MAC_LEN + 7, -2, -1])
def test_any_flipped_byte_is_rejected(where: int) -> None:
    codec = Codec((TEST_SECRET,))
    raw = bytearray(codec.encode(ENV))
    raw[where] ^= 0x01
    with pytest.raises(BadMac):
        codec.decode(bytes(raw))


def test_truncated_extended_and_recased_messages_are_rejected() -> None:
    codec = Codec((TEST_SECRET,))
    raw = codec.encode(ENV)
    for bad in (raw[:-1], raw + b" ", raw + b"{}", raw[1:], raw[:MAC_LEN].upper() + raw[MAC_LEN:], b" " + raw):
        with pytest.raises(BadMac):
            codec.decode(bad)


@pytest.mark.parametrize(
    "raw",
    [b"", b"x", b"0" * MAC_LEN, b"0" * (MAC_LEN + 1), b"\xff" * 200, b"A" * (MAX_MESSAGE + 1), None, "text", 12],
    ids=["empty", "one byte", "mac only", "zero mac", "binary", "too long", "None", "str", "int"],
)
def test_garbage_raises_bad_mac(raw: Any) -> None:
    with pytest.raises(BadMac):
        Codec((TEST_SECRET,)).decode(raw)


def test_oversized_message_is_refused_even_when_signed() -> None:
    payload = json.dumps({"pad": "x" * MAX_MESSAGE}).encode()
    with pytest.raises(BadMac):
        Codec((TEST_SECRET,)).decode(sign(payload))


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"\xff\xfe{}",  # not UTF-8
        b"[" * 100_000 + b"]" * 100_000,  # nesting deep enough for RecursionError
        b'{"v":1,"t":"heartbeat","seq":' + b"9" * 5000 + b"}",  # int longer than Python will parse
        b'{"v":1,"t":"replicate","src":"a","inc":"1","seq":1,"b":{"s":[{"k":"' + ids.new_token().encode()
        + b'","o":"a","e":0,"n":1,"c":1e999,"a":1,"d":"{}"}],"handoff":false}}',  # 1e999 is Infinity
        b'{"v":1,"t":"replicate","src":"a","inc":"1","seq":1,"b":{"s":[{"k":"' + ids.new_token().encode()
        + b'","o":"a","e":0,"n":1,"c":1,"a":1,"d":"' + b"[" * 50_000 + b'"}],"handoff":false}}',
        b'{"v":1,"t":"leave","src":"a","inc":"1","seq":1,"b":{}} trailing',
        b'{"v":2,"t":"leave","src":"a","inc":"1","seq":1,"b":{}}',
        b"NaN",
        b"[]",
        b'"string"',
        b"null",
    ],
    ids=["text", "utf8", "deep", "long int", "infinity", "deep data", "trailing", "version", "nan", "list", "str", "null"],  # noqa: E501
)
def test_authenticated_garbage_raises_bad_message(payload: bytes) -> None:
    with pytest.raises(BadMessage):
        Codec((TEST_SECRET,)).decode(sign(payload))


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes_only_raise_wire_errors(raw: bytes) -> None:
    codec = Codec((TEST_SECRET,))
    for candidate in (raw, sign(raw), raw[:MAC_LEN] + raw):
        try:
            env = codec.decode(candidate)
        except WireError:
            continue
        assert isinstance(env, m.Envelope)


@FUZZ
@given(JSON, st.sampled_from(list(m.MsgType)))
def test_signed_arbitrary_json_only_raises_wire_errors(body: Any, kind: m.MsgType) -> None:
    codec = Codec((TEST_SECRET,))
    doc = {"v": 1, "t": kind.value, "src": "x", "inc": "1", "seq": 1, "b": body}
    for payload in (json.dumps(doc).encode(), json.dumps(body).encode()):
        try:
            env = codec.decode(sign(payload))
        except WireError:
            continue
        assert codec.decode(codec.encode(env)) == env


# -- a node's receive path ------------------------------------------------------------------
async def one_node(cluster: Cluster, **peer: Any) -> tuple[Any, Peer]:
    [n1] = await cluster.start("n1")
    return n1, Peer(cluster.bus, **peer)


def stats(manager: Any, *names: str) -> dict[str, int]:
    return {n: getattr(manager.stats, n) for n in names}


async def test_garbage_forged_and_tampered_messages_are_dropped_and_counted(cluster: Cluster) -> None:
    n1, peer = await one_node(cluster)
    node = n1.cluster
    me, everyone = node.ch_me, node.ch_all
    good = peer.encode(me, m.Heartbeat("evil:1", 0, 0))
    forged = Codec(("not the cluster secret",)).encode(m.Envelope("mallory", peer.incarnation, 1, m.Leave()))
    tampered = good.replace(b"evil:1", b"evil:2")
    assert tampered != good
    for raw in (b"garbage", b"\x00" * 500, forged, tampered, good[: MAC_LEN + 5]):
        for channel in (me, everyone):
            peer.bus.inject(channel, raw)
    await delivered()
    assert stats(n1, "messages_dropped_auth", "messages_dropped_malformed") == {
        "messages_dropped_auth": 10,
        "messages_dropped_malformed": 0,
    }
    assert node.members.live() == []  # nothing of it counted as a sign of life

    await peer.send(me, m.Heartbeat("ok:1", 0, 0))  # the receiver is still alive
    assert node.members.live() == ["mallory"]
    assert node.members.members["mallory"].address == "ok:1"


async def test_authenticated_but_malformed_messages_are_dropped_and_counted(cluster: Cluster) -> None:
    n1, peer = await one_node(cluster)
    token = ids.new_token()
    state = m.SessionState(token, "mallory", 0, 1, 1.0, 1.0, "{}")
    env = m.Envelope("mallory", peer.incarnation, 1, m.Replicate((state,)))
    doc = env.to_json()
    bad = [
        {**doc, "v": 99},
        {**doc, "t": "gossip"},
        {**doc, "seq": True},
        {**doc, "b": {"s": [{**doc["b"]["s"][0], "n": True}], "handoff": False}},
        {**doc, "b": {"s": [{**doc["b"]["s"][0], "a": float("nan")}], "handoff": False}},
        {**doc, "b": {"s": [{**doc["b"]["s"][0], "d": "[]"}], "handoff": False}},
        {**doc, "b": []},
        [doc],
    ]
    for item in bad:
        peer.bus.inject(n1.cluster.ch_me, sign(json.dumps(item).encode()))
    await delivered()
    assert n1.stats.messages_dropped_malformed == len(bad)
    assert n1.stats.messages_dropped_auth == 0
    assert n1.stats.replications_applied == 0 and token not in n1.store.backups
    assert peer.received == []  # no ack for any of them
    peer.bus.inject(n1.cluster.ch_me, sign(json.dumps(doc).encode()))  # the valid original
    await delivered()
    assert token in n1.store.backups


async def test_replayed_messages_are_dropped(cluster: Cluster) -> None:
    n1, peer = await one_node(cluster)
    token = ids.new_token()
    state = m.SessionState(token, "mallory", 0, 1, 1.0, 1.0, '{"a":1}')
    raw = await peer.send(n1.cluster.ch_me, m.Replicate((state,)))
    assert n1.stats.replications_applied == 1
    assert [a.ack for a in peer.got(m.Ack)] == [1]
    del n1.store.backups[token]
    peer.bus.inject(n1.cluster.ch_me, raw)  # the same bytes again
    await peer.send(n1.cluster.ch_me, m.Replicate((state,)), seq=1)  # the same seq, freshly signed
    assert n1.stats.messages_dropped_replay == 2
    assert token not in n1.store.backups
    assert len(peer.got(m.Ack)) == 1
    # sequence numbers are per channel: seq 1 on the broadcast channel is new
    await peer.send(peer.all, m.Heartbeat("h", 0, 0), seq=1)
    assert n1.stats.messages_dropped_replay == 2
    # ...and per incarnation: a restarted peer starts again at 1
    peer.incarnation = peer.incarnation + "1"  # sorts after the old one
    await peer.send(n1.cluster.ch_me, m.Replicate((state,)), seq=1)
    assert token in n1.store.backups


async def test_stale_replicate_is_not_applied(cluster: Cluster) -> None:
    n1, peer = await one_node(cluster)
    token = ids.new_token()

    def state(epoch: int, version: int) -> m.SessionState:
        return m.SessionState(token, "mallory", epoch, version, 1.0, 1.0, json.dumps({"e": epoch, "n": version}))

    await peer.send(n1.cluster.ch_me, m.Replicate((state(1, 5),)))
    for older in (state(1, 4), state(1, 5), state(0, 9)):
        await peer.send(n1.cluster.ch_me, m.Replicate((older,)))
        copy = n1.store.backups[token]
        assert (copy.epoch, copy.version) == (1, 5)
    assert n1.stats.messages_dropped_stale == 2  # (1, 5) again is a duplicate, not stale
    # the sender of an older epoch is told it lost the session
    assert [a.stale for a in peer.got(m.Ack)] == [(), (), (), (token,)]
    await peer.send(n1.cluster.ch_me, m.Replicate((state(1, 6),)))
    assert json.loads(n1.store.backups[token].payload) == {"e": 1, "n": 6}
    await peer.send(n1.cluster.ch_me, m.Replicate((state(2, 1),)))
    assert json.loads(n1.store.backups[token].payload) == {"e": 2, "n": 1}


async def test_a_stale_replicate_does_not_replace_a_session_this_node_owns(cluster: Cluster) -> None:
    n1, peer = await one_node(cluster, auto_ack=True)
    await peer.send(peer.all, m.Heartbeat("h", 0, 0))  # a member, so n1 replicates to it
    assert n1.cluster.members.live() == ["mallory"]
    cookie = await write(n1, None, mine=True)
    token = token_of(n1, cookie)
    entry = n1.store.owned[token]
    await peer.send(n1.cluster.ch_me, m.Replicate((m.SessionState(token, "mallory", entry.epoch, 1, 1.0, 1.0, "{}"),)))
    assert n1.store.owned[token] is entry and entry.session is not None and dict(entry.session) == {"mine": True}
    # a newer epoch, though, means the session moved: the owner lets it go
    newer = m.SessionState(token, "mallory", entry.epoch + 1, 1, 1.0, 1.0, "{}")
    await peer.send(n1.cluster.ch_me, m.Replicate((newer,)))
    assert token not in n1.store.owned and n1.store.backups[token].epoch == entry.epoch + 1


async def test_a_gap_on_a_direct_channel_is_counted_and_triggers_resync(cluster: Cluster) -> None:
    n1, peer = await one_node(cluster)
    await peer.send(n1.cluster.ch_me, m.Ack(1), seq=1)
    await peer.send(n1.cluster.ch_me, m.Ack(2), seq=4)  # 2 and 3 were lost
    assert n1.stats.gaps_detected == 1
    await eventually(lambda: peer.got(m.Resync), what="RESYNC sent to the peer")
    assert [e.src for e in peer.received if isinstance(e.body, m.Resync)] == ["n1"]
    # broadcasts are not checked for gaps (a node may join mid-stream)
    await peer.send(peer.all, m.Heartbeat("h", 0, 0), seq=1)
    await peer.send(peer.all, m.Heartbeat("h", 0, 0), seq=9)
    await peer.send(n1.cluster.ch_me, m.Ack(3), seq=5)
    assert n1.stats.gaps_detected == 1


async def test_resync_makes_the_owner_resend_what_the_asker_backs_up(cluster: Cluster) -> None:
    n1, peer = await one_node(cluster, auto_ack=True)
    await peer.send(peer.all, m.Heartbeat("h", 0, 0))
    tokens = {token_of(n1, await write(n1, None, i=i)) for i in range(5)}
    await eventually(lambda: len(peer.got(m.Replicate)) == 5)
    await peer.send(n1.cluster.ch_me, m.Resync())
    await eventually(lambda: len(peer.got(m.Replicate)) > 5, what="resend")
    resent = {s.token for r in peer.got(m.Replicate)[5:] for s in r.sessions}
    assert resent == tokens


async def test_the_node_keeps_replicating_after_hostile_input(cluster: Cluster) -> None:
    n1, n2 = await cluster.start("n1", "n2")
    for raw in (b"junk", sign(b"{}"), sign(b"[" * 10_000), Codec(("x",)).encode(ENV)):
        for channel in (n1.cluster.ch_me, n1.cluster.ch_all):
            cluster.bus.inject(channel, raw)
    await delivered()
    cookie = await write(n1, None, still="fine")
    assert token_of(n1, cookie) in n2.store.backups
    assert n2.stats.messages_dropped_auth == 2 and n2.stats.messages_dropped_malformed == 2


# -- property: well-formed messages never crash a handler -------------------------------------
STATES = st.builds(
    m.SessionState,
    st.sampled_from([ids.new_token() for _ in range(3)]),
    st.sampled_from(["mallory", "n1", "n2"]),
    st.integers(0, 3),
    st.integers(1, 3),
    st.floats(1.6e9, 1.8e9),
    st.floats(1.6e9, 1.8e9),
    st.sampled_from(["{}", '{"a":1}']),
)
TOKENS = st.sampled_from(["a" * 24, "b" * 24])
BODIES = st.one_of(
    st.builds(m.Heartbeat, st.text(max_size=5), st.integers(0, 9), st.integers(0, 9), st.booleans()),
    st.builds(m.Leave),
    st.builds(m.Replicate, st.lists(STATES, max_size=3).map(tuple), st.booleans()),
    st.builds(m.Ack, st.integers(0, 5), st.lists(TOKENS, max_size=2).map(tuple)),
    st.builds(
        m.Accessed, st.lists(st.tuples(TOKENS, st.integers(0, 3), st.floats(1.6e9, 1.8e9)), max_size=2).map(tuple)
    ),
    st.builds(m.Invalidate, st.lists(TOKENS, max_size=2).map(tuple), st.sampled_from(["invalidated", "expired"])),
    st.builds(m.Fetch, st.text(max_size=4), TOKENS),
    st.builds(m.FetchReply, st.text(max_size=4), TOKENS, st.none() | STATES, st.booleans()),
    st.builds(m.Owned, TOKENS, st.integers(0, 5), st.sampled_from([None, "n1", "mallory"])),
    st.builds(m.Resync),
)


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 4), BODIES), min_size=1, max_size=12))
def test_well_formed_messages_in_any_order_never_crash_a_handler(script: list[tuple[bool, int, m.Body]]) -> None:
    async def run() -> None:
        async with Cluster() as nodes:
            [n1] = await nodes.start("n1", notify_listeners_on_replication=True, listeners=[Recorder()])
            peer = Peer(nodes.bus)
            await write(n1, None, own=1)
            seq = 0
            for broadcast, step, body in script:
                seq += step
                await peer.send(peer.all if broadcast else n1.cluster.ch_me, body, seq=seq)
            await asyncio.sleep(0.01)
            assert n1.stats.messages_dropped_malformed == 0  # no handler raised
            assert n1.stats.listener_errors == 0
            store = n1.store
            assert not set(store.owned) & set(store.backups), "a token both owned and backed up"
            assert all(e.owner == "n1" and e.token == t for t, e in store.owned.items())
            assert all(e.token == t for t, e in store.backups.items())
            now = nodes.clock.time()
            assert not [t for t in (*store.owned, *store.backups) if store.is_dead(t, now)], "a buried token lives"

    asyncio.run(run())


async def test_accessed_times_apply_only_to_the_same_epoch_and_only_forward(cluster: Cluster) -> None:
    n1, peer = await one_node(cluster)
    token = ids.new_token()
    await peer.send(n1.cluster.ch_me, m.Replicate((m.SessionState(token, "mallory", 2, 1, 100.0, 100.0, "{}"),)))
    for epoch, when, expected in [(1, 500.0, 100.0), (3, 500.0, 100.0), (2, 50.0, 100.0), (2, 300.0, 300.0)]:
        await peer.send(n1.cluster.ch_me, m.Accessed(((token, epoch, when),)))
        assert n1.store.backups[token].last_accessed == expected, (epoch, when)


async def test_an_ack_naming_a_session_as_stale_makes_the_owner_let_go(cluster: Cluster) -> None:
    n1, peer = await one_node(cluster)
    await peer.send(peer.all, m.Heartbeat("h", 0, 0))
    writing = asyncio.ensure_future(write(n1, None, a=1))
    await eventually(lambda: peer.got(m.Replicate), what="REPLICATE to the peer")
    [replicate] = [e for e in peer.received if isinstance(e.body, m.Replicate)]
    token = replicate.body.sessions[0].token
    # the peer holds this session at a newer epoch: someone took it over meanwhile
    await peer.send(n1.cluster.ch_me, m.Ack(replicate.seq, (token,)))
    await writing
    assert token not in n1.store.owned
    assert n1.stats.ack_timeouts == 0
