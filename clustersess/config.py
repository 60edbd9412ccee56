"""The one validated, frozen configuration object.

Built from keyword arguments, falling back to ``CLUSTERSESS_*`` environment variables for
anything not given in code. Every check happens here, at start-up, with a message that
says how to fix it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

from .errors import ConfigError
from .redis_url import parse_redis_url, redact

SameSite = Literal["lax", "strict", "none"]
ReplicationMode = Literal["sync", "async"]
FailureMode = Literal["serve", "refuse"]

ROUTE_RE = re.compile(r"[A-Za-z0-9_]{1,32}")
COOKIE_NAME_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,64}")
#: no ':' (it separates the parts of channel and key names, so no cluster's channel can
#: be another's) and no braces (Redis Cluster hash tags)
CLUSTER_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: a zone names a failure domain (a machine by default: its host name)
ZONE_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")

#: environment variable -> (config field, parser)
ENV_VARS: dict[str, str] = {
    "CLUSTERSESS_NODE": "node_name",
    "CLUSTERSESS_SECRET": "secret_key",
    "CLUSTERSESS_REDIS_URL": "redis_url",
    "CLUSTERSESS_COOKIE": "session_cookie",
    "CLUSTERSESS_MAX_INACTIVE": "max_inactive",
    "CLUSTERSESS_MAX_SIZE": "max_session_size",
    "CLUSTERSESS_HEARTBEAT": "heartbeat_interval",
    "CLUSTERSESS_DROP_TIME": "drop_time",
    "CLUSTERSESS_REPLICATION": "replication",
    "CLUSTERSESS_ACK_TIMEOUT": "ack_timeout",
    "CLUSTERSESS_ON_REPLICATION_FAILURE": "on_replication_failure",
    "CLUSTERSESS_CLUSTER": "cluster_name",
    "CLUSTERSESS_HTTPS_ONLY": "https_only",
    "CLUSTERSESS_GC_FREEZE": "gc_freeze",
    "CLUSTERSESS_ZONE": "zone",
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Settings of one clustersess node.

    Arguments (keyword only):
        secret_key: one secret or a list, oldest first; the last one signs cookies and
            cluster messages, the others are still accepted (key rotation).
        node_name: this node's route, ``[A-Za-z0-9_]{1,32}``; it ends every session ID.
        session_cookie: cookie name, ``JSESSIONID`` like Tomcat so load balancer configs
            written for Tomcat keep working.
        max_age: cookie Max-Age in seconds; ``None`` (default) is a browser-session cookie;
            0 or less makes the cookie expire at once (no session survives its request).
        path, domain, same_site, https_only, partitioned: cookie attributes.
        max_inactive: idle seconds after which a session expires (Tomcat's 30 minutes).
        max_session_size: largest session, in bytes of JSON, that will be stored.
        redis_url: Redis for replication; ``None`` runs a single node. ``redis://``,
            ``rediss://`` (TLS), ``unix://`` or ``redis+sentinel://h1:26379,h2:26379/service``;
            a Redis Cluster is detected by itself (:mod:`clustersess.redis_url`, docs/redis.md).
        cluster_name: prefix of the Redis channels, so clusters can share one Redis.
        heartbeat_interval, drop_time: membership timing (Tomcat's 500 ms and 3 s).
        replication: ``"sync"`` waits for the backup's ack before the response is sent
            (Tomcat's channelSendOptions=6); ``"async"`` does not wait.
        ack_timeout: the longest a response waits for that ack.
        on_replication_failure: what a write gets when it cannot be confirmed replicated
            (the node is fenced, the ack timed out or was refused): ``"serve"`` (default)
            answers from memory and replicates later; ``"refuse"`` answers 503.
        notify_listeners_on_replication: also fire session listeners on backup nodes.
        gc_freeze: once the application has started, run one full garbage collection
            and freeze what survives; and on a node holding 10,000 sessions or more,
            freeze the heap again after each sweep, so that full collections do not
            walk every session (:mod:`clustersess.heap` says why and what it costs).
        zone: the failure domain this node runs in, announced in its heartbeats; a
            session's backup is placed in another zone than its owner whenever one is
            live (Infinispan's server hints, Hazelcast's partition groups). Empty
            (default): the host name, so backups leave the machine. Set it to a rack or
            an availability zone to spread further.

    Raises:
        ConfigError: on any invalid value.
    """

    secret_key: tuple[str, ...]
    node_name: str = "node1"
    session_cookie: str = "JSESSIONID"
    max_age: int | None = None
    path: str = "/"
    domain: str | None = None
    same_site: SameSite = "lax"
    https_only: bool = False
    partitioned: bool = False
    max_inactive: float = 1800.0
    max_session_size: int = 1024 * 1024
    sweep_interval: float | None = None
    redis_url: str | None = None
    cluster_name: str = "clustersess"
    heartbeat_interval: float = 0.5
    drop_time: float = 3.0
    replication: ReplicationMode = "sync"
    ack_timeout: float = 1.0
    on_replication_failure: FailureMode = "serve"
    notify_listeners_on_replication: bool = False
    gc_freeze: bool = True
    zone: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.secret_key, str):
            object.__setattr__(self, "secret_key", (self.secret_key,))
        secrets_ = tuple(str(s) for s in self.secret_key)
        object.__setattr__(self, "secret_key", secrets_)
        if not secrets_ or any(not s for s in secrets_):
            raise ConfigError(
                "no secret key: set CLUSTERSESS_SECRET (or pass secret_key=...) to a long "
                "random string, the same on every node; there is no built-in default"
            )
        if not ROUTE_RE.fullmatch(self.node_name or ""):
            raise ConfigError(
                f"node name {self.node_name!r} is invalid: use 1-32 characters from "
                "A-Z a-z 0-9 _ (set CLUSTERSESS_NODE or node_name=...); it ends every "
                "session ID so the load balancer can route on it"
            )
        if not COOKIE_NAME_RE.fullmatch(self.session_cookie or ""):
            raise ConfigError(f"cookie name {self.session_cookie!r} is not a valid cookie token")
        if self.same_site not in get_args(SameSite):
            raise ConfigError(f"same_site must be one of {get_args(SameSite)}, not {self.same_site!r}")
        if self.same_site == "none" and not self.https_only:
            raise ConfigError("same_site='none' requires https_only=True (browsers demand Secure)")
        if self.replication not in get_args(ReplicationMode):
            raise ConfigError(
                f"replication must be 'sync' or 'async', not {self.replication!r} "
                "(CLUSTERSESS_REPLICATION)"
            )
        if not self.path.startswith("/"):
            raise ConfigError(f"cookie path must start with '/', not {self.path!r}")
        if self.on_replication_failure not in get_args(FailureMode):
            raise ConfigError(
                f"on_replication_failure must be 'serve' or 'refuse', not {self.on_replication_failure!r} "
                "(CLUSTERSESS_ON_REPLICATION_FAILURE)"
            )
        if not CLUSTER_NAME_RE.fullmatch(self.cluster_name or ""):
            raise ConfigError(
                f"cluster name {self.cluster_name!r} is invalid (CLUSTERSESS_CLUSTER): use 1-64 characters "
                "from A-Z a-z 0-9 _ . - (no ':', which separates the parts of channel names, so that one "
                "cluster's channels can never be another's; no braces)"
            )
        for name in ("max_inactive", "heartbeat_interval", "drop_time", "ack_timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"{name} must be a positive number of seconds, not {value!r}")
        if self.drop_time <= self.heartbeat_interval:
            raise ConfigError(
                f"drop_time ({self.drop_time}s) must be longer than heartbeat_interval "
                f"({self.heartbeat_interval}s), or every member looks dead"
            )
        if self.max_age is not None and (not isinstance(self.max_age, int) or isinstance(self.max_age, bool)):
            # 0 or less is accepted, as Starlette does: the cookie expires as it is set.
            raise ConfigError(f"max_age must be a whole number of seconds or None, not {self.max_age!r}")
        if self.max_session_size < 64:
            raise ConfigError("max_session_size must be at least 64 bytes")
        from .cluster.wire import MAX_SESSION_BYTES

        if self.max_session_size > MAX_SESSION_BYTES:
            raise ConfigError(
                f"max_session_size must be at most {MAX_SESSION_BYTES} bytes: a session must fit in one "
                "replication message"
            )
        if not self.zone:
            object.__setattr__(self, "zone", socket.gethostname())
        if not ZONE_RE.fullmatch(self.zone):
            raise ConfigError(
                f"zone {self.zone!r} is invalid: use 1-64 characters from A-Z a-z 0-9 _ . : - "
                "(set CLUSTERSESS_ZONE or zone=...; the default is the host name)"
            )
        if self.redis_url is not None:
            try:
                parse_redis_url(self.redis_url)
            except ValueError as exc:
                raise ConfigError(f"redis_url (CLUSTERSESS_REDIS_URL): {exc}") from None

    @property
    def sweep_every(self) -> float:
        """How often the expiry sweeper runs."""
        if self.sweep_interval is not None:
            return self.sweep_interval
        return max(0.05, min(60.0, self.max_inactive / 4))

    def __repr__(self) -> str:
        # Never print secrets, not even in a traceback or a debug log.
        fields = ", ".join(
            f"{f.name}={'<hidden>' if f.name == 'secret_key' else _redact(f.name, getattr(self, f.name))!r}"
            for f in dataclasses.fields(self)
        )
        return f"Config({fields})"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **kwargs: Any) -> Config:
        """Build a config from keywords, using ``CLUSTERSESS_*`` variables for the rest.

        Keywords whose value is ``None`` count as not given. In one of several worker
        processes that a server runs on one port (``uvicorn --workers``, ``gunicorn -w``)
        the node name becomes this worker's own route, ``<node_name>_w<pid>``, or, without
        Redis, the layout is refused (:func:`clustersess.workers.for_this_process`).
        Raises :class:`ConfigError`.
        """
        env = os.environ if env is None else env
        given = {k: v for k, v in kwargs.items() if v is not None}
        unknown = set(given) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown clustersess option(s): {', '.join(sorted(unknown))}")
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        for var, field in ENV_VARS.items():
            if field in given or var not in env or env[var] == "":
                continue
            given[field] = _parse(var, field, types[field], env[var])
        if "secret_key" not in given:
            given["secret_key"] = ()
        elif isinstance(given["secret_key"], Sequence) and not isinstance(given["secret_key"], str):
            given["secret_key"] = tuple(given["secret_key"])
        from .workers import for_this_process  # workers imports this module

        return for_this_process(cls(**given))


def _redact(name: str, value: Any) -> Any:
    if name == "redis_url" and isinstance(value, str):
        # redis://user:password@host -> redis://***@host (and ?sentinel_password=***)
        return redact(value)
    return value


def _parse(var: str, field: str, type_: Any, raw: str) -> Any:
    raw = raw.strip()
    try:
        if field == "secret_key":
            return tuple(s.strip() for s in raw.split(",") if s.strip())
        if "bool" in str(type_):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if "float" in str(type_):
            return float(raw)
        if "int" in str(type_):
            return int(raw)
    except ValueError:
        raise ConfigError(f"{var}={raw!r} is not a valid {type_}") from None
    return raw
