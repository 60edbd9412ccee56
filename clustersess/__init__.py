"""clustersess: Tomcat-style session clustering for Python web apps."""

from __future__ import annotations

from .asgi import ClusterSessionMiddleware
from .clock import Clock, FakeClock, SystemClock
from .config import Config
from .errors import (
    ClusterSessError,
    ConfigError,
    DuplicateNodeError,
    ReplicationUnavailable,
    SessionTooLarge,
    SessionUnavailable,
    SessionValueError,
)
from .listeners import SessionEvent, SessionListener
from .manager import SessionManager
from .session import Session
from .wsgi import ClusterSessionWSGIMiddleware

__version__ = "0.1.0"

__all__ = [
    "Clock",
    "ClusterSessError",
    "ClusterSessionMiddleware",
    "ClusterSessionWSGIMiddleware",
    "Config",
    "ConfigError",
    "DuplicateNodeError",
    "FakeClock",
    "ReplicationUnavailable",
    "Session",
    "SessionEvent",
    "SessionListener",
    "SessionManager",
    "SessionTooLarge",
    "SessionUnavailable",
    "SessionValueError",
    "SystemClock",
    "__version__",
]
