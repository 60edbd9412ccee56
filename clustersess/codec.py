"""JSON encoding of session data: the only format sessions are stored and sent in.

Never pickle: session data crosses the network and a message from Redis is untrusted.
The encoding is canonical for a given dict (insertion order, compact separators), so two
encodings of unchanged data are byte-equal; that is how in-place mutation is detected.

Two encoders produce it. The standard library's defines what can be stored: JSON's own
types, nothing else (no NaN, no datetime, no objects), with a clear error naming the key.
orjson is about ten times faster but accepts more (datetimes, UUIDs, enums, dataclasses)
and writes NaN as ``null``, so it is used only where it cannot differ in what it accepts:
a dict whose values are all exact ``str``/``int``/``float``/``bool``/``None`` (the
common session: a user id, a counter, a flag), each checked at assignment.
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson

from .errors import SessionTooLarge, SessionValueError

#: value types that cannot change in place and always encode the same way
SCALARS = frozenset({str, int, float, bool, type(None)})

_encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"), check_circular=True)
_decoder = json.JSONDecoder()
_c_make_encoder = getattr(json.encoder, "c_make_encoder", None)


def _dumps(data: dict[str, Any]) -> str:
    """``_encoder.encode(data)`` for a dict, calling the C encoder directly.

    Same output and errors; it skips ``JSONEncoder.iterencode``'s per-call set-up, which
    is a measurable part of a session write. A fresh markers dict per call keeps the
    circular-reference check correct when several threads encode at once.
    """
    if _c_make_encoder is None:  # pragma: no cover - CPython always has the C encoder
        return _encoder.encode(data)
    encoder = _c_make_encoder(
        {}, _encoder.default, json.encoder.encode_basestring, None, ":", ",", False, False, False
    )
    return "".join(encoder(data, 0))


def only_scalars(data: dict[str, Any]) -> bool:
    """Every value of ``data`` is an exact JSON scalar (nothing that could change in place)."""
    return SCALARS.issuperset(map(type, dict.values(data)))


def encode(data: dict[str, Any], *, limit: int | None = None, scalars: bool | None = None) -> bytes:
    """Encode session data.

    ``scalars`` is :func:`only_scalars` of ``data`` when the caller already knows it.

    Raises:
        SessionValueError: a value is not JSON-serializable (names the key).
        SessionTooLarge: the encoding is longer than ``limit`` bytes.
    """
    raw: bytes | None = None
    if scalars or (scalars is None and only_scalars(data)):
        # orjson where it cannot differ from the standard library (see the module doc);
        # it refuses big ints, surrogates and non-str keys, and those go the slow way.
        try:
            raw = orjson.dumps(data)
        except orjson.JSONEncodeError:
            pass
        else:
            # orjson writes NaN and infinities as null; most sessions hold no "null" at all.
            # (find(), not ``in``: bytes.__contains__ first tries the needle as an int and
            # formats a TypeError it then discards, several times the cost of the search.)
            if raw.find(b"null") >= 0 and not all(math.isfinite(v) for v in dict.values(data) if type(v) is float):
                raw = None
            else:
                # orjson (3.12+) returns a bytes object whose buffer is at least 4 KiB and
                # never trimmed: stored as is, a 12-byte session would cost 4 KiB. Keep an
                # exact-size copy: %-formatting allocates exactly the result's size, at a
                # third of the cost of bytes(memoryview(raw)).
                raw = b"%b" % raw
    if raw is None:
        try:
            raw = _dumps(data).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise _culprit(data, exc) from None
    if limit is not None and len(raw) > limit:
        raise SessionTooLarge(len(raw), limit)
    return raw


def check_value(key: Any, value: Any) -> bool:
    """Raise :class:`SessionValueError` unless ``session[key] = value`` can be stored.

    Returns whether ``value`` is one of :data:`SCALARS` (exactly, not a subclass).
    """
    kind = type(value)
    # The values that always encode, most common first (this runs on every assignment).
    if type(key) is str and (
        (kind is str and value.isascii())
        or (kind is int and value.bit_length() < 8192)  # far below int-to-str's digit limit
        or kind is bool
        or value is None
        or (kind is float and math.isfinite(value))
    ):
        return True
    if not isinstance(key, str):
        raise SessionValueError(repr(key), f"keys must be str, not {type(key).__name__}")
    try:
        _encoder.encode(value).encode("utf-8")  # utf-8 too: lone surrogates cannot be stored
    except (TypeError, ValueError) as exc:
        raise SessionValueError(key, str(exc)) from None
    return kind in SCALARS


def decode(raw: bytes | str) -> dict[str, Any]:
    """Decode session data; raises ``ValueError`` unless it is a JSON object."""
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8")
    data = _decoder.decode(raw)
    if not isinstance(data, dict):
        raise ValueError("session data must be a JSON object")  # noqa: TRY004 - malformed input, not a caller's bug
    return data


def _culprit(data: dict[str, Any], exc: Exception) -> SessionValueError:
    for key, value in data.items():
        try:
            check_value(key, value)
        except SessionValueError as err:
            return err
    return SessionValueError("?", str(exc))
