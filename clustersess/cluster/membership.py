"""Who is in the cluster, and where each session's backup lives.

Like Tomcat's McastService: every node announces itself each heartbeat interval; a
member not heard from for ``drop_time`` is dead. A node restarted under the same name
has a newer incarnation (start time first, so incarnations sort by age) and is never
confused with its previous life. Backups are chosen by rendezvous hashing over the live
members, so every node computes the same backup for a token without asking anyone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections.abc import Iterable


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


def score(token: str, node: str) -> int:
    digest = hashlib.blake2b(f"{token}\x00{node}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def pick_backup(token: str, candidates: Iterable[str]) -> str | None:
    """Rendezvous (highest random weight) choice among ``candidates``; even and stable."""
    best: str | None = None
    best_score = -1
    for node in candidates:
        s = score(token, node)
        if s > best_score or (s == best_score and best is not None and node < best):
            best, best_score = node, s
    return best


class Membership:
    """The member table of one node (``me`` is never in it)."""

    def __init__(self, me: str, drop_time: float) -> None:
        self.me = me
        self.drop_time = drop_time
        self.members: dict[str, Member] = {}
        #: newest incarnation seen per name, so messages from a past life are refused
        self.incarnations: dict[str, str] = {}
        #: (name, incarnation) that left cleanly: what it still sends (an ack, a late
        #: heartbeat) must not make it a member again, or we would pick it as a backup
        self.left: set[tuple[str, str]] = set()

    def heard(self, name: str, incarnation: str, now: float) -> tuple[bool, Member | None]:
        """Record a sign of life. Returns (is_new_member, replaced_member_or_None).

        A message from an older incarnation than one already seen is not a sign of life.
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
        if member is None:
            self.members[name] = Member(name, incarnation, now)
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

    def backup_for(self, token: str, *, exclude: Iterable[str] = ()) -> str | None:
        excluded = set(exclude)
        return pick_backup(
            token, (n for n, m in self.members.items() if not m.suspect and n not in excluded)
        )
