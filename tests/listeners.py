"""A session listener for tests: records every event, in order."""

from __future__ import annotations

from clustersess import SessionEvent, SessionListener


class Recorder(SessionListener):
    def __init__(self) -> None:
        self.events: list[tuple[str, SessionEvent, str | None]] = []

    def created(self, event: SessionEvent) -> None:
        self.events.append(("created", event, None))

    def changed(self, event: SessionEvent) -> None:
        self.events.append(("changed", event, None))

    def destroyed(self, event: SessionEvent, reason: str) -> None:  # type: ignore[override]
        self.events.append(("destroyed", event, reason))

    def kinds(self) -> list[str]:
        return [k if r is None else f"{k}:{r}" for k, _, r in self.events]
