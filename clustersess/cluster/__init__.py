"""The cluster layer: membership, replication to one backup, takeover and hand-off.

``messages`` is the closed wire vocabulary, ``wire`` authenticates it, ``transport``
moves bytes over Redis pub/sub (``memory`` is the in-memory bus of the unit tests), ``membership`` tracks
who is alive and picks backups, and ``node`` ties them to the session manager.
"""

from __future__ import annotations

from .memory import MemoryBus
from .node import ClusterNode
from .transport import RedisTransport, Transport, TransportError

__all__ = ["ClusterNode", "MemoryBus", "RedisTransport", "Transport", "TransportError"]
