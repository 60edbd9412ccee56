"""What one node holds in memory: sessions it owns, backup copies, and tombstones.

Pure data structure, no I/O, no clock of its own: callers pass ``now``.
"""

from __future__ import annotations

from collections.abc import Callable

from .pacing import paced, select
from .session import Entry


class LocalStore:
    def __init__(self) -> None:
        #: sessions this node owns (serves), by token
        self.owned: dict[str, Entry] = {}
        #: copies held for other owners (or relinquished), by token
        self.backups: dict[str, Entry] = {}
        #: token -> time until which the token is dead (invalidated or rotated away)
        self.tombstones: dict[str, float] = {}
        #: old token -> the owned entry a request is rotating away from it; the rotation
        #: is not committed yet (it may still be undone), so the cluster is not told
        self.rotating: dict[str, Entry] = {}

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

    async def sweep_chunked(
        self, now: float, max_inactive: float, release_after: float | None, mono: Callable[[], float]
    ) -> tuple[list[Entry], list[Entry]]:
        """:meth:`sweep` in slices (``mono``: the caller's monotonic clock), giving the event
        loop back between them: a node holding 200,000 sessions must not stop serving
        while it sweeps. With ``release_after``, owned sessions idle that long also drop
        their decoded session object (it is decoded again from the stored JSON when next
        used)."""
        limit = now - max_inactive
        release = None if release_after is None else now - release_after
        expired: list[Entry] = []
        owned, backups = self.owned, self.backups
        async for e in paced(list(owned.values()), mono):
            if e.inflight == 0 and owned.get(e.token) is e:
                if e.last_accessed < limit:
                    del owned[e.token]
                    expired.append(e)
                elif release is not None and e.session is not None and e.last_accessed < release:
                    e.session = None
        stale: list[Entry] = []
        async for e in paced(list(backups.values()), mono):
            if e.last_accessed < limit and backups.get(e.token) is e:
                del backups[e.token]
                stale.append(e)
        for t, _ in await select(list(self.tombstones.items()), lambda i: i[1] <= now, mono):
            if self.tombstones.get(t, now + 1) <= now:
                del self.tombstones[t]
        return expired, stale

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
