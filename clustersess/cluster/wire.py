"""Authenticated encoding of envelopes: ``<hex HMAC-SHA256><JSON>``.

The MAC key is derived from the cluster secret with its own salt, so a cookie signature
can never pass as a message MAC or the other way round. Any key of the rotation list
verifies; the newest signs. A message from Redis is untrusted input: decode() raises
:class:`WireError` subclasses, never anything else.
"""

from __future__ import annotations

import hashlib
import hmac
import json

from .messages import Envelope, Malformed

SALT = b"clustersess.wire.v1"
MAC_LEN = 64  # hex digits of SHA-256
MAX_MESSAGE = 8 * 1024 * 1024


class WireError(ValueError):
    pass


class BadMac(WireError):
    pass


class BadMessage(WireError):
    pass


class Codec:
    def __init__(self, secret_keys: tuple[str, ...]) -> None:
        assert secret_keys, "Config guarantees at least one key"
        self._keys = [hmac.new(k.encode(), SALT, hashlib.sha256).digest() for k in reversed(secret_keys)]

    def encode(self, envelope: Envelope) -> bytes:
        payload = json.dumps(envelope.to_json(), separators=(",", ":"), ensure_ascii=False).encode()
        mac = hmac.new(self._keys[0], payload, hashlib.sha256).hexdigest().encode()
        return mac + payload

    def decode(self, raw: bytes) -> Envelope:
        if not isinstance(raw, (bytes, bytearray)) or len(raw) <= MAC_LEN or len(raw) > MAX_MESSAGE:
            raise BadMac("message too short, too long or not bytes")
        mac, payload = bytes(raw[:MAC_LEN]), bytes(raw[MAC_LEN:])
        for key in self._keys:
            if hmac.compare_digest(hmac.new(key, payload, hashlib.sha256).hexdigest().encode(), mac):
                break
        else:
            raise BadMac("message authentication failed")
        try:
            return Envelope.from_json(json.loads(payload))
        except (ValueError, Malformed, RecursionError) as exc:
            raise BadMessage(str(exc)) from None
