"""What one node holds in memory: sessions it owns, backup copies, and tombstones.

Pure data structure, no I/O, no clock of its own: callers pass ``now``.
"""

from __future__ import annotations

from .session import Entry


class LocalStore:
    def __init__(self) -> None:
        #: sessions this node owns (serves), by token
        self.owned: dict[str, Entry] = {}
        #: copies held for other owners (or relinquished), by token
        self.backups: dict[str, Entry] = {}
        #: token -> time until which the token is dead (invalidated or rotated away)
        self.tombstones: dict[str, float] = {}

    def is_dead(self, token: str, now: float) -> bool:
        until = self.tombstones.get(token)
        return until is not None and until > now

    def bury(self, token: str, until: float, *, extend: bool = True) -> None:
        """Kill ``token``: drop every copy and refuse it until ``until``.

        With ``extend=False`` (a tombstone announced by another node) a tombstone already
        held keeps its expiry: announcing one again never makes it live longer.
        """
        self.owned.pop(token, None)
        self.backups.pop(token, None)
        held = self.tombstones.get(token)
        if held is None or (extend and held < until):
            self.tombstones[token] = until

    def sweep(self, now: float, max_inactive: float) -> tuple[list[Entry], list[Entry]]:
        """Remove what has expired; returns (expired owned entries, expired copies)."""
        limit = now - max_inactive
        expired = [e for e in self.owned.values() if e.last_accessed < limit and e.inflight == 0]
        for e in expired:
            del self.owned[e.token]
        stale = [e for e in self.backups.values() if e.last_accessed < limit]
        for e in stale:
            del self.backups[e.token]
        for t in [t for t, until in self.tombstones.items() if until <= now]:
            del self.tombstones[t]
        return expired, stale
