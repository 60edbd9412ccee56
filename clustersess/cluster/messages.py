"""The wire protocol: a closed, versioned set of message types.

Every message is an :class:`Envelope` (protocol version, type, sender name and
incarnation, per-channel sequence number) around a body of one of the frozen dataclasses
below. Bodies are parsed field by field: anything missing, mistyped or unknown raises
:class:`Malformed`, so the receiver drops the message instead of acting on it.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from typing import Any, ClassVar

from ..config import ROUTE_RE, ZONE_RE
from ..ids import TOKEN_RE

PROTOCOL_VERSION = 1


class Malformed(ValueError):
    """A message that does not follow the protocol."""


class MsgType(str, enum.Enum):
    HEARTBEAT = "heartbeat"  # broadcast: I am alive (membership)
    LEAVE = "leave"  # broadcast: I am shutting down cleanly
    REPLICATE = "replicate"  # to a backup: full state of sessions (created / changed / hand-off)
    ACK = "ack"  # to the sender of a REPLICATE: applied
    ACCESSED = "accessed"  # to a backup: coalesced last-access times of read-only sessions
    INVALIDATE = "invalidate"  # broadcast: these tokens are dead (logout, rotation, expiry)
    FETCH = "fetch"  # broadcast: I take this session over; send me your copy
    FETCH_REPLY = "fetch_reply"  # to the fetcher: my copy (or none, or dead)
    OWNED = "owned"  # broadcast: this session now belongs to me at this epoch
    RESYNC = "resync"  # to an owner: I may have missed messages, resend what I back up


def _get(body: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = body.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise Malformed(f"field {key!r} must be {kind}")
    return value


def _num(body: dict[str, Any], key: str) -> float:
    value = _get(body, key, (int, float))
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float: not ValueError, would escape decode()
        raise Malformed(f"field {key!r} is out of range") from None
    # NaN and Infinity are valid JSON to Python; an infinite last-access time never expires.
    if isinstance(value, bool) or not math.isfinite(number):
        raise Malformed(f"field {key!r} must be a finite number")
    return number


def _token(body: dict[str, Any], key: str = "k") -> str:
    value: str = _get(body, key, str)
    # ids owns the format; str.isalnum() would also pass non-ASCII letters and digits
    if not TOKEN_RE.fullmatch(value):
        raise Malformed("bad token")
    return value


def _tokens(body: dict[str, Any], key: str) -> tuple[str, ...]:
    items = _get(body, key, list)
    return tuple(_token({"k": t}) for t in items)


@dataclasses.dataclass(frozen=True, slots=True)
class SessionState:
    """Full state of one session as it travels between nodes."""

    token: str
    owner: str
    epoch: int
    version: int
    created: float
    last_accessed: float
    data: str  # the session's JSON text, exactly as committed by the owner

    def to_json(self) -> dict[str, Any]:
        return {
            "k": self.token,
            "o": self.owner,
            "e": self.epoch,
            "n": self.version,
            "c": self.created,
            "a": self.last_accessed,
            "d": self.data,
        }

    @classmethod
    def from_json(cls, body: Any) -> SessionState:
        if not isinstance(body, dict):
            raise Malformed("session state must be an object")
        data = _get(body, "d", str)
        try:
            if not isinstance(json.loads(data), dict):
                raise Malformed("session data must be a JSON object")
        except ValueError:
            raise Malformed("session data is not JSON") from None
        owner = _get(body, "o", str)
        if not ROUTE_RE.fullmatch(owner):  # it ends the session ID (Entry.session_id asserts)
            raise Malformed("owner must be a node name")
        state = cls(
            _token(body),
            owner,
            _get(body, "e", int),
            _get(body, "n", int),
            _num(body, "c"),
            _num(body, "a"),
            data,
        )
        if state.epoch < 0 or state.version < 1:
            raise Malformed("epoch and version must be positive")
        return state


class Body:
    TYPE: ClassVar[MsgType]

    def to_json(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Body:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True, slots=True)
class Heartbeat(Body):
    TYPE: ClassVar[MsgType] = MsgType.HEARTBEAT
    address: str
    owned: int
    backups: int
    hello: bool = False  # a joining node asks everyone to answer with a heartbeat now
    zone: str = ""  # the sender's failure domain (Config.zone); "" from nodes that announce none

    def to_json(self) -> dict[str, Any]:
        return {"addr": self.address, "owned": self.owned, "backups": self.backups, "hello": self.hello, "zone": self.zone}

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Heartbeat:
        # Optional, so a node of an older release stays a member during a rolling upgrade.
        zone = body.get("zone", "")
        if not isinstance(zone, str) or (zone and not ZONE_RE.fullmatch(zone)):
            raise Malformed("zone must be a zone name")
        return cls(
            _get(body, "addr", str), _get(body, "owned", int), _get(body, "backups", int), _get(body, "hello", bool), zone
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Leave(Body):
    TYPE: ClassVar[MsgType] = MsgType.LEAVE

    def to_json(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Leave:
        return cls()


@dataclasses.dataclass(frozen=True, slots=True)
class Replicate(Body):
    TYPE: ClassVar[MsgType] = MsgType.REPLICATE
    sessions: tuple[SessionState, ...]
    handoff: bool = False  # the owner is leaving: adopt these sessions

    def to_json(self) -> dict[str, Any]:
        return {"s": [s.to_json() for s in self.sessions], "handoff": self.handoff}

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Replicate:
        return cls(tuple(SessionState.from_json(s) for s in _get(body, "s", list)), _get(body, "handoff", bool))


@dataclasses.dataclass(frozen=True, slots=True)
class Ack(Body):
    TYPE: ClassVar[MsgType] = MsgType.ACK
    ack: int  # the acknowledged REPLICATE's sequence number
    stale: tuple[str, ...] = ()  # tokens the receiver holds at a newer epoch: you lost them

    def to_json(self) -> dict[str, Any]:
        return {"ack": self.ack, "stale": list(self.stale)}

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Ack:
        return cls(_get(body, "ack", int), _tokens(body, "stale"))


@dataclasses.dataclass(frozen=True, slots=True)
class Accessed(Body):
    TYPE: ClassVar[MsgType] = MsgType.ACCESSED
    items: tuple[tuple[str, int, float], ...]  # (token, epoch, last_accessed)

    def to_json(self) -> dict[str, Any]:
        return {"i": [list(i) for i in self.items]}

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Accessed:
        items = []
        for item in _get(body, "i", list):
            if not isinstance(item, list) or len(item) != 3:
                raise Malformed("accessed item must be [token, epoch, time]")
            items.append((_token({"k": item[0]}), _get({"e": item[1]}, "e", int), _num({"a": item[2]}, "a")))
        return cls(tuple(items))


@dataclasses.dataclass(frozen=True, slots=True)
class Invalidate(Body):
    TYPE: ClassVar[MsgType] = MsgType.INVALIDATE
    tokens: tuple[str, ...]
    reason: str = "invalidated"

    def to_json(self) -> dict[str, Any]:
        return {"t": list(self.tokens), "reason": self.reason}

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Invalidate:
        reason = _get(body, "reason", str)
        if reason not in ("invalidated", "expired"):
            raise Malformed("unknown reason")
        return cls(_tokens(body, "t"), reason)


@dataclasses.dataclass(frozen=True, slots=True)
class Fetch(Body):
    TYPE: ClassVar[MsgType] = MsgType.FETCH
    request: str
    token: str

    def to_json(self) -> dict[str, Any]:
        return {"req": self.request, "k": self.token}

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Fetch:
        return cls(_get(body, "req", str), _token(body))


@dataclasses.dataclass(frozen=True, slots=True)
class FetchReply(Body):
    TYPE: ClassVar[MsgType] = MsgType.FETCH_REPLY
    request: str
    token: str
    state: SessionState | None
    dead: bool = False
    #: the replier is taking this session over itself right now: try again shortly
    busy: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "req": self.request,
            "k": self.token,
            "s": None if self.state is None else self.state.to_json(),
            "dead": self.dead,
            "busy": self.busy,
        }

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> FetchReply:
        raw = body.get("s")
        state = None if raw is None else SessionState.from_json(raw)
        return cls(_get(body, "req", str), _token(body), state, _get(body, "dead", bool), _get(body, "busy", bool))


@dataclasses.dataclass(frozen=True, slots=True)
class Owned(Body):
    TYPE: ClassVar[MsgType] = MsgType.OWNED
    token: str
    epoch: int
    backup: str | None

    def to_json(self) -> dict[str, Any]:
        return {"k": self.token, "e": self.epoch, "b": self.backup}

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Owned:
        backup = body.get("b")
        if backup is not None and not isinstance(backup, str):
            raise Malformed("backup must be a name or null")
        return cls(_token(body), _get(body, "e", int), backup)


@dataclasses.dataclass(frozen=True, slots=True)
class Resync(Body):
    TYPE: ClassVar[MsgType] = MsgType.RESYNC

    def to_json(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Resync:
        return cls()


BODIES: dict[MsgType, type[Body]] = {
    cls.TYPE: cls for cls in (Heartbeat, Leave, Replicate, Ack, Accessed, Invalidate, Fetch, FetchReply, Owned, Resync)
}
assert set(BODIES) == set(MsgType), "every message type has exactly one body class"


@dataclasses.dataclass(frozen=True, slots=True)
class Envelope:
    src: str  # sender's node name
    inc: str  # sender's incarnation (sortable: start time first)
    seq: int  # per sender incarnation and channel, strictly increasing
    body: Body

    def to_json(self) -> dict[str, Any]:
        return {
            "v": PROTOCOL_VERSION,
            "t": self.body.TYPE.value,
            "src": self.src,
            "inc": self.inc,
            "seq": self.seq,
            "b": self.body.to_json(),
        }

    @classmethod
    def from_json(cls, raw: Any) -> Envelope:
        if not isinstance(raw, dict):
            raise Malformed("message must be a JSON object")
        version = raw.get("v")
        if type(version) is not int or version != PROTOCOL_VERSION:  # True == 1 and 1.0 == 1
            raise Malformed(f"unsupported protocol version {raw.get('v')!r}")
        try:
            kind = MsgType(raw.get("t"))
        except ValueError:
            raise Malformed(f"unknown message type {raw.get('t')!r}") from None
        body = _get(raw, "b", dict)
        return cls(_get(raw, "src", str), _get(raw, "inc", str), _get(raw, "seq", int), BODIES[kind].from_json(body))
