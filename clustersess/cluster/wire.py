"""Authenticated frames: ``CS2 | HMAC-SHA256 | header length | header JSON | blobs``.

The MAC covers every byte after it (the header names the cluster and the channel, so a
message copied to another channel or cluster is recognised as such), under a key derived
from the cluster secret with its own salt: a cookie signature can never pass as a message
MAC or the other way round. Any key of the rotation list verifies; the newest signs.

A message from Redis is untrusted input: :meth:`Codec.decode` raises :class:`WireError`
subclasses, never anything else, and checks the cheap things first: the frame's structure
and size before the MAC (an oversized frame costs no hashing and is counted as
*oversize*, not as an authentication failure), the MAC before parsing any JSON.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

import orjson

from . import messages
from .messages import Blobs, Body, Envelope, Malformed

SALT = b"clustersess.wire.v2"
MAGIC = b"CS2"
MAC_LEN = 32
_HLEN = struct.Struct(">I")
_PREFIX = len(MAGIC) + MAC_LEN + _HLEN.size
#: the largest frame a receiver accepts (Redis disconnects a pub/sub subscriber whose
#: output buffer passes 32 MB; a frame this size never gets near it)
MAX_MESSAGE = 4 * 1024 * 1024
#: senders split batches of sessions at about this many bytes
BATCH_BYTES = 512 * 1024
#: room for a frame's header beside the largest session it carries
HEADER_ROOM = 64 * 1024
#: the largest session (bytes of JSON) that fits in one frame
MAX_SESSION_BYTES = MAX_MESSAGE - HEADER_ROOM


class WireError(ValueError):
    """Why a frame was dropped; ``kind`` names the counter it goes to."""

    kind = "malformed"


class Oversize(WireError):
    kind = "oversize"


class BadMac(WireError):
    kind = "auth"


class BadMessage(WireError):
    kind = "malformed"


class WrongChannel(WireError):
    """Authentic, but published on another channel or by another cluster than it names."""

    kind = "channel"


class Codec:
    def __init__(self, secret_keys: tuple[str, ...], cluster: str) -> None:
        assert secret_keys, "Config guarantees at least one key"
        self.cluster = cluster
        keys = [hmac.new(k.encode(), SALT, hashlib.sha256).digest() for k in reversed(secret_keys)]
        # One keyed HMAC per key, copied for each frame: the copy skips the key set-up
        # (two hashed pads), a third of what a MAC over a small frame costs.
        self._macs = [hmac.new(key, digestmod=hashlib.sha256) for key in keys]

    def _mac(self, index: int, body: bytes | memoryview) -> bytes:
        h = self._macs[index].copy()
        h.update(body)
        return h.digest()

    def encode(self, envelope: Envelope) -> bytes:
        e = envelope
        return self.frame(e.channel, e.src, e.inc, e.seq, e.body, cluster=e.cluster)

    def frame(self, channel: str, src: str, inc: str, seq: int, body: Body, *, cluster: str | None = None) -> bytes:
        """The frame of a message of these fields (what :meth:`encode` makes of their
        envelope) in this codec's cluster unless ``cluster`` says otherwise."""
        blobs = Blobs()
        header = messages.header(self.cluster if cluster is None else cluster, channel, src, inc, seq, body, blobs)
        items = blobs.items
        header["blobs"] = [len(b) for b in items] if items else []
        head = orjson.dumps(header)
        hlen = _HLEN.pack(len(head))
        h = self._macs[0].copy()
        h.update(hlen)
        h.update(head)
        for item in items:
            h.update(item)
        return b"".join([MAGIC, h.digest(), hlen, head, *items])

    def decode(self, channel: str, raw: bytes) -> Envelope:
        """The envelope of ``raw`` as received on ``channel``; raises :class:`WireError`."""
        envelope = self._decode(channel, raw, None)
        assert envelope is not None
        return envelope

    def decode_received(self, channel: str, raw: bytes, own: tuple[str, str]) -> Envelope | None:
        """:meth:`decode` for a receiver that is ``own`` (name, incarnation): a message of
        its own other than a heartbeat (Redis echoes every broadcast to its sender, who
        ignores it) is authenticated and then not parsed: None. (An adoption's claims
        leave 100 times a second; each took 1 ms to parse, again, by their sender.)"""
        return self._decode(channel, raw, own)

    def _decode(self, channel: str, raw: bytes, own: tuple[str, str] | None) -> Envelope | None:
        if not isinstance(raw, (bytes, bytearray)):
            raise BadMessage("not bytes")
        if len(raw) < _PREFIX or raw[: len(MAGIC)] != MAGIC:
            raise BadMessage("not a clustersess frame")
        if len(raw) > MAX_MESSAGE:
            raise Oversize(f"{len(raw)} bytes")
        (hlen,) = _HLEN.unpack_from(raw, len(MAGIC) + MAC_LEN)
        if hlen > len(raw) - _PREFIX:
            raise BadMessage("header length out of range")
        mac = bytes(raw[len(MAGIC) : len(MAGIC) + MAC_LEN])
        body = memoryview(raw)[len(MAGIC) + MAC_LEN :]
        for index in range(len(self._macs)):
            if hmac.compare_digest(self._mac(index, body), mac):
                break
        else:
            raise BadMac("message authentication failed")
        try:
            header = orjson.loads(body[_HLEN.size : _HLEN.size + hlen])
            if (
                own is not None
                and type(header) is dict
                and header.get("src") == own[0]
                and header.get("inc") == own[1]
                and header.get("t") != messages.MsgType.HEARTBEAT.value
            ):
                return None
            sizes = header.pop("blobs", None) if isinstance(header, dict) else None
            if type(sizes) is not list:
                raise Malformed("bad blob table")
            end = _PREFIX + hlen
            for n in sizes:
                if type(n) is not int or n < 0:
                    raise Malformed("bad blob table")
                end += n
            if end != len(raw):
                raise Malformed("blob sizes do not add up")
            offset = _PREFIX + hlen
            items = []
            for n in sizes:
                items.append(bytes(raw[offset : offset + n]))  # an exact-size copy
                offset += n
            envelope = Envelope.from_header(header, Blobs(items))
        except (ValueError, Malformed, RecursionError) as exc:  # orjson.JSONDecodeError is a ValueError
            raise BadMessage(str(exc)) from None
        if envelope.cluster != self.cluster or envelope.channel != channel:
            raise WrongChannel(f"published on {channel!r}, names {envelope.cluster!r}/{envelope.channel!r}")
        return envelope
