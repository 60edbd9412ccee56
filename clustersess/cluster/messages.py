"""The wire protocol: a closed, versioned set of message types.

Every message is an :class:`Envelope` (cluster, channel, type, sender name and
incarnation, per-channel sequence number) around a body of one of the frozen dataclasses
below. Session data travel beside the JSON header as *blobs* (their exact bytes), so a
big session is neither escaped nor re-encoded. Bodies are parsed field by field: anything
missing, mistyped or unknown raises :class:`Malformed`, so the receiver drops the message
instead of acting on it. ``docs/PROTOCOL.md`` says what each message means.

Times are relative (idle seconds, age, remaining lifetime), never another host's clock.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from typing import Any, ClassVar

import orjson

from .. import ids, versions
from ..config import ROUTE_RE
from ..ids import TOKEN_RE

PROTOCOL_VERSION = 2

#: buckets of a resync digest (DIGEST / NEED / PRUNE)
DIGEST_BUCKETS = 64


class Malformed(ValueError):
    """A message that does not follow the protocol."""


class MsgType(str, enum.Enum):
    HEARTBEAT = "heartbeat"  # broadcast: I am alive (membership, self-proof, skew)
    LEAVE = "leave"  # broadcast: I handed my sessions over and am gone
    REPLICATE = "replicate"  # to a backup: full state of sessions (or a hand-off)
    ACK = "ack"  # to the sender of a REPLICATE / INVALIDATE: applied, or refused and why
    ACCESSED = "accessed"  # to a backup: idle times of sessions used since the last pass
    INVALIDATE = "invalidate"  # broadcast and to the backup: these tokens are dead
    FETCH = "fetch"  # to each member: I take this session over; give up and send me your copy
    FETCH_REPLY = "fetch_reply"  # to the fetcher: my copy (or none, or dead, or busy)
    OWNED = "owned"  # broadcast: these sessions are mine now at these epochs
    DROP = "drop"  # to a former backup: you no longer back these up
    RESYNC = "resync"  # broadcast: I had a gap; tell me what I may have missed
    RETIRED = "retired"  # to a node: I retired your incarnation (your sessions were adopted): rejoin
    DIGEST = "digest"  # to a backup: per-bucket hashes of what you should hold of mine
    NEED = "need"  # to an owner: these buckets differ, send them again (or list them)
    PRUNE = "prune"  # to a backup: in these buckets, these are all my sessions you back up
    WANT = "want"  # to an owner: of those listed, send me these (I lack them or hold another state)


class Blobs:
    """Session data carried beside the header, referenced by index."""

    __slots__ = ("items",)

    def __init__(self, items: list[bytes] | None = None) -> None:
        self.items: list[bytes] = items if items is not None else []

    def add(self, data: bytes) -> int:
        self.items.append(data)
        return len(self.items) - 1

    def get(self, index: Any) -> bytes:
        if type(index) is not int or not 0 <= index < len(self.items):
            raise Malformed("bad blob reference")
        return self.items[index]


# -- field parsers (untrusted input) ----------------------------------------------------
def _get(body: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = body.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise Malformed(f"field {key!r} must be {kind}")
    return value


def _int(body: dict[str, Any], key: str, low: int = 0) -> int:
    value = body.get(key)
    if type(value) is not int or value < low:
        raise Malformed(f"field {key!r} must be an integer >= {low}")
    return value


def _num(value: Any, what: str) -> float:
    if type(value) not in (int, float):
        raise Malformed(f"{what} must be a number")
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float (stdlib json parses 1e400 digits)
        raise Malformed(f"{what} is out of range") from None
    if not math.isfinite(number) or number < 0:
        raise Malformed(f"{what} must be a finite number >= 0")
    return number


def _token(value: Any) -> str:
    # ids owns the format; str.isalnum() would also pass non-ASCII letters and digits
    if not isinstance(value, str) or not TOKEN_RE.fullmatch(value):
        raise Malformed("bad token")
    return value


def _tokens(values: list[Any]) -> None:
    """:func:`_token` for the hundreds of tokens of one message, in one pattern match."""
    if not all(type(v) is str for v in values) or not ids.all_tokens(values):
        raise Malformed("bad token")


#: node names that passed :func:`_name` (a cluster has a few; bounded against floods)
_GOOD_NAMES: set[str] = set()


def _name(value: Any) -> str:
    if type(value) is str and value in _GOOD_NAMES:
        return value
    if not isinstance(value, str) or not ROUTE_RE.fullmatch(value):
        raise Malformed("bad node name")
    if len(_GOOD_NAMES) >= 1024:
        _GOOD_NAMES.clear()
    _GOOD_NAMES.add(value)
    return value


#: items a list field of a message may hold
MAX_ITEMS = 100_000


def _list(body: dict[str, Any], key: str, limit: int = MAX_ITEMS) -> list[Any]:
    items: list[Any] = _get(body, key, list)
    if len(items) > limit:
        raise Malformed(f"field {key!r} is too long")
    return items


def _vv(value: Any) -> versions.VV:
    if type(value) is dict and len(value) == 1:
        # The common case, one writer whose name was seen before: no pattern match.
        ((k, n),) = value.items()
        if type(k) is str and k in _GOOD_NAMES and type(n) is int and 0 < n < 2**53:
            return (k, n)
    try:
        vv = versions.from_json(value, ROUTE_RE)
    except ValueError as exc:
        raise Malformed(str(exc)) from None
    if len(vv) == 2:
        _name(vv[0])  # (valid: remembered)
    return vv


def _tuple_of(items: list[Any], arity: int, what: str) -> list[list[Any]]:
    out: list[list[Any]] = []
    for item in items:
        if not isinstance(item, list) or len(item) != arity:
            raise Malformed(f"{what} must be a list of {arity}")
        out.append(item)
    return out


@dataclasses.dataclass(frozen=True, slots=True)
class SessionState:
    """One session as it travels between nodes."""

    token: str
    owner: str
    epoch: int
    vv: versions.VV
    age: float  # seconds since the session was created
    idle: float  # seconds since its last access
    data: bytes  # the session's JSON, exactly as committed by the owner

    @property
    def version(self) -> int:
        return versions.total(self.vv)

    def to_json(self, blobs: Blobs) -> dict[str, Any]:
        return {
            "k": self.token,
            "o": self.owner,
            "e": self.epoch,
            "vv": versions.to_json(self.vv),
            "age": round(self.age, 3),
            "idle": round(self.idle, 3),
            "d": blobs.add(self.data),
        }

    @classmethod
    def from_json(cls, body: Any, blobs: Blobs) -> SessionState:
        if not isinstance(body, dict):
            raise Malformed("session state must be an object")
        data = blobs.get(body.get("d"))
        try:
            if not isinstance(orjson.loads(data), dict):
                raise Malformed("session data must be a JSON object")
        except orjson.JSONDecodeError:
            raise Malformed("session data is not JSON") from None
        vv = _vv(body.get("vv"))
        if not vv:
            raise Malformed("a replicated session has at least one write")
        return cls(
            _token(body.get("k")),
            _name(body.get("o")),  # it ends the session ID (Entry.session_id asserts)
            _int(body, "e"),
            vv,
            _num(body.get("age"), "age"),
            _num(body.get("idle"), "idle"),
            data,
        )


class Body:
    TYPE: ClassVar[MsgType]

    def to_json(self, blobs: Blobs) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_json(cls, body: dict[str, Any], blobs: Blobs) -> Body:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True, slots=True)
class Heartbeat(Body):
    TYPE: ClassVar[MsgType] = MsgType.HEARTBEAT
    address: str
    owned: int
    backups: int
    wall: float  # the sender's wall clock, only to report skew
    hello: bool = False  # a joining node asks everyone to answer with a heartbeat now
    zone: str = ""

    def to_json(self, blobs: Blobs) -> dict[str, Any]:
        return {
            "addr": self.address,
            "owned": self.owned,
            "backups": self.backups,
            "wall": self.wall,
            "hello": self.hello,
            "zone": self.zone,
        }

    @classmethod
    def from_json(cls, body: dict[str, Any], blobs: Blobs) -> Heartbeat:
        zone = _get(body, "zone", str)
        address = _get(body, "addr", str)
        if len(zone) > 64 or len(address) > 256:
            raise Malformed("zone or address too long")
        return cls(
            address,
            _int(body, "owned"),
            _int(body, "backups"),
            _num(body.get("wall"), "wall"),
            _get(body, "hello", bool),
            zone,
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Leave(Body):
    TYPE: ClassVar[MsgType] = MsgType.LEAVE

    def to_json(self, blobs: Blobs) -> dict[str, Any]:
        return {}

    @classmethod
    def from_json(cls, body: dict[str, Any], blobs: Blobs) -> Leave:
        return cls()


@dataclasses.dataclass(frozen=True, slots=True)
class Replicate(Body):
    TYPE: ClassVar[MsgType] = MsgType.REPLICATE
    sessions: tuple[SessionState, ...]
    handoff: bool = False  # the owner is leaving: you own these now

    def to_json(self, blobs: Blobs) -> dict[str, Any]:
        return {"s": [s.to_json(blobs) for s in self.sessions], "handoff": self.handoff}

    @classmethod
    def from_json(cls, body: dict[str, Any], blobs: Blobs) -> Replicate:
        states = tuple(SessionState.from_json(s, blobs) for s in _list(body, "s"))
        return cls(states, _get(body, "handoff", bool))


class Refused(str, enum.Enum):
    SUPERSEDED = "superseded"  # I hold it at a newer epoch: you are not its owner any more
    DIVERGED = "diverged"  # my copy holds writes yours lacks: take it over to reconcile
    DEAD = "dead"  # it was logged out (tombstoned)


@dataclasses.dataclass(frozen=True, slots=True)
class Refusal:
    token: str
    reason: Refused
    epoch: int  # the refuser's epoch for it
    vv: versions.VV  # the refuser's vector for it

    def to_json(self) -> list[Any]:
        return [self.token, self.reason.value, self.epoch, versions.to_json(self.vv)]

    @classmethod
    def from_json(cls, item: list[Any]) -> Refusal:
        try:
            reason = Refused(item[1])
        except ValueError:
            raise Malformed("unknown refusal") from None
        epoch = item[2]
        if type(epoch) is not int or epoch < 0:
            raise Malformed("bad epoch")
        return cls(_token(item[0]), reason, epoch, _vv(item[3]))


@dataclasses.dataclass(frozen=True, slots=True)
class Ack(Body):
    TYPE: ClassVar[MsgType] = MsgType.ACK
    ack: int  # the acknowledged message's sequence number on the acker's channel
    refused: tuple[Refusal, ...] = ()  # everything else in it was applied

    def to_json(self, blobs: Blobs) -> dict[str, Any]:
        return {"ack": self.ack, "refused": [r.to_json() for r in self.refused]}

    @classmethod
    def from_json(cls, body: dict[str, Any], blobs: Blobs) -> Ack:
        items = _list(body, "refused")
        if not items:
            return cls(_int(body, "ack", 1))  # (the common case: everything applied)
        return cls(_int(body, "ack", 1), tuple(Refusal.from_json(i) for i in _tuple_of(items, 4, "refusals")))


@dataclasses.dataclass(frozen=True, slots=True)
class Accessed(Body):
    TYPE: ClassVar[MsgType] = MsgType.ACCESSED
    items: tuple[tuple[str, int, float], ...]  # (token, epoch, idle seconds)

    def to_json(self, blobs: Blobs) -> dict[str, Any]:
        return {"i": [[t, e, round(idle, 3)] for t, e, idle in self.items]}

    @classmethod
    def from_json(cls, body: dict[str, Any], blobs: Blobs) -> Accessed:
        out = []
        for token, epoch, idle in _tuple_of(_list(body, "i"), 3, "accessed items"):
            if type(epoch) is not int or epoch < 0:
                raise Malformed("bad epoch")
            if type(idle) is not float or not 0.0 <= idle < math.inf:  # (the common case)
                idle = _num(idle, "idle")
            out.append((token, epoch, idle))
        _tokens([t for t, _, _ in out])
        return cls(tuple(out))


@dataclasses.dataclass(frozen=True, slots=True)
class Invalidate(Body):
    TYPE: ClassVar[MsgType] = MsgType.INVALIDATE
    items: tuple[tuple[str, float], ...]  # (token, seconds the tombstone has left)
    reason: str = "invalidated"

    def to_json(self, blobs: Blobs) -> dict[str, Any]:
        return {"t": [[t, round(left, 3)] for t, left in self.items], "reason": self.reason}

    @classmethod
    def from_json(cls, body: dict[str, Any], blobs: Blobs) -> Invalidate:
        reason = _get(body, "reason", str)
        if reason not in ("invalidated", "expired"):
            raise Malformed("unknown reason")
        items = _tuple_of(_list(body, "t"), 2, "tombstones")
        return cls(tuple((_token(t), _num(left, "lifetime")) for t, left in items), reason)

    @property
    def tokens(self) -> tuple[str, ...]:
        return tuple(t for t, _ in self.items)


@dataclasses.dataclass(frozen=True, slots=True)
class Fetch(Body):
    TYPE: ClassVar[MsgType] = MsgType.FETCH
    request: str
    token: str
    #: only read it: send your copy, keep ownership (lazy ownership: the request may
    #: never use its session)
    peek: bool = False

    def to_json(self, blobs: Blobs) -> dict[str, Any]:
        return {"req": self.request, "k": self.token, "peek": self.peek}

    @classmethod
    def from_json(cls, body: dict[str, Any], blobs: Blobs) -> Fetch:
        request = _get(body, "req", str)
        if len(request) > 64:
            raise Malformed("request id too long")
        return cls(request, _token(body.get("k")), _get(body, "peek", bool))


@dataclasses.dataclass(frozen=True, slots=True)
class FetchReply(Body):
    TYPE: ClassVar[MsgType] = MsgType.FETCH_REPLY
    request: str
    token: str
    state: SessionState | None
    dead: bool = False
    #: the replier is taking this session over itself right now: try again shortly
    busy: bool = False

    def to_json(self, blobs: Blobs) -> dict[str, Any]:
        return {
            "req": self.request,
            "k": self.token,
            "s": None if self.state is None else self.state.to_json(blobs),
            "dead": self.dead,
            "busy": self.busy,
        }

    @classmethod
    def from_json(cls, body: dict[str, Any], blobs: Blobs) -> FetchReply:
        request = _get(body, "req", str)
        if len(request) > 64:
            raise Malformed("request id too long")
        token = _token(body.get("k"))
        raw = body.get("s")
        state = None if raw is None else SessionState.from_json(raw, blobs)
        if state is not None and state.token != token:
            # the taker matches replies by (request, token) and promotes the state it gets
            raise Malformed("a fetch reply carries the state of the session it names")
        return cls(request, token, state, _get(body, "dead", bool), _get(body, "busy", bool))


@dataclasses.dataclass(frozen=True, slots=True)
class Owned(Body):
    TYPE: ClassVar[MsgType] = MsgType.OWNED
    items: tuple[tuple[str, int, versions.VV], ...]  # (token, epoch, vector)

    def to_json(self, blobs: Blobs) -> dict[str, Any]:
        return {"i": [[t, e, versions.to_json(vv)] for t, e, vv in self.items]}

    @classmethod
    def from_json(cls, body: dict[str, Any], blobs: Blobs) -> Owned:
        # An adoption announces 100,000 of these, and every member parses them all.
        out = []
        tokens = []
        for token, epoch, vv in _tuple_of(_list(body, "i"), 3, "owned items"):
            if type(epoch) is not int or epoch < 0:
                raise Malformed("bad epoch")
            out.append((token, epoch, _vv(vv)))
            tokens.append(token)
        _tokens(tokens)
        return cls(tuple(out))


@dataclasses.dataclass(frozen=True, slots=True)
class Drop(Body):
    TYPE: ClassVar[MsgType] = MsgType.DROP
    items: tuple[tuple[str, int], ...]  # (token, epoch): drop your copy if not newer

    def to_json(self, blobs: Blobs) -> dict[str, Any]:
        return {"i": [list(i) for i in self.items]}

    @classmethod
    def from_json(cls, body: dict[str, Any], blobs: Blobs) -> Drop:
        out = []
        for token, epoch in _tuple_of(_list(body, "i"), 2, "drop items"):
            if type(epoch) is not int or epoch < 0:
                raise Malformed("bad epoch")
            out.append((token, epoch))
        _tokens([t for t, _ in out])
        return cls(tuple(out))


@dataclasses.dataclass(frozen=True, slots=True)
class Resync(Body):
    TYPE: ClassVar[MsgType] = MsgType.RESYNC
    since: float  # how many seconds of messages the sender may have missed

    def to_json(self, blobs: Blobs) -> dict[str, Any]:
        return {"since": round(self.since, 3)}

    @classmethod
    def from_json(cls, body: dict[str, Any], blobs: Blobs) -> Resync:
        return cls(_num(body.get("since"), "since"))


@dataclasses.dataclass(frozen=True, slots=True)
class Retired(Body):
    TYPE: ClassVar[MsgType] = MsgType.RETIRED
    incarnation: str  # the receiver's incarnation that the sender retired

    def to_json(self, blobs: Blobs) -> dict[str, Any]:
        return {"inc": self.incarnation}

    @classmethod
    def from_json(cls, body: dict[str, Any], blobs: Blobs) -> Retired:
        inc = _get(body, "inc", str)
        if not 0 < len(inc) <= 64:
            raise Malformed("bad incarnation")
        return cls(inc)


#: what Digest.to_json writes; int(h, 16) alone also takes "-", "+", "0x", "_", spaces
#: and non-ASCII digits, so a negative or non-canonical "hash" would pass
_HEX64 = re.compile("[0-9a-f]{16}")


def _buckets(body: dict[str, Any], key: str) -> tuple[int, ...]:
    items = _list(body, key, DIGEST_BUCKETS)
    if any(type(b) is not int or not 0 <= b < DIGEST_BUCKETS for b in items):
        raise Malformed("bad bucket")
    return tuple(items)


@dataclasses.dataclass(frozen=True, slots=True)
class Digest(Body):
    TYPE: ClassVar[MsgType] = MsgType.DIGEST
    hashes: tuple[int, ...]  # DIGEST_BUCKETS 64-bit values

    def to_json(self, blobs: Blobs) -> dict[str, Any]:
        return {"h": [f"{h:016x}" for h in self.hashes]}

    @classmethod
    def from_json(cls, body: dict[str, Any], blobs: Blobs) -> Digest:
        items = _list(body, "h", DIGEST_BUCKETS)
        if len(items) != DIGEST_BUCKETS or not all(isinstance(h, str) and _HEX64.fullmatch(h) for h in items):
            raise Malformed("a digest has one 16-digit hex value per bucket")
        return cls(tuple(int(h, 16) for h in items))


@dataclasses.dataclass(frozen=True, slots=True)
class Need(Body):
    TYPE: ClassVar[MsgType] = MsgType.NEED
    buckets: tuple[int, ...]
    #: list the buckets' sessions with their states (PRUNE) and I WANT what I lack,
    #: instead of sending them all again (absent, False, from a node that predates it)
    listing: bool = False

    def to_json(self, blobs: Blobs) -> dict[str, Any]:
        if self.listing:
            return {"b": list(self.buckets), "l": True}
        return {"b": list(self.buckets)}

    @classmethod
    def from_json(cls, body: dict[str, Any], blobs: Blobs) -> Need:
        return cls(_buckets(body, "b"), "l" in body and _get(body, "l", bool))


@dataclasses.dataclass(frozen=True, slots=True)
class Prune(Body):
    TYPE: ClassVar[MsgType] = MsgType.PRUNE
    buckets: tuple[int, ...]
    tokens: tuple[str, ...]  # every session of the sender's you back up in those buckets
    #: each token's epoch and version, to a NEED that asked for a listing (else None);
    #: parallel tuples of ints, not 50,000 pairs (long-lived tuples set off collections)
    epochs: tuple[int, ...] | None = None
    versions: tuple[int, ...] | None = None

    def to_json(self, blobs: Blobs) -> dict[str, Any]:
        if self.epochs is None or self.versions is None:
            return {"b": list(self.buckets), "t": list(self.tokens)}
        return {"b": list(self.buckets), "t": list(self.tokens), "e": list(self.epochs), "n": list(self.versions)}

    @classmethod
    def from_json(cls, body: dict[str, Any], blobs: Blobs) -> Prune:
        tokens = _list(body, "t")
        _tokens(tokens)
        if "e" not in body and "n" not in body:
            return cls(_buckets(body, "b"), tuple(tokens))
        epochs, numbers = _list(body, "e"), _list(body, "n")
        if len(epochs) != len(tokens) or len(numbers) != len(tokens):
            raise Malformed("a listing has one epoch and one version per token")
        if not all(type(n) is int and n >= 0 for n in epochs) or not all(type(n) is int and n >= 0 for n in numbers):
            raise Malformed("epochs and versions are integers >= 0")
        return cls(_buckets(body, "b"), tuple(tokens), tuple(epochs), tuple(numbers))


@dataclasses.dataclass(frozen=True, slots=True)
class Want(Body):
    TYPE: ClassVar[MsgType] = MsgType.WANT
    tokens: tuple[str, ...]  # listed by the owner's PRUNE; the asker lacks them or holds another state

    def to_json(self, blobs: Blobs) -> dict[str, Any]:
        return {"t": list(self.tokens)}

    @classmethod
    def from_json(cls, body: dict[str, Any], blobs: Blobs) -> Want:
        tokens = _list(body, "t")
        _tokens(tokens)
        return cls(tuple(tokens))


BODIES: dict[MsgType, type[Body]] = {
    cls.TYPE: cls
    for cls in (
        Heartbeat, Leave, Replicate, Ack, Accessed, Invalidate, Fetch, FetchReply, Owned, Drop, Resync, Digest,
        Need, Prune, Want, Retired,
    )
}  # fmt: skip
assert set(BODIES) == set(MsgType), "every message type has exactly one body class"
#: the wire name of a type -> its body class
_BODY_OF: dict[str, type[Body]] = {kind.value: cls for kind, cls in BODIES.items()}


@dataclasses.dataclass(frozen=True, slots=True)
class Envelope:
    cluster: str  # the cluster name
    channel: str  # the channel it was published on
    src: str  # sender's node name
    inc: str  # sender's incarnation
    seq: int  # per sender incarnation and channel, strictly increasing
    body: Body

    def header(self, blobs: Blobs) -> dict[str, Any]:
        return header(self.cluster, self.channel, self.src, self.inc, self.seq, self.body, blobs)

    @classmethod
    def from_header(cls, raw: Any, blobs: Blobs) -> Envelope:
        if not isinstance(raw, dict):
            raise Malformed("message must be a JSON object")
        version = raw.get("v")
        if type(version) is not int or version != PROTOCOL_VERSION:  # True == 1 and 1.0 == 1
            raise Malformed(f"unsupported protocol version {raw.get('v')!r}")
        t = raw.get("t")
        body = _BODY_OF.get(t) if type(t) is str else None
        if body is None:
            raise Malformed(f"unknown message type {t!r}")
        inc = _get(raw, "inc", str)
        if not 0 < len(inc) <= 64:
            raise Malformed("bad incarnation")
        return cls(
            _get(raw, "c", str),
            _get(raw, "ch", str),
            _name(raw.get("src")),
            inc,
            _int(raw, "seq", 1),
            body.from_json(_get(raw, "b", dict), blobs),
        )


def header(cluster: str, channel: str, src: str, inc: str, seq: int, body: Body, blobs: Blobs) -> dict[str, Any]:
    """The JSON header of an :class:`Envelope` of these fields (senders build no envelope)."""
    return {
        "v": PROTOCOL_VERSION,
        "c": cluster,
        "ch": channel,
        "t": body.TYPE,  # (a str enum: orjson writes its value)
        "src": src,
        "inc": inc,
        "seq": seq,
        "b": body.to_json(blobs),
    }
