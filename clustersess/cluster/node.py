"""One node's part in the cluster: its life cycle, its lease, and what ties the parts together.

The parts (each in its own module, sharing a :class:`~.context.ClusterContext`):
``inbox`` (receive path), ``outbox`` (send path), ``replication`` (both sides of
replication and resync), ``ownership`` (takeover, adoption, hand-off), ``membership``
(members and backup choice) and ``health`` (what this node can prove about itself). This
module runs them: it claims the node's name, sends heartbeats and renews the lease,
suspects silent members and adopts their sessions once Redis confirms their lease lapsed,
rejoins as a new incarnation when its own sessions were adopted, hands everything over on
a clean stop, and answers the manager (:class:`~clustersess.manager.Replicator`).
``docs/PROTOCOL.md`` is the specification.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Coroutine
from typing import Any

from .. import tasks
from ..clock import Clock
from ..config import Config
from ..errors import DuplicateNodeError
from ..session import Entry
from ..stats import Stats
from ..store import LocalStore
from . import messages as m
from .context import ClusterContext, SessionEvents, log
from .health import Health, SelfProof, State
from .inbox import Inbox
from .membership import Member, Membership, new_incarnation
from .outbox import Outbox, RateLimitedLog
from .ownership import Ownership
from .replication import Replication
from .timing import Timing
from .transport import RedisTransport, Transport, TransportError
from .trickle import Trickle
from .wire import Codec

#: a stopping node leaves once no session has reached it for this long
HANDOFF_QUIET = 0.1


class _LoopClock:
    """Monotonic time from the node's event loop: the clock asyncio's timers use (a virtual
    one in the fault simulator). Readable from other threads (a WSGI status page) once
    the node has started."""

    __slots__ = ("loop",)

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None

    def __call__(self) -> float:
        loop = self.loop
        if loop is None:
            loop = self.loop = asyncio.get_running_loop()
        return loop.time()


class ClusterNode:
    """Implements the manager's :class:`~clustersess.manager.Replicator` over Redis."""

    def __init__(
        self,
        config: Config,
        *,
        stats: Stats,
        store: LocalStore,
        events: SessionEvents,
        clock: Clock,
        transport: Transport | None = None,
    ) -> None:
        self.config = config
        self.name = config.node_name
        self._mono = _LoopClock()
        self.timing = timing = Timing.from_config(config)
        if transport is None:
            assert config.redis_url is not None
            transport = RedisTransport(config.redis_url, backoff_cap=timing.reconnect_cap)
        self.transport = transport
        self.incarnation = new_incarnation()
        self.address = f"{socket.gethostname()}:{os.getpid()}"
        self.stats = stats
        self.store = store
        warn = RateLimitedLog(log)
        self.proof = SelfProof(timing)
        self.members = Membership(self.name, zone=config.zone)
        codec = Codec(config.secret_key, config.cluster_name)
        self.outbox = Outbox(
            self.name,
            self.incarnation,
            codec,
            transport,
            stats=stats,
            store=store,
            warn=warn,
            wall=clock.time,
            mono=self._mono,
            on_unreachable=self._unreachable,
            on_sent=self._sent,
        )
        self.ctx = ctx = ClusterContext(
            config=config,
            timing=timing,
            name=self.name,
            stats=stats,
            store=store,
            events=events,
            wall=clock.time,
            mono=self._mono,
            transport=transport,
            codec=codec,
            members=self.members,
            proof=self.proof,
            outbox=self.outbox,
            trickle=Trickle(self.outbox),
            warn=warn,
            spawn=self._spawn,
        )
        self.replication = Replication(ctx)
        self.outbox.on_resent = self.replication.resent
        #: replicate a committed session; True if it is confirmed (see Replication). The
        #: component's own method, not a wrapper: one coroutine less on every write.
        self.replicate = self.replication.replicate
        self.ownership = Ownership(ctx, self.replication)
        self.replication.reclaim = self.ownership.reclaim
        self.replication.reclaiming = self.ownership.reclaiming
        self.replication.take_handoff = self.ownership.take_handoff
        self.replication.unconfirmed = self.ownership.unconfirmed
        self.inbox = Inbox(
            ctx,
            on_echo=self._echo,
            on_twin=self._twin,
            on_joined=self._joined,
            on_back=self._back,
            on_gap=self._gap,
            on_leave=self._left,
            on_retired_sender=self._tell_retired,
        )
        T = m.MsgType
        for kind, handler in (
            (T.HEARTBEAT, self._on_heartbeat),
            (T.REPLICATE, self.replication.on_replicate),
            (T.ACK, self.replication.on_ack),
            (T.ACCESSED, self.replication.on_accessed),
            (T.INVALIDATE, self.replication.on_invalidate),
            (T.DROP, self.replication.on_drop),
            (T.RESYNC, self.replication.on_resync),
            (T.DIGEST, self.replication.on_digest),
            (T.NEED, self.replication.on_need),
            (T.PRUNE, self.replication.on_prune),
            (T.WANT, self.replication.on_want),
            (T.FETCH, self.ownership.on_fetch),
            (T.FETCH_REPLY, self.ownership.on_fetch_reply),
            (T.OWNED, self.ownership.on_owned),
            (T.RETIRED, self._on_retired),
        ):
            self.inbox.on(kind, handler)
        self.inbox.check_complete()
        #: logouts waiting for acknowledgement (the manager binds this very list)
        self.unsettled = self.replication.unsettled
        self.ch_all = ctx.ch_all
        self.ch_me = ctx.channel(self.name)
        self.tasks: dict[str, tasks.TaskInfo] = {}
        self._tg: asyncio.TaskGroup | None = None
        self._loose: set[asyncio.Task[Any]] = set()
        self._connected = asyncio.Event()
        self._heartbeat_seqs: dict[int, None] = {}
        self._watch_since = float("-inf")
        self._last_traffic = float("-inf")
        self._superseded_by = ""
        self._told_retired: dict[tuple[str, str], float] = {}

    # == lifecycle ============================================================================
    def start_tasks(self, tg: asyncio.TaskGroup) -> None:
        self._tg = tg
        loop = self._mono.loop = asyncio.get_running_loop()
        # the parts read it on every write: the loop's own method, not a wrapper
        self.ctx.mono = self.outbox._mono = loop.time
        transport = self.transport
        for name, factory in (
            ("receiver", lambda: transport.run([self.ch_me, self.ch_all], self._on_message, self._on_connect)),
            ("flusher", self.outbox.run),
            ("heartbeat", self._heartbeat),
            ("access", self._access_flusher),
            ("rebalancer", self.replication.rebalancer),
            ("reconciler", self.ownership.reconciler),
        ):
            info = self.tasks[name] = tasks.TaskInfo(name)
            tg.create_task(
                tasks.supervise(info, factory, on_error=self._task_failed, cap=self.timing.reconnect_cap),
                name=f"clustersess-{name}",
            )

    def _task_failed(self) -> None:
        self.stats.task_restarts += 1

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        guarded = tasks.guarded(coro, name, on_error=self._handler_failed)
        if self._tg is not None:
            try:
                return self._tg.create_task(guarded, name=name)
            except RuntimeError:  # the task group is shutting down
                pass
        task = asyncio.get_running_loop().create_task(guarded, name=name)
        self._loose.add(task)
        task.add_done_callback(self._loose.discard)
        return task

    def _handler_failed(self) -> None:
        self.stats.handler_errors += 1

    @property
    def state(self) -> State:
        return self.proof.state

    async def wait_ready(self) -> None:
        """Wait for Redis (briefly) and claim the node name; raise if it is taken."""
        try:
            await asyncio.wait_for(self._connected.wait(), timeout=2.0)
        except TimeoutError:
            log.warning("clustersess: Redis is unreachable at start-up; serving from memory and retrying")
            return
        duplicate = DuplicateNodeError(
            f"another live node is already named {self.name!r} in cluster "
            f"{self.config.cluster_name!r}; give every node its own CLUSTERSESS_NODE"
        )
        # The claim waits out a previous life of this node (it expires one lease after
        # its last renewal) and refuses a live namesake.
        deadline = self._mono() + self.timing.lease_ttl + self.timing.heartbeat
        # The claim in Redis decides: a live namesake keeps renewing it, a previous life
        # lets it lapse. (Another incarnation's heartbeats with our name are not proof:
        # an outsider can replay a previous life's. A namesake that stalled past its
        # lease and comes back finds the claim taken and fences itself for good.)
        while (answer := await self._claim()) != "held":
            if answer == "error":
                return  # Redis cannot take the claim now: the heartbeat task joins later
            if self._mono() > deadline:
                raise duplicate
            await asyncio.sleep(self.timing.heartbeat)
        log.info(
            "clustersess: node %s joined cluster %s (incarnation %s, %s replication)",
            self.name, self.config.cluster_name, self.incarnation, self.config.replication,
        )  # fmt: skip
        # Serve once every member has been heard (ClusterContext.knows_everyone): a
        # takeover before that cannot be confirmed, and concurrent requests on several
        # nodes would keep taking the session over again meanwhile.
        settle = self._mono() + 4 * self.timing.heartbeat
        while not self.ctx.knows_everyone() and self._mono() < settle:
            await asyncio.sleep(self.timing.heartbeat / 4)

    async def _claim(self) -> str:
        """Claim our name for this incarnation (the first lease): "held" once we hold it,
        "taken" while another incarnation does, "error" if Redis could not answer."""
        sent = self._mono()
        try:
            holder = await self.transport.claim(self.ctx.claim_key(self.name), self.incarnation, self.timing.lease_ttl)
        except TransportError as exc:
            self.ctx.warn.warning("claim", "clustersess: could not claim node name %s yet (%s)", self.name, exc)
            return "error"
        if holder != self.incarnation:
            self.ctx.warn.warning(
                "claim", "clustersess: node name %s is still held by another incarnation; waiting", self.name
            )
            return "taken"
        self.proof.renewed(sent)
        rejoined = self.proof.state is State.REJOINING
        if rejoined:
            self.outbox.new_life(self.incarnation)
        if self.proof.state in (State.JOINING, State.REJOINING):
            self.proof.state = State.HEALTHY
            self.proof.reason = ""
        # Admission: others read our claim when they first hear us, so claim first.
        self._beat(hello=True)
        if rejoined:
            self.ownership.rejoined()
        return "held"

    async def stop(self) -> None:
        """Hand every owned session to its backup and leave, promptly."""
        self.proof.state = State.STOPPING
        self.proof.reason = "handing sessions over"
        if not self.transport.connected or self._superseded_by:
            log.warning("clustersess: stopping without Redis; %d session(s) not handed over", len(self.store.owned))
            await self.transport.close()
            return
        handed = 0
        loop_time = self._mono
        deadline = loop_time() + self.timing.handoff_deadline
        quiet_since: float | None = None
        # In rounds: a member stopping at the same moment may hand us sessions (or we may
        # adopt its copies) after our first list was taken; they go on to a member that
        # stays. We leave once nothing new has arrived for a short quiet period.
        while loop_time() < deadline:
            entries = [e for e in self.store.owned.values() if e.version > 0]
            if not entries:
                now = loop_time()
                quiet_since = quiet_since or now
                if now - quiet_since >= HANDOFF_QUIET:
                    break
                await asyncio.sleep(0.01)
                continue
            quiet_since = None
            sent = [(e, self.replication.enqueue(e, handoff=True)) for e in entries]
            waiting = [f for _, f in sent if f is not None]
            if not waiting:
                break  # no member left to take them
            done, _ = await asyncio.wait(waiting, timeout=max(0.01, deadline - loop_time()))
            for entry, fut in sent:
                if fut in done and not fut.cancelled() and fut.exception() is None and fut.result() is None:
                    handed += 1
                    if self.store.owned.get(entry.token) is entry:
                        # The receiver owns it now; keep only a copy until we are gone.
                        del self.store.owned[entry.token]
                        self.store.backups[entry.token] = entry
        self.stats.handed_over += handed
        log.info(
            "clustersess: handed %d of %d session(s) over before leaving", handed, handed + len(self.store.owned)
        )
        await self.outbox.flush()
        # Release the claim, then say goodbye: the LEAVE retires this incarnation, and its
        # receivers adopt whatever copies of ours are left without waiting for a lease.
        await self.transport.release(self.ctx.claim_key(self.name), self.incarnation)
        self.outbox.send(self.ch_all, m.Leave())
        await self.outbox.flush()
        await self.transport.close()

    # == called by the manager =================================================================
    async def acquire(self, token: str) -> Entry | None:
        """Take session ``token`` over (a request for it arrived here)."""
        return await self.ownership.acquire(token)

    async def peek(self, token: str) -> Entry | None:
        """The newest copy of ``token``, read without taking it over (lazy ownership)."""
        return await self.ownership.peek(token)

    def can_replicate(self, token: str | None = None) -> bool:
        """False while fenced, or while the ownership of ``token`` is unconfirmed (taken
        over without hearing every member): a write now would not be claimed as
        replicated."""
        return self.ctx.healthy() and (token is None or token not in self.ownership.unconfirmed)

    def buried(self, tokens: dict[str, str | None]) -> None:
        """These sessions were logged out or rotated away here (token -> its backup)."""
        self.replication.buried(tokens)

    async def settle(self) -> bool:
        """Wait until the logouts sent so far are acknowledged (sync mode), bounded."""
        return await self.replication.settle()

    def reclaim(self, entry: Entry) -> None:
        """A request committed to a session that moved away while it ran: take it back so
        that its write meets the new owner's copy (newest write wins)."""
        self.stats.writes_after_handoff += 1
        self.ctx.warn.warning(
            "reclaim", "clustersess: a request finished after its session moved to another node; reconciling"
        )
        self.ownership.reclaim(entry.token)

    def requeue(self, entry: Entry) -> None:
        """Send ``entry``'s state to its backup with the next retry."""
        self.outbox.requeue[entry.token] = None

    def health(self) -> Health:
        return self.proof.health(self._mono(), transport_up=self.transport.connected)

    # == receiving =============================================================================
    def _on_message(self, channel: str, raw: bytes) -> None:
        self._last_traffic = self._mono()
        self.inbox.on_message(channel, raw)

    async def _on_connect(self, first: bool) -> None:
        now = self._mono()
        gap = now - self._last_traffic if self._last_traffic > float("-inf") else 0.0
        self._watch_since = now
        self.proof.disconnected()
        self._connected.set()
        if self.proof.state is not State.JOINING and not self._superseded_by:
            self._beat(hello=True)
        if not first:
            # We may have missed messages while disconnected: a gap. Owners send us what
            # we may lack (incrementally), and what we never had acknowledged goes again.
            self.stats.redis_reconnects += 1
            self.inbox.reconnected()
            self.replication.request_resync(gap + self.timing.drop_time)
            self.outbox.answers_lost()  # (their ACKs may have come while we were away)
            self.replication.retry_requeued()

    def _sent(self, channel: str, seq: int, body: m.Body) -> None:
        if isinstance(body, m.Heartbeat) and channel == self.ch_all:
            self.proof.sent(seq, self._mono())

    def _echo(self, seq: int) -> None:
        now = self._mono()
        self.proof.echoed(seq, now)
        self._watch_since = now

    def _twin(self, incarnation: str) -> None:
        self.ctx.warn.warning(
            "dup", "clustersess: another node also calls itself %s; rename one (CLUSTERSESS_NODE)", self.name
        )

    def _joined(self, member: Member, replaced: Member | None) -> None:
        if replaced is not None:
            log.warning("clustersess: member %s restarted as a new incarnation", member.name)
            # Its previous life is gone with its memory: what it owned we adopt, what it
            # backed up goes to a backup again.
            self._spawn(self.ownership.adopt_from(member.name), "clustersess-adoption")
            self.replication.rebalance_soon(refill=member.name)
        else:
            log.info("clustersess: member %s joined (%d live)", member.name, len(self.members.members))
            self.replication.rebalance_soon()

    def _back(self, member: Member) -> None:
        log.warning("clustersess: member %s is heard again", member.name)
        self.replication.rebalance_soon()

    def _left(self, member: Member) -> None:
        log.warning("clustersess: member %s left (%d live)", member.name, len(self.members.members))
        self.outbox.release_channel(self.ctx.channel(member.name))
        self._spawn(self.ownership.adopt_from(member.name), "clustersess-adoption")
        self.replication.rebalance_soon()

    def _tell_retired(self, name: str, incarnation: str) -> None:
        """A retired incarnation is still talking (it was cut off, and did not learn that
        its sessions were adopted, e.g. because Redis lost the marker): tell it."""
        now = self._mono()
        key = (name, incarnation)
        if now - self._told_retired.get(key, float("-inf")) < self.timing.heartbeat * 2:
            return
        self._told_retired[key] = now
        while len(self._told_retired) > 256:
            del self._told_retired[next(iter(self._told_retired))]
        if self.ctx.healthy():
            self.outbox.send(self.ctx.channel(name), m.Retired(incarnation))

    def _on_retired(self, member: Member, env: m.Envelope) -> None:
        body = env.body
        assert isinstance(body, m.Retired)
        if body.incarnation == self.incarnation and self.proof.state is State.HEALTHY:
            log.warning("clustersess: %s retired this incarnation (it was presumed dead); rejoining", member.name)
            self._spawn(self._rejoin(), "clustersess-rejoin")

    def _gap(self, src: str, missed: int) -> None:
        self.replication.request_resync(self.timing.drop_time)

    def _on_heartbeat(self, member: Member, env: m.Envelope) -> None:
        body = env.body
        assert isinstance(body, m.Heartbeat)
        member.address, member.owned, member.backups = body.address, body.owned, body.backups
        if member.zone != body.zone:  # first heartbeat of this member: its backups may move
            member.zone = body.zone
            self.replication.rebalance_soon()
        member.skew = body.wall - self.ctx.wall()
        if body.hello and self.proof.state is not State.JOINING:
            self._beat()

    # == periodic work =========================================================================
    async def _heartbeat(self) -> None:
        while True:
            await self._tick()
            await asyncio.sleep(self.timing.heartbeat)

    async def _tick(self) -> None:
        now = self._mono()
        if not self.transport.connected:
            self.proof.disconnected()
            return
        state = self.proof.state
        if state is State.SUPERSEDED or state is State.STOPPING:
            return
        if state is State.JOINING or state is State.REJOINING:
            await self._claim()
            return
        self._beat()
        proof = self.proof
        # Watchdog: our own heartbeats stopped coming back although the transport says it
        # is connected (a silently dead subscription): reconnect, which is then a gap.
        if not proof.connected(now) and now - self._watch_since > self.timing.echo_timeout:
            self._watch_since = now
            self.stats.watchdog_resets += 1
            log.warning("clustersess: our own heartbeats stopped coming back; reconnecting to Redis")
            self.transport.reset()
            return
        if proof.connected(now):
            await self._renew()
        if self.ctx.healthy():
            self._suspect(now)
            await self._adopt_suspects()
            self.replication.retry_requeued()
            self.replication.retry_tombstones()
            self.replication.send_drops()
        self.replication.send_resync()
        self.outbox.release_window(now - self.timing.ack_expiry / 2)
        self.outbox.expire_acks(now - self.timing.ack_expiry)

    def _beat(self, hello: bool = False) -> None:
        self.outbox.send(
            self.ch_all,
            m.Heartbeat(
                self.address,
                len(self.store.owned),
                len(self.store.backups),
                self.ctx.wall(),
                hello,
                self.config.zone,
            ),
        )

    async def _renew(self) -> None:
        sent = self._mono()
        ctx = self.ctx
        try:
            answer = await self.transport.refresh(
                ctx.claim_key(self.name), self.incarnation, self.timing.lease_ttl,
                ctx.adopted_key(self.name, self.incarnation),
            )  # fmt: skip
        except TransportError as exc:
            ctx.warn.warning("lease", "clustersess: could not renew this node's lease (%s)", exc)
            return
        if answer == "held":
            self.proof.renewed(sent)
        elif answer == "lapsed":
            # It expired (a long pause, a Redis outage or restart), and nobody adopted our
            # sessions: we hold it again; what we may have missed meanwhile is a gap.
            self.proof.renewed(sent)
            log.warning("clustersess: this node's lease had lapsed; nobody adopted its sessions, resyncing")
            self.replication.request_resync(self.timing.drop_time * 2)
        elif answer == "adopted":
            await self._rejoin()
        else:
            self._superseded(answer.partition(":")[2])

    def _superseded(self, holder: str) -> None:
        self._superseded_by = holder or "?"
        self.proof.state = State.SUPERSEDED
        self.proof.reason = "a newer node of the same name holds the name"
        log.error(
            "clustersess: another process now runs as node %s (incarnation %s); this one stays fenced and "
            "serves no cluster work: stop it",
            self.name, holder,
        )  # fmt: skip

    async def _rejoin(self) -> None:
        """Our incarnation was retired (its sessions adopted) while we were away: start a
        new life. We keep what we hold, but only provisionally: we announce it, members
        that took a session over answer with their newer claim, and we step down there,
        or take it back where we hold writes they lack (newest write wins)."""
        proof = self.proof
        if proof.state is State.REJOINING:
            return
        proof.state = State.REJOINING
        proof.reason = "its sessions were adopted while it was cut off; rejoining"
        # What we missed goes back to before our lease last held (it lapsed meanwhile).
        held = proof.lease_until - (self.timing.lease_ttl - self.timing.lease_margin)
        proof.lapse()
        self.stats.rejoins += 1
        log.warning("clustersess: this node's sessions were adopted while it was cut off; rejoining")
        self.incarnation = new_incarnation()
        # Messages carry the new incarnation only once it holds our name (see _claim):
        # members would refuse it before, and keep refusing it for a while.
        self.outbox.abandon_acks()  # unacknowledged sessions are requeued
        now = self._mono()
        away = max(now - self._last_traffic, now - held if held > float("-inf") else 0.0)
        self.replication.request_resync(away + self.timing.drop_time)
        await self._claim()  # if Redis cannot answer now, the heartbeat task keeps trying

    def _suspect(self, now: float) -> None:
        since = self.proof.connected_stretch(now)
        if since is None:
            return
        for member in self.members.silent(now, since, self.timing.drop_time):
            member.suspected = True
            self.stats.members_suspected += 1
            log.warning(
                "clustersess: member %s silent for %.1fs; suspected (its sessions are adopted once its lease lapses)",
                member.name, self.timing.drop_time,
            )  # fmt: skip
            self.replication.rebalance_soon()

    async def _adopt_suspects(self) -> None:
        ctx = self.ctx
        for member in [mb for mb in self.members.members.values() if mb.suspected]:
            try:
                lapsed = await self.transport.adopt(
                    ctx.claim_key(member.name), member.incarnation,
                    ctx.adopted_key(member.name, member.incarnation), self.timing.adoption_marker_ttl,
                )  # fmt: skip
            except TransportError:
                return
            if not lapsed or not member.suspected:
                continue  # its lease still holds (or it was heard meanwhile): wait
            self.members.retire(member.name, member.incarnation)
            self.inbox.forget(member.name, member.incarnation)
            self.outbox.release_channel(self.ctx.channel(member.name))
            log.warning(
                "clustersess: member %s lost: silent and its lease lapsed (%d live)",
                member.name, len(self.members.members),
            )  # fmt: skip
            self._spawn(self.ownership.adopt_from(member.name), "clustersess-adoption")
            self.replication.rebalance_soon()

    async def _access_flusher(self) -> None:
        # A read costs the cluster nothing per request: every access_every, one pass over
        # the owned sessions finds those used since the last pass and tells their backups
        # (coalesced), so a session that is only read is not expired on its backup.
        since = self.ctx.wall()
        while True:
            await asyncio.sleep(self.timing.access_every)
            if not self.transport.connected:
                continue  # the first pass after reconnecting covers the outage too
            now = self.ctx.wall()
            await self.replication.send_accesses(since)
            since = now

    def _unreachable(self, channel: str) -> None:
        """Nobody listens on a backup's channel: do not pick it again until it is heard."""
        for member in self.members.members.values():
            if self.ctx.channel(member.name) == channel:
                member.unreachable = True

    # == status ================================================================================
    def status(self) -> dict[str, Any]:
        now = self._mono()
        health = self.health()
        skew_warn = 2.0
        members: list[dict[str, Any]] = [
            {
                "name": self.name,
                "incarnation": self.incarnation,
                "state": "up" if health.ok else health.state,
                "self": True,
                "address": self.address,
                "owned": len(self.store.owned),
                "backups": len(self.store.backups),
                "zone": self.config.zone,
            }
        ]
        for member in sorted(self.members.members.values(), key=lambda x: x.name):
            members.append(
                {
                    "name": member.name,
                    "incarnation": member.incarnation,
                    "state": "suspected" if member.suspected else "leaving" if member.leaving else "up",
                    "self": False,
                    "address": member.address,
                    "owned": member.owned,
                    "backups": member.backups,
                    "zone": member.zone,
                    "last_seen": round(max(0.0, now - member.last_heard), 3),
                    "skew": round(member.skew, 3),
                }
            )
        skewed = [mb.name for mb in self.members.members.values() if abs(mb.skew) > skew_warn]
        if skewed:
            self.ctx.warn.warning(
                "skew",
                "clustersess: wall clocks of %s differ from ours by more than %.0fs",
                ", ".join(skewed), skew_warn,
            )  # fmt: skip
        echo = self.proof.echo_sent
        return {
            "members": members,
            "connected": self.transport.connected,
            "incarnation": self.incarnation,
            "health": health.as_dict(),
            "lease_remaining": round(max(0.0, self.proof.lease_until - now), 3),
            "echo_age": None if echo is None else round(now - echo, 3),
            "clock_skew_warning": skewed,
            "pending_replication": self.pending_replication(),
            "rebalancing": self.replication.rebalancing,
            "unconfirmed": len(self.ownership.unconfirmed),
            "tasks": {name: info.as_dict() for name, info in self.tasks.items()},
        }

    def pending_replication(self) -> int:
        """Sessions whose latest version is not yet acknowledged by a backup."""
        return self.outbox.pending()
