"""Authenticated frames (protocol 2), and a node's receive path under hostile input.

``Codec.decode(channel, raw)`` raises :class:`WireError` subclasses and nothing else, for
any bytes: ``Oversize`` before any MAC work, ``BadMac`` when any byte after the MAC was
changed (so every header field and every blob is authenticated), ``BadMessage`` for a
frame that is not well-formed, ``WrongChannel`` for a genuine frame that arrived on
another channel or names another cluster. A node drops and counts each kind
(``stats.messages_dropped_*``), applies none of them, never raises out of its receive
callback, and keeps working afterwards: the attacks of issue 12 (a captured message
copied onto another channel, replays, retired incarnations, phantom members) change
nothing. Real-process versions of the attacks are in ``tests/test_outsider.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import struct
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clustersess import SessionManager, versions
from clustersess.cluster import inbox, membership, wire
from clustersess.cluster import messages as m
from clustersess.cluster.wire import (
    MAC_LEN,
    MAGIC,
    MAX_MESSAGE,
    MAX_SESSION_BYTES,
    SALT,
    BadMac,
    BadMessage,
    Codec,
    Oversize,
    WireError,
    WrongChannel,
)
from tests.memcluster import Cluster, Peer, delivered, eventually, token_of, write
from tests.test_messages import ALL_BODIES, BODIES, JSON, NAMES, STATE, STATE2, TOKEN, TOKEN2, text
from tests.utils import TEST_SECRET

FUZZ = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
CLUSTER = "clustersess"
ALL = f"{CLUSTER}:all"
DIRECT = f"{CLUSTER}:node:n1"
INC = "0123456789abcdef"
CODEC = Codec((TEST_SECRET,), CLUSTER)
HB_ENV = m.Envelope(CLUSTER, ALL, "mallory", INC, 3, m.Heartbeat("h:1", 2, 3, 1_700_000_000.0))
REP_ENV = m.Envelope(CLUSTER, DIRECT, "mallory", INC, 7, m.Replicate((STATE, STATE2)))
_PREFIX = len(MAGIC) + MAC_LEN + 4  # magic, MAC, header length


def key_of(secret: str) -> bytes:
    return hmac.new(secret.encode(), SALT, hashlib.sha256).digest()


def frame(head: bytes, blobs: list[bytes] | tuple[bytes, ...] = (), *, secret: str = TEST_SECRET) -> bytes:
    """A correctly authenticated frame around any header bytes, as a keyholder could send."""
    body = struct.pack(">I", len(head)) + head + b"".join(blobs)
    return MAGIC + hmac.new(key_of(secret), body, hashlib.sha256).digest() + body


def signed_header(header: Any, blobs: list[bytes] | tuple[bytes, ...] = ()) -> bytes:
    """A frame of a header document; adds the right blob table unless it has one."""
    if isinstance(header, dict) and "blobs" not in header:
        header = {**header, "blobs": [len(b) for b in blobs]}
    return frame(orjson.dumps(header), blobs)


def split(raw: bytes) -> tuple[bytes, dict[str, Any], list[bytes]]:
    """(MAC, header document with its blob table, blobs) of a frame."""
    mac = raw[len(MAGIC) : len(MAGIC) + MAC_LEN]
    (hlen,) = struct.unpack_from(">I", raw, len(MAGIC) + MAC_LEN)
    header = orjson.loads(raw[_PREFIX : _PREFIX + hlen])
    blobs, offset = [], _PREFIX + hlen
    for n in header["blobs"]:
        blobs.append(raw[offset : offset + n])
        offset += n
    assert offset == len(raw)
    return mac, header, blobs


def join(mac: bytes, header: dict[str, Any], blobs: list[bytes]) -> bytes:
    head = orjson.dumps(header)
    return MAGIC + mac + struct.pack(">I", len(head)) + head + b"".join(blobs)


# -- codec ----------------------------------------------------------------------------------
@pytest.mark.parametrize("body", ALL_BODIES, ids=lambda b: type(b).__name__)
def test_every_message_type_round_trips_through_the_codec(body: m.Body) -> None:
    env = m.Envelope(CLUSTER, DIRECT, "n2", INC, 9, body)
    raw = CODEC.encode(env)
    assert CODEC.decode(DIRECT, raw) == env
    assert CODEC.decode(DIRECT, bytearray(raw)) == env  # type: ignore[arg-type]  # it takes both
    # CS2 | HMAC-SHA256 of everything after it, under the derived key | header length | header | blobs
    assert raw[:3] == b"CS2"
    assert raw[3:35] == hmac.new(key_of(TEST_SECRET), raw[35:], hashlib.sha256).digest()
    _, header, blobs = split(raw)
    assert header.pop("blobs") == [len(b) for b in blobs]
    expected = m.Blobs()
    assert header == env.header(expected) and blobs == expected.items


def test_session_data_are_appended_raw_not_escaped_into_the_header() -> None:
    raw = CODEC.encode(REP_ENV)
    _, header, blobs = split(raw)
    assert blobs == [STATE.data, STATE2.data]
    assert raw.endswith(STATE.data + STATE2.data)
    assert STATE.data not in orjson.dumps(header)


ENVELOPES = st.builds(
    m.Envelope, st.just(CLUSTER), st.sampled_from([ALL, DIRECT]), NAMES, text(min_size=1, max_size=64),
    st.integers(1, 2**63 - 1), BODIES,
)  # fmt: skip


@FUZZ
@given(ENVELOPES)
def test_any_valid_message_round_trips_through_the_codec(env: m.Envelope) -> None:
    assert CODEC.decode(env.channel, CODEC.encode(env)) == env


def test_mac_key_is_derived_not_the_secret_itself() -> None:
    # A cookie signature (keyed by the secret itself) can never pass as a message MAC.
    raw = CODEC.encode(HB_ENV)
    plain = hmac.new(TEST_SECRET.encode(), raw[35:], hashlib.sha256).digest()
    assert plain != raw[3:35]
    with pytest.raises(BadMac):
        CODEC.decode(ALL, MAGIC + plain + raw[35:])


def test_wrong_key_is_rejected() -> None:
    raw = Codec(("someone else's secret",), CLUSTER).encode(HB_ENV)
    with pytest.raises(BadMac):
        CODEC.decode(ALL, raw)


def test_a_receiver_skips_its_own_echoes_but_not_its_heartbeats_twins_or_forgeries() -> None:
    """Redis echoes every broadcast to its sender. A receiver parses its own heartbeats
    (their echo proves its link) and its twin's (same name, other incarnation), skips the
    body of any other message of its own, and authenticates every one first."""
    me = ("mallory", INC)
    owned = m.Envelope(CLUSTER, ALL, "mallory", INC, 8, m.Owned(((TOKEN, 2, ("mallory", 3)),)))
    assert CODEC.decode_received(ALL, CODEC.encode(owned), me) is None
    assert CODEC.decode_received(ALL, CODEC.encode(HB_ENV), me) == HB_ENV
    twin = m.Envelope(CLUSTER, ALL, "mallory", "fedcba9876543210", 8, owned.body)
    assert CODEC.decode_received(ALL, CODEC.encode(twin), me) == twin
    other = m.Envelope(CLUSTER, ALL, "n2", INC, 8, owned.body)
    assert CODEC.decode_received(ALL, CODEC.encode(other), me) == other
    assert CODEC.decode(ALL, CODEC.encode(owned)) == owned  # (decode itself parses everything)
    forged = Codec(("someone else's secret",), CLUSTER).encode(owned)
    with pytest.raises(BadMac):
        CODEC.decode_received(ALL, forged, me)


def test_key_rotation_any_listed_key_verifies_and_the_newest_signs() -> None:
    old, new = "key-2025", "key-2026"
    before = Codec((old,), CLUSTER)
    during = Codec((old, new), CLUSTER)  # oldest first, as in Config
    after = Codec((new,), CLUSTER)
    signed_before = before.encode(HB_ENV)
    assert during.decode(ALL, signed_before) == HB_ENV  # nodes not yet rotated are still heard
    signed_during = during.encode(HB_ENV)
    assert signed_during[3:35] == hmac.new(key_of(new), signed_during[35:], hashlib.sha256).digest()
    assert after.decode(ALL, signed_during) == HB_ENV  # the newest key signs...
    with pytest.raises(BadMac):
        before.decode(ALL, signed_during)  # ...so a node without it cannot read it
    with pytest.raises(BadMac):
        after.decode(ALL, signed_before)  # a retired key is refused
    assert Codec((old, "k2", new), CLUSTER).decode(ALL, signed_before) == HB_ENV  # any listed key


# -- the MAC covers every field ----------------------------------------------------------------
def leaves(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(doc, dict) and doc:
        return [p for k, v in doc.items() for p in leaves(v, (*prefix, k))]
    if isinstance(doc, list) and doc:
        return [p for i, v in enumerate(doc) for p in leaves(v, (*prefix, i))]
    return [prefix]


def changed(value: Any) -> Any:
    """Another value of the same JSON type."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value + 0.5
    if isinstance(value, str):
        return value[:-1] + ("x" if value[-1:] != "x" else "y")
    if isinstance(value, dict):
        return {**value, "x": 1}
    if isinstance(value, list):
        return [*value, 0]
    return 0


def get_path(doc: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        doc = doc[key]
    return doc


def with_path(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    doc = orjson.loads(orjson.dumps(doc))
    get_path(doc, path[:-1])[path[-1]] = value
    return doc


HEADER_FIELDS = [
    (name, path)
    for name, env in (("heartbeat", HB_ENV), ("replicate", REP_ENV))
    for path in leaves(split(CODEC.encode(env))[1])
]


@pytest.mark.parametrize(
    ("kind", "path"), HEADER_FIELDS, ids=[f"{k}:{'.'.join(map(str, p))}" for k, p in HEADER_FIELDS]
)
def test_changing_any_header_field_fails_the_mac(kind: str, path: tuple[Any, ...]) -> None:
    env = HB_ENV if kind == "heartbeat" else REP_ENV
    mac, header, blobs = split(CODEC.encode(env))
    forged = with_path(header, path, changed(get_path(header, path)))
    with pytest.raises(BadMac):
        CODEC.decode(env.channel, join(mac, forged, blobs))
    # ...and it is the MAC that refuses it: signed afresh, the same change gets past it
    try:
        CODEC.decode(env.channel, frame(orjson.dumps(forged), blobs))
    except BadMac:
        pytest.fail(f"a correctly signed frame with {path} changed failed the MAC")
    except WireError:
        pass  # refused for what the change means (a channel, a blob size), not for the MAC


@pytest.mark.parametrize(
    ("field", "value", "then"),
    [
        ("c", "other", WrongChannel),
        ("ch", f"{CLUSTER}:node:n2", WrongChannel),
        ("ch", ALL, WrongChannel),
        ("t", "fetch_reply", BadMessage),
        ("src", "eve", None),
        ("inc", "fedcba9876543210", None),
        ("seq", 8, None),
        ("seq", 1, None),
        ("v", 1, BadMessage),
    ],
)
def test_the_mac_authenticates_cluster_channel_type_sender_incarnation_and_sequence(
    field: str, value: Any, then: type[WireError] | None
) -> None:
    mac, header, blobs = split(CODEC.encode(REP_ENV))
    forged = {**header, field: value}
    with pytest.raises(BadMac):
        CODEC.decode(DIRECT, join(mac, forged, blobs))
    resigned = frame(orjson.dumps(forged), blobs)
    if then is None:  # what a keyholder may legitimately send decodes, with the change
        assert getattr(CODEC.decode(DIRECT, resigned), {"src": "src", "inc": "inc", "seq": "seq"}[field]) == value
    else:
        with pytest.raises(then):
            CODEC.decode(DIRECT, resigned)


@pytest.mark.parametrize("index", [0, 1])
def test_changing_any_blob_fails_the_mac(index: int) -> None:
    mac, header, blobs = split(CODEC.encode(REP_ENV))
    for replacement in (
        blobs[index].replace(b"1", b"2") if b"1" in blobs[index] else b"[]",  # same length, other data
        b'{"x":1}',  # another valid session, sizes table unchanged: only the MAC catches it
        blobs[index] + b" ",
    ):
        forged = list(blobs)
        forged[index] = replacement
        # with the blob table as it was, or fixed to the new sizes: the MAC is checked first
        for doc in (header, {**header, "blobs": [len(b) for b in forged]}):
            with pytest.raises(BadMac):
                CODEC.decode(DIRECT, join(mac, doc, forged))


def test_every_byte_after_the_mac_is_covered() -> None:
    raw = CODEC.encode(REP_ENV)
    hlen_field = range(len(MAGIC) + MAC_LEN, _PREFIX)
    for i in range(len(MAGIC), len(raw)):
        for bit in (0x01, 0x80):
            mutated = bytearray(raw)
            mutated[i] ^= bit
            with pytest.raises(WireError) as caught:
                CODEC.decode(DIRECT, bytes(mutated))
            if i in hlen_field:
                # a header length out of range is refused on structure, before the MAC
                assert caught.type in (BadMac, BadMessage), i
            else:
                assert caught.type is BadMac, (i, bit, caught.value)
    for bad in (raw + b"x", raw + b"{}", raw[:-1], raw[: -len(STATE2.data)]):
        with pytest.raises(BadMac):
            CODEC.decode(DIRECT, bad)


# -- channel and cluster ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "received_on", [ALL, f"{CLUSTER}:node:n2", f"{CLUSTER}:node:n1x", "other:node:n1", "", DIRECT + " "]
)
def test_a_genuine_frame_received_on_another_channel_is_wrong_channel(received_on: str) -> None:
    raw = CODEC.encode(REP_ENV)
    assert CODEC.decode(DIRECT, raw) == REP_ENV
    with pytest.raises(WrongChannel):
        CODEC.decode(received_on, raw)


def test_a_frame_of_another_cluster_with_the_same_secret_is_wrong_channel() -> None:
    other = Codec((TEST_SECRET,), "other")
    raw = CODEC.encode(REP_ENV)
    for channel in (DIRECT, "other:node:n1"):  # even on the very channel it was published on
        with pytest.raises(WrongChannel):
            other.decode(channel, raw)
    # ...and the other way round: a frame naming cluster "other" published on our channel
    theirs = other.encode(m.Envelope("other", DIRECT, "mallory", INC, 1, m.Leave()))
    with pytest.raises(WrongChannel):
        CODEC.decode(DIRECT, theirs)
    assert other.decode(DIRECT, theirs).cluster == "other"


def test_channel_is_checked_only_after_authentication_and_structure() -> None:
    # An outsider cannot make a forgery count as a channel drop, nor a malformed frame.
    forged = Codec(("not the secret",), CLUSTER).encode(REP_ENV)
    with pytest.raises(BadMac):
        CODEC.decode(ALL, forged)
    _, header, blobs = split(CODEC.encode(REP_ENV))
    malformed = signed_header({**header, "seq": 0}, blobs)
    with pytest.raises(BadMessage):
        CODEC.decode(ALL, malformed)


# -- size ---------------------------------------------------------------------------------------
class NoHashing:
    """Stands in for the hmac module: any MAC work fails the test."""

    @staticmethod
    def new(*args: Any, **kw: Any) -> Any:
        raise AssertionError("MAC work on an oversized frame")

    @staticmethod
    def compare_digest(*args: Any) -> bool:
        raise AssertionError("MAC work on an oversized frame")


class NoParsing:
    @staticmethod
    def loads(*args: Any) -> Any:
        raise AssertionError("JSON parsed from an oversized frame")


def replicate_of_size(size: int) -> bytes:
    """A genuine REPLICATE frame of exactly ``size`` bytes (one padded session)."""
    pad = size
    for _ in range(10):
        data = b'{"p":"' + b"x" * pad + b'"}'
        env = m.Envelope(
            CLUSTER,
            DIRECT,
            "mallory",
            INC,
            1,
            m.Replicate((m.SessionState(TOKEN, "mallory", 0, ("mallory", 1), 0.0, 0.0, data),)),
        )
        raw = CODEC.encode(env)
        if len(raw) == size:
            return raw
        pad += size - len(raw)
    raise AssertionError("could not hit the size")


def test_an_oversized_frame_is_refused_before_any_mac_work(monkeypatch: pytest.MonkeyPatch) -> None:
    genuine = replicate_of_size(MAX_MESSAGE + 1)
    monkeypatch.setattr(wire, "hmac", NoHashing)
    monkeypatch.setattr(wire, "orjson", NoParsing)
    with pytest.raises(Oversize):
        CODEC.decode(DIRECT, genuine)
    with pytest.raises(Oversize):
        CODEC.decode(DIRECT, bytearray(genuine) + b"more")  # type: ignore[arg-type]
    # garbage that large costs no hashing either (whichever structure error it is given)
    for garbage in (b"\0" * (MAX_MESSAGE + 1), MAGIC + b"\xff" * MAX_MESSAGE):
        with pytest.raises(WireError):
            CODEC.decode(DIRECT, garbage)


def test_a_frame_of_exactly_the_limit_is_accepted() -> None:
    raw = replicate_of_size(MAX_MESSAGE)
    env = CODEC.decode(DIRECT, raw)
    assert isinstance(env.body, m.Replicate) and len(env.body.sessions[0].data) > MAX_MESSAGE - 1000


def test_the_largest_session_allowed_fits_in_one_frame() -> None:
    # The manager refuses sessions above MAX_SESSION_BYTES at commit (SessionTooLarge);
    # one that size must still travel alone, with room for a big header beside it.
    data = b'{"p":"' + b"x" * (MAX_SESSION_BYTES - 8) + b'"}'
    assert len(data) == MAX_SESSION_BYTES
    vv = tuple(x for i in range(64) for x in (f"node_{i:02}_" + "w" * 20, 2**53 - 1))
    state = m.SessionState(TOKEN, "n" * 32, 2**62, vv, 1e12, 1e12, data)
    raw = CODEC.encode(m.Envelope(CLUSTER, DIRECT, "n" * 32, "i" * 64, 2**62, m.Replicate((state,), handoff=True)))
    assert len(raw) <= MAX_MESSAGE
    assert CODEC.decode(DIRECT, raw).body == m.Replicate((state,), handoff=True)


# -- structure ----------------------------------------------------------------------------------
_, REP_HEADER, REP_BLOBS = split(CODEC.encode(REP_ENV))
GOOD = CODEC.encode(REP_ENV)
REP_HLEN = len(orjson.dumps(REP_HEADER))
V1_FRAME = hmac.new(b"k", b"{}", hashlib.sha256).hexdigest().encode() + b'{"v":1,"t":"leave"}'

BAD_FRAMES: dict[str, bytes] = {
    # too short or not ours
    "empty": b"",
    "one byte": b"C",
    "magic only": MAGIC,
    "no header length": GOOD[: _PREFIX - 1],
    "protocol 1 frame": V1_FRAME,
    "magic CS1": b"CS1" + GOOD[3:],
    "magic lower-case": b"cs2" + GOOD[3:],
    "magic shifted": b" " + GOOD,
    "binary": b"\xff" * 200,
    # header length out of range (refused before the MAC)
    "header length one too many": GOOD[:35] + struct.pack(">I", len(GOOD) - _PREFIX + 1) + GOOD[_PREFIX:],
    "header length 2**32-1": GOOD[:35] + b"\xff\xff\xff\xff" + GOOD[_PREFIX:],
    "truncated in the header": GOOD[: _PREFIX + REP_HLEN - 1],
    "header length, nothing after": GOOD[:_PREFIX],
    # correctly signed, but the header is not a JSON object
    "header empty": frame(b""),
    "header not JSON": frame(b"not json"),
    "header not UTF-8": frame(b'{"a":"\xff"}'),
    "header with trailing bytes": frame(orjson.dumps(REP_HEADER) + b" x", REP_BLOBS),
    "header NaN": frame(b"NaN"),
    "header nested too deep": frame(b"[" * 2000 + b"]" * 2000),
    "header a list": frame(b"[]"),
    "header a string": frame(b'"header"'),
    "header null": frame(b"null"),
    "header a number": frame(b"1"),
    "header true": frame(b"true"),
    "header with a huge int": frame(b'{"seq":' + b"9" * 5000 + b"}"),
    # correctly signed, but the blob table is wrong
    "blob table missing": frame(orjson.dumps({k: v for k, v in REP_HEADER.items() if k != "blobs"}), REP_BLOBS),
    "blob table null": signed_header({**REP_HEADER, "blobs": None}, REP_BLOBS),
    "blob table an object": signed_header({**REP_HEADER, "blobs": {"0": 1}}, REP_BLOBS),
    "blob table a number": signed_header({**REP_HEADER, "blobs": 3}, REP_BLOBS),
    "blob size negative": signed_header(
        {**REP_HEADER, "blobs": [-1, len(REP_BLOBS[1]) + len(REP_BLOBS[0]) + 1]}, REP_BLOBS
    ),
    "blob size bool": signed_header({**REP_HEADER, "blobs": [True, True]}, [b"{", b"}"]),
    "blob size float": signed_header({**REP_HEADER, "blobs": [float(len(b)) for b in REP_BLOBS]}, REP_BLOBS),
    "blob size string": signed_header({**REP_HEADER, "blobs": [str(len(b)) for b in REP_BLOBS]}, REP_BLOBS),
    "blob size null": signed_header({**REP_HEADER, "blobs": [None, len(REP_BLOBS[1])]}, REP_BLOBS),
    "blob sizes short of the frame": signed_header({**REP_HEADER, "blobs": [len(REP_BLOBS[0])]}, REP_BLOBS),
    "blob sizes past the frame": signed_header({**REP_HEADER, "blobs": [len(b) + 1 for b in REP_BLOBS]}, REP_BLOBS),
    "blob table empty, bytes left": signed_header({**REP_HEADER, "blobs": []}, REP_BLOBS),
    "blobs split in the wrong place": signed_header(
        {**REP_HEADER, "blobs": [len(REP_BLOBS[0]) - 1, len(REP_BLOBS[1]) + 1]}, REP_BLOBS
    ),
    "blob reference past the table": signed_header({**REP_HEADER, "blobs": [len(REP_BLOBS[0])]}, REP_BLOBS[:1]),
    "blob not a JSON object": signed_header(REP_HEADER | {"blobs": [2, 2]}, [b"[]", b"{}"]),
    "truncated in the blobs, signed": frame(orjson.dumps(REP_HEADER), [REP_BLOBS[0], REP_BLOBS[1][:-1]]),
    # correctly signed and well framed, but off-protocol
    "protocol version 1": signed_header({**REP_HEADER, "v": 1}, REP_BLOBS),
    "unknown type": signed_header({**REP_HEADER, "t": "gossip"}, REP_BLOBS),
    "sequence 0": signed_header({**REP_HEADER, "seq": 0}, REP_BLOBS),
    "bad token": signed_header(with_path(REP_HEADER, ("b", "s", 0, "k"), "a b"), REP_BLOBS),
    "bad node name": signed_header({**REP_HEADER, "src": "a.b"}, REP_BLOBS),
    "infinite idle": frame(orjson.dumps(REP_HEADER).replace(b'"idle":0.5', b'"idle":1e999'), REP_BLOBS),
}


@pytest.mark.parametrize("raw", list(BAD_FRAMES.values()), ids=list(BAD_FRAMES))
def test_a_frame_that_is_not_well_formed_is_bad_message(raw: bytes) -> None:
    with pytest.raises(BadMessage):
        CODEC.decode(DIRECT, raw)


def test_infinite_idle_case_changes_what_it_says() -> None:
    assert b'"idle":0.5' in orjson.dumps(REP_HEADER)  # otherwise that case tests nothing


@pytest.mark.parametrize("raw", [None, "text", 12, memoryview(GOOD), [GOOD]], ids=repr)
def test_anything_but_bytes_is_bad_message(raw: Any) -> None:
    with pytest.raises(BadMessage):
        CODEC.decode(DIRECT, raw)


def test_truncated_frames_each_fail_at_the_cheapest_check() -> None:
    hlen_end = _PREFIX + REP_HLEN
    for cut in range(len(GOOD)):
        with pytest.raises(WireError) as caught:
            CODEC.decode(DIRECT, GOOD[:cut])
        # before the header's end the structure says so; inside the blobs only the MAC can
        expected = BadMessage if cut < hlen_end else BadMac
        assert caught.type is expected, (cut, caught.value)


# -- fuzzing: only WireError, ever ---------------------------------------------------------------
@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes_only_raise_wire_errors(raw: bytes) -> None:
    for candidate in (raw, MAGIC + raw, GOOD[:_PREFIX] + raw, frame(raw), frame(raw[:20], [raw[20:]])):
        try:
            env = CODEC.decode(DIRECT, candidate)
        except WireError:
            continue
        assert CODEC.decode(env.channel, CODEC.encode(env)) == env


@FUZZ
@given(
    JSON,
    st.sampled_from(list(m.MsgType)),
    st.lists(st.binary(max_size=8) | st.just(b"{}"), max_size=3),
    st.one_of(st.none(), st.lists(st.integers(-2, 10), max_size=4)),
)
def test_signed_arbitrary_headers_only_raise_wire_errors(
    body: Any, kind: m.MsgType, blobs: list[bytes], table: list[int] | None
) -> None:
    doc = {"v": 2, "c": CLUSTER, "ch": DIRECT, "t": kind.value, "src": "x", "inc": "1", "seq": 1, "b": body}
    if table is not None:
        doc["blobs"] = table
    for header in (doc, body):
        try:
            raw = signed_header(header, blobs)
        except orjson.JSONEncodeError:  # NaN, huge ints: nothing a peer could send
            continue
        try:
            env = CODEC.decode(DIRECT, raw)
        except WireError:
            continue
        assert CODEC.decode(DIRECT, CODEC.encode(env)) == env


@FUZZ
@given(st.data())
def test_any_change_to_a_genuine_frame_is_detected(data: st.DataObject) -> None:
    raw = bytearray(GOOD)
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(raw)))
        action = data.draw(st.sampled_from(["set", "insert", "delete"]))
        if action == "insert" or i == len(raw):
            raw[i:i] = data.draw(st.binary(min_size=1, max_size=3))
        elif action == "set":
            raw[i] = data.draw(st.integers(0, 255))
        else:
            del raw[i]
    if bytes(raw) == GOOD:
        return
    with pytest.raises(WireError):
        CODEC.decode(DIRECT, bytes(raw))


# == a node's receive path =======================================================================
@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with Cluster() as c:
        yield c


DROPS = ("auth", "malformed", "oversize", "channel", "replay", "stale", "unknown_member")


def drops(manager: SessionManager) -> dict[str, int]:
    """The drop counters that are not zero."""
    counts = {k: getattr(manager.stats, f"messages_dropped_{k}") for k in DROPS}
    return {k: n for k, n in counts.items() if n}


def spy(node: Any) -> list[m.Envelope]:
    """Every message that reaches one of the node's handlers (LEAVE is handled inline)."""
    seen: list[m.Envelope] = []
    for kind, handler in list(node.inbox.handlers.items()):

        def recording(member: Any, env: m.Envelope, handler: Any = handler) -> None:
            seen.append(env)
            handler(member, env)

        node.inbox.handlers[kind] = recording
    return seen


async def one_node(cluster: Cluster) -> tuple[SessionManager, Any, Peer]:
    [n1] = await cluster.start("n1")
    assert n1.cluster is not None
    return n1, n1.cluster, Peer(cluster.bus)


async def admitted(node: Any, peer: Peer, *, seq: int | None = None) -> None:
    await peer.send(peer.all, peer.heartbeat(), seq=seq)
    await eventually(lambda: node.members.current(peer.name, peer.incarnation) is not None, what="peer admitted")


def state(token: str = TOKEN, n: int = 1, data: bytes = b'{"a":1}') -> m.SessionState:
    return m.SessionState(token, "mallory", 0, ("mallory", n), 0.0, 0.0, data)


async def test_every_kind_of_bad_frame_is_dropped_counted_by_kind_and_never_applied(cluster: Cluster) -> None:
    n1, node, peer = await one_node(cluster)
    await admitted(node, peer)
    seen = spy(node)
    me = node.ch_me
    good = peer.encode(me, m.Replicate((state(),)), seq=10)
    mac, header, blobs = split(good)
    forged_blob = join(mac, header, [blobs[0].replace(b"1", b"2")])
    hostile = {
        "malformed": [
            b"garbage",
            b"\x00" * 500,
            good[:20],
            V1_FRAME,
            frame(b"not json"),
            frame(orjson.dumps({k: v for k, v in header.items() if k != "blobs"}), blobs),  # no blob table
            signed_header(with_path(header, ("b", "s", 0, "k"), "a b"), blobs),
            signed_header({**header, "blobs": [1, len(blobs[0]) - 1]}, [blobs[0][:1], blobs[0][1:]]),
        ],
        "auth": [
            Codec(("not the cluster secret",), CLUSTER).encode(
                m.Envelope(CLUSTER, me, "mallory", peer.incarnation, 11, m.Leave())
            ),
            forged_blob,
            join(mac, {**header, "seq": 12}, blobs),
            good[:-1],
        ],
        "oversize": [replicate_of_size(MAX_MESSAGE + 1)],
        "channel": [
            peer.encode(me, m.Replicate((state(),)), seq=13, named=node.ch_all),
            Peer(cluster.bus, cluster="other").encode(me, m.Replicate((state(),)), seq=14),
        ],
    }
    received = n1.stats.messages_received
    for raws in hostile.values():
        for raw in raws:
            cluster.bus.inject(me, raw)
    await delivered()
    assert drops(n1) == {kind: len(raws) for kind, raws in hostile.items()}
    assert n1.stats.messages_received - received >= sum(map(len, hostile.values()))
    assert seen == [] and TOKEN not in n1.store.backups and peer.got(m.Ack) == []
    assert n1.stats.handler_errors == 0 and n1.stats.replications_applied == 0
    # The genuine frame itself, afterwards, is applied: nothing above used up seq 10.
    cluster.bus.inject(me, good)
    await delivered()
    assert TOKEN in n1.store.backups and [e.seq for e in seen] == [10]
    assert [a.ack for a in peer.got(m.Ack)] == [10]


async def test_the_receive_callback_never_raises(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    n1, node, peer = await one_node(cluster)
    await admitted(node, peer)
    for raw in (None, "text", 12, memoryview(GOOD), bytearray(b"CS2"), b"", [b"x"]):
        node.inbox.on_message(node.ch_me, raw)  # called directly: nothing may propagate
    assert n1.stats.messages_dropped_malformed == 7

    def broken(member: Any, env: m.Envelope) -> None:
        raise RuntimeError("a bug in a handler")

    monkeypatch.setitem(node.inbox.handlers, m.MsgType.DROP, broken)
    node.inbox.on_message(node.ch_me, peer.encode(node.ch_me, m.Drop(())))
    assert n1.stats.handler_errors == 1
    monkeypatch.undo()
    await peer.send(node.ch_me, m.Replicate((state(),)))  # and the next message is handled
    assert TOKEN in n1.store.backups


async def test_a_heartbeat_copied_onto_a_direct_channel_does_not_make_replicates_replays(cluster: Cluster) -> None:
    # Issue 12, case 1: a captured heartbeat with a high sequence number, copied onto a
    # node's direct channel, used to make every later REPLICATE of its sender a "replay".
    n1, node, peer = await one_node(cluster)
    await admitted(node, peer)
    captured = await peer.send(peer.all, peer.heartbeat(), seq=1000)
    cluster.bus.inject(node.ch_me, captured)
    # the same with the frame re-signed by a keyholder for the wrong channel it lands on
    cluster.bus.inject(node.ch_me, peer.encode(peer.all, peer.heartbeat(), seq=2000))
    await delivered()
    assert drops(n1) == {"channel": 2}
    await peer.send(node.ch_me, m.Replicate((state(),)), seq=1)
    assert TOKEN in n1.store.backups and [a.ack for a in peer.got(m.Ack)] == [1]
    assert drops(n1) == {"channel": 2}


async def test_a_replicate_copied_onto_the_broadcast_channel_does_not_make_heartbeats_replays(cluster: Cluster) -> None:
    # Issue 12, case 1, the other way: the sender's heartbeats then counted as replays and
    # it was declared dead while alive.
    n1, node, peer = await one_node(cluster)
    await admitted(node, peer, seq=1)
    captured = await peer.send(node.ch_me, m.Replicate((state(),)), seq=500)
    cluster.bus.inject(node.ch_all, captured)
    await delivered()
    assert drops(n1) == {"channel": 1}
    await peer.send(peer.all, m.Heartbeat("later:1", 0, 0, 0.0), seq=2)
    member = node.members.current(peer.name, peer.incarnation)
    assert member is not None and member.address == "later:1"
    assert drops(n1) == {"channel": 1}


async def test_a_frame_of_another_cluster_sharing_the_secret_is_dropped(cluster: Cluster) -> None:
    n1, node, peer = await one_node(cluster)
    await admitted(node, peer)
    seen = spy(node)
    other = Peer(cluster.bus, cluster="other")
    for raw in (
        other.encode("other:node:n1", m.Replicate((state(),))),  # for the other cluster's n1
        other.encode(node.ch_me, m.Replicate((state(),))),  # names our channel, but cluster "other"
        other.encode("other:all", other.heartbeat()),
    ):
        cluster.bus.inject(node.ch_me, raw)
        cluster.bus.inject(node.ch_all, raw)
    await delivered()
    assert drops(n1) == {"channel": 6}
    assert seen == [] and TOKEN not in n1.store.backups


async def test_a_replayed_sequence_number_is_dropped(cluster: Cluster) -> None:
    n1, node, peer = await one_node(cluster)
    await admitted(node, peer)  # seq 1 on the broadcast channel
    seen = spy(node)
    raw = await peer.send(node.ch_me, m.Replicate((state(),)), seq=2)
    assert n1.stats.replications_applied == 1 and [a.ack for a in peer.got(m.Ack)] == [2]
    del n1.store.backups[TOKEN]
    cluster.bus.inject(node.ch_me, raw)  # the same bytes again
    await peer.send(node.ch_me, m.Replicate((state(n=2),)), seq=2)  # the same seq, freshly signed
    await peer.send(node.ch_me, m.Replicate((state(n=3),)), seq=1)  # a lower one
    assert drops(n1) == {"replay": 3}
    assert TOKEN not in n1.store.backups and len(peer.got(m.Ack)) == 1
    assert [e.seq for e in seen] == [2]
    # sequence numbers are per channel: 2 on the broadcast channel is new there
    await peer.send(peer.all, peer.heartbeat(), seq=2)
    assert drops(n1) == {"replay": 3} and len(seen) == 2


async def test_duplicates_queued_during_admission_are_replays(cluster: Cluster) -> None:
    n1, node, peer = await one_node(cluster)
    raw = peer.encode(peer.all, peer.heartbeat())
    for _ in range(3):  # all three arrive before the claim has been read
        cluster.bus.inject(peer.all, raw)
    await eventually(lambda: node.members.current(peer.name, peer.incarnation) is not None)
    await delivered()
    assert drops(n1) == {"replay": 2}


async def test_a_sequence_gap_asks_for_a_resync(cluster: Cluster) -> None:
    n1, node, peer = await one_node(cluster)
    await admitted(node, peer, seq=1)
    seen = spy(node)
    await peer.send(node.ch_me, m.Drop(()), seq=1)
    published = len(cluster.bus.published)
    await peer.send(node.ch_me, m.Drop(()), seq=4)  # 2 and 3 were lost
    assert n1.stats.gaps_detected == 1
    assert [e.seq for e in seen] == [1, 4]  # the message after the gap is applied all the same

    def resyncs() -> list[m.Envelope]:
        out = []
        for channel, raw in cluster.bus.published[published:]:
            env = peer.codec.decode(channel, raw)
            if isinstance(env.body, m.Resync):
                out.append(env)
        return out

    await eventually(resyncs, what="RESYNC broadcast")
    assert [(e.src, e.channel) for e in resyncs()] == [("n1", node.ch_all)]
    await peer.send(node.ch_me, m.Drop(()), seq=5)
    assert n1.stats.gaps_detected == 1
    # a gap on the broadcast channel counts too (per sender, incarnation and channel)
    await peer.send(peer.all, peer.heartbeat(), seq=3)
    assert n1.stats.gaps_detected == 2
    assert drops(n1) == {}


async def test_the_gap_a_reconnect_leaves_is_covered_by_its_own_resync(cluster: Cluster) -> None:
    """Messages published while the subscription was down show up as a gap on the first
    message of each channel after the reconnect; the reconnect's resync covers them, and
    no second resync is asked for (it came a second later, in the middle of whatever
    followed, with a full digest round). A later gap asks for one as usual."""
    n1, node, peer = await one_node(cluster)
    await admitted(node, peer, seq=1)
    await peer.send(node.ch_me, m.Drop(()), seq=1)
    asked: list[float] = []
    request = node.replication.request_resync
    node.replication.request_resync = lambda since: (asked.append(since), request(since))[1]
    await node._on_connect(False)  # the subscription is back: one resync for the time away
    assert len(asked) == 1
    await peer.send(node.ch_me, m.Drop(()), seq=5)  # 2-4 were published while we were away
    await peer.send(peer.all, peer.heartbeat(), seq=7)
    assert n1.stats.gaps_detected == 2 and len(asked) == 1
    await peer.send(node.ch_me, m.Drop(()), seq=8)  # 6 and 7 lost since: a new gap
    assert n1.stats.gaps_detected == 3 and len(asked) == 2
    assert drops(n1) == {}


async def test_a_message_of_a_retired_incarnation_is_refused(cluster: Cluster) -> None:
    n1, node, peer = await one_node(cluster)
    await admitted(node, peer)
    old = peer.incarnation
    captured = peer.encode(node.ch_me, m.Replicate((state(),)), seq=50)  # recorded, not yet delivered
    # the peer restarts: a new incarnation claims the name and is admitted; the old one retires
    peer.incarnation = "fedcba9876543210"
    peer.claim()
    await admitted(node, peer, seq=1)
    assert node.members.is_retired(peer.name, old)
    seen = spy(node)
    cluster.bus.inject(node.ch_me, captured)
    cluster.bus.inject(node.ch_me, peer.encode(node.ch_me, m.Replicate((state(),)), seq=99, inc=old))
    cluster.bus.inject(peer.all, peer.encode(peer.all, peer.heartbeat(), seq=99, inc=old))
    await delivered()
    assert drops(n1) == {"stale": 3} and seen == [] and TOKEN not in n1.store.backups
    assert node.members.current(peer.name, peer.incarnation) is not None
    # the retired incarnation is told so, once (rate-limited), on its name's channel
    await eventually(lambda: peer.got(m.Retired), what="RETIRED sent")
    assert [r.incarnation for r in peer.got(m.Retired)] == [old]
    # the new incarnation numbers from 1 again on each channel
    await peer.send(node.ch_me, m.Replicate((state(),)), seq=1)
    assert TOKEN in n1.store.backups
    # after a LEAVE the incarnation is retired too
    await peer.send(peer.all, m.Leave(), seq=2)
    assert node.members.live() == []
    await peer.send(node.ch_me, m.Replicate((state(TOKEN2),)), seq=2)
    assert drops(n1) == {"stale": 4} and TOKEN2 not in n1.store.backups


async def test_forgetting_a_retired_incarnation_never_readmits_it(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(membership, "RETIRED_LIMIT", 1)
    n1, node, peer = await one_node(cluster)
    await admitted(node, peer)
    old = peer.incarnation
    peer.incarnation = "fedcba9876543210"
    peer.claim()
    await admitted(node, peer, seq=1)
    node.members.retire("ghost", "0")  # the bounded table forgets the old incarnation
    assert not node.members.is_retired(peer.name, old)
    peer.bus.inject(node.ch_me, peer.encode(node.ch_me, m.Replicate((state(),)), seq=7, inc=old))
    await eventually(lambda: n1.stats.messages_dropped_unknown_member == 1, what="admission refused")
    assert node.members.current(peer.name, peer.incarnation) is not None  # the new one stays
    assert TOKEN not in n1.store.backups


async def test_an_incarnation_that_does_not_hold_its_claim_is_never_admitted(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    n1, node, peer = await one_node(cluster)
    seen = spy(node)
    for holder in ("someone-else", None):  # the claim names another incarnation, or nobody
        if holder is None:
            del cluster.bus.keys[f"{CLUSTER}:claim:{{mallory}}"]
            peer.incarnation = "00000000ffffffff"
        else:
            peer.claim(holder)
        before = n1.stats.messages_dropped_unknown_member
        await peer.send(peer.all, peer.heartbeat(hello=True), seq=1)
        await peer.send(node.ch_me, m.Replicate((state(),)), seq=1)
        target = before + 2
        await eventually(lambda: n1.stats.messages_dropped_unknown_member >= target, what="admission refused")  # noqa: B023
        assert n1.stats.messages_dropped_unknown_member == target
        await peer.send(node.ch_me, m.Replicate((state(),)), seq=2)  # refused at once, no new lookup
        assert n1.stats.messages_dropped_unknown_member == before + 3
    assert node.members.live() == [] and seen == [] and TOKEN not in n1.store.backups
    assert peer.got(m.Ack) == [] and drops(n1) == {"unknown_member": 6}
    # once the incarnation does hold the claim, it is admitted (after the recheck delay)
    monkeypatch.setattr(inbox, "REFUSED_RECHECK", 0.0)
    peer.claim()
    await admitted(node, peer, seq=3)
    await peer.send(node.ch_me, m.Replicate((state(),)), seq=3)
    assert TOKEN in n1.store.backups


async def test_a_hello_once_the_claim_is_held_is_admitted_before_the_recheck_delay(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A node that rejoins answers messages under its new incarnation before Redis has
    # its claim (Redis refusing writes, say): refused. Its hello, sent once it holds the
    # claim, must not wait out REFUSED_RECHECK: what follows it (its OWNED announcements)
    # is sent once only.
    n1, node, peer = await one_node(cluster)
    peer.claim("someone-else")
    await peer.send(node.ch_me, m.Replicate((state(),)), seq=1)
    await eventually(lambda: n1.stats.messages_dropped_unknown_member == 1, what="admission refused")
    peer.claim()
    await peer.send(node.ch_me, m.Replicate((state(),)), seq=2)  # no new lookup yet
    assert n1.stats.messages_dropped_unknown_member == 2
    await peer.send(peer.all, peer.heartbeat(hello=True), seq=3)  # too soon after the refusal
    assert n1.stats.messages_dropped_unknown_member == 3
    monkeypatch.setattr(inbox, "HELLO_RECHECK", 0.0)
    await peer.send(peer.all, peer.heartbeat(hello=True), seq=4)
    await peer.send(node.ch_me, m.Replicate((state(),)), seq=5)  # queued behind the lookup
    await eventually(lambda: node.members.current(peer.name, peer.incarnation) is not None, what="peer admitted")
    await eventually(lambda: TOKEN in n1.store.backups, what="the queued REPLICATE applied")
    assert n1.stats.messages_dropped_unknown_member == 3


async def test_our_own_name_from_another_incarnation_is_never_applied(cluster: Cluster) -> None:
    n1, node, _ = await one_node(cluster)
    seen = spy(node)
    # a recorded (or a keyholder's) frame of another life of n1
    twin = m.Envelope(CLUSTER, node.ch_me, "n1", "ffff0000ffff0000", 1, m.Replicate((state(),)))
    cluster.bus.inject(node.ch_me, CODEC.encode(twin))
    await delivered()
    assert seen == [] and TOKEN not in n1.store.backups and n1.stats.handler_errors == 0


async def test_a_replayed_frame_of_our_previous_life_does_not_stop_a_restart(cluster: Cluster) -> None:
    recorded = CODEC.encode(m.Envelope(CLUSTER, ALL, "n1", "00000000deadbeef", 5, m.Heartbeat("x", 0, 0, 0.0)))

    async def replay() -> None:
        for _ in range(30):
            await asyncio.sleep(0.01)
            cluster.bus.inject(ALL, recorded)

    replaying = asyncio.ensure_future(replay())
    try:
        await cluster.add("n1")  # raises DuplicateNodeError today
    finally:
        await replaying


async def test_the_node_keeps_replicating_after_hostile_input(cluster: Cluster) -> None:
    n1, n2 = await cluster.start("n1", "n2")
    node1: Any = n1.cluster
    node2: Any = n2.cluster
    junk = [b"junk", frame(b"{}"), frame(b"[" * 10_000), Codec(("x",), CLUSTER).encode(HB_ENV), GOOD]
    for raw in junk:
        for channel in (node1.ch_me, node1.ch_all, node2.ch_me):
            cluster.bus.inject(channel, raw)
    await delivered()
    cookie = await write(n1, None, still="fine")
    assert token_of(n1, cookie) in n2.store.backups
    # n2 hears the junk on its own channel and on the broadcast channel; GOOD names n1's
    # channel, so it is a channel drop everywhere but there, where it comes from "mallory",
    # who holds no claim
    assert drops(n2) == {"auth": 2, "malformed": 6, "channel": 2}
    await eventually(lambda: n1.stats.messages_dropped_unknown_member == 1, what="mallory refused")
    assert drops(n1) == {"auth": 2, "malformed": 6, "channel": 1, "unknown_member": 1}
    assert n2.stats.handler_errors == 0 and n1.stats.handler_errors == 0


# -- property: well-formed messages in any order never crash a handler ---------------------------
NODE_TOKENS = ["a" * 24, "b" * 24, "c" * 24]
OWNED = NODE_TOKENS[0]  # replaced by the token of the session the node owns
N_VVS = st.dictionaries(st.sampled_from(["mallory", "n1"]), st.integers(1, 3), min_size=1).map(versions.from_dict)
N_STATES = st.builds(
    m.SessionState, st.sampled_from(NODE_TOKENS), st.sampled_from(["mallory", "n1"]), st.integers(0, 3), N_VVS,
    st.sampled_from([0.0, 5.0, 10_000.0]), st.sampled_from([0.0, 5.0, 10_000.0]), st.sampled_from([b"{}", b'{"a":1}']),
)  # fmt: skip
T = st.sampled_from(NODE_TOKENS)
E = st.integers(0, 4)
N_REFUSALS = st.builds(m.Refusal, T, st.sampled_from(list(m.Refused)), E, N_VVS)
NODE_BODIES = st.one_of(
    st.builds(m.Heartbeat, st.just("p:1"), E, E, st.just(0.0), st.booleans()),
    st.builds(m.Replicate, st.lists(N_STATES, max_size=3).map(tuple), st.booleans()),
    st.builds(m.Ack, st.integers(1, 5), st.lists(N_REFUSALS, max_size=2).map(tuple)),
    st.builds(m.Accessed, st.lists(st.tuples(T, E, st.sampled_from([0.0, 1.0, 1e6])), max_size=2).map(tuple)),
    st.builds(
        m.Invalidate, st.lists(st.tuples(T, st.sampled_from([0.0, 60.0])), max_size=2).map(tuple),
        st.sampled_from(["invalidated", "expired"]),
    ),
    st.builds(m.Fetch, st.just("r1"), T),
    st.builds(m.FetchReply, st.just("r1"), T, st.none(), st.booleans(), st.booleans()),
    st.builds(m.Owned, st.lists(st.tuples(T, E, N_VVS), max_size=2).map(tuple)),
    st.builds(m.Drop, st.lists(st.tuples(T, E), max_size=2).map(tuple)),
    st.builds(m.Resync, st.sampled_from([0.0, 1.0])),
    st.builds(m.Retired, st.sampled_from(["00ff00ff00ff00ff", "n1"])),  # not the node's own incarnation
    st.builds(m.Digest, st.lists(st.integers(0, 3), min_size=64, max_size=64).map(tuple)),
    st.builds(m.Need, st.lists(st.integers(0, 63), max_size=3).map(tuple), st.booleans()),
    st.builds(m.Prune, st.lists(st.integers(0, 63), max_size=3).map(tuple), st.lists(T, max_size=2).map(tuple)),
    st.lists(st.tuples(T, E, E), max_size=2).flatmap(
        lambda items: st.builds(
            m.Prune, st.lists(st.integers(0, 63), max_size=3).map(tuple), st.just(tuple(i[0] for i in items)),
            st.just(tuple(i[1] for i in items)), st.just(tuple(i[2] for i in items)),
        )
    ),
    st.builds(m.Want, st.lists(T, max_size=2).map(tuple)),
)  # fmt: skip


def with_token(body: m.Body, token: str) -> m.Body:
    """``body`` with the placeholder token replaced (tokens have one length)."""
    blobs = m.Blobs()
    env = m.Envelope(CLUSTER, ALL, "mallory", INC, 1, body)
    header = orjson.loads(orjson.dumps(env.header(blobs)).replace(OWNED.encode(), token.encode()))
    return m.Envelope.from_header(header, blobs).body


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 3), NODE_BODIES), min_size=1, max_size=15))
def test_well_formed_messages_in_any_order_never_crash_a_handler(script: list[tuple[bool, int, m.Body]]) -> None:
    async def run() -> None:
        async with Cluster() as nodes:
            [n1] = await nodes.start("n1")
            node: Any = n1.cluster
            peer = Peer(nodes.bus)
            token = token_of(n1, await write(n1, None, own=1))
            seen = spy(node)
            seqs = {True: 0, False: 0}
            for broadcast, step, body in script:
                seqs[broadcast] += step
                channel = peer.all if broadcast else node.ch_me
                await peer.send(channel, with_token(body, token), seq=seqs[broadcast])
            await asyncio.sleep(0.02)  # spawned work (fetch replies, digests) runs too
            assert len(seen) == len(script), "every message reached its handler"
            stats = n1.stats
            assert (stats.handler_errors, stats.task_restarts, stats.messages_dropped_malformed) == (0, 0, 0)
            assert drops(n1).keys() <= {"stale"}  # refused dead sessions; nothing else is dropped
            store = n1.store
            assert not set(store.owned) & set(store.backups), "a token both owned and backed up"
            assert all(e.token == t for t, e in (*store.owned.items(), *store.backups.items()))
            assert all(e.owner == "n1" for e in store.owned.values())
            now = nodes.clock.time()
            assert not [t for t in (*store.owned, *store.backups) if store.is_dead(t, now)], "a buried token lives"

    asyncio.run(run())
