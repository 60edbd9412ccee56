"""Reading the session cookie from a request and writing the Set-Cookie header.

Shared by the ASGI and WSGI adapters so both speak exactly the same cookie.
"""

from __future__ import annotations

from typing import Any

from .config import Config
from .ids import MAX_COOKIE_LENGTH

_EXPIRED = "expires=Thu, 01 Jan 1970 00:00:00 GMT; Max-Age=0; "


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


class CookieWriter:
    """Builds Set-Cookie header values from the config's cookie attributes."""

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


def make_private(headers: list[tuple[Any, Any]]) -> None:
    """Keep a response that sets the session cookie out of shared caches.

    Adds ``Cache-Control: private`` (dropping ``public`` and ``s-maxage``) unless the
    response is already ``private`` or ``no-store``. ``headers`` is a list of (name,
    value) pairs, ``bytes`` (ASGI) or ``str`` (WSGI), already holding the Set-Cookie
    header (which tells the type); it is changed in place.
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
    headers.append((b"cache-control", b"private") if isinstance(headers[-1][0], bytes) else ("Cache-Control", "private"))
