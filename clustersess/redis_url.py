"""What a ``CLUSTERSESS_REDIS_URL`` names, parsed and checked once, at start-up.

Four forms, one per way users run Redis::

    redis://[[user]:password@]host[:port][/db]          one Redis, or any node of a Redis Cluster
    rediss://[[user]:password@]host[:port][/db]         the same over TLS
    unix://[[user]:password@]/path/to/redis.sock[?db=N]  one Redis on a local socket
    redis+sentinel://[[user]:password@]h1:26379,h2:26379,h3:26379/service[/db]
    rediss+sentinel://...                               Sentinel and Redis over TLS

Whether a ``redis://`` URL names a Redis Cluster is found out at connect time (``INFO
cluster``), not here. The user and password in a URL are Redis's (the data nodes'); a
Sentinel that requires its own comes from ``?sentinel_username=...&sentinel_password=...``.
TLS options go in the query: ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``,
``ssl_cert_reqs`` (``required``, ``optional`` or ``none``) and ``ssl_check_hostname``.
Any other option is refused, so that a typo never silently turns verification off.

This module imports nothing from redis-py: the config validates URLs without it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote, urlsplit

__all__ = ["RedisTarget", "parse_redis_url", "redact"]

Scheme = Literal["redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel"]
SCHEMES: tuple[str, ...] = ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel")

_TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname")
_SENTINEL_OPTIONS = ("sentinel_username", "sentinel_password")
_CERT_REQS = ("required", "optional", "none")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RedisTarget:
    """A parsed Redis URL: where to connect, as whom, and how.

    Attributes:
        scheme: the URL's scheme.
        hosts: ``(host, port)`` pairs: the one server (``redis``/``rediss``; a seed node of
            a Redis Cluster) or the Sentinels; empty for ``unix``.
        path: the socket path of a ``unix://`` URL.
        service: the Sentinel service (``mymaster``).
        db: the database number (Redis Cluster has only 0).
        username, password: Redis ACL credentials (``None``: the default user, no AUTH).
        sentinel_username, sentinel_password: the Sentinels' own credentials, if any.
        tls: connect over TLS (``rediss``/``rediss+sentinel``).
        tls_options: redis-py ``ssl_*`` keyword arguments from the query.
    """

    scheme: Scheme
    hosts: tuple[tuple[str, int], ...] = ()
    path: str | None = None
    service: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    tls: bool = False
    tls_options: tuple[tuple[str, Any], ...] = ()

    @property
    def sentinel(self) -> bool:
        return self.scheme.endswith("+sentinel")

    def connection_kwargs(self) -> dict[str, Any]:
        """redis-py connection keywords for a data node (credentials, db, TLS), no address."""
        kw: dict[str, Any] = {"db": self.db, "username": self.username, "password": self.password}
        if self.tls:
            kw["ssl"] = True
            kw.update(self.tls_options)
        return kw

    def sentinel_kwargs(self) -> dict[str, Any]:
        """redis-py connection keywords for a Sentinel (its own credentials, TLS)."""
        kw: dict[str, Any] = {"username": self.sentinel_username, "password": self.sentinel_password}
        if self.tls:
            kw["ssl"] = True
            kw.update(self.tls_options)
        return kw

    def describe(self) -> str:
        """Where this points, without credentials (for logs and errors)."""
        if self.scheme == "unix":
            return f"unix://{self.path}"
        hosts = ",".join(f"{h}:{p}" for h, p in self.hosts)
        tail = f"/{self.service}" if self.service else ""
        return f"{self.scheme}://{hosts}{tail}"


def parse_redis_url(url: str) -> RedisTarget:
    """Parse and check a clustersess Redis URL (the forms in this module's docstring).

    Raises:
        ValueError: with a message that says what is wrong and how to write it instead;
            it never contains the password.
    """
    scheme, sep, _ = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in SCHEMES:
        raise ValueError(
            "the Redis URL must start with redis://, rediss://, unix://, redis+sentinel:// or "
            f"rediss+sentinel://, not {scheme + sep if sep else 'no scheme'!r}: for example "
            "redis://redis.internal:6379/0 or redis+sentinel://s1:26379,s2:26379,s3:26379/mymaster"
        )
    if scheme == "unix":
        return _parse_unix(url)
    parts = urlsplit(url)
    if parts.fragment:
        raise ValueError("the Redis URL must not have a #fragment")
    userinfo, at, hostlist = parts.netloc.rpartition("@")
    username, password = _credentials(userinfo) if at else (None, None)
    sentinel = scheme.endswith("+sentinel")
    default_port = 26379 if sentinel else 6379
    hosts = tuple(_host_port(h, default_port) for h in hostlist.split(","))
    if not sentinel and len(hosts) != 1:
        raise ValueError(
            "a redis:// URL names one server; for a Redis Cluster name any one of its nodes "
            "(the others are discovered), for Sentinel use redis+sentinel://h1:26379,h2:26379/service"
        )
    segments = [s for s in parts.path.split("/") if s]
    service: str | None = None
    if sentinel:
        if not segments:
            raise ValueError(
                "a redis+sentinel:// URL needs the service name the Sentinels monitor after the "
                "hosts, for example redis+sentinel://s1:26379,s2:26379,s3:26379/mymaster (and "
                "/mymaster/2 for database 2)"
            )
        service = unquote(segments.pop(0))
    if len(segments) > 1:
        raise ValueError(f"the Redis URL's path must be at most one database number, not {parts.path!r}")
    options = _options(parts.query, sentinel=sentinel)
    db = _db(segments[0] if segments else options.pop("db", "0"))
    options.pop("db", None)
    tls = scheme.startswith("rediss")
    tls_options = _tls_options(options, tls=tls)
    return RedisTarget(
        scheme=scheme,  # type: ignore[arg-type]  # checked against SCHEMES above
        hosts=hosts,
        service=service,
        db=db,
        username=username,
        password=password,
        sentinel_username=options.get("sentinel_username"),
        sentinel_password=options.get("sentinel_password"),
        tls=tls,
        tls_options=tls_options,
    )


def redact(url: str) -> str:
    """``url`` with its credentials (userinfo, ``*password=`` options) replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    head, q, query = rest.partition("?")
    netloc, slash, path = head.partition("/")
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    if q:
        query = "&".join(
            f"{k}=***" if k.endswith("password") else f"{k}={v}" for k, v in parse_qsl(query, keep_blank_values=True)
        )
    return f"{scheme}://{netloc}{slash}{path}{q}{query}"


def _parse_unix(url: str) -> RedisTarget:
    parts = urlsplit(url)
    userinfo, at, _ = parts.netloc.rpartition("@")
    username, password = _credentials(userinfo) if at else (None, None)
    if not parts.path:
        raise ValueError("a unix:// URL needs the socket path, for example unix:///run/redis/redis.sock?db=0")
    options = _options(parts.query, sentinel=False)
    db = _db(options.pop("db", "0"))
    if any(k.startswith("ssl_") for k in options):
        raise ValueError("TLS options make no sense on a unix:// socket; remove them")
    return RedisTarget(scheme="unix", path=unquote(parts.path), db=db, username=username, password=password)


def _credentials(userinfo: str) -> tuple[str | None, str | None]:
    user, colon, password = userinfo.partition(":")
    if not colon:
        # redis://secret@host is how redis-py reads a bare password; say so rather than guess.
        raise ValueError(
            "the Redis URL has credentials without a ':'; write redis://:PASSWORD@host for the "
            "default user or redis://USER:PASSWORD@host for an ACL user"
        )
    return (unquote(user) or None), unquote(password)


def _host_port(item: str, default_port: int) -> tuple[str, int]:
    item = item.strip()
    if item.startswith("["):  # [::1]:6379
        host, _, port = item[1:].partition("]")
        port = port.lstrip(":")
    else:
        host, _, port = item.rpartition(":") if ":" in item else (item, "", "")
    if not host:
        raise ValueError(
            "the Redis URL names an empty host; for Sentinel list them as "
            "redis+sentinel://h1:26379,h2:26379,h3:26379/service"
        )
    try:
        number = int(port) if port else default_port
    except ValueError:
        raise ValueError(f"the Redis URL's port {port!r} (host {host}) is not a number") from None
    if not 0 < number < 65536:
        raise ValueError(f"the Redis URL's port {number} (host {host}) is out of range")
    return host, number


def _db(raw: str) -> int:
    try:
        db = int(raw)
    except ValueError:
        raise ValueError(f"the Redis database must be a number (redis://host:6379/0), not {raw!r}") from None
    if db < 0:
        raise ValueError(f"the Redis database must be >= 0, not {db}")
    return db


def _options(query: str, *, sentinel: bool) -> dict[str, str]:
    known = ("db", *_TLS_OPTIONS, *(_SENTINEL_OPTIONS if sentinel else ()))
    options: dict[str, str] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in known:
            hint = " (Sentinel credentials are for redis+sentinel:// URLs)" if key in _SENTINEL_OPTIONS else ""
            raise ValueError(
                f"unknown option {key!r} in the Redis URL{hint}; known: {', '.join(known)}. "
                "Timeouts and retries are set by clustersess itself"
            )
        options[key] = value
    return options


def _tls_options(options: dict[str, str], *, tls: bool) -> tuple[tuple[str, Any], ...]:
    given = {k: v for k, v in options.items() if k in _TLS_OPTIONS}
    if given and not tls:
        raise ValueError(
            f"TLS option(s) {', '.join(sorted(given))} need a rediss:// (or rediss+sentinel://) URL"
        )
    out: list[tuple[str, Any]] = []
    for key, value in sorted(given.items()):
        if key == "ssl_cert_reqs":
            if value not in _CERT_REQS:
                raise ValueError(f"ssl_cert_reqs must be one of {', '.join(_CERT_REQS)}, not {value!r}")
            out.append((key, value))
        elif key == "ssl_check_hostname":
            if value.lower() not in _TRUE + _FALSE:
                raise ValueError(f"ssl_check_hostname must be true or false, not {value!r}")
            out.append((key, value.lower() in _TRUE))
        else:
            out.append((key, value))
    return tuple(out)
