"""Who is in the cluster, and where each session's backup lives.

Like Tomcat's McastService, every node announces itself each heartbeat interval. Unlike
it, silence alone convicts nobody: a member counts as silent only for the time this node
could itself prove it was connected (``connected_since``), and its sessions are adopted
only after Redis confirms that its lease lapsed (``node.py``). A (name, incarnation) is a
member only once admitted (its claim in Redis names that incarnation), so a replayed
message of a dead incarnation never makes a phantom member; a newer admitted incarnation
of a name retires the older one. Backups are chosen by :mod:`.placement` (rendezvous
hashing, in another zone than the owner's while one is live) over the live members, so
every node computes the same backup for a token without asking anyone.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Iterable

from .placement import choose_among, rendezvous, score


def new_incarnation() -> str:
    """A random identity for one life of a node; ordered by Redis, not by any clock."""
    return os.urandom(8).hex()


@dataclasses.dataclass(slots=True)
class Member:
    name: str
    incarnation: str
    last_heard: float  # monotonic
    address: str = ""
    owned: int = 0
    backups: int = 0
    zone: str = ""
    #: its wall clock minus ours, at its last heartbeat (transit time included)
    skew: float = 0.0
    #: a direct message found nobody listening: do not pick it as a backup until heard again
    unreachable: bool = False
    #: it is handing its sessions over (stopping): never pick it as a backup again
    leaving: bool = False
    #: silent for the drop time while we were connected: no backup of ours goes there, and
    #: its sessions are adopted once Redis confirms its lease lapsed
    suspected: bool = False

    @property
    def candidate(self) -> bool:
        return not (self.unreachable or self.leaving or self.suspected)


__all__ = ["Member", "Membership", "new_incarnation", "pick_backup", "score"]

#: rendezvous choice among names, zones aside (kept for callers and tests of the old name)
pick_backup = rendezvous


#: incarnations remembered as retired (their messages are refused); older ones are
#: forgotten, which is safe: admission would refuse them anyway
RETIRED_LIMIT = 4096


class Membership:
    """The member table of one node (``me`` is never in it)."""

    def __init__(self, me: str, *, zone: str = "") -> None:
        self.me = me
        #: this node's zone (Config.zone): its backups go to another one while one is live
        self.zone = zone
        self.members: dict[str, Member] = {}
        self.retired: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()

    def current(self, name: str, incarnation: str) -> Member | None:
        member = self.members.get(name)
        return member if member is not None and member.incarnation == incarnation else None

    def is_retired(self, name: str, incarnation: str) -> bool:
        return (name, incarnation) in self.retired

    def admit(self, name: str, incarnation: str, now: float) -> tuple[Member, Member | None]:
        """Make (name, incarnation) the member of that name; returns it and the member it
        replaced (an older incarnation), if any."""
        old = self.members.get(name)
        if old is not None and old.incarnation != incarnation:
            self.retire(name, old.incarnation)
        else:
            old = None
        member = self.members[name] = Member(name, incarnation, now)
        return member, old

    def retire(self, name: str, incarnation: str) -> Member | None:
        """That incarnation is gone for good (left, replaced, or its sessions adopted)."""
        self.retired[(name, incarnation)] = None
        while len(self.retired) > RETIRED_LIMIT:
            self.retired.popitem(last=False)
        member = self.members.get(name)
        if member is not None and member.incarnation == incarnation:
            return self.members.pop(name)
        return None

    def heard(self, member: Member, now: float) -> bool:
        """A sign of life from a current member; True if it was suspected until now."""
        member.last_heard = now
        member.unreachable = False
        was, member.suspected = member.suspected, False
        return was

    def silent(self, now: float, connected_since: float, drop_time: float) -> list[Member]:
        """Members not heard from for ``drop_time`` of time we were provably connected,
        not yet suspected."""
        return [
            m
            for m in self.members.values()
            if not m.suspected and now - max(m.last_heard, connected_since) > drop_time
        ]

    def live(self) -> list[str]:
        """Names of the members not suspected (sorted)."""
        return sorted(n for n, m in self.members.items() if not m.suspected)

    def candidates(self, exclude: Iterable[str] = ()) -> list[str]:
        excluded = set(exclude)
        return [n for n, m in self.members.items() if m.candidate and n not in excluded]

    def backup_for(
        self, token: str, *, exclude: Iterable[str] = (), pairs: list[tuple[str, str]] | None = None
    ) -> str | None:
        """The backup this node gives its session ``token`` among the candidates
        (``pairs``: :meth:`candidate_pairs` of now, for a pass that picks for many)."""
        if pairs is None:
            pairs = self.candidate_pairs()
        if exclude:
            pairs = [p for p in pairs if p[0] not in exclude]
        return choose_among(token, self.zone, pairs)

    def candidate_pairs(self) -> list[tuple[str, str]]:
        """(name, zone) of every member that may take a backup copy now."""
        return [(n, mb.zone) for n, mb in self.members.items() if mb.candidate]
