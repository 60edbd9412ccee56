"""Version vectors: which copy of a session holds the newest write.

Every copy of a session carries, per node name, how many writes that node made to it
(a flat tuple ``(name1, n1, name2, n2, ...)`` sorted by name, so the common one-writer
case is a two-item tuple). A commit increments the writer's count; a takeover or an
adoption changes the ownership epoch but never the vector, so moving a session is not a
write and can never outrank one.

Copy *a* is newer than *b* when *a*'s vector dominates *b*'s. When neither dominates,
both sides wrote while apart: a conflict, resolved by :func:`choose`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from typing import Any

VV = tuple[Any, ...]  # (str, int, str, int, ...), names ascending
EMPTY: VV = ()

#: more names than this in one vector is malformed input, not a real history
MAX_WRITERS = 64


class Order(enum.Enum):
    EQUAL = "equal"
    NEWER = "newer"  # the first dominates the second
    OLDER = "older"
    CONCURRENT = "concurrent"


def bump(vv: VV, name: str) -> VV:
    """``vv`` with one more write by ``name``."""
    if len(vv) == 2 and vv[0] == name:  # the common case: one writer, us
        return (name, vv[1] + 1)
    counts = as_dict(vv)
    counts[name] = counts.get(name, 0) + 1
    return from_dict(counts)


def as_dict(vv: VV) -> dict[str, int]:
    return {vv[i]: vv[i + 1] for i in range(0, len(vv), 2)}


def from_dict(counts: dict[str, int]) -> VV:
    out: list[Any] = []
    for name in sorted(counts):
        if counts[name] > 0:
            out += (name, counts[name])
    return tuple(out)


def total(vv: VV) -> int:
    """How many writes the vector accounts for (the session's version)."""
    return sum(vv[1::2])


def compare(a: VV, b: VV) -> Order:
    if a == b:
        return Order.EQUAL
    if len(a) == 2 and len(b) == 2 and a[0] == b[0]:  # the common case: one writer
        return Order.NEWER if a[1] > b[1] else Order.OLDER
    da, db = as_dict(a), as_dict(b)
    a_ahead = any(n > db.get(k, 0) for k, n in da.items())
    b_ahead = any(n > da.get(k, 0) for k, n in db.items())
    if a_ahead and b_ahead:
        return Order.CONCURRENT
    return Order.NEWER if a_ahead else Order.OLDER


def dominates(a: VV, b: VV) -> bool:
    """``a`` holds every write ``b`` holds (equal counts as dominating)."""
    return compare(a, b) in (Order.EQUAL, Order.NEWER)


def merge(vectors: Iterable[VV]) -> VV:
    """The element-wise maximum: a vector that dominates every one given."""
    counts: dict[str, int] = {}
    for vv in vectors:
        for k, n in as_dict(vv).items():
            if n > counts.get(k, 0):
                counts[k] = n
    return from_dict(counts)


def to_json(vv: VV) -> dict[str, int]:
    if len(vv) == 2:  # the common case: one writer
        return {vv[0]: vv[1]}
    return as_dict(vv)


def from_json(raw: Any, valid_name: Any) -> VV:
    """Parse a vector from untrusted JSON (an object of name -> positive count).

    ``valid_name`` is a compiled pattern the names must match. Raises ValueError.
    """
    if not isinstance(raw, dict) or len(raw) > MAX_WRITERS:
        raise ValueError("a version vector is an object of at most 64 names")
    if len(raw) == 1:  # the common case: one writer
        ((k, n),) = raw.items()
        if not isinstance(k, str) or not valid_name.fullmatch(k):
            raise ValueError("a version vector's keys are node names")
        if type(n) is not int or not 0 < n < 2**53:
            raise ValueError("a version vector's counts are positive integers")
        return (k, n)
    for k, n in raw.items():
        if not isinstance(k, str) or not valid_name.fullmatch(k):
            raise ValueError("a version vector's keys are node names")
        if type(n) is not int or not 0 < n < 2**53:
            raise ValueError("a version vector's counts are positive integers")
    return from_dict(raw)


class Candidate:
    """One copy offered to :func:`choose`: its vector, epoch, owner and data."""

    __slots__ = ("epoch", "item", "owner", "payload", "vv")

    def __init__(self, vv: VV, epoch: int, owner: str, payload: bytes, item: Any = None) -> None:
        self.vv = vv
        self.epoch = epoch
        self.owner = owner
        self.payload = payload
        self.item = item  # whatever the caller wants back

    def rank(self) -> tuple[int, int, str, bytes, VV]:
        # the vector last: two copies alike in all else still differ in it (a total order)
        return (self.epoch, total(self.vv), self.owner, self.payload, self.vv)


def choose(candidates: Sequence[Candidate]) -> tuple[Candidate, VV, list[Candidate]]:
    """The copy whose data win, the vector the result must carry, and the losers.

    The winner is the copy whose vector dominates all others. If none does (writes on
    both sides of a split), the maximal copies conflict: the one of the higher epoch
    wins (the owner the cluster chose last; a fenced node's writes were never confirmed),
    then the one with more writes, then the owner name, then the data, then the vector
    (any total order will do: every node must pick the same). ``losers`` are the maximal copies that lost, i.e.
    writes that are discarded; copies the winner dominates are not losers. The result's
    vector is the merge of all, so the choice is final: no loser can outrank it later.
    """
    assert candidates, "choose() needs at least one copy"
    maximal: list[Candidate] = []
    for c in candidates:
        if any(compare(o.vv, c.vv) is Order.NEWER for o in candidates):
            continue
        if not any(c.vv == o.vv for o in maximal):
            maximal.append(c)
        elif c.rank() > next(o for o in maximal if o.vv == c.vv).rank():
            maximal = [c if o.vv == c.vv else o for o in maximal]
    winner = max(maximal, key=Candidate.rank)
    losers = [c for c in maximal if c is not winner]
    vv = merge(c.vv for c in candidates) if losers else winner.vv
    return winner, vv, losers
