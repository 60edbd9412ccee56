"""What a node knows about itself: is it connected, does it hold its lease, may it act?

* **Connected**: the node's own heartbeats come back on the broadcast channel (its
  *echo*); the last one that did was sent less than ``echo_timeout`` ago. Its path to the
  cluster works both ways at that moment.
* **Lease**: the name claim in Redis, renewed every heartbeat while connected, holds
  until its renewal's send time + ``lease_ttl`` - ``lease_margin`` on our own monotonic
  clock: before Redis could expire it, so before anyone may adopt our sessions.
* **Healthy** = connected, lease held, and neither joining, rejoining, stopping nor
  superseded. Anything else is *fenced*: no write is claimed as replicated, nobody is
  suspected, nothing adopted, and the readiness check fails so the load balancer drains us.
"""

from __future__ import annotations

import dataclasses
import enum

from .timing import Timing


class State(str, enum.Enum):
    JOINING = "joining"  # started, not yet holding its name
    HEALTHY = "healthy"
    REJOINING = "rejoining"  # its sessions were adopted while it was away: a new life
    STOPPING = "stopping"  # handing its sessions over
    SUPERSEDED = "superseded"  # a newer incarnation of this name runs: fenced for good


@dataclasses.dataclass(frozen=True, slots=True)
class Health:
    """A readiness verdict: ``ok`` means route traffic here; ``reason`` says why not."""

    ok: bool
    state: str
    reason: str = ""

    def as_dict(self) -> dict[str, object]:
        return {"ok": self.ok, "state": self.state, "reason": self.reason}


#: heartbeats whose send time is remembered until they come back
_SENT_LIMIT = 64


class SelfProof:
    def __init__(self, timing: Timing) -> None:
        self.timing = timing
        self.state = State.JOINING
        #: send time (monotonic) of the last heartbeat of ours that came back
        self.echo_sent: float | None = None
        #: when the current stretch of being connected began (None: not connected)
        self.connected_since: float | None = None
        #: our lease holds until then (monotonic)
        self.lease_until = float("-inf")
        self._sent: dict[int, float] = {}
        self.reason = "starting"

    # -- evidence --------------------------------------------------------------------------
    def sent(self, seq: int, now: float) -> None:
        """We published heartbeat ``seq`` at ``now``."""
        self._sent[seq] = now
        if len(self._sent) > _SENT_LIMIT:
            del self._sent[next(iter(self._sent))]

    def echoed(self, seq: int, now: float) -> None:
        """Our heartbeat ``seq`` came back."""
        sent = self._sent.pop(seq, None)
        if sent is None:
            return
        for old in [s for s in self._sent if s < seq]:
            del self._sent[old]
        if self.connected_since is None or not self.connected(now):
            self.connected_since = now
        if self.echo_sent is None or sent > self.echo_sent:
            self.echo_sent = sent

    def disconnected(self) -> None:
        """The transport lost its connection: what we do not hear proves nothing now."""
        self.connected_since = None
        self.echo_sent = None
        self._sent.clear()

    def renewed(self, sent_at: float) -> None:
        """A lease renewal sent at ``sent_at`` succeeded."""
        self.lease_until = max(self.lease_until, sent_at + self.timing.lease_ttl - self.timing.lease_margin)

    def lapse(self) -> None:
        self.lease_until = float("-inf")

    # -- verdicts --------------------------------------------------------------------------
    def connected(self, now: float) -> bool:
        return self.echo_sent is not None and now - self.echo_sent < self.timing.echo_timeout

    def connected_stretch(self, now: float) -> float | None:
        """Start of the current connected stretch, or None while not connected."""
        if not self.connected(now):
            return None
        return self.connected_since

    def holds_lease(self, now: float) -> bool:
        return now < self.lease_until

    def healthy(self, now: float) -> bool:
        return self.state is State.HEALTHY and self.connected(now) and now < self.lease_until

    def health(self, now: float, *, transport_up: bool) -> Health:
        if self.state is not State.HEALTHY:
            return Health(False, self.state.value, self.reason)
        if not transport_up:
            return Health(False, "fenced", "no connection to Redis")
        if not self.connected(now):
            age = "never" if self.echo_sent is None else f"{now - self.echo_sent:.1f}s ago"
            return Health(False, "fenced", f"own heartbeats not coming back (last {age})")
        if not self.holds_lease(now):
            return Health(False, "fenced", "lease not renewed")
        return Health(True, "healthy")
