"""The session object handed to the application, and the record a node keeps for it.

A node holds one live :class:`Session` per ID (as Tomcat does), shared by every concurrent
request of that session, so concurrent updates on one node never overwrite each other.
What the node stores and replicates is the :class:`Entry`: metadata and the last committed
JSON. Metadata is kept on the entry, never hidden inside the user's dict.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Self

from . import codec, ids, versions

if TYPE_CHECKING:  # pragma: no cover
    from .manager import SessionManager


@dataclasses.dataclass(slots=True, eq=False)
class Entry:
    """One session as a node holds it: as owner (with a live session) or as backup."""

    token: str
    owner: str
    created: float
    last_accessed: float
    epoch: int = 0
    version: int = 0
    payload: bytes = b"{}"
    session: Session | None = None
    inflight: int = 0
    #: commit at request end even if the data did not change (after rotate())
    dirty: bool = False
    #: the node that holds this session's backup copy, as of the last replication
    backup: str | None = None
    #: writes per node name (see :mod:`clustersess.versions`); ``version`` is their sum
    vv: versions.VV = ()

    @property
    def session_id(self) -> str:
        return ids.make_id(self.token, self.owner)


class Session(dict[str, Any]):
    """A dict of JSON-serializable values with the session's identity and lifecycle.

    Use it like ``request.session`` in Starlette. Extra API:

    * ``id``: ``<token>.<route>``; ``is_new``: not stored yet; ``created`` and
      ``last_accessed``: epoch seconds.
    * ``rotate()``: new ID, same data, old ID dead; call it at login (anti-fixation).
    * ``invalidate()``, or ``clear()``: logout; the old ID is dead everywhere, the
      client's cookie is deleted, and the session starts over empty (a write after it
      gets a new ID). A session that a request leaves empty ends the same way.
    * ``accessed`` and ``modified``, as in Starlette and Flask: the session was used, or
      changed (``modified`` only tracks the dict itself; a change inside a nested value
      is found anyway, by comparing the stored JSON). Both are reset when a request
      opens a session no other request holds.

    Setting a value that is not JSON-serializable raises :class:`SessionValueError` (a
    ``TypeError``) naming the key, at the assignment.
    """

    __slots__ = ("_clean", "_deep", "_entry", "_killed", "_manager", "_rotated_from", "accessed", "modified")

    def __init__(self, entry: Entry, manager: SessionManager, data: Mapping[str, Any] | None = None) -> None:
        super().__init__(data or {})
        #: rotate() in this request: (the ID the cluster knows, its backup, whether this
        #: node owned it), told to the cluster at commit
        self._rotated_from: tuple[str, str | None, bool] | None = None
        self._entry = entry
        self._manager = manager
        self.accessed = False
        self.modified = False
        #: invalidate() destroyed the stored session this object came from
        self._killed = False
        #: provably equal to the committed JSON: untouched since the last commit, and
        #: holding only immutable scalars (nothing nested could have been mutated in place)
        self._clean = False
        #: may hold a value that is not one of codec.SCALARS (kept conservatively: set by
        #: any such assignment, cleared only by a recount in only_scalars())
        self._deep = True

    def only_scalars(self) -> bool:
        """Every value is one of :data:`codec.SCALARS` (cheap unless a non-scalar was set)."""
        if self._deep:
            self._deep = not codec.only_scalars(self)
        return not self._deep

    def _settle_clean(self) -> None:
        """Called when the contents equal the committed JSON (after a commit or a load)."""
        self._clean = self.only_scalars()

    # -- identity ---------------------------------------------------------------------
    @property
    def id(self) -> str:
        return self._entry.session_id

    @property
    def is_new(self) -> bool:
        return self._entry.version == 0

    @property
    def created(self) -> float:
        return self._entry.created

    @property
    def last_accessed(self) -> float:
        return self._entry.last_accessed

    def rotate(self) -> None:
        """Give the session a new ID and kill the old one (like changeSessionId)."""
        self._manager.rotate(self)

    def invalidate(self) -> None:
        """Log out: destroy the stored session; this object starts over, empty, with a new ID."""
        self._manager.invalidate(self)

    def mark_accessed(self) -> None:  # called by Starlette's ``request.session``
        self.accessed = True

    # -- validated mutation -----------------------------------------------------------
    def __setitem__(self, key: str, value: Any) -> None:
        if not codec.check_value(key, value):
            self._deep = True
        self._clean = False
        self.accessed = self.modified = True
        dict.__setitem__(self, key, value)

    def __delitem__(self, key: str) -> None:
        self._clean = False
        self.accessed = self.modified = True
        super().__delitem__(key)

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key not in self:
            if not codec.check_value(key, default):
                self._deep = True
            self._clean = False
            self.modified = True
        self.accessed = True
        return super().setdefault(key, default)

    def update(self, *args: Any, **kwargs: Any) -> None:
        items: dict[str, Any] = dict(*args, **kwargs)
        for key, value in items.items():
            if not codec.check_value(key, value):
                self._deep = True
        self._clean = False
        self.accessed = self.modified = True
        super().update(items)

    def __ior__(self, other: Any) -> Self:  # type: ignore[override,misc]
        self.update(other)
        return self

    def pop(self, key: str, *default: Any) -> Any:
        if key in self:
            self._clean = False
            self.modified = True
        self.accessed = True
        return super().pop(key, *default)

    def popitem(self) -> tuple[str, Any]:
        self._clean = False
        self.accessed = self.modified = True
        return super().popitem()

    def clear(self) -> None:
        """Log out, like :meth:`invalidate` (which says what that does).

        Starlette and Flask apps log out with ``session.clear()``; on a server-side
        session emptying the dict alone would leave the old ID alive on the server.
        """
        self.accessed = self.modified = True
        self.invalidate()

    def replace_all(self, data: Iterable[tuple[str, Any]] | Mapping[str, Any]) -> None:
        """Swap the contents without validation (data known good); internal use."""
        self._clean = False
        self._deep = True
        super().clear()
        super().update(data)

    def __repr__(self) -> str:
        return f"<Session {self._entry.token[:6]}….{self._entry.owner} {dict.__repr__(self)}>"
