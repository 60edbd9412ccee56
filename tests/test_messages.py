"""The wire vocabulary: every message type round-trips, and anything off-protocol is Malformed.

A message from Redis is untrusted input, so ``Envelope.from_json`` must turn every
deviation (missing field, wrong type, bool posing as int, NaN, unknown type or version,
non-object body) into :class:`Malformed`, and never into any other exception.
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clustersess import ids
from clustersess.cluster import messages as m

FUZZ = settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

TOKEN = ids.new_token()
TOKEN2 = ids.new_token()
STATE = m.SessionState(TOKEN, "node1", 3, 7, 1_700_000_000.5, 1_700_000_100.25, '{"cart":[1,2],"name":"\\u00e9"}')
STATE2 = m.SessionState(TOKEN2, "node2", 0, 1, 1_700_000_000.0, 1_700_000_000.0, "{}")

#: one representative body per message type (and a second, different one where it matters)
SAMPLES: dict[m.MsgType, list[m.Body]] = {
    m.MsgType.HEARTBEAT: [m.Heartbeat("host:123", 5, 9), m.Heartbeat("", 0, 0, hello=True)],
    m.MsgType.LEAVE: [m.Leave()],
    m.MsgType.REPLICATE: [m.Replicate((STATE, STATE2)), m.Replicate((STATE,), handoff=True), m.Replicate(())],
    m.MsgType.ACK: [m.Ack(41), m.Ack(1, (TOKEN, TOKEN2))],
    m.MsgType.ACCESSED: [m.Accessed(((TOKEN, 3, 1_700_000_200.0), (TOKEN2, 0, 5.0)))],
    m.MsgType.INVALIDATE: [m.Invalidate((TOKEN,)), m.Invalidate((TOKEN, TOKEN2), "expired")],
    m.MsgType.FETCH: [m.Fetch("abcd1234", TOKEN)],
    m.MsgType.FETCH_REPLY: [
        m.FetchReply("abcd1234", TOKEN, STATE),
        m.FetchReply("r", TOKEN, None),
        m.FetchReply("r", TOKEN, None, dead=True),
    ],
    m.MsgType.OWNED: [m.Owned(TOKEN, 4, "node3"), m.Owned(TOKEN, 1, None)],
    m.MsgType.RESYNC: [m.Resync()],
}
ALL_BODIES = [b for bodies in SAMPLES.values() for b in bodies]


def test_samples_cover_every_message_type() -> None:
    assert set(SAMPLES) == set(m.MsgType) == set(m.BODIES)
    for kind, bodies in SAMPLES.items():
        assert all(type(b) is m.BODIES[kind] and b.TYPE is kind for b in bodies)


def roundtrip(env: m.Envelope) -> m.Envelope:
    """Through real JSON text, as it travels."""
    return m.Envelope.from_json(json.loads(json.dumps(env.to_json())))


@pytest.mark.parametrize("body", ALL_BODIES, ids=lambda b: type(b).__name__)
def test_every_message_type_round_trips(body: m.Body) -> None:
    env = m.Envelope("node1", "1700000000000-deadbeef", 12, body)
    back = roundtrip(env)
    assert back == env
    assert type(back.body) is type(body)
    assert back.to_json()["t"] == body.TYPE.value
    assert back.to_json()["v"] == m.PROTOCOL_VERSION


def test_session_state_keeps_data_text_exactly() -> None:
    # The owner's committed JSON travels as text and must arrive byte for byte.
    back = roundtrip(m.Envelope("a", "1", 1, m.Replicate((STATE,))))
    assert isinstance(back.body, m.Replicate)
    assert back.body.sessions[0].data == STATE.data
    assert json.loads(back.body.sessions[0].data) == {"cart": [1, 2], "name": "é"}


# -- malformed ------------------------------------------------------------------------------
def valid(body: m.Body) -> dict[str, Any]:
    return json.loads(json.dumps(m.Envelope("node1", "1", 5, body).to_json()))


def set_path(doc: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    target: Any = doc
    for key in path[:-1]:
        target = target[key]
    if value is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return doc


DELETE = object()
HB, REP, ACK, ACC = (
    valid(SAMPLES[m.MsgType.HEARTBEAT][0]),
    valid(SAMPLES[m.MsgType.REPLICATE][0]),
    valid(SAMPLES[m.MsgType.ACK][1]),
    valid(SAMPLES[m.MsgType.ACCESSED][0]),
)
INV, FETCH, REPLY, OWNED = (
    valid(SAMPLES[m.MsgType.INVALIDATE][0]),
    valid(SAMPLES[m.MsgType.FETCH][0]),
    valid(SAMPLES[m.MsgType.FETCH_REPLY][0]),
    valid(SAMPLES[m.MsgType.OWNED][0]),
)
S0 = ("b", "s", 0)  # the first session state of REP

MALFORMED: dict[str, dict[str, Any]] = {
    # envelope
    "version missing": set_path(HB, ("v",), DELETE),
    "version 0": set_path(HB, ("v",), 0),
    "version 2": set_path(HB, ("v",), m.PROTOCOL_VERSION + 1),
    "version as string": set_path(HB, ("v",), "1"),
    "version as bool": set_path(HB, ("v",), True),
    "version as float": set_path(HB, ("v",), 1.0),
    "type unknown": set_path(HB, ("t",), "gossip"),
    "type missing": set_path(HB, ("t",), DELETE),
    "type as list": set_path(HB, ("t",), ["heartbeat"]),
    "type as object": set_path(HB, ("t",), {"heartbeat": 1}),
    "type upper-case": set_path(HB, ("t",), "HEARTBEAT"),
    "src missing": set_path(HB, ("src",), DELETE),
    "src number": set_path(HB, ("src",), 1),
    "inc null": set_path(HB, ("inc",), None),
    "seq missing": set_path(HB, ("seq",), DELETE),
    "seq bool": set_path(HB, ("seq",), True),
    "seq float": set_path(HB, ("seq",), 5.0),
    "seq string": set_path(HB, ("seq",), "5"),
    "body missing": set_path(HB, ("b",), DELETE),
    "body list": set_path(HB, ("b",), []),
    "body string": set_path(HB, ("b",), "{}"),
    "body null": set_path(HB, ("b",), None),
    # heartbeat
    "heartbeat owned bool": set_path(HB, ("b", "owned"), False),
    "heartbeat owned float": set_path(HB, ("b", "owned"), 1.5),
    "heartbeat backups missing": set_path(HB, ("b", "backups"), DELETE),
    "heartbeat hello int": set_path(HB, ("b", "hello"), 1),
    "heartbeat addr null": set_path(HB, ("b", "addr"), None),
    # replicate / session state
    "replicate sessions object": set_path(REP, ("b", "s"), {"0": REP["b"]["s"][0]}),
    "replicate handoff string": set_path(REP, ("b", "handoff"), "false"),
    "state not object": set_path(REP, S0, [TOKEN]),
    "state token missing": set_path(REP, (*S0, "k"), DELETE),
    "state token empty": set_path(REP, (*S0, "k"), ""),
    "state token too long": set_path(REP, (*S0, "k"), TOKEN + "a"),
    "state token too short": set_path(REP, (*S0, "k"), TOKEN[:-1]),
    "state token with dot": set_path(REP, (*S0, "k"), TOKEN[:10] + "." + TOKEN[11:]),
    "state token with space": set_path(REP, (*S0, "k"), "abc def"),
    "state token non-ascii": set_path(REP, (*S0, "k"), "é" * 24),
    "state token number": set_path(REP, (*S0, "k"), 12345),
    "state owner number": set_path(REP, (*S0, "o"), 1),
    "state owner not a route": set_path(REP, (*S0, "o"), "node1.evil"),
    "state epoch bool": set_path(REP, (*S0, "e"), True),
    "state epoch negative": set_path(REP, (*S0, "e"), -1),
    "state epoch float": set_path(REP, (*S0, "e"), 3.0),
    "state version zero": set_path(REP, (*S0, "n"), 0),
    "state version bool": set_path(REP, (*S0, "n"), True),
    "state created NaN": set_path(REP, (*S0, "c"), math.nan),
    "state created Infinity": set_path(REP, (*S0, "c"), math.inf),
    "state created huge int": set_path(REP, (*S0, "c"), 10**400),  # float() raises OverflowError
    "state accessed -Infinity": set_path(REP, (*S0, "a"), -math.inf),
    "state accessed bool": set_path(REP, (*S0, "a"), True),
    "state accessed string": set_path(REP, (*S0, "a"), "1700000000"),
    "state data not JSON": set_path(REP, (*S0, "d"), "{not json"),
    "state data a list": set_path(REP, (*S0, "d"), "[1, 2]"),
    "state data an object, not text": set_path(REP, (*S0, "d"), {"a": 1}),
    "state data null": set_path(REP, (*S0, "d"), "null"),
    # ack
    "ack seq bool": set_path(ACK, ("b", "ack"), True),
    "ack stale string": set_path(ACK, ("b", "stale"), TOKEN),
    "ack stale of numbers": set_path(ACK, ("b", "stale"), [1, 2]),
    # accessed
    "accessed item too short": set_path(ACC, ("b", "i", 0), [TOKEN, 3]),
    "accessed item object": set_path(ACC, ("b", "i", 0), {"k": TOKEN}),
    "accessed epoch bool": set_path(ACC, ("b", "i", 0, 1), True),
    "accessed time NaN": set_path(ACC, ("b", "i", 0, 2), math.nan),
    "accessed time huge int": set_path(ACC, ("b", "i", 0, 2), -(10**309)),
    "accessed bad token": set_path(ACC, ("b", "i", 0, 0), "../../etc"),
    # invalidate
    "invalidate reason unknown": set_path(INV, ("b", "reason"), "because"),
    "invalidate reason missing": set_path(INV, ("b", "reason"), DELETE),
    "invalidate tokens string": set_path(INV, ("b", "t"), TOKEN),
    "invalidate token null": set_path(INV, ("b", "t"), [None]),
    # fetch / reply
    "fetch req missing": set_path(FETCH, ("b", "req"), DELETE),
    "fetch token bad": set_path(FETCH, ("b", "k"), "a b"),
    "reply state a string": set_path(REPLY, ("b", "s"), "state"),
    "reply state bad version": set_path(REPLY, ("b", "s", "n"), -3),
    "reply dead int": set_path(REPLY, ("b", "dead"), 0),
    # owned
    "owned backup number": set_path(OWNED, ("b", "b"), 7),
    "owned epoch string": set_path(OWNED, ("b", "e"), "4"),
    "owned epoch bool": set_path(OWNED, ("b", "e"), False),
}


@pytest.mark.parametrize("doc", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_message_raises_malformed(doc: dict[str, Any]) -> None:
    with pytest.raises(m.Malformed):
        m.Envelope.from_json(doc)
    # ...and the same after a real JSON round trip (NaN and Infinity survive json.dumps)
    with pytest.raises(m.Malformed):
        m.Envelope.from_json(json.loads(json.dumps(doc)))


def test_the_unmutated_documents_are_valid() -> None:
    # Otherwise the table above would prove nothing.
    for doc in (HB, REP, ACK, ACC, INV, FETCH, REPLY, OWNED):
        assert m.Envelope.from_json(doc).to_json() == doc


@pytest.mark.parametrize("raw", [None, 1, 1.5, "x", [], [HB], True], ids=repr)
def test_non_object_message_is_malformed(raw: Any) -> None:
    with pytest.raises(m.Malformed):
        m.Envelope.from_json(raw)


# -- property: only Malformed, ever ----------------------------------------------------------
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([10**400, -(10**309), 2**63, True, False, 0, 1])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=5),
    max_leaves=25,
)


def paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += paths(v, (*prefix, i))
    return out


@FUZZ
@given(st.sampled_from(ALL_BODIES), st.data(), JSON)
def test_any_single_field_replaced_parses_or_raises_malformed(body: m.Body, data: st.DataObject, value: Any) -> None:
    doc = valid(body)
    path = data.draw(st.sampled_from(paths(doc)))
    mutated = set_path(doc, path, value if data.draw(st.booleans()) else DELETE)
    try:
        env = m.Envelope.from_json(mutated)
    except m.Malformed:
        return
    # Accepted: then it must be a well-typed message that survives another round trip.
    assert env == roundtrip(env)


@FUZZ
@given(st.dictionaries(st.sampled_from(["v", "t", "src", "inc", "seq", "b"]), JSON), st.sampled_from(list(m.MsgType)))
def test_arbitrary_envelopes_only_raise_malformed(doc: dict[str, Any], kind: m.MsgType) -> None:
    doc.setdefault("v", m.PROTOCOL_VERSION)
    doc.setdefault("t", kind.value)
    try:
        env = m.Envelope.from_json(doc)
    except m.Malformed:
        return
    assert env == roundtrip(env)


@FUZZ
@given(JSON)
def test_arbitrary_json_is_malformed(doc: Any) -> None:
    # Without the protocol version no document can be a message.
    if isinstance(doc, dict):
        doc.pop("v", None)
    with pytest.raises(m.Malformed):
        m.Envelope.from_json(doc)
