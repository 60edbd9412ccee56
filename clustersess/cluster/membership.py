"""Who is in the cluster, and where each session's backup lives.

Like Tomcat's McastService: every node announces itself each heartbeat interval; a
member not heard from for ``drop_time`` is dead. A node restarted under the same name
has a newer incarnation (start time first, so incarnations sort by age) and is never
confused with its previous life. Backups are chosen by :mod:`.placement` (rendezvous
hashing, in another zone than the owner's while one is live) over the live members, so
every node computes the same backup for a token without asking anyone.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterable

from .placement import choose_backup, rendezvous, score


def new_incarnation() -> str:
    """Sortable by start time, unique by the random tail."""
    return f"{int(time.time() * 1000):013d}-{os.urandom(4).hex()}"


@dataclasses.dataclass(slots=True)
class Member:
    name: str
    incarnation: str
    last_seen: float  # monotonic
    address: str = ""
    owned: int = 0
    backups: int = 0
    #: a direct message found nobody listening: do not pick it as a backup until heard again
    suspect: bool = False
    #: the failure domain it announced ("" until heard, or from an older release)
    zone: str = ""


__all__ = ["Member", "Membership", "new_incarnation", "pick_backup", "score"]

#: rendezvous choice among names, zones aside (kept for callers and tests of the old name)
pick_backup = rendezvous


class Membership:
    """The member table of one node (``me`` is never in it)."""

    def __init__(self, me: str, drop_time: float, *, zone: str = "") -> None:
        self.me = me
        self.drop_time = drop_time
        self.zone = zone
        #: last zone each name announced; kept when the member is gone, because a survivor
        #: needs a dead owner's zone to tell which member that owner chose as its backup
        self.zones: dict[str, str] = {}
        self.members: dict[str, Member] = {}
        #: newest incarnation seen per name, so messages from a past life are refused
        self.incarnations: dict[str, str] = {}
        #: (name, incarnation) that left cleanly: what it still sends (an ack, a late
        #: heartbeat) must not make it a member again, or we would pick it as a backup
        self.left: set[tuple[str, str]] = set()

    def heard(self, name: str, incarnation: str, now: float, *, zone: str | None = None) -> tuple[bool, Member | None]:
        """Record a sign of life. Returns (is_new_member, replaced_member_or_None).

        ``zone`` is what a heartbeat announced (``None``: another kind of message); it is
        remembered for the name and given to a new member (a known member's zone is the
        caller's to update, since a change moves backups). A message from an older
        incarnation than one already seen is not a sign of life.
        """
        known = self.incarnations.get(name)
        if (known is not None and incarnation < known) or (name, incarnation) in self.left:
            return False, None
        replaced = None
        member = self.members.get(name)
        if member is not None and member.incarnation != incarnation:
            replaced = self.members.pop(name)
            member = None
        self.incarnations[name] = incarnation
        if zone is not None:
            self.zones[name] = zone
        if member is None:
            self.members[name] = Member(name, incarnation, now, zone=self.zones.get(name, ""))
            return True, replaced
        member.last_seen = now
        member.suspect = False
        return False, None

    def is_current(self, name: str, incarnation: str) -> bool:
        known = self.incarnations.get(name)
        return known is None or incarnation >= known

    def remove(self, name: str) -> Member | None:
        return self.members.pop(name, None)

    def leave(self, name: str, incarnation: str) -> Member | None:
        """``name`` said goodbye: that incarnation is gone for good."""
        self.left.add((name, incarnation))
        return self.remove(name)

    def expire(self, now: float) -> list[Member]:
        """Drop members not heard from for ``drop_time``; returns them."""
        dead = [m for m in self.members.values() if now - m.last_seen > self.drop_time]
        for m in dead:
            del self.members[m.name]
        return dead

    def refresh_all(self, now: float) -> None:
        """After our own outage we heard nothing; that is not evidence of death."""
        for m in self.members.values():
            m.last_seen = now

    def live(self) -> list[str]:
        return sorted(self.members)

    def zone_of(self, name: str) -> str:
        """The zone ``name`` announced last (this node's own for ``me``; "" if never heard)."""
        return self.zone if name == self.me else self.zones.get(name, "")

    def backup_for(self, token: str, *, exclude: Iterable[str] = ()) -> str | None:
        """The backup this node gives its session ``token`` among the live members."""
        excluded = set(exclude)
        candidates = {n: m.zone for n, m in self.members.items() if not m.suspect and n not in excluded}
        return choose_backup(token, self.zone, candidates)

    def backup_chosen_by(self, owner: str, token: str, view: Iterable[str]) -> str | None:
        """The backup ``owner`` chose for ``token`` while the live members were ``view``
        (names, this node's included): how a survivor knows it must adopt a dead owner's
        session."""
        return choose_backup(token, self.zone_of(owner), {n: self.zone_of(n) for n in view if n != owner})
