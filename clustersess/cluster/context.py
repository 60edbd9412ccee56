"""What every part of the cluster layer shares, and the narrow interface back to the manager.

The cluster layer never sees the :class:`~clustersess.manager.SessionManager`: it gets
the store, the stats, the clocks and this :class:`SessionEvents` interface (the way
Tomcat's replicated map talks back through ``MapOwner``), and nothing else.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from ..config import Config
from ..listeners import DestroyReason
from ..session import Entry
from ..stats import Stats
from ..store import LocalStore
from .health import SelfProof
from .membership import Membership
from .outbox import Outbox, RateLimitedLog
from .timing import Timing
from .transport import Transport
from .trickle import Trickle
from .wire import Codec

log = logging.getLogger("clustersess.cluster")


class SessionEvents(Protocol):
    """What the cluster layer tells the manager (which fires listeners and counts)."""

    def replicated(self, copy: Entry, created: bool) -> None:
        """A backup copy was created or updated here."""

    def destroyed(self, entry: Entry, reason: DestroyReason) -> None:
        """A session or copy held here was killed by another node's logout or rotation."""

    def conflict(self, winner: Entry, discarded: list[bytes]) -> None:
        """Two copies had writes the other lacked; ``winner`` holds the data kept."""


@dataclasses.dataclass(eq=False)
class ClusterContext:
    config: Config
    timing: Timing
    name: str
    stats: Stats
    store: LocalStore
    events: SessionEvents
    wall: Callable[[], float]
    mono: Callable[[], float]
    transport: Transport
    codec: Codec
    members: Membership
    proof: SelfProof
    outbox: Outbox
    #: bulk control items, paced (see trickle.py)
    trickle: Trickle
    warn: RateLimitedLog
    #: start a background task owned by the manager's task group
    spawn: Callable[[Coroutine[Any, Any, Any], str], asyncio.Task[Any]]

    @property
    def cluster_name(self) -> str:
        return self.config.cluster_name

    @property
    def ch_all(self) -> str:
        return f"{self.config.cluster_name}:all"

    #: node name -> its direct channel (built once: every write names one)
    _channels: dict[str, str] = dataclasses.field(default_factory=dict, init=False, repr=False)

    def channel(self, node: str) -> str:
        name = self._channels.get(node)
        if name is None:
            if len(self._channels) >= 4096:
                self._channels.clear()  # (names of members long gone)
            name = self._channels[node] = f"{self.config.cluster_name}:node:{node}"
        return name

    def claim_key(self, node: str) -> str:
        return f"{self.config.cluster_name}:claim:{{{node}}}"

    def adopted_key(self, node: str, incarnation: str) -> str:
        return f"{self.config.cluster_name}:adopted:{{{node}}}:{incarnation}"

    def healthy(self) -> bool:
        """Not fenced: what :meth:`~.node.ClusterNode.health` calls ok."""
        return self.transport.connected and self.proof.healthy(self.mono())

    def knows_everyone(self) -> bool:
        """The member table is complete: our heartbeats have made the round trip over a
        stretch of one and a half heartbeat intervals. Every live member publishes a
        heartbeat each interval, and Redis delivers what was published before our own
        heartbeat before its echo, so we have heard them all. Right after joining,
        rejoining or reconnecting (or while Redis stalls) the table may be incomplete:
        hearing of nobody then proves nothing."""
        proof = self.proof
        since = proof.connected_stretch(self.mono())
        if since is None or proof.echo_sent is None:
            return False
        return proof.echo_sent - since >= 1.5 * self.timing.heartbeat
