"""The one owner of the session-ID format.

A session ID is ``<token>.<route>``: a random token and the name of the node that owns
the session (Tomcat's jvmRoute). The cookie carries ``<token>~<signature>.<route>``: the
itsdangerous signature sits *before* the single dot, so every load balancer that splits
the cookie on ``.`` finds the route as the last field, and a forged token is rejected
before any lookup. The route itself is only a routing hint and is not signed: a client
that edits it merely asks another node to take the session over, which any node may do.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Callable
from typing import NamedTuple

import itsdangerous

from .config import ROUTE_RE

TOKEN_BYTES = 18  # 144 bits of entropy from the OS CSPRNG
TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{24}")
SIGN_SEP = "~"  # not in the base64url alphabet, not a '.', legal in a cookie value
MAX_COOKIE_LENGTH = 4096
_COOKIE_RE = re.compile(r"([A-Za-z0-9_-]{24})~([A-Za-z0-9_-]{20,90})\.([A-Za-z0-9_]{1,32})")
_CACHE_SIZE = 4096


class SessionId(NamedTuple):
    token: str
    route: str

    def __str__(self) -> str:
        return f"{self.token}.{self.route}"


#: tokens are this long, over the alphabet of TOKEN_RE
TOKEN_LEN = 24
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9_-]*")


def all_tokens(values: list[str]) -> bool:
    """Whether every one of ``values`` (all str) is a well-formed token: one pattern
    match over them all, for messages that carry hundreds (the same answer as
    ``TOKEN_RE.fullmatch`` on each)."""
    return all(len(v) == TOKEN_LEN for v in values) and _TOKEN_CHARS.fullmatch("".join(values)) is not None


def new_token() -> str:
    """A fresh random token (144 bits, URL-safe, never containing a dot)."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def make_id(token: str, route: str) -> str:
    """``token.route``."""
    assert TOKEN_RE.fullmatch(token), "tokens come from new_token()"
    assert ROUTE_RE.fullmatch(route), "routes are validated by Config"
    return f"{token}.{route}"


def parse_id(session_id: str) -> SessionId | None:
    """Split ``token.route``; ``None`` if it is not a well-formed session ID."""
    token, dot, route = session_id.partition(".")
    if not dot or not TOKEN_RE.fullmatch(token) or not ROUTE_RE.fullmatch(route):
        return None
    return SessionId(token, route)


class Verified(NamedTuple):
    token: str
    route: str
    resign: bool  # signed with an older key: re-issue the cookie with the current one


class CookieSigner:
    """Signs and verifies session cookies.

    ``secret_keys`` are oldest first (itsdangerous' order); the last one signs. Successful
    verifications are cached by exact cookie value, so the HMAC is not recomputed on every
    request; only values that verified ever enter the cache. With ``route`` (this node's
    name), :meth:`current_token` answers the question every request asks: is this a cookie
    this node issues, signed with the newest key, and for which token?
    """

    def __init__(
        self, secret_keys: tuple[str, ...], *, salt: str = "clustersess.cookie", route: str | None = None
    ) -> None:
        self._salt = salt
        self._cache: dict[str, Verified] = {}
        self._issued: dict[tuple[str, str], str] = {}
        self._route = route
        #: cookie value -> token, for the cached values that name ``route`` with the newest key
        self._routed_here: dict[str, str] = {}
        #: ``current_token(value)``: the token if ``value`` verified before, names this
        #: signer's ``route`` and was signed with the newest key; else ``None``. It is the
        #: dict's own ``get`` (no Python frame: it runs on every request), so the dict is
        #: only ever changed in place.
        self.current_token: Callable[[str], str | None] = self._routed_here.get
        self.set_keys(secret_keys)

    def set_keys(self, secret_keys: tuple[str, ...]) -> None:
        """Sign and verify with ``secret_keys`` from now on (oldest first).

        Every cached verification is forgotten, so a cookie signed with a key no longer in
        the list is refused from the next request on. For a Flask app whose keys change
        at run time; a cluster's messages stay under the key they started with.
        """
        assert secret_keys, "Config guarantees at least one key"
        kw = {"salt": self._salt, "sep": SIGN_SEP, "digest_method": hashlib.sha256}
        # Newest key first: it signs, and it is tried first when verifying.
        self._signers = [itsdangerous.Signer(key, **kw) for key in reversed(secret_keys)]  # type: ignore[arg-type]
        self._current = self._signers[0]
        # Cleared in place: current_token is bound to _routed_here.
        self._cache.clear()
        self._issued.clear()
        self._routed_here.clear()

    def cookie_value(self, token: str, route: str) -> str:
        """The cookie value for session ``token`` owned by ``route``."""
        value = self._issued.get((token, route))
        if value is not None:
            return value
        if len(self._issued) >= _CACHE_SIZE:
            self._issued.clear()
        signed = self._current.sign(token).decode("ascii")
        value = self._issued[(token, route)] = f"{signed}.{route}"
        self._remember(value, Verified(token, route, False))
        return value

    def verify(self, value: str) -> Verified | None:
        """Check a cookie value; ``None`` for anything forged, malformed or oversized."""
        hit = self._cache.get(value)
        if hit is not None:
            return hit
        if len(value) > MAX_COOKIE_LENGTH:
            return None
        m = _COOKIE_RE.fullmatch(value)
        if m is None:
            return None
        token, sig, route = m.groups()
        raw_token, raw_sig = token.encode("ascii"), sig.encode("ascii")
        for i, signer in enumerate(self._signers):
            # Compare encoded signatures, not decoded bytes: base64 would also accept
            # non-canonical spellings of the same digest.
            if hmac.compare_digest(signer.get_signature(raw_token), raw_sig):
                result = Verified(token, route, i > 0)
                break
        else:
            return None
        self._remember(value, result)
        return result

    def _remember(self, value: str, result: Verified) -> None:
        if len(self._cache) >= _CACHE_SIZE:
            # Cheap bounded cache: drop the oldest half (dicts keep insertion order).
            for key in list(self._cache)[: _CACHE_SIZE // 2]:
                del self._cache[key]
                self._routed_here.pop(key, None)
        self._cache[value] = result
        if result.route == self._route and not result.resign:
            self._routed_here[value] = result.token

