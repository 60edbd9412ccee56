"""Session listeners: hooks fired when a session is created, changed or destroyed.

Like Tomcat's HttpSessionListener, fired on the owner; with
``notify_listeners_on_replication`` also on the backup when a copy arrives or dies.
A listener that raises is logged and counted; it never breaks a request.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

DestroyReason = Literal["expired", "invalidated"]


@dataclasses.dataclass(frozen=True)
class SessionEvent:
    session_id: str
    node: str
    #: True when fired on a backup copy rather than on the owner
    replicated: bool
    data: dict[str, Any]


class SessionListener:
    """Subclass and override what you need; every hook is a no-op by default."""

    def created(self, event: SessionEvent) -> None:
        pass

    def changed(self, event: SessionEvent) -> None:
        pass

    def destroyed(self, event: SessionEvent, reason: DestroyReason) -> None:
        pass

    def conflict(self, event: SessionEvent, discarded: list[dict[str, Any]]) -> None:
        """Both sides of a split wrote to this session; ``event.data`` won (on every node
        alike, by a deterministic rule) and ``discarded`` holds the data that lost."""
