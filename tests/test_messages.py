"""The wire vocabulary (protocol 2): every message type round-trips, anything off-protocol is Malformed.

A message from Redis is untrusted input, so :meth:`Envelope.from_header` must turn every
deviation of the header or of a blob (missing field, wrong type, bool posing as int,
NaN, infinite or negative time, bad token, node name or version vector, blob reference
out of range, a blob that is not a JSON object, a list that is too long) into
:class:`Malformed`, and never into any other exception. ``tests/test_wire.py`` tests the
frame around the header (MAC, blob table, sizes).
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clustersess import ids, versions
from clustersess.cluster import messages as m
from clustersess.config import ROUTE_RE

FUZZ = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

CLUSTER = "clustersess"
TOKEN = "tok0" + "A" * 20
TOKEN2 = "tok1-_" + "b" * 18
assert ids.TOKEN_RE.fullmatch(TOKEN) and ids.TOKEN_RE.fullmatch(TOKEN2)
DATA = '{"cart":[1,2],"name":"é","quote":"\\""}'.encode()  # raw UTF-8, an escaped quote
STATE = m.SessionState(TOKEN, "node1", 3, ("node1", 7), 120.25, 0.5, DATA)
STATE2 = m.SessionState(TOKEN2, "node2", 0, ("node1", 1, "node2", 2), 0.0, 0.0, b"{}")
HASHES = (0, 2**64 - 1, *range(1, 63))

#: one representative body per message type (and more where the variants matter)
SAMPLES: dict[m.MsgType, list[m.Body]] = {
    m.MsgType.HEARTBEAT: [
        m.Heartbeat("host:123", 5, 9, 1_700_000_000.5, False, "eu-1"),
        m.Heartbeat("", 0, 0, 0.0, hello=True),
    ],
    m.MsgType.LEAVE: [m.Leave()],
    m.MsgType.REPLICATE: [m.Replicate((STATE, STATE2)), m.Replicate((STATE,), handoff=True), m.Replicate(())],
    m.MsgType.ACK: [
        m.Ack(41),
        m.Ack(1, (m.Refusal(TOKEN, m.Refused.SUPERSEDED, 4, ("node1", 2)), m.Refusal(TOKEN2, m.Refused.DEAD, 0, ()))),
        m.Ack(7, (m.Refusal(TOKEN, m.Refused.DIVERGED, 1, ("a", 1, "b", 1)),)),
    ],
    m.MsgType.ACCESSED: [m.Accessed(((TOKEN, 3, 1.5), (TOKEN2, 0, 0.0)))],
    m.MsgType.INVALIDATE: [m.Invalidate(((TOKEN, 60.0),)), m.Invalidate(((TOKEN, 1.0), (TOKEN2, 0.0)), "expired")],
    m.MsgType.FETCH: [m.Fetch("abcd1234", TOKEN), m.Fetch("r", TOKEN, peek=True)],
    m.MsgType.FETCH_REPLY: [
        m.FetchReply("abcd1234", TOKEN, STATE),
        m.FetchReply("r", TOKEN, None),
        m.FetchReply("r", TOKEN, None, dead=True),
        m.FetchReply("r", TOKEN2, None, busy=True),
    ],
    m.MsgType.OWNED: [m.Owned(((TOKEN, 4, ("node1", 7)), (TOKEN2, 0, ())))],
    m.MsgType.DROP: [m.Drop(((TOKEN, 3), (TOKEN2, 0)))],
    m.MsgType.RESYNC: [m.Resync(12.5), m.Resync(0.0)],
    m.MsgType.RETIRED: [m.Retired("00ff00ff00ff00ff")],
    m.MsgType.DIGEST: [m.Digest(HASHES)],
    m.MsgType.NEED: [m.Need((0, 63), listing=True), m.Need((0, 63)), m.Need(())],
    m.MsgType.PRUNE: [
        m.Prune((1, 2), (TOKEN, TOKEN2), (3, 0), (7, 2**60)),
        m.Prune((1, 2), (TOKEN, TOKEN2)),
        m.Prune((5,), ()),
        m.Prune((5,), (), (), ()),
    ],
    m.MsgType.WANT: [m.Want((TOKEN, TOKEN2)), m.Want(())],
}
ALL_BODIES = [b for bodies in SAMPLES.values() for b in bodies]


def envelope(body: m.Body, *, seq: int = 5, channel: str = f"{CLUSTER}:all") -> m.Envelope:
    return m.Envelope(CLUSTER, channel, "node1", "00ff00ff00ff00ff", seq, body)


def to_wire(env: m.Envelope) -> tuple[dict[str, Any], list[bytes]]:
    """The header as the receiver's JSON decoder returns it, and the blobs."""
    blobs = m.Blobs()
    header = env.header(blobs)
    return orjson.loads(orjson.dumps(header)), blobs.items


def parse(doc: Any, blobs: list[bytes]) -> m.Envelope:
    return m.Envelope.from_header(doc, m.Blobs(list(blobs)))


def roundtrip(env: m.Envelope) -> m.Envelope:
    return parse(*to_wire(env))


def test_samples_cover_every_message_type() -> None:
    assert set(SAMPLES) == set(m.MsgType) == set(m.BODIES)
    for kind, bodies in SAMPLES.items():
        assert all(type(b) is m.BODIES[kind] and b.TYPE is kind for b in bodies)


@pytest.mark.parametrize("body", ALL_BODIES, ids=lambda b: type(b).__name__)
def test_every_message_type_round_trips(body: m.Body) -> None:
    env = envelope(body, seq=12)
    back = roundtrip(env)
    assert back == env
    assert type(back.body) is type(body)
    doc, _ = to_wire(env)
    assert set(doc) == {"v", "c", "ch", "t", "src", "inc", "seq", "b"}
    assert (doc["v"], doc["c"], doc["ch"], doc["t"]) == (m.PROTOCOL_VERSION, CLUSTER, f"{CLUSTER}:all", body.TYPE.value)
    assert (doc["src"], doc["inc"], doc["seq"]) == ("node1", "00ff00ff00ff00ff", 12)


def test_session_data_travel_as_blobs_byte_for_byte() -> None:
    env = envelope(m.Replicate((STATE, STATE2)))
    doc, blobs = to_wire(env)
    assert blobs == [DATA, b"{}"]  # the owner's committed bytes, in order, not re-encoded
    assert [s["d"] for s in doc["b"]["s"]] == [0, 1]
    assert b"cart" not in orjson.dumps(doc)  # no session data inside the header
    back = parse(doc, blobs)
    assert isinstance(back.body, m.Replicate)
    assert back.body.sessions[0].data == DATA
    assert orjson.loads(back.body.sessions[0].data)["name"] == "é"


def test_a_fetch_reply_blob_is_referenced_like_a_replicate_blob() -> None:
    doc, blobs = to_wire(envelope(m.FetchReply("r", TOKEN, STATE)))
    assert doc["b"]["s"]["d"] == 0 and blobs == [DATA]


def test_session_state_wire_form() -> None:
    assert STATE.version == 7 and STATE2.version == 3  # the vector's total
    doc = STATE.to_json(m.Blobs())
    assert doc == {"k": TOKEN, "o": "node1", "e": 3, "vv": {"node1": 7}, "age": 120.25, "idle": 0.5, "d": 0}
    # times travel relative and rounded to milliseconds
    rounded = m.SessionState(TOKEN, "n", 0, ("n", 1), 1.23456, 0.0004, b"{}").to_json(m.Blobs())
    assert (rounded["age"], rounded["idle"]) == (1.235, 0.0)


def test_digest_travels_as_fixed_width_hex() -> None:
    doc, _ = to_wire(envelope(m.Digest(HASHES)))
    assert doc["b"]["h"][:2] == ["0000000000000000", "ffffffffffffffff"]
    assert len(doc["b"]["h"]) == m.DIGEST_BUCKETS


def test_blob_references_must_be_in_range() -> None:
    blobs = m.Blobs([b"{}"])
    assert blobs.get(0) == b"{}"
    for bad in (1, -1, True, 0.0, "0", None):
        with pytest.raises(m.Malformed):
            blobs.get(bad)


# -- malformed ------------------------------------------------------------------------------
Doc = tuple[dict[str, Any], list[bytes]]
DELETE = object()


def valid(body: m.Body) -> Doc:
    return to_wire(envelope(body))


def set_path(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    doc = copy.deepcopy(doc)
    target: Any = doc
    for key in path[:-1]:
        target = target[key]
    if value is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return doc


def bad(base: Doc, path: tuple[Any, ...], value: Any) -> Doc:
    return set_path(base[0], path, value), list(base[1])


HB = valid(SAMPLES[m.MsgType.HEARTBEAT][0])
LEAVE = valid(m.Leave())
REP = valid(SAMPLES[m.MsgType.REPLICATE][0])
ACK = valid(SAMPLES[m.MsgType.ACK][1])
ACC = valid(SAMPLES[m.MsgType.ACCESSED][0])
INV = valid(SAMPLES[m.MsgType.INVALIDATE][1])
FETCH = valid(SAMPLES[m.MsgType.FETCH][0])
REPLY = valid(SAMPLES[m.MsgType.FETCH_REPLY][0])
OWNED = valid(SAMPLES[m.MsgType.OWNED][0])
DROP = valid(SAMPLES[m.MsgType.DROP][0])
RESYNC = valid(SAMPLES[m.MsgType.RESYNC][0])
RETIRED = valid(SAMPLES[m.MsgType.RETIRED][0])
DIGEST = valid(SAMPLES[m.MsgType.DIGEST][0])
NEED = valid(SAMPLES[m.MsgType.NEED][0])
PRUNE = valid(SAMPLES[m.MsgType.PRUNE][0])
WANT = valid(SAMPLES[m.MsgType.WANT][0])
BASES = {
    "heartbeat": HB, "leave": LEAVE, "replicate": REP, "ack": ACK, "accessed": ACC, "invalidate": INV,
    "fetch": FETCH, "reply": REPLY, "owned": OWNED, "drop": DROP, "resync": RESYNC, "digest": DIGEST,
    "need": NEED, "prune": PRUNE, "want": WANT, "retired": RETIRED,
}  # fmt: skip

# families of wrong values, by what the field must be
NOT_TIME = {
    "missing": DELETE, "NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf, "negative": -0.5,
    "negative int": -1, "bool": True, "string": "1.5", "null": None, "list": [1.0], "huge int": 10**400,
}  # fmt: skip
NOT_COUNT = {"missing": DELETE, "bool": True, "false": False, "float": 3.0, "negative": -1, "string": "3", "null": None}
NOT_TOKEN = {
    "missing": DELETE, "empty": "", "too long": TOKEN + "a", "too short": TOKEN[:-1],
    "with dot": TOKEN[:10] + "." + TOKEN[11:], "with space": TOKEN[:23] + " ", "with tilde": TOKEN[:23] + "~",
    "non-ascii": "é" * 24, "arabic digits": "٣" * 24,
    "trailing newline": TOKEN[:23] + "\n", "path": "../../../etc/passwd/xxxxx", "number": 12345, "null": None,
    "list": [TOKEN],
}  # fmt: skip
NOT_NAME = {
    "missing": DELETE, "empty": "", "too long": "n" * 33, "with dot": "node1.evil", "with colon": "a:b",
    "with dash": "a-b", "with brace": "a}", "non-ascii": "nöde", "trailing newline": "node1\n", "number": 1,
    "null": None, "list": ["node1"],
}  # fmt: skip
NOT_VV = {
    "missing": DELETE, "null": None, "list": ["node1", 7], "string": "node1=7", "bad name": {"node.1": 1},
    "count zero": {"node1": 0}, "count negative": {"node1": -1}, "count bool": {"node1": True},
    "count float": {"node1": 1.5}, "count string": {"node1": "7"}, "count 2**53": {"node1": 2**53},
    "too many writers": {f"n{i}": 1 for i in range(versions.MAX_WRITERS + 1)},
}  # fmt: skip
NOT_BOOL = {"missing": DELETE, "int 0": 0, "int 1": 1, "string": "false", "null": None, "list": [True]}
NOT_LIST = {"missing": DELETE, "object": {"0": 1}, "string": "x", "null": None, "number": 1, "bool": True}
NOT_PAIRS = {"short": ["x"], "object": {"k": TOKEN}, "string": TOKEN, "null": None, "empty": []}
NOT_BLOB_REF = {
    "missing": DELETE, "negative": -1, "past the end": 99, "bool": True, "float": 0.0, "string": "0", "null": None,
    "object": {"i": 0},
}  # fmt: skip
NOT_OBJECT_BLOB = {
    "not JSON": b"{not json", "truncated": DATA[:-1], "a list": b"[1, 2]", "null": b"null", "a string": b'"{}"',
    "a number": b"1", "true": b"true", "empty": b"", "not UTF-8": b'{"a":"\xff"}', "trailing": b"{} {}",
    "NaN": b'{"a":NaN}', "nested too deep": b'{"a":' + b"[" * 2000 + b"]" * 2000 + b"}", "two objects": b"{}{}",
}  # fmt: skip
NOT_BUCKETS = {
    **NOT_LIST, "bucket 64": [64], "bucket -1": [-1], "bucket bool": [True], "bucket float": [1.0],
    "bucket string": ["1"], "bucket null": [None], "too many": [*range(64), 0],
}  # fmt: skip


def present(values: dict[str, Any]) -> dict[str, Any]:
    """The wrong values of a family except 'missing' (for items of a list, which cannot be)."""
    return {name: value for name, value in values.items() if value is not DELETE}


def family(prefix: str, base: Doc, path: tuple[Any, ...], values: dict[str, Any]) -> dict[str, Doc]:
    return {f"{prefix} {name}": bad(base, path, value) for name, value in values.items()}


def arity(prefix: str, base: Doc, path: tuple[Any, ...]) -> dict[str, Doc]:
    """An item of a list of tuples: too short, too long, and not a list."""
    item: Any = base[0]
    for key in path:
        item = item[key]
    return {
        f"{prefix} too short": bad(base, path, item[:-1]),
        f"{prefix} too long": bad(base, path, [*item, 0]),
        **family(prefix, base, path, NOT_PAIRS),
    }


S0 = ("b", "s", 0)  # the first session state of REP
R0 = ("b", "refused", 0)  # the first refusal of ACK

MALFORMED: dict[str, Doc] = {
    # -- envelope (on every type: the envelope parser runs before the body's)
    **family("version", HB, ("v",), {
        "missing": DELETE, "1": 1, "3": m.PROTOCOL_VERSION + 1, "0": 0, "string": "2", "bool": True,
        "float": 2.0, "null": None,
    }),
    **family("cluster", HB, ("c",), {"missing": DELETE, "number": 1, "null": None, "list": [CLUSTER]}),
    **family("channel", HB, ("ch",), {"missing": DELETE, "number": 1, "null": None, "object": {"ch": "x"}}),
    **family("type", HB, ("t",), {
        "unknown": "gossip", "missing": DELETE, "list": ["heartbeat"], "object": {"heartbeat": 1},
        "upper-case": "HEARTBEAT", "enum name": "FETCH_REPLY", "null": None, "number": 1,
    }),
    **family("src", HB, ("src",), NOT_NAME),
    **family("inc", HB, ("inc",), {"missing": DELETE, "null": None, "empty": "", "too long": "f" * 65, "number": 1}),
    **family("seq", HB, ("seq",), {**NOT_COUNT, "zero": 0}),
    **{  # even LEAVE, which reads nothing from it, needs an object as its body
        f"{kind} body {name}": bad(base, ("b",), value)
        for kind, base in BASES.items()
        for name, value in {"missing": DELETE, "list": [], "string": "{}", "null": None}.items()
    },
    "leave with another type's name": bad(LEAVE, ("t",), "replicate"),  # a Replicate without 's'
    # -- heartbeat
    **family("heartbeat addr", HB, ("b", "addr"), {
        "missing": DELETE, "null": None, "number": 1, "too long": "a" * 257,
    }),
    **family("heartbeat zone", HB, ("b", "zone"), {
        "missing": DELETE, "null": None, "number": 1, "too long": "z" * 65,
    }),
    **family("heartbeat owned", HB, ("b", "owned"), NOT_COUNT),
    **family("heartbeat backups", HB, ("b", "backups"), NOT_COUNT),
    **family("heartbeat wall", HB, ("b", "wall"), NOT_TIME),
    **family("heartbeat hello", HB, ("b", "hello"), NOT_BOOL),
    # -- replicate and session state
    **family("replicate s", REP, ("b", "s"), NOT_LIST),
    "replicate s too long": bad(REP, ("b", "s"), [0] * 100_001),
    **family("replicate handoff", REP, ("b", "handoff"), NOT_BOOL),
    **family("state", REP, S0, {"list": [TOKEN], "string": TOKEN, "null": None, "number": 0, "empty list": []}),
    **family("state token", REP, (*S0, "k"), NOT_TOKEN),
    **family("state owner", REP, (*S0, "o"), NOT_NAME),
    **family("state epoch", REP, (*S0, "e"), NOT_COUNT),
    **family("state vv", REP, (*S0, "vv"), {**NOT_VV, "empty": {}}),  # a replicated session has a write
    **family("state age", REP, (*S0, "age"), NOT_TIME),
    **family("state idle", REP, (*S0, "idle"), NOT_TIME),
    **family("state data ref", REP, (*S0, "d"), NOT_BLOB_REF),
    "state data ref to the other state's missing blob": (REP[0], REP[1][:1]),
    "no blobs at all": (REP[0], []),
    **{f"state data {name}": (REP[0], [blob, REP[1][1]]) for name, blob in NOT_OBJECT_BLOB.items()},
    **{f"second state data {name}": (REP[0], [REP[1][0], blob]) for name, blob in NOT_OBJECT_BLOB.items()},
    # -- ack and refusals
    **family("ack seq", ACK, ("b", "ack"), {**NOT_COUNT, "zero": 0}),
    **family("ack refused", ACK, ("b", "refused"), NOT_LIST),
    "ack refused too long": bad(ACK, ("b", "refused"), [0] * 100_001),
    **arity("refusal", ACK, R0),
    **family("refusal token", ACK, (*R0, 0), present(NOT_TOKEN)),
    **family("refusal reason", ACK, (*R0, 1), {
        "unknown": "because", "upper-case": "SUPERSEDED", "null": None, "number": 1, "list": ["dead"],
        "object": {"dead": 1},
    }),
    **family("refusal epoch", ACK, (*R0, 2), present(NOT_COUNT)),
    **family("refusal vv", ACK, (*R0, 3), present(NOT_VV)),
    # -- accessed
    **family("accessed i", ACC, ("b", "i"), NOT_LIST),
    "accessed i too long": bad(ACC, ("b", "i"), [0] * 100_001),
    **arity("accessed item", ACC, ("b", "i", 0)),
    **family("accessed token", ACC, ("b", "i", 0, 0), present(NOT_TOKEN)),
    **family("accessed epoch", ACC, ("b", "i", 0, 1), present(NOT_COUNT)),
    **family("accessed idle", ACC, ("b", "i", 0, 2), present(NOT_TIME)),
    # -- invalidate
    **family("invalidate t", INV, ("b", "t"), NOT_LIST),
    "invalidate t too long": bad(INV, ("b", "t"), [0] * 100_001),
    "invalidate t of bare tokens": bad(INV, ("b", "t"), [TOKEN]),  # protocol 1's form
    **arity("invalidate item", INV, ("b", "t", 0)),
    **family("invalidate token", INV, ("b", "t", 0, 0), present(NOT_TOKEN)),
    **family("invalidate lifetime", INV, ("b", "t", 0, 1), present(NOT_TIME)),
    **family("invalidate reason", INV, ("b", "reason"), {
        "missing": DELETE, "unknown": "because", "upper-case": "EXPIRED", "null": None, "number": 1,
    }),
    # -- fetch and its reply
    **family("fetch req", FETCH, ("b", "req"), {"missing": DELETE, "null": None, "number": 1, "too long": "r" * 65}),
    **family("fetch token", FETCH, ("b", "k"), NOT_TOKEN),
    **family("fetch peek", FETCH, ("b", "peek"), NOT_BOOL),
    **family("reply req", REPLY, ("b", "req"), {"missing": DELETE, "null": None, "number": 1, "too long": "r" * 65}),
    **family("reply token", REPLY, ("b", "k"), NOT_TOKEN),
    "reply token not the state's": bad(REPLY, ("b", "k"), TOKEN2),
    **family("reply state", REPLY, ("b", "s"), {"string": "state", "list": [], "number": 0, "false": False}),
    **family("reply state epoch", REPLY, ("b", "s", "e"), NOT_COUNT),
    **family("reply state vv", REPLY, ("b", "s", "vv"), {"empty": {}, "null": None}),
    **family("reply state data ref", REPLY, ("b", "s", "d"), NOT_BLOB_REF),
    **{f"reply state data {name}": (REPLY[0], [blob]) for name, blob in NOT_OBJECT_BLOB.items()},
    **family("reply dead", REPLY, ("b", "dead"), NOT_BOOL),
    **family("reply busy", REPLY, ("b", "busy"), NOT_BOOL),
    # -- owned
    **family("owned i", OWNED, ("b", "i"), NOT_LIST),
    "owned i too long": bad(OWNED, ("b", "i"), [0] * 100_001),
    **arity("owned item", OWNED, ("b", "i", 0)),
    **family("owned token", OWNED, ("b", "i", 0, 0), present(NOT_TOKEN)),
    **family("owned epoch", OWNED, ("b", "i", 0, 1), present(NOT_COUNT)),
    **family("owned vv", OWNED, ("b", "i", 0, 2), present(NOT_VV)),
    # -- drop
    **family("drop i", DROP, ("b", "i"), NOT_LIST),
    "drop i too long": bad(DROP, ("b", "i"), [0] * 100_001),
    **arity("drop item", DROP, ("b", "i", 0)),
    **family("drop token", DROP, ("b", "i", 0, 0), present(NOT_TOKEN)),
    **family("drop epoch", DROP, ("b", "i", 0, 1), present(NOT_COUNT)),
    # -- resync
    **family("resync since", RESYNC, ("b", "since"), NOT_TIME),
    # -- retired
    **family("retired inc", RETIRED, ("b", "inc"), {
        "missing": DELETE, "null": None, "empty": "", "too long": "f" * 65, "number": 1, "list": ["f"],
    }),
    # -- digest, need, prune
    **family("digest h", DIGEST, ("b", "h"), NOT_LIST),
    "digest too few": bad(DIGEST, ("b", "h"), DIGEST[0]["b"]["h"][:-1]),
    "digest too many": bad(DIGEST, ("b", "h"), [*DIGEST[0]["b"]["h"], "0" * 16]),
    "digest empty": bad(DIGEST, ("b", "h"), []),
    **family("digest value", DIGEST, ("b", "h", 0), {
        "15 digits": "0" * 15, "17 digits": "0" * 17, "not hex": "g" * 16, "negative": "-123456789abcdef",
        "plus": "+123456789abcdef", "0x": "0x3456789abcdef0", "underscore": "1_3456789abcdef0",
        "spaces": " 123456789abcde ", "upper-case": "ABCDEF0123456789", "non-ascii digits": "٣" * 16,
        "number": 0, "null": None, "bool": True,
    }),
    **family("need b", NEED, ("b", "b"), NOT_BUCKETS),
    **family("need l", NEED, ("b", "l"), present(NOT_BOOL)),  # (absent: a node from before listings)
    **family("prune b", PRUNE, ("b", "b"), NOT_BUCKETS),
    **family("prune t", PRUNE, ("b", "t"), NOT_LIST),
    "prune t too long": bad(PRUNE, ("b", "t"), [0] * 100_001),
    **family("prune token", PRUNE, ("b", "t", 0), present(NOT_TOKEN)),
    # a listing: both or neither, one of each per token (absent: an answer to a NEED without l)
    **family("prune e", PRUNE, ("b", "e"), present(NOT_LIST)),
    **family("prune n", PRUNE, ("b", "n"), present(NOT_LIST)),
    "prune e missing": bad(PRUNE, ("b", "e"), DELETE),
    "prune n missing": bad(PRUNE, ("b", "n"), DELETE),
    "prune e short": bad(PRUNE, ("b", "e"), [3]),
    "prune n long": bad(PRUNE, ("b", "n"), [7, 2, 1]),
    "prune e too long": bad(PRUNE, ("b", "e"), [0] * 100_001),
    **family("prune epoch", PRUNE, ("b", "e", 0), present(NOT_COUNT)),
    **family("prune version", PRUNE, ("b", "n", 1), present(NOT_COUNT)),
    **family("want t", WANT, ("b", "t"), NOT_LIST),
    "want t too long": bad(WANT, ("b", "t"), [0] * 100_001),
    **family("want token", WANT, ("b", "t", 0), present(NOT_TOKEN)),
}  # fmt: skip


@pytest.mark.parametrize("case", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_message_raises_malformed(case: Doc) -> None:
    doc, blobs = case
    with pytest.raises(m.Malformed):
        parse(doc, blobs)
    # ...and the same after a JSON text round trip (json keeps NaN, Infinity and big ints)
    with pytest.raises(m.Malformed):
        parse(json.loads(json.dumps(doc)), blobs)


#: how the table names a field whose wire key is terse
LABELS = {
    ("ack", "ack"): "seq", ("fetch", "k"): "token", ("reply", "k"): "token", ("reply", "s"): "state",
    ("state", "k"): "token", ("state", "o"): "owner", ("state", "e"): "epoch", ("state", "d"): "data",
    ("envelope", "v"): "version", ("envelope", "c"): "cluster", ("envelope", "ch"): "channel",
    ("envelope", "t"): "type", ("envelope", "b"): "heartbeat body",
}  # fmt: skip


def test_the_table_covers_every_field_of_every_body() -> None:
    # Every field of the envelope, of every body and of a session state has cases of its own.
    docs = {kind: doc["b"] for kind, (doc, _) in BASES.items()}
    docs |= {"state": REP[0]["b"]["s"][0], "envelope": HB[0]}
    for kind, doc in docs.items():
        for key in doc:
            label = LABELS.get((kind, key), key)
            prefix = label if kind == "envelope" else f"{kind} {label}"
            assert any(name.startswith(prefix + " ") for name in MALFORMED), f"no case for {kind}.{key}"


def test_the_unmutated_documents_are_valid() -> None:
    # Otherwise the table above would prove nothing.
    for doc, blobs in BASES.values():
        env = parse(doc, blobs)
        assert to_wire(env) == (doc, blobs)


def test_the_limits_themselves_are_accepted() -> None:
    # The boundaries of the table's "too long" cases, so they test the limit and not the type.
    ok = [
        bad(HB, ("b", "addr"), "a" * 256),
        bad(HB, ("b", "zone"), "z" * 64),
        bad(HB, ("inc",), "f" * 64),
        bad(RETIRED, ("b", "inc"), "f" * 64),
        bad(HB, ("src",), "n" * 32),
        bad(FETCH, ("b", "req"), "r" * 64),
        bad(REPLY, ("b", "req"), "r" * 64),
        bad(NEED, ("b", "b"), list(range(64))),
        bad(REP, (*S0, "vv"), {f"n{i}": 1 for i in range(versions.MAX_WRITERS)}),
        bad(REP, (*S0, "vv"), {"node1": 2**53 - 1}),
        bad(REP, (*S0, "e"), 0),
        bad(REP, (*S0, "age"), 0),  # an int is a number
        bad(HB, ("seq",), 2**63 - 1),
        bad(DIGEST, ("b", "h", 0), "ffffffffffffffff"),
        bad(OWNED, ("b", "i", 0, 2), {}),  # OWNED may announce a session with no write yet
    ]
    for doc, blobs in ok:
        parse(doc, blobs)


@pytest.mark.parametrize("raw", [None, 1, 1.5, "x", [], [HB[0]], True, b"{}"], ids=repr)
def test_non_object_header_is_malformed(raw: Any) -> None:
    with pytest.raises(m.Malformed):
        parse(raw, [])


# -- properties -------------------------------------------------------------------------------
def text(*, min_size: int = 0, max_size: int) -> st.SearchStrategy[str]:
    # no lone surrogates: orjson neither decodes nor encodes them
    return st.text(st.characters(exclude_categories=["Cs"]), min_size=min_size, max_size=max_size)


NAMES = st.from_regex(ROUTE_RE, fullmatch=True)
TOKENS = st.from_regex(ids.TOKEN_RE, fullmatch=True)
MILLIS = st.integers(0, 10**12).map(lambda n: n / 1000)  # times survive the rounding to ms
COUNTS = st.integers(0, 2**63 - 1)
VVS = st.dictionaries(NAMES, st.integers(1, 2**53 - 1), max_size=4).map(versions.from_dict)
WRITTEN = st.dictionaries(NAMES, st.integers(1, 2**53 - 1), min_size=1, max_size=4).map(versions.from_dict)
TEXT = text(max_size=8)
OBJECTS = st.dictionaries(TEXT, st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | TEXT, max_size=4)


@st.composite
def states(draw: st.DrawFn, token: str | None = None) -> m.SessionState:
    return m.SessionState(
        token or draw(TOKENS), draw(NAMES), draw(COUNTS), draw(WRITTEN), draw(MILLIS), draw(MILLIS),
        orjson.dumps(draw(OBJECTS)),
    )  # fmt: skip


@st.composite
def fetch_replies(draw: st.DrawFn) -> m.FetchReply:
    token = draw(TOKENS)
    state = draw(st.none() | states(token))
    return m.FetchReply(draw(text(max_size=64)), token, state, draw(st.booleans()), draw(st.booleans()))


REFUSALS = st.builds(m.Refusal, TOKENS, st.sampled_from(list(m.Refused)), COUNTS, VVS)
BUCKETS = st.lists(st.integers(0, m.DIGEST_BUCKETS - 1), max_size=m.DIGEST_BUCKETS).map(tuple)


def tuples(*parts: st.SearchStrategy[Any]) -> st.SearchStrategy[tuple[Any, ...]]:
    return st.lists(st.tuples(*parts), max_size=3).map(tuple)


#: every message type, with any valid field values
BODY_STRATEGIES: dict[m.MsgType, st.SearchStrategy[m.Body]] = {
    m.MsgType.HEARTBEAT: st.builds(
        m.Heartbeat, text(max_size=256), COUNTS, COUNTS, st.floats(0, 1e12), st.booleans(), text(max_size=64)
    ),
    m.MsgType.LEAVE: st.builds(m.Leave),
    m.MsgType.REPLICATE: st.builds(m.Replicate, st.lists(states(), max_size=3).map(tuple), st.booleans()),
    m.MsgType.ACK: st.builds(m.Ack, st.integers(1, 2**63 - 1), st.lists(REFUSALS, max_size=3).map(tuple)),
    m.MsgType.ACCESSED: st.builds(m.Accessed, tuples(TOKENS, COUNTS, MILLIS)),
    m.MsgType.INVALIDATE: st.builds(m.Invalidate, tuples(TOKENS, MILLIS), st.sampled_from(["invalidated", "expired"])),
    m.MsgType.FETCH: st.builds(m.Fetch, text(max_size=64), TOKENS),
    m.MsgType.FETCH_REPLY: fetch_replies(),
    m.MsgType.OWNED: st.builds(m.Owned, tuples(TOKENS, COUNTS, VVS)),
    m.MsgType.DROP: st.builds(m.Drop, tuples(TOKENS, COUNTS)),
    m.MsgType.RESYNC: st.builds(m.Resync, MILLIS),
    m.MsgType.RETIRED: st.builds(m.Retired, text(min_size=1, max_size=64)),
    m.MsgType.DIGEST: st.builds(
        m.Digest, st.lists(st.integers(0, 2**64 - 1), min_size=m.DIGEST_BUCKETS, max_size=m.DIGEST_BUCKETS).map(tuple)
    ),
    m.MsgType.NEED: st.builds(m.Need, BUCKETS, st.booleans()),
    m.MsgType.PRUNE: st.one_of(
        st.builds(m.Prune, BUCKETS, st.lists(TOKENS, max_size=3).map(tuple)),
        st.lists(st.tuples(TOKENS, COUNTS, COUNTS), max_size=3).flatmap(
            lambda items: st.builds(
                m.Prune, BUCKETS, st.just(tuple(t for t, _, _ in items)),
                st.just(tuple(e for _, e, _ in items)), st.just(tuple(n for _, _, n in items)),
            )
        ),
    ),
    m.MsgType.WANT: st.builds(m.Want, st.lists(TOKENS, max_size=3).map(tuple)),
}
assert set(BODY_STRATEGIES) == set(m.MsgType)
BODIES = st.one_of(*BODY_STRATEGIES.values())
ENVELOPES = st.builds(
    m.Envelope, text(max_size=20), text(max_size=40), NAMES, text(min_size=1, max_size=64),
    st.integers(1, 2**63 - 1), BODIES,
)  # fmt: skip

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([10**400, -(10**309), 2**63, 2**64, True, False, 0, 1, -1, 64])
    | st.floats(allow_nan=True, allow_infinity=True)
    | text(max_size=30)
    | TOKENS
    | NAMES,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(text(max_size=6), children, max_size=5),
    max_leaves=25,
)


@FUZZ
@given(ENVELOPES)
def test_any_valid_message_round_trips(env: m.Envelope) -> None:
    assert roundtrip(env) == env


def paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += paths(v, (*prefix, i))
    return out


def accepted_is_canonical(env: m.Envelope) -> None:
    """An accepted message is well-typed: encoding it again gives a fixed point."""
    again = roundtrip(env)
    assert type(again.body) is type(env.body)
    assert roundtrip(again) == again


@FUZZ
@given(st.sampled_from(ALL_BODIES), st.data(), JSON)
def test_any_single_field_replaced_parses_or_raises_malformed(body: m.Body, data: st.DataObject, value: Any) -> None:
    doc, blobs = valid(body)
    path = data.draw(st.sampled_from(paths(doc)))
    mutated = set_path(doc, path, value if data.draw(st.booleans()) else DELETE)
    try:
        env = parse(mutated, blobs)
    except m.Malformed:
        return
    accepted_is_canonical(env)


@FUZZ
@given(
    st.sampled_from([REP, REPLY]),
    st.binary(max_size=40) | OBJECTS.map(orjson.dumps) | JSON.map(json.dumps).map(str.encode),
)
def test_any_blob_content_parses_as_an_object_or_raises_malformed(base: Doc, blob: bytes) -> None:
    doc, blobs = base
    try:
        env = parse(doc, [blob, *blobs[1:]])
    except m.Malformed:
        return
    state = env.body.sessions[0] if isinstance(env.body, m.Replicate) else env.body.state  # type: ignore[attr-defined]
    assert state.data == blob and isinstance(orjson.loads(blob), dict)


@FUZZ
@given(
    st.dictionaries(st.sampled_from(["v", "c", "ch", "t", "src", "inc", "seq", "b"]), JSON),
    st.sampled_from(list(m.MsgType)),
    st.lists(st.binary(max_size=10) | st.just(b"{}"), max_size=3),
)
def test_arbitrary_envelopes_only_raise_malformed(doc: dict[str, Any], kind: m.MsgType, blobs: list[bytes]) -> None:
    doc.setdefault("v", m.PROTOCOL_VERSION)
    doc.setdefault("t", kind.value)
    try:
        env = parse(doc, blobs)
    except m.Malformed:
        return
    accepted_is_canonical(env)


@FUZZ
@given(st.sampled_from(list(m.MsgType)), JSON, st.lists(st.just(b"{}"), max_size=2))
def test_arbitrary_bodies_only_raise_malformed(kind: m.MsgType, body: Any, blobs: list[bytes]) -> None:
    doc = {**HB[0], "t": kind.value, "b": body}
    try:
        env = parse(doc, blobs)
    except m.Malformed:
        return
    accepted_is_canonical(env)


@FUZZ
@given(JSON)
def test_arbitrary_json_is_malformed(doc: Any) -> None:
    # Without the protocol version no document can be a message.
    if isinstance(doc, dict):
        doc.pop("v", None)
    with pytest.raises(m.Malformed):
        parse(doc, [])
