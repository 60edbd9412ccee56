"""Every counter in one place; the status page and metrics read this object."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Stats:
    # sessions (owner side)
    sessions_created: int = 0
    sessions_expired: int = 0
    sessions_invalidated: int = 0
    sessions_rotated: int = 0
    commits: int = 0
    rejected_cookies: int = 0
    unknown_sessions: int = 0
    bad_values: int = 0
    too_large: int = 0
    # cluster
    takeovers: int = 0
    takeover_misses: int = 0
    takeover_retries: int = 0
    takeover_conflicts: int = 0
    handed_over: int = 0
    adopted: int = 0
    messages_sent: int = 0
    messages_received: int = 0
    messages_dropped_auth: int = 0
    messages_dropped_malformed: int = 0
    messages_dropped_stale: int = 0
    messages_dropped_replay: int = 0
    gaps_detected: int = 0
    resyncs: int = 0
    replications_sent: int = 0
    replications_applied: int = 0
    ack_timeouts: int = 0
    publish_errors: int = 0
    requeued: int = 0
    redis_reconnects: int = 0
    listener_errors: int = 0
    writes_after_handoff: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)
