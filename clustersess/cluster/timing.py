"""Every interval of the protocol, named and derived from the configuration in one place."""

from __future__ import annotations

import dataclasses

from ..config import Config


@dataclasses.dataclass(frozen=True, slots=True)
class Timing:
    #: a heartbeat (and a lease renewal) every this many seconds (McastService frequency)
    heartbeat: float
    #: a member silent this long, while we are provably connected, is suspected (dropTime)
    drop_time: float
    #: the longest a sync write waits for its backup's acknowledgement
    ack_timeout: float
    #: the TTL of the name claim in Redis, which is the node's lease
    lease_ttl: float
    #: a node treats its lease as over this long before Redis can expire it (clock rates
    #: differ a little; a renewal reaches Redis after it was sent)
    lease_margin: float
    #: no echo of our own heartbeat for this long: the subscription is dead, reconnect
    echo_timeout: float
    #: the longest wait between reconnect attempts: well under the drop time, so that after
    #: a Redis restart every node is back before any other could suspect it
    reconnect_cap: float
    #: one FETCH round of a takeover waits this long for every member's answer
    takeover_round: float
    #: a takeover that keeps meeting concurrent takeovers gives up stepping aside after this
    takeover_deadline: float
    #: a holder lets requests in flight finish for this long before giving a session up
    release_wait: float
    #: a stopping node waits this long for its hand-offs to be acknowledged
    handoff_deadline: float
    #: how long a logged-out or rotated token stays dead
    tombstone_ttl: float
    #: how long Redis remembers that a node's sessions were adopted, so the node learns it
    adoption_marker_ttl: float
    #: an owner answers one resync request per asker at most this often
    resync_interval: float
    #: a pass sends the access times of the sessions used since the last one this often
    access_every: float
    #: acknowledgements not received after this long are given up (and re-replicated)
    ack_expiry: float

    @classmethod
    def from_config(cls, cfg: Config) -> Timing:
        return cls(
            heartbeat=cfg.heartbeat_interval,
            drop_time=cfg.drop_time,
            ack_timeout=cfg.ack_timeout,
            lease_ttl=cfg.drop_time,
            lease_margin=max(0.05, cfg.drop_time * 0.1),
            echo_timeout=max(4 * cfg.heartbeat_interval, cfg.drop_time / 2),
            reconnect_cap=max(0.1, min(2.0, cfg.drop_time / 3)),
            takeover_round=2 * cfg.ack_timeout,
            takeover_deadline=4 * cfg.ack_timeout,
            release_wait=cfg.ack_timeout,
            handoff_deadline=2 * cfg.ack_timeout,
            tombstone_ttl=cfg.max_inactive + 60.0,
            adoption_marker_ttl=cfg.max_inactive + 2 * cfg.drop_time,
            resync_interval=max(cfg.heartbeat_interval, 1.0),
            access_every=max(0.05, min(30.0, cfg.max_inactive / 4)),
            ack_expiry=max(10.0, cfg.ack_timeout * 4),
        )
