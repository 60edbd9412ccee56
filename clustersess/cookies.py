"""The session cookie: how it is read from a request, what a response does with it, and
the headers that say so.

Shared by every adapter (ASGI, WSGI, Flask), so they all speak exactly the same cookie:

* :func:`find_cookie` reads it from a Cookie header;
* :func:`decide` is the one place that turns a request's session state into a
  :class:`CookieAction` (the manager calls it when a request ends);
* :class:`CookieWriter`, :func:`add_vary_cookie` and :func:`make_private` write the
  Set-Cookie, Vary and Cache-Control headers for that action.
"""

from __future__ import annotations

import enum
from typing import Any

from .config import Config
from .ids import MAX_COOKIE_LENGTH

_EXPIRED = "expires=Thu, 01 Jan 1970 00:00:00 GMT; Max-Age=0; "


class CookieAction(enum.Enum):
    """What a response does with the session cookie."""

    #: send no Set-Cookie: the client's cookie is right, or there is nothing to name
    KEEP = "keep"
    #: send the session's cookie: a new, rotated, taken-over or re-signed ID, or a
    #: refreshed lifetime (``max_age``) after a write
    SET = "set"
    #: delete the client's cookie: its session ended in this request (``invalidate()``,
    #: ``clear()``, or emptied) and nothing new was stored
    DELETE = "delete"


KEEP = CookieAction.KEEP
SET = CookieAction.SET
DELETE = CookieAction.DELETE


def decide(*, stored: bool, ended: bool, had_cookie: bool, current: bool, refresh: bool) -> CookieAction:
    """The cookie decision, for the state of a session at the end of a request.

    Arguments:
        stored: the session exists on the server after this request.
        ended: this request ended the session it was given (logout).
        had_cookie: the request carried a session cookie (of any validity).
        current: the request's cookie is exactly the cookie this node issues for the
            stored session now (its ID, routed here, signed with the newest key).
        refresh: the cookie's lifetime should be renewed even if it is current (a write
            under ``max_age``; Flask's permanent sessions).
    """
    if not stored:
        # Nothing to name. Tell a client that held the ended session to forget it.
        return DELETE if ended and had_cookie else KEEP
    if current and not refresh:
        return KEEP
    return SET


def vary_needed(action: CookieAction, accessed: bool) -> bool:
    """``Vary: Cookie`` goes on a response that used the session or changes the cookie."""
    return accessed or action is not KEEP


def find_cookie(header: str, name: str) -> str | None:
    """The value of cookie ``name`` in a Cookie header, or ``None``.

    Oversized, empty or non-ASCII values count as absent. With several cookies of that
    name (a parent path's and ours), the first one that is non-empty is returned.
    """
    if name not in header or len(header) > 64 * 1024:
        return None
    for part in header.split(";"):
        key, eq, value = part.partition("=")
        if eq and key.strip() == name:
            value = value.strip().strip('"')
            if value and len(value) <= MAX_COOKIE_LENGTH and value.isascii():
                return value
    return None


def expires_at_once(config: Config) -> bool:
    """A ``max_age`` of 0 or less makes every cookie expire as it is set.

    No browser sends such a cookie back; a client that does anyway gets a fresh session,
    as Starlette's signer refuses an expired cookie. Adapters treat the cookie as absent.
    """
    return config.max_age is not None and config.max_age <= 0


class CookieWriter:
    """Builds Set-Cookie header values from the config's cookie attributes.

    The deleting cookie carries the same Path, Domain, SameSite, Secure and Partitioned
    attributes as the setting one: a browser only replaces a cookie whose attributes match.
    """

    def __init__(self, config: Config) -> None:
        flags = f"path={config.path}; "
        if config.domain is not None:
            flags += f"domain={config.domain}; "
        tail = "httponly; samesite=" + config.same_site
        if config.https_only:
            tail += "; secure"
        if config.partitioned:
            tail += "; partitioned"
        self._name = config.session_cookie
        self._set_tail = flags + (f"Max-Age={config.max_age}; " if config.max_age is not None else "") + tail
        self._delete_tail = flags + _EXPIRED + tail

    def set(self, value: str) -> str:
        return f"{self._name}={value}; {self._set_tail}"

    def delete(self) -> str:
        return f"{self._name}=null; {self._delete_tail}"


def add_vary_cookie(headers: list[tuple[Any, Any]], *, raw: bool) -> None:
    """Add ``Cookie`` to the response's Vary header, merged into the app's own if it has one.

    ``headers`` is a list of (name, value) pairs: ``bytes`` with lowercase names (ASGI,
    ``raw=True``) or ``str`` in any case (WSGI); it is changed in place. ``Vary: *`` is
    left alone.
    """
    for i, (name, value) in enumerate(headers):
        if (name if raw else name.lower()) != (b"vary" if raw else "vary"):
            continue
        text = value.decode("latin-1") if raw else value
        tokens = [t.strip().lower() for t in text.split(",")]
        if "cookie" in tokens or "*" in tokens:
            return
        new = f"{text}, Cookie" if text.strip() else "Cookie"
        headers[i] = (name, new.encode("latin-1") if raw else new)
        return
    headers.append((b"vary", b"Cookie") if raw else ("Vary", "Cookie"))


def make_private(headers: list[tuple[Any, Any]]) -> None:
    """Keep a response that sets the session cookie out of shared caches.

    Adds ``Cache-Control: private`` (dropping ``public`` and ``s-maxage``) unless the
    response is already ``private`` or ``no-store``. ``headers`` as for
    :func:`add_vary_cookie` (the Set-Cookie header already in it tells which); changed
    in place.
    """
    assert headers, "call make_private() after adding the Set-Cookie header"
    for i, (name, value) in enumerate(headers):
        raw = isinstance(name, bytes)
        if (name.decode("latin-1") if raw else name).lower() != "cache-control":
            continue
        text = value.decode("latin-1") if raw else value
        directives = [d.strip() for d in text.split(",") if d.strip()]
        lowered = [d.lower() for d in directives]
        if "private" in lowered or "no-store" in lowered:
            return
        kept = [d for d in directives if d.lower() != "public" and not d.lower().startswith("s-maxage")]
        new = ", ".join(["private", *kept])
        headers[i] = (name, new.encode("latin-1") if raw else new)
        return
    raw = isinstance(headers[-1][0], bytes)
    headers.append((b"cache-control", b"private") if raw else ("Cache-Control", "private"))
