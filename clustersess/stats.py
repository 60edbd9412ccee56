"""Every counter in one place; the status page and metrics read this object.

:mod:`clustersess.metrics` exports each field generically: an ``int`` field is a
counter, a :class:`Histogram` field a histogram. A field added here appears in
``/cluster.json`` and ``/metrics`` without further edits.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Callable

#: upper bounds, in seconds, of the ack-latency buckets: from a fast LAN round trip
#: (Redis on the same switch answers in 0.1-0.3 ms) to past the default ack_timeout
ACK_LATENCY_BOUNDS = (0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclasses.dataclass(eq=False)
class Histogram:
    """Observations counted per bucket (not cumulative), with their sum.

    ``counts[i]`` counts values ``<= bounds[i]`` and above the previous bound (the
    Prometheus ``le`` convention); the last entry counts values above every bound.
    """

    bounds: tuple[float, ...]
    counts: list[int] = dataclasses.field(init=False)
    total: float = 0.0
    #: called with every observation too (``clustersess.metrics`` sets it in
    #: prometheus_client's multiprocess mode, which needs each value)
    also: Callable[[float], None] | None = None

    def __post_init__(self) -> None:
        assert list(self.bounds) == sorted(set(self.bounds)), "bounds must be strictly increasing"
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        if self.also is not None:
            self.also(value)

    @property
    def count(self) -> int:
        return sum(self.counts)


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
    bytes_sent: int = 0
    bytes_received: int = 0
    messages_dropped_auth: int = 0
    messages_dropped_malformed: int = 0
    messages_dropped_stale: int = 0
    messages_dropped_replay: int = 0
    #: authentic, but published on another channel or by another cluster than it names
    messages_dropped_channel: int = 0
    #: larger than the protocol's MAX_MESSAGE (dropped before any MAC work)
    messages_dropped_oversize: int = 0
    #: from an incarnation that is not (or not yet) the holder of its name
    messages_dropped_unknown_member: int = 0
    handler_errors: int = 0
    gaps_detected: int = 0
    #: resync requests answered (as an owner) and sent (after a gap of our own)
    resyncs: int = 0
    resyncs_requested: int = 0
    #: sessions sent again because a backup's digest differed
    resync_sessions_sent: int = 0
    replications_sent: int = 0
    replications_applied: int = 0
    ack_timeouts: int = 0
    #: a backup refused a state (superseded, diverged or dead)
    acks_refused: int = 0
    #: writes answered without being confirmed replicated (fenced, timeout, refusal)
    writes_unreplicated: int = 0
    #: writes answered 503 instead (on_replication_failure="refuse")
    writes_refused: int = 0
    #: copies with writes on both sides of a split; one side's data was discarded
    conflicts: int = 0
    takeovers_unconfirmed: int = 0
    reclaims: int = 0
    #: copies read without taking the session over (lazy ownership), and those taken over
    peeks: int = 0
    lazy_takeovers: int = 0
    #: sessions given up to a takeover that never completed, taken back
    takebacks: int = 0
    stepped_down: int = 0
    members_suspected: int = 0
    rejoins: int = 0
    watchdog_resets: int = 0
    task_restarts: int = 0
    publish_errors: int = 0
    requeued: int = 0
    redis_reconnects: int = 0
    listener_errors: int = 0
    writes_after_handoff: int = 0
    #: seconds from publishing a REPLICATE to its ack (sync and async alike)
    ack_latency: Histogram = dataclasses.field(default_factory=lambda: Histogram(ACK_LATENCY_BOUNDS))

    def as_dict(self) -> dict[str, int]:
        """Every counter by name (the histograms are in :meth:`histograms`)."""
        return {f.name: value for f in dataclasses.fields(self) if type(value := getattr(self, f.name)) is int}

    def histograms(self) -> dict[str, Histogram]:
        """Every histogram by name."""
        fields = dataclasses.fields(self)
        return {f.name: value for f in fields if isinstance(value := getattr(self, f.name), Histogram)}
