"""JSON encoding of session data: the only format sessions are stored and sent in.

Never pickle: session data crosses the network and a message from Redis is untrusted.
The encoding is canonical for a given dict (insertion order, compact separators), so two
encodings of unchanged data are byte-equal; that is how in-place mutation is detected.
"""

from __future__ import annotations

import json
import math
from typing import Any

from .errors import SessionTooLarge, SessionValueError

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


def encode(data: dict[str, Any], *, limit: int | None = None) -> bytes:
    """Encode session data.

    Raises:
        SessionValueError: a value is not JSON-serializable (names the key).
        SessionTooLarge: the encoding is longer than ``limit`` bytes.
    """
    try:
        raw = _dumps(data).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise _culprit(data, exc) from None
    if limit is not None and len(raw) > limit:
        raise SessionTooLarge(len(raw), limit)
    return raw


def check_value(key: Any, value: Any) -> None:
    """Raise :class:`SessionValueError` unless ``session[key] = value`` can be stored."""
    if not isinstance(key, str):
        raise SessionValueError(repr(key), f"keys must be str, not {type(key).__name__}")
    # Fast path for the values that always encode (most assignments): no encoder run.
    kind = type(value)
    if (
        (kind is str and value.isascii())
        or kind is bool
        or value is None
        or (kind is int and value.bit_length() < 8192)  # far below int-to-str's digit limit
        or (kind is float and math.isfinite(value))
    ):
        return
    try:
        _encoder.encode(value).encode("utf-8")  # utf-8 too: lone surrogates cannot be stored
    except (TypeError, ValueError) as exc:
        raise SessionValueError(key, str(exc)) from None


def decode(raw: bytes | str) -> dict[str, Any]:
    """Decode session data; raises ``ValueError`` unless it is a JSON object."""
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8")
    data = _decoder.decode(raw)
    if not isinstance(data, dict):
        raise ValueError("session data must be a JSON object")
    return data


def _culprit(data: dict[str, Any], exc: Exception) -> SessionValueError:
    for key, value in data.items():
        try:
            check_value(key, value)
        except SessionValueError as err:
            return err
    return SessionValueError("?", str(exc))
