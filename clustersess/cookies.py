"""Reading the session cookie from a request and writing the Set-Cookie header.

Shared by the ASGI and WSGI adapters so both speak exactly the same cookie.
"""

from __future__ import annotations

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
