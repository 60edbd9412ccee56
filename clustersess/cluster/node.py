"""One node's part in the cluster: replication, acks, takeover, adoption and hand-off.

This is Tomcat's BackupManager over Redis pub/sub:

* ``replicate()`` sends a committed session's full state to its backup (chosen by
  rendezvous hashing over the live members). Concurrent requests' sends are coalesced
  into one message per backup and one pipelined round trip by the flusher task. In sync
  mode (channelSendOptions=6) the request waits for the backup's ack, never longer than
  ``ack_timeout``; a miss queues the session for re-replication.
* ``acquire()`` takes a session over when a request for it arrives here: it asks the
  cluster for every copy (FETCH), the holders give up ownership and answer, the newest
  copy (by epoch, then version) wins, the epoch is bumped and a new backup is chosen.
* When a member dies, sessions it backed up get a new backup, and its sessions are
  adopted by their backup. A node stopping cleanly hands its sessions to their backups.
* Every incoming message is authenticated, parsed strictly, checked for replay and gaps,
  and applied only if it is newer than what this node holds; the rest is dropped and
  counted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import socket
import time
from typing import TYPE_CHECKING, Any

from .. import codec
from ..errors import DuplicateNodeError
from ..session import Entry
from . import messages as m
from .membership import Membership, new_incarnation
from .outbox import NoReceiver, Outbox, RateLimitedLog, consume, state_of
from .transport import RedisTransport, Transport, TransportError
from .wire import BadMac, Codec

if TYPE_CHECKING:  # pragma: no cover
    from ..manager import SessionManager

log = logging.getLogger("clustersess.cluster")

#: a stopping node leaves once no session has reached it for this long
HANDOFF_QUIET = 0.1


@dataclasses.dataclass(slots=True, eq=False)
class _Fetch:
    expected: int = -1
    replies: list[m.FetchReply] = dataclasses.field(default_factory=list)
    done: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)


def _time_out(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


class ClusterNode:
    def __init__(self, manager: SessionManager, transport: Transport | None = None) -> None:
        cfg = manager.config
        self.manager = manager
        self.config = cfg
        self.stats = manager.stats
        self.store = manager.store
        self.clock = manager.clock
        self.name = cfg.node_name
        self.incarnation = new_incarnation()
        self.codec = Codec(cfg.secret_key)
        if transport is None:
            assert cfg.redis_url is not None
            transport = RedisTransport(cfg.redis_url, backoff_cap=self.reconnect_cap(cfg.drop_time))
        self.transport = transport
        self.members = Membership(self.name, cfg.drop_time, zone=cfg.zone)
        self.address = f"{socket.gethostname()}:{os.getpid()}"
        self.ch_all = f"{cfg.cluster_name}:all"
        self.ch_me = self.channel(self.name)
        self.claim_key = f"{cfg.cluster_name}:claim:{self.name}"
        self.access_every = max(0.05, min(30.0, cfg.max_inactive / 4))
        self._warn = RateLimitedLog(log)
        #: everything this node sends goes through here (sequence numbers, batching, acks)
        self.outbox = Outbox(
            self.name,
            self.incarnation,
            self.codec,
            self.transport,
            stats=self.stats,
            store=self.store,
            warn=self._warn,
            on_unreachable=self._unreachable,
        )
        self._fetches: dict[str, _Fetch] = {}
        self._acquiring: dict[str, asyncio.Future[Entry | None]] = {}
        #: invalidations sent but maybe not yet published; changed only in place (the
        #: manager looks at this very list on every request)
        self.unsettled: list[asyncio.Future[int]] = []
        #: tokens this node is taking over right now (FETCH out, not yet owned)
        self._contending: set[str] = set()
        #: incarnation of an older live node with our name, if we heard one
        self._older_twin: str | None = None
        # incoming
        self._last_seq: dict[tuple[str, str, bool], int] = {}
        self._connected = asyncio.Event()
        self._tg: asyncio.TaskGroup | None = None
        self._lone_logged = False
        self._stopping = False

    def channel(self, node: str) -> str:
        return f"{self.config.cluster_name}:node:{node}"

    # -- lifecycle ----------------------------------------------------------------------
    def start_tasks(self, tg: asyncio.TaskGroup) -> None:
        self._tg = tg
        tg.create_task(
            self.transport.run([self.ch_me, self.ch_all], self._on_message, self._on_connect),
            name="clustersess-receiver",
        )
        tg.create_task(self.outbox.run(), name="clustersess-flusher")
        tg.create_task(self._heartbeat(), name="clustersess-heartbeat")
        tg.create_task(self._access_flusher(), name="clustersess-access")

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
        # The claim in Redis waits out a previous life of this node (it expires one drop
        # time after its last heartbeat) and refuses a live namesake.
        deadline = time.monotonic() + self.config.drop_time + self.config.heartbeat_interval
        while True:
            try:
                holder = await self.transport.claim(self.claim_key, self.incarnation, self.config.drop_time)
            except TransportError:
                log.warning("clustersess: could not claim node name %s yet (Redis down)", self.name)
                return
            if holder == self.incarnation:
                break
            if time.monotonic() > deadline or self._older_twin is not None:
                raise duplicate
            await asyncio.sleep(self.config.heartbeat_interval)
        # A namesake that stalled past its claim's expiry still sends heartbeats: listen
        # for two intervals before declaring ourselves in.
        await asyncio.sleep(2 * self.config.heartbeat_interval)
        if self._older_twin is not None:
            await self.transport.release(self.claim_key, self.incarnation)
            raise duplicate
        log.info(
            "clustersess: node %s joined cluster %s (incarnation %s, %s replication)",
            self.name,
            self.config.cluster_name,
            self.incarnation,
            self.config.replication,
        )

    async def stop(self) -> None:
        """Hand every owned session to its backup and leave, promptly."""
        self._stopping = True
        if not self.transport.connected:
            log.warning("clustersess: stopping without Redis; %d session(s) not handed over", len(self.store.owned))
            await self.transport.close()
            return
        self.outbox.send(self.ch_all, m.Leave())
        handed = 0
        deadline = time.monotonic() + self.config.ack_timeout * 2
        quiet_since: float | None = None
        # In rounds: a member stopping at the same moment may hand us sessions (or we may
        # adopt its copies) after our first list was taken; they go on to a member that
        # stays. We leave once nothing new has arrived for a short quiet period.
        while time.monotonic() < deadline:
            entries = list(self.store.owned.values())
            if not entries:
                now = time.monotonic()
                quiet_since = quiet_since or now
                if now - quiet_since >= HANDOFF_QUIET:
                    break
                await asyncio.sleep(0.01)
                continue
            quiet_since = None
            sent = [(e, self._enqueue(e, handoff=True)) for e in entries]
            waiting = [f for _, f in sent if f is not None]
            if not waiting:
                break  # no member left to take them
            done, _ = await asyncio.wait(waiting, timeout=max(0.01, deadline - time.monotonic()))
            for entry, fut in sent:
                if fut in done and not fut.cancelled() and fut.exception() is None:
                    handed += 1
                    if self.store.owned.get(entry.token) is entry:
                        # The receiver adopted it; keep only a copy until we are gone.
                        del self.store.owned[entry.token]
                        self.store.backups[entry.token] = entry
        self.stats.handed_over += handed
        log.info(
            "clustersess: handed %d of %d session(s) over before leaving",
            handed,
            handed + len(self.store.owned),
        )
        await self.outbox.flush()
        await self.transport.release(self.claim_key, self.incarnation)
        await self.transport.close()

    # -- called by the manager ------------------------------------------------------------
    async def replicate(self, entry: Entry) -> None:
        """Send a committed session to its backup; in sync mode wait for the ack."""
        deadline = time.monotonic() + self.config.ack_timeout
        for _attempt in range(3):
            fut = self._enqueue(entry)
            if fut is None or self.config.replication == "async":
                return
            # The future is this request's own, so it is awaited directly with a timer of
            # its own; asyncio.wait_for(shield(...)) cost five more objects per waiting
            # request, and a sync write waits across loop iterations: with tens of writes
            # in flight, those objects survived into the older GC generations and set off
            # full collections (about 10 ms each) several times a second.
            timer = asyncio.get_running_loop().call_later(max(0.0, deadline - time.monotonic()), _time_out, fut)
            try:
                await fut
                return
            except NoReceiver:
                continue  # the backup was marked suspect: the next attempt picks another
            except TimeoutError:
                self.stats.ack_timeouts += 1
                self._warn.warning(
                    "ack", "clustersess: no ack from backup within %.2fs; queued for re-replication",
                    self.config.ack_timeout,
                )
                self.outbox.requeue.add(entry.token)
                return
            except TransportError:
                return  # counted and queued by the flusher
            finally:
                timer.cancel()
        self.outbox.requeue.add(entry.token)

    def buried(self, tokens: list[str], reason: str) -> None:
        for t in tokens:
            self.outbox.requeue.discard(t)
        fut = self.outbox.send(self.ch_all, m.Invalidate(tuple(tokens), reason), counted=True)
        assert fut is not None
        fut.add_done_callback(consume)
        self.unsettled.append(fut)

    async def settle(self) -> None:
        """Wait until invalidations sent so far are published (sync mode), bounded.

        A logout must reach the cluster before the user sees it succeed; otherwise an
        owner killed right after could leave a live copy on its backup.
        """
        if not self.unsettled:
            return
        pending = self.unsettled.copy()
        self.unsettled.clear()
        if self.config.replication == "sync":
            await asyncio.wait(pending, timeout=self.config.ack_timeout)

    def reclaim(self, entry: Entry) -> None:
        self.stats.writes_after_handoff += 1
        self._warn.warning(
            "reclaim", "clustersess: a request finished after its session moved to another node; its change is dropped"
        )

    async def acquire(self, token: str, route: str) -> Entry | None:
        """Take session ``token`` over (a request for it arrived here)."""
        for _ in range(3):
            running = self._acquiring.get(token)
            if running is None:
                break
            # Another request here is already taking it over: share its result, unless
            # the session moved on again while we waited to resume (our request was not
            # in flight yet, so the owner could hand it over without waiting for it).
            entry = await asyncio.shield(running)
            if entry is None or self.store.owned.get(token) is entry:
                return entry
        running = self._acquiring.get(token)
        if running is not None:  # still contended after three tries: take what it gets
            return await asyncio.shield(running)
        fut: asyncio.Future[Entry | None] = asyncio.get_running_loop().create_future()
        self._acquiring[token] = fut
        try:
            entry = await self._acquire(token)
        except Exception:
            log.exception("clustersess: takeover of a session failed")
            entry = None
        finally:
            del self._acquiring[token]
        fut.set_result(entry)
        return entry

    async def _acquire(self, token: str) -> Entry | None:
        # Each round waits twice the holders' wait for their requests in flight
        # (_release_when_idle), so a busy owner's answer still arrives in time; stepping
        # aside for other takeovers is bounded separately.
        give_up = time.monotonic() + 4 * self.config.ack_timeout
        attempt = 0
        try:
            while True:
                # While our FETCH is out and until we own the session, we answer other
                # takeovers of it with "busy", so two nodes never both win one epoch.
                self._contending.add(token)
                replies = await self._fetch_round(token, time.monotonic() + 2 * self.config.ack_timeout)
                if not any(r.busy for r in replies) or time.monotonic() >= give_up:
                    break
                # Another node is taking it over at this very moment: step aside (not
                # busy ourselves meanwhile) and ask again; it will hand it over then.
                self._contending.discard(token)
                attempt += 1
                self.stats.takeover_retries += 1
                await asyncio.sleep(random.uniform(0.001, 0.004) * min(attempt, 8))
            return await self._take(token, replies)
        finally:
            self._contending.discard(token)

    async def _fetch_round(self, token: str, deadline: float) -> list[m.FetchReply]:
        """Ask every member for its copy of ``token``; returns the answers heard in time."""
        if not self.transport.connected:
            return []
        req = os.urandom(8).hex()
        fetch = self._fetches[req] = _Fetch()
        try:
            counted = self.outbox.send(self.ch_all, m.Fetch(req, token), counted=True)
            assert counted is not None
            receivers = await asyncio.wait_for(counted, max(0.001, deadline - time.monotonic()))
            fetch.expected = receivers - 1  # we hear our own broadcast
            if len(fetch.replies) < fetch.expected:
                await asyncio.wait_for(fetch.done.wait(), max(0.001, deadline - time.monotonic()))
        except (TimeoutError, TransportError):
            self._warn.warning("fetch", "clustersess: takeover did not hear from every member in time")
        finally:
            del self._fetches[req]
        return fetch.replies

    async def _take(self, token: str, replies: list[m.FetchReply]) -> Entry | None:
        local = [e for e in (self.store.owned.get(token), self.store.backups.get(token)) if e is not None]
        if any(r.dead for r in replies):
            self.store.bury(token, self.clock.time() + self.config.max_inactive + 60.0)
            return None
        best: Entry | None = max(local, key=Entry.order, default=None)
        for r in replies:
            if r.state is not None and (best is None or (r.state.epoch, r.state.version) > best.order()):
                best = _entry_from(r.state)
        if best is None:
            self.stats.takeover_misses += 1
            return None
        if best is self.store.owned.get(token):
            return best  # already ours, and nobody holds a newer copy
        entry = self._promote(best)
        self.stats.takeovers += 1
        await self.replicate(entry)
        self.outbox.send(self.ch_all, m.Owned(token, entry.epoch, entry.backup))
        return entry

    def _promote(self, best: Entry) -> Entry:
        """Make this node the owner of ``best``'s session at a new epoch."""
        token = best.token
        entry = self.store.owned.get(token)
        if entry is None:
            entry = Entry(token=token, owner=self.name, created=best.created, last_accessed=best.last_accessed)
        if entry.session is not None and entry.payload != best.payload:
            entry.session.replace_all(codec.decode(best.payload))
        entry.payload = best.payload
        entry.version = best.version
        entry.created = best.created
        entry.last_accessed = max(entry.last_accessed, best.last_accessed)
        entry.epoch = best.epoch + 1
        entry.owner = self.name
        self.store.backups.pop(token, None)
        self.store.owned[token] = entry
        return entry

    # -- sending --------------------------------------------------------------------------
    def _unreachable(self, channel: str) -> None:
        """Nobody listens on a backup's channel: do not pick it again until it is heard."""
        for member in self.members.members.values():
            if self.channel(member.name) == channel:
                member.suspect = True

    def _enqueue(self, entry: Entry, *, handoff: bool = False) -> asyncio.Future[None] | None:
        exclude = (entry.owner,) if entry.owner != self.name else ()
        backup = self.members.backup_for(entry.token, exclude=exclude)
        entry.backup = backup
        if backup is None:
            if self.members.members:
                # Members exist but none answers right now (all suspect, e.g. they have
                # not re-subscribed after a Redis restart yet): keep it for the retry.
                self.outbox.requeue.add(entry.token)
            elif not self._lone_logged:
                log.warning("clustersess: node %s is alone in the cluster; sessions have no backup", self.name)
                self._lone_logged = True
            return None
        self._lone_logged = False
        return self.outbox.replicate(self.channel(backup), entry, handoff=handoff)

    # -- periodic work --------------------------------------------------------------------
    async def _heartbeat(self) -> None:
        while True:
            if self.transport.connected:
                self._beat()
                try:
                    holder = await self.transport.claim(self.claim_key, self.incarnation, self.config.drop_time)
                    if holder != self.incarnation:
                        self._warn.warning(
                            "dup", "clustersess: another live node also calls itself %s; rename one (CLUSTERSESS_NODE)",
                            self.name,
                        )
                except TransportError:
                    pass
                for member in self.members.expire(time.monotonic()):
                    self._member_lost(member.name, f"no heartbeat for {self.config.drop_time:.1f}s")
                self._retry_requeued()
                self.outbox.expire_acks(time.monotonic() - max(10.0, self.config.ack_timeout * 4))
            await asyncio.sleep(self.config.heartbeat_interval)

    def _beat(self, hello: bool = False) -> None:
        self.outbox.send(
            self.ch_all,
            m.Heartbeat(self.address, len(self.store.owned), len(self.store.backups), hello, self.config.zone),
        )

    def _retry_requeued(self) -> None:
        if not self.outbox.requeue:
            return
        tokens, self.outbox.requeue = self.outbox.requeue, set()
        for token in tokens:
            entry = self.store.owned.get(token)
            if entry is not None:
                fut = self._enqueue(entry)
                if fut is not None:
                    fut.add_done_callback(consume)

    async def _access_flusher(self) -> None:
        # A read costs the cluster nothing per request: every access_every, one pass over
        # the owned sessions finds those used since the last pass and tells their backups
        # (coalesced), so a session that is only read is not expired on its backup.
        since = self.clock.time()
        while True:
            await asyncio.sleep(self.access_every)
            if not self.transport.connected:
                continue  # the first pass after reconnecting covers the outage too
            now = self.clock.time()
            self.send_accesses(since)
            # If the wall clock went back, accesses stamped before `since` are caught by
            # the next pass: one interval late, and the interval is a quarter of the
            # time a backup waits before expiring.
            since = now

    def send_accesses(self, since: float) -> int:
        """Send the last access time of every owned session used at or after ``since`` to
        its backup; returns how many sessions that covered."""
        by_backup: dict[str, list[tuple[str, int, float]]] = {}
        for e in self.store.owned.values():
            if e.last_accessed >= since and e.backup is not None:
                by_backup.setdefault(e.backup, []).append((e.token, e.epoch, e.last_accessed))
        for dest, items in by_backup.items():
            for i in range(0, len(items), 500):
                self.outbox.send(self.channel(dest), m.Accessed(tuple(items[i : i + 500])))
        return sum(map(len, by_backup.values()))

    # -- receiving ------------------------------------------------------------------------
    @staticmethod
    def reconnect_cap(drop_time: float) -> float:
        """Longest wait between reconnect attempts: well under the drop time, so that after
        a Redis restart every node is back before any other declares it dead."""
        return max(0.1, min(2.0, drop_time / 3))

    async def _on_connect(self, first: bool) -> None:
        # Silence while we were cut off proves nothing, and the others may need up to
        # one backoff step longer than we did to come back: give them that much extra.
        self.members.refresh_all(time.monotonic() + self.reconnect_cap(self.config.drop_time))
        self._connected.set()
        self._beat(hello=True)
        if not first:
            # We may have missed messages while disconnected: treat it as a gap. Our
            # own sessions go to their backups again, and owners resend what we back up.
            self.stats.redis_reconnects += 1
            self.stats.resyncs += 1
            self.outbox.requeue.update(self.store.owned)
            self._retry_requeued()
            self.outbox.send(self.ch_all, m.Resync())
            self._send_tombstones(self.ch_all)  # logouts we could not publish

    def _on_message(self, channel: str, raw: bytes) -> None:
        self.stats.messages_received += 1
        self.stats.bytes_received += len(raw)
        try:
            env = self.codec.decode(raw)
        except BadMac:
            self.stats.messages_dropped_auth += 1
            self._warn.warning("auth", "clustersess: dropped a cluster message that failed authentication")
            return
        except Exception:  # ValueError by contract; anything else must not kill the receiver
            self.stats.messages_dropped_malformed += 1
            self._warn.warning("malformed", "clustersess: dropped a malformed cluster message")
            return
        try:
            self._dispatch(channel, env)
        except Exception:  # a bug must not kill the receiver
            self.stats.messages_dropped_malformed += 1
            log.exception("clustersess: error while applying a %s message", env.body.TYPE.value)

    def _dispatch(self, channel: str, env: m.Envelope) -> None:
        src = env.src
        if src == self.name:
            if env.inc < self.incarnation:
                self._older_twin = env.inc  # a live node had this name before us
            if env.inc != self.incarnation:
                self._warn.warning(
                    "dup", "clustersess: another node also calls itself %s; rename one (CLUSTERSESS_NODE)", src
                )
            return
        broadcast = channel == self.ch_all
        key = (src, env.inc, broadcast)
        last = self._last_seq.get(key)
        if last is not None and env.seq <= last:
            self.stats.messages_dropped_replay += 1
            return
        if not self.members.is_current(src, env.inc):
            self.stats.messages_dropped_stale += 1
            return
        self._last_seq[key] = env.seq
        if last is not None and env.seq > last + 1 and not broadcast:
            self.stats.gaps_detected += 1
            self._warn.warning("gap", "clustersess: missed %d message(s) from %s; asking it to resync", env.seq - last - 1, src)
            self.outbox.send(self.channel(src), m.Resync())
        body = env.body
        if isinstance(body, m.Leave):
            if self.members.leave(src, env.inc) is not None:
                self._member_lost(src, "left")
            return
        zone = body.zone if isinstance(body, m.Heartbeat) else None
        is_new, replaced = self.members.heard(src, env.inc, time.monotonic(), zone=zone)
        if replaced is not None:
            self._member_lost(src, "restarted as a new incarnation")
        if is_new:
            self._member_joined(src)
        handler = getattr(self, "_on_" + body.TYPE.value)
        handler(src, env, body)

    def _on_heartbeat(self, src: str, env: m.Envelope, body: m.Heartbeat) -> None:
        member = self.members.members.get(src)
        if member is not None:
            member.address, member.owned, member.backups = body.address, body.owned, body.backups
            if member.zone != body.zone:  # first heard from through another message
                member.zone = body.zone
                self._rebalance()
        if body.hello:
            self._beat()

    def _on_replicate(self, src: str, env: m.Envelope, body: m.Replicate) -> None:
        now = self.clock.time()
        stale: list[str] = []
        adopted: list[Entry] = []
        for st in body.sessions:
            token = st.token
            if self.store.is_dead(token, now):
                self.stats.messages_dropped_stale += 1
                continue
            cur = self.store.owned.get(token) or self.store.backups.get(token)
            if cur is not None and cur.order() >= (st.epoch, st.version):
                if cur.epoch > st.epoch:
                    stale.append(token)
                if cur.order() > (st.epoch, st.version):
                    self.stats.messages_dropped_stale += 1
                elif body.handoff and token in self.store.backups:
                    adopted.append(cur)  # we already hold this exact version
                continue
            if self.store.owned.pop(token, None) is not None:
                log.info("clustersess: a session moved to %s at a newer epoch", src)
            copy = _entry_from(st)
            self.store.backups[token] = copy
            self.stats.replications_applied += 1
            if self.config.notify_listeners_on_replication:
                self.manager._fire("changed" if cur is not None else "created", copy, replicated=True)
            if body.handoff:
                adopted.append(copy)
        self.outbox.send(self.channel(src), m.Ack(env.seq, tuple(stale)))
        for copy in adopted:
            self._adopt(copy)

    def _adopt(self, copy: Entry) -> None:
        entry = self._promote(copy)
        self.stats.adopted += 1
        fut = self._enqueue(entry)
        if fut is not None:
            fut.add_done_callback(consume)

    def _on_ack(self, src: str, env: m.Envelope, body: m.Ack) -> None:
        self.outbox.acked(self.channel(src), body.ack)
        for token in body.stale:
            entry = self.store.owned.pop(token, None)
            if entry is not None:
                log.info("clustersess: %s holds a newer epoch of a session; dropping our copy", src)

    def _on_accessed(self, src: str, env: m.Envelope, body: m.Accessed) -> None:
        for token, epoch, ts in body.items:
            copy = self.store.backups.get(token)
            if copy is not None and copy.epoch == epoch and ts > copy.last_accessed:
                copy.last_accessed = ts

    def _on_invalidate(self, src: str, env: m.Envelope, body: m.Invalidate) -> None:
        until = self.clock.time() + self.config.max_inactive + 60.0
        for token in body.tokens:
            had = self.store.owned.get(token) or self.store.backups.get(token)
            self.store.bury(token, until)
            if had is not None and self.config.notify_listeners_on_replication:
                self.manager._destroyed(had, body.reason, replicated=True)  # type: ignore[arg-type]

    def _on_fetch(self, src: str, env: m.Envelope, body: m.Fetch) -> None:
        token = body.token
        if self.store.is_dead(token, self.clock.time()):
            self.outbox.send(self.channel(src), m.FetchReply(body.request, token, None, dead=True))
            return
        if token in self._contending:
            self.outbox.send(self.channel(src), m.FetchReply(body.request, token, None, busy=True))
            return
        owned = self.store.owned.get(token)
        if owned is not None and owned.inflight > 0 and self._tg is not None:
            self._tg.create_task(self._release_when_idle(src, body, owned))
            return
        self._answer_fetch(src, body)

    async def _release_when_idle(self, src: str, body: m.Fetch, entry: Entry) -> None:
        # Let requests in flight here commit before the session leaves (bounded).
        deadline = time.monotonic() + self.config.ack_timeout
        while entry.inflight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.002)
        self._answer_fetch(src, body)

    def _answer_fetch(self, src: str, body: m.Fetch) -> None:
        token = body.token
        owned = self.store.owned.pop(token, None)
        if owned is not None:
            # Give up ownership; keep the copy as a backup until the new owner's epoch
            # is confirmed, in case the new owner dies before replicating.
            self.store.backups[token] = owned
        copy = owned or self.store.backups.get(token)
        state = state_of(copy) if copy is not None and copy.version > 0 else None
        self.outbox.send(self.channel(src), m.FetchReply(body.request, token, state))

    def _on_fetch_reply(self, src: str, env: m.Envelope, body: m.FetchReply) -> None:
        fetch = self._fetches.get(body.request)
        if fetch is None:
            return
        fetch.replies.append(body)
        if fetch.expected >= 0 and len(fetch.replies) >= fetch.expected:
            fetch.done.set()

    def _on_owned(self, src: str, env: m.Envelope, body: m.Owned) -> None:
        token = body.token
        mine = self.store.owned.get(token)
        if mine is not None and mine.epoch == body.epoch and src < self.name:
            # Two takeovers won the same epoch (possible only when a takeover ran out of
            # time while another node was busy taking the session): the lower name keeps it.
            self.stats.takeover_conflicts += 1
            self._warn.warning("conflict", "clustersess: %s won a concurrent takeover; yielding", src)
            self.store.owned.pop(token)
            self.store.backups[token] = mine
            return
        for table in (self.store.owned, self.store.backups):
            cur = table.get(token)
            if cur is not None and cur.epoch < body.epoch and body.backup != self.name:
                del table[token]

    def _on_resync(self, src: str, env: m.Envelope, body: m.Resync) -> None:
        self.stats.resyncs += 1
        for entry in self.store.owned.values():
            if self.members.backup_for(entry.token) == src:
                fut = self._enqueue(entry)
                if fut is not None:
                    fut.add_done_callback(consume)
        self._send_tombstones(self.channel(src))  # logouts it may have missed

    def _send_tombstones(self, channel: str) -> None:
        """Announce the live tombstones again: an INVALIDATE lost in an outage would leave a
        copy that a backup adopts (and serves) when the owner dies."""
        now = self.clock.time()
        dead = [t for t, until in self.store.tombstones.items() if until > now]
        for i in range(0, len(dead), 500):
            self.outbox.send(channel, m.Invalidate(tuple(dead[i : i + 500])))

    # -- membership changes ---------------------------------------------------------------
    def _member_joined(self, name: str) -> None:
        log.info("clustersess: member %s joined (%d live)", name, len(self.members.members))
        self._rebalance()

    def _member_lost(self, name: str, why: str) -> None:
        log.warning("clustersess: member %s lost: %s (%d live)", name, why, len(self.members.members))
        for key in [k for k in self._last_seq if k[0] == name]:
            del self._last_seq[key]
        # Sessions whose owner was the lost member: their backup (as the owner chose it)
        # adopts them, so they get a new backup and survive a second failure.
        # Without ``name``: after a restart its new incarnation is already a member again,
        # but the owner chose among the others.
        view = (set(self.members.members) - {name}) | {self.name}
        for copy in list(self.store.backups.values()):
            if copy.owner == name and self.members.backup_chosen_by(name, copy.token, view) == self.name:
                self._adopt(copy)
        self._rebalance()

    def _rebalance(self) -> None:
        """Re-replicate every owned session whose backup is no longer the right one."""
        if self._stopping:
            return
        for entry in self.store.owned.values():
            if entry.version > 0 and self.members.backup_for(entry.token) != entry.backup:
                fut = self._enqueue(entry)
                if fut is not None:
                    fut.add_done_callback(consume)

    # -- status ---------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        members: list[dict[str, Any]] = [
            {
                "name": self.name,
                "incarnation": self.incarnation,
                "state": "up" if self.transport.connected else "disconnected",
                "self": True,
                "address": self.address,
                "zone": self.config.zone,
                "owned": len(self.store.owned),
                "backups": len(self.store.backups),
            }
        ]
        for member in sorted(self.members.members.values(), key=lambda x: x.name):
            members.append(
                {
                    "name": member.name,
                    "incarnation": member.incarnation,
                    "state": "suspect" if member.suspect else "up",
                    "self": False,
                    "address": member.address,
                    "zone": member.zone,
                    "owned": member.owned,
                    "backups": member.backups,
                    "last_seen": round(max(0.0, now - member.last_seen), 3),
                }
            )
        return {
            "members": members,
            "connected": self.transport.connected,
            "incarnation": self.incarnation,
            "pending_replication": self.pending_replication(),
        }

    def pending_replication(self) -> int:
        """Sessions whose latest version is not yet acknowledged by a backup."""
        return self.outbox.pending()


def _entry_from(state: m.SessionState) -> Entry:
    return Entry(
        token=state.token,
        owner=state.owner,
        created=state.created,
        last_accessed=state.last_accessed,
        epoch=state.epoch,
        version=state.version,
        payload=state.data.encode("utf-8"),
    )
