"""Where a session's backup lives: rendezvous hashing, in another zone than the owner.

A pure function of the session's token, the owner's zone and the live candidates, so
every node computes the same backup without asking anyone (and a survivor can tell, after
the owner died, which member the owner had chosen).

* **Another zone first.** Only candidates outside the owner's zone are considered while
  there is one; a machine (or rack) failure then never takes a session's owner and its
  backup together. With every candidate in the owner's zone, the choice falls back to all
  of them: a backup next door is better than none.
* **Even.** Among the considered candidates the choice is rendezvous (highest random
  weight) hashing, so each gets an equal share of an owner's sessions; with zones of equal
  size every member backs up the same share overall.
* **Stable.** Rendezvous hashing moves the least possible on a change: a member that
  joins takes over only the sessions it now wins, a member that leaves gives up only its
  own. The one exception is wanted: when an owner's zone gains its first other live zone
  (or loses its last), the owner's backups move there (or come back).

A member whose zone is not known (not heard from by heartbeat yet) counts as a zone of its
own: it is never treated as sharing a machine with anyone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping


def score(token: str, node: str) -> int:
    """The rendezvous weight of ``node`` for ``token``: 64 bits of BLAKE2b."""
    digest = hashlib.blake2b(f"{token}\x00{node}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rendezvous(token: str, candidates: Iterable[str]) -> str | None:
    """The candidate with the highest :func:`score` for ``token`` (ties: the lower name)."""
    best: str | None = None
    best_score = -1
    for node in candidates:
        s = score(token, node)
        if s > best_score or (s == best_score and best is not None and node < best):
            best, best_score = node, s
    return best


def choose_backup(token: str, owner_zone: str, candidates: Mapping[str, str]) -> str | None:
    """The backup for session ``token`` of an owner in ``owner_zone``.

    Arguments:
        token: the session's token.
        owner_zone: the owner's zone; ``""`` if not known.
        candidates: member name -> zone (``""`` if not known) of every member that may
            hold the copy; the owner itself must not be among them.

    Returns the chosen member's name, or ``None`` if there is no candidate.
    """
    return choose_among(token, owner_zone, candidates.items())


def choose_among(token: str, owner_zone: str, candidates: Iterable[tuple[str, str]]) -> str | None:
    """:func:`choose_backup` over (name, zone) pairs (no mapping to build on a hot path)."""
    away: list[str] = []
    near: list[str] = []
    for name, zone in candidates:
        (near if zone and zone == owner_zone else away).append(name)
    chosen = away or near
    if len(chosen) == 1:
        return chosen[0]  # the only candidate wins whatever its weight (two-node clusters)
    return rendezvous(token, chosen)
