"""The cluster layer: membership, replication to one backup, takeover and hand-off.

``messages`` is the closed wire vocabulary, ``wire`` authenticates it, ``transport``
moves bytes over Redis pub/sub (or an in-memory bus in unit tests), ``membership`` tracks
who is alive and picks backups, and ``node`` ties them to the session manager.
"""

from __future__ import annotations

from .node import ClusterNode
from .transport import MemoryBus, RedisTransport, Transport, TransportError

__all__ = ["ClusterNode", "MemoryBus", "RedisTransport", "Transport", "TransportError"]
