"""The exceptions clustersess raises.

All of them derive from :class:`ClusterSessError`, so one ``except`` catches every
library error. Each message says how to fix the problem, not just what it is.
"""

from __future__ import annotations

from typing import Any


class ClusterSessError(Exception):
    """Base class of every clustersess error."""


class ConfigError(ClusterSessError, ValueError):
    """The configuration is invalid; raised at start-up, never at the first request."""


class SessionValueError(ClusterSessError, TypeError):
    """A session value cannot be stored because it is not JSON-serializable.

    It is a ``TypeError`` so code written against ``json.dumps`` semantics keeps working.
    ``key`` names the top-level session key that holds the bad value.
    """

    def __init__(self, key: str, detail: str) -> None:
        self.key = key
        super().__init__(
            f"session[{key!r}] cannot be stored: {detail}. Session values must be "
            "JSON-serializable (dict with str keys, list, str, int, float, bool, None); "
            "convert it first, e.g. str(value) or value.isoformat()."
        )


class SessionTooLarge(ClusterSessError, ValueError):
    """A session grew past ``max_session_size`` and was not stored."""

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(
            f"session is {size} bytes as JSON, over the limit of {limit} bytes; store large "
            "data elsewhere (a database) and keep only its key in the session, or raise "
            "max_session_size / CLUSTERSESS_MAX_SIZE."
        )


class DuplicateNodeError(ClusterSessError):
    """Another live node already uses this node name in the same cluster."""


class ReplicationUnavailable(ClusterSessError):
    """A write could not be confirmed replicated, and the node is configured to refuse
    such writes (``on_replication_failure="refuse"``): the request is answered 503."""

    def __init__(self, reason: str, action: Any = None) -> None:
        self.reason = reason
        #: the :class:`~clustersess.cookies.CookieAction` the 503 still carries (a rotation
        #: that happened stays done: the client must learn the session's new ID)
        self.action = action
        super().__init__(
            f"the session change could not be replicated ({reason}); it was answered 503. "
            "Set on_replication_failure='serve' (CLUSTERSESS_ON_REPLICATION_FAILURE) to answer "
            "from memory instead."
        )


class SessionUnavailable(ReplicationUnavailable):
    """A request's session may exist on a member that did not answer (this node is cut
    off, or the member is reconnecting). With ``on_replication_failure="serve"`` the
    request gets a fresh session; with ``"refuse"`` it is answered 503."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, None)
