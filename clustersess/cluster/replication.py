"""Replication, both sides: an owner sends state to backups, a backup applies it.

Owner side: :meth:`Replication.replicate` sends a committed session's full state to its
backup (chosen by rendezvous hashing over the live members) and, in sync mode, waits for
the backup's answer about *that* session; a write counts as replicated only if the backup
applied it while this node was healthy. Refusals are acted on (step down, take over
again, or bury). Rebalancing, access times, logouts and the owner's half of a resync live
here too.

Backup side: a state is applied only if it is not older than the copy held, in both epoch
(ownership) and version vector (writes); everything else is refused with the reason, so
the sender can reconcile. See ``docs/PROTOCOL.md``.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
from collections.abc import Callable, Iterable
from typing import Any

from .. import heap, versions
from ..pacing import BULK_RATE, Rate, Slicer, paced, select
from ..session import Entry
from . import messages as m
from .context import ClusterContext, log
from .health import State
from .membership import Member
from .outbox import NoReceiver, NotOwner, consume
from .transport import TransportError

#: sessions per ACCESSED / INVALIDATE / OWNED message
ITEMS_PER_MESSAGE = 500
#: tokens a PRUNE lists, at most (unless one bucket alone has more; receivers take
#: 100,000): each is encoded, parsed and checked in one piece, and parts of 50,000
#: stalled the asker for 50-90 ms each. (Parts this small need the asker to check each
#: against its copies in the PRUNE's buckets only, see Replication._ask: scanning all
#: its copies per part, parts of 5,000 made a rebalance's writes wait 1-1.4 s.)
PRUNE_TOKENS = 10_000
#: the longest a backup waits for the PRUNEs that answer its NEED (seconds), keeping the
#: copies it applies meanwhile (see Replication._ask)
ASKED_FOR = 60.0
#: the longest a resync's answer waits for sessions to stop moving away from the asker
#: (seconds; see Replication._answer_resync)
SETTLE_FOR = 30.0


def send_items(ctx: ClusterContext, channel: str, kind: Callable[[tuple[Any, ...]], m.Body], items: list[Any]) -> None:
    """Send ``items`` on ``channel`` as ``kind`` messages of at most ITEMS_PER_MESSAGE each."""
    for i in range(0, len(items), ITEMS_PER_MESSAGE):
        ctx.outbox.send(channel, kind(tuple(items[i : i + ITEMS_PER_MESSAGE])))


def entry_from(state: m.SessionState, now: float) -> Entry:
    """A local copy of a session that arrived from another node (times made absolute on
    our own clock)."""
    return Entry(
        token=state.token,
        owner=state.owner,
        created=now - state.age,
        last_accessed=now - state.idle,
        epoch=state.epoch,
        version=versions.total(state.vv),
        payload=state.data,
        vv=state.vv,
    )


#: a token's first character picks its digest bucket: tokens are random over exactly
#: these 64 characters (ids.new_token), so the buckets are even
_BUCKET = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")}
assert len(_BUCKET) == m.DIGEST_BUCKETS


def bucket_of(token: str) -> int:
    return _BUCKET[token[0]]


def state_hash(entry: Entry) -> int:
    data = f"{entry.token}|{entry.epoch}|{entry.version}".encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


async def digest(entries: Iterable[Entry], clock: Callable[[], float]) -> list[int]:
    """Per bucket, the XOR of the state hashes of ``entries`` (in slices)."""
    out = [0] * m.DIGEST_BUCKETS
    async for e in paced(entries, clock):
        out[bucket_of(e.token)] ^= state_hash(e)
    return out


class Replication:
    def __init__(self, ctx: ClusterContext) -> None:
        self.ctx = ctx
        #: set by the node: take a session over again to reconcile (see ownership.py)
        self.reclaim: Callable[[str], None] = lambda token: None
        #: whether a reclaim of this token is pending or running (set by the node)
        self.reclaiming: Callable[[str], bool] = lambda token: False
        #: set by the node: make a handed-over copy ours
        self.take_handoff: Callable[[Entry, Member], None] = lambda entry, member: None
        #: set by the node: owned sessions whose takeover has not heard every member
        self.unconfirmed: dict[str, str] = {}
        #: acknowledgements of logouts not yet received; changed only in place (the
        #: manager looks at this very list on every request)
        self.unsettled: list[asyncio.Future[Any]] = []
        #: logouts whose backup has not acknowledged them yet: token -> backup
        self._tombstones_due: dict[str, str] = {}
        #: old backup -> sessions it should drop now that their new backup has them
        #: (token -> epoch: a rebalance makes 100,000; sent each heartbeat tick, trickled)
        self._drops: dict[str, dict[str, int]] = {}
        #: token -> its former backup, while a sync write to its new one is awaited
        self._moved: dict[str, str | None] = {}
        #: token -> its former backup, while a resend to its new one is unanswered
        self._resent_from: dict[str, str] = {}
        #: asker -> when we last answered its resync; askers waiting for the next answer
        self._resync_at: dict[str, float] = {}
        #: (each asker's earliest gap start, on our monotonic clock: an answer may wait)
        self._resync_waiting: dict[str, float] = {}
        self._last_resync_request = float("-inf")
        self._resync_due = False
        #: start (monotonic) of the earliest gap not yet asked about: the request sent
        #: covers until now, however long it waited (a rejoin while Redis refuses writes)
        self._resync_from: float | None = None
        self._rebalance_due = asyncio.Event()
        #: rebalance passes started so far, and whether one runs now
        self._passes = 0
        self._rebalancing = False
        #: members whose copies were lost (they restarted): every session they backed up
        #: goes to its backup again
        self._refill: set[str] = set()
        self._lone_logged = False
        #: owner -> what we asked it for (NEED) and have not had its PRUNEs for yet
        self._asked: dict[str, _Asked] = {}

    # == owner side ==========================================================================
    def _pick_backup(self, entry: Entry, pairs: list[tuple[str, str]] | None = None) -> str | None:
        """Choose ``entry``'s backup now and note it on the entry; None if there is nobody.
        (``pairs``: the candidates, if the caller read them in this turn of the loop.)"""
        ctx = self.ctx
        exclude = (entry.owner,) if entry.owner != ctx.name else ()
        backup = ctx.members.backup_for(entry.token, exclude=exclude, pairs=pairs)
        entry.backup = backup
        if backup is None:
            if ctx.members.members:
                # Members exist but none can take it now (all suspected or unreachable,
                # e.g. they have not re-subscribed after a Redis restart): retry later.
                ctx.outbox.requeue[entry.token] = None
            elif not self._lone_logged:
                log.warning("clustersess: node %s is alone in the cluster; sessions have no backup", ctx.name)
                self._lone_logged = True
            return None
        self._lone_logged = False
        return backup

    def enqueue(
        self, entry: Entry, *, handoff: bool = False, settle: bool = True
    ) -> asyncio.Future[m.Refusal | None] | None:
        """Queue ``entry`` for its backup; None if there is nobody to send it to. The
        backup's answer is acted on when it comes (``settle=False``: the caller awaits
        the future and calls :meth:`settled` itself)."""
        ctx = self.ctx
        old = entry.backup
        backup = self._pick_backup(entry)
        if backup is None:
            return None
        fut = ctx.outbox.replicate(ctx.channel(backup), entry, handoff=handoff)
        if settle:
            fut.add_done_callback(lambda f: self._settled(entry, old, backup, f))
        elif old != backup:
            self._moved[entry.token] = old
        return fut

    def _settled(self, entry: Entry, old: str | None, new: str, fut: asyncio.Future[m.Refusal | None]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        self.settled(entry, fut.result(), old, new)

    def settled(self, entry: Entry, refusal: m.Refusal | None, old: str | None, new: str | None) -> None:
        """The backup ``new`` answered for ``entry``: act on a refusal, or let the former
        backup ``old`` drop its copy."""
        if refusal is not None:
            self.refused(entry, refusal)
        elif old is not None and old != new and old in self.ctx.members.members:
            # The new backup has it: the old one may let its copy go.
            self.drop_later(old, entry.token, entry.epoch)

    async def replicate(self, entry: Entry) -> bool:
        """Send a committed session to its backup; True if it is confirmed replicated
        (sync mode: the backup applied it while this node was healthy)."""
        ctx = self.ctx
        if not ctx.healthy():
            # Fenced: claim nothing, but send what can be sent (the link may still work,
            # e.g. while Redis refuses writes): a copy elsewhere beats none. What fails
            # is requeued and sent again once we are back.
            fut = self.enqueue(entry)
            if fut is not None:
                fut.add_done_callback(consume)
            return False
        confirmed = entry.token not in self.unconfirmed  # else: replicate, but claim nothing
        sync = ctx.config.replication == "sync"
        deadline = ctx.mono() + ctx.timing.ack_timeout
        for _attempt in range(3):
            fut = self.enqueue(entry, settle=False)
            if fut is None:
                # Alone in the cluster (no member at all): there is nothing to replicate
                # to, and a lone node answers as a single node does. Members that cannot
                # take it now (all suspected or unreachable) are a failure of this write.
                return confirmed and not ctx.members.members
            if not sync:
                self._moved.pop(entry.token, None)
                fut.add_done_callback(functools.partial(self._settled, entry, None, entry.backup or ""))
                return False  # async mode claims nothing
            # The future is this request's own, so it is awaited directly with a timer of
            # its own; asyncio.wait_for(shield(...)) cost five more objects per waiting
            # request, and with tens of writes in flight those survived into the older
            # GC generations and set off full collections several times a second.
            timer = asyncio.get_running_loop().call_later(max(0.0, deadline - ctx.mono()), _time_out, fut)
            try:
                refusal = await fut
            except NoReceiver:
                continue  # marked unreachable (the next attempt picks another), or its ACK lost
            except TimeoutError:
                ctx.stats.ack_timeouts += 1
                ctx.warn.warning(
                    "ack",
                    "clustersess: no ack from backup within %.2fs; queued for re-replication",
                    ctx.timing.ack_timeout,
                )
                ctx.outbox.requeue[entry.token] = None
                return False
            except (TransportError, NotOwner):
                return False  # counted and queued by the flusher, or no longer ours
            finally:
                timer.cancel()
            self.settled(entry, refusal, self._moved.pop(entry.token, None), entry.backup)
            return refusal is None and confirmed and ctx.healthy()
        ctx.outbox.requeue[entry.token] = None
        return False

    def refused(self, entry: Entry, refusal: m.Refusal) -> None:
        """The backup did not apply ``entry``'s state: reconcile."""
        ctx = self.ctx
        ctx.stats.acks_refused += 1
        token = entry.token
        ours = ctx.store.owned.get(token) is entry
        if refusal.reason is m.Refused.DEAD:
            if ours:
                log.info("clustersess: a session was logged out elsewhere; dropping it here")
                ctx.store.bury(token, ctx.wall() + ctx.timing.tombstone_ttl, extend=False)
                ctx.events.destroyed(entry, "invalidated")
            return
        if refusal.reason is m.Refused.SUPERSEDED and ours:
            # Another node owns it at a newer epoch: step down, keep the copy.
            del ctx.store.owned[token]
            ctx.store.backups[token] = entry
            ctx.stats.stepped_down += 1
            log.info("clustersess: a session is owned at a newer epoch elsewhere; stepping down")
            if versions.dominates(refusal.vv, entry.vv):
                return  # it holds every write we made
        ctx.warn.warning("reconcile", "clustersess: copies of a session diverged; reconciling by takeover")
        self.reclaim(token)

    def retry_requeued(self) -> None:
        ctx = self.ctx
        if not ctx.outbox.requeue or not ctx.healthy():
            return
        tokens, ctx.outbox.requeue = ctx.outbox.requeue, {}
        for token in tokens:
            entry = ctx.store.owned.get(token)
            if entry is not None and entry.version > 0:
                self.resend(entry)

    def drop_later(self, holder: str, token: str, epoch: int) -> None:
        """Tell ``holder`` (with the next batch) to drop its copy of ``token`` up to ``epoch``."""
        due = self._drops.get(holder)
        if due is None:
            due = self._drops[holder] = {}
        due[token] = max(epoch, due.get(token, epoch))  # (a later move covers an earlier one)

    def send_drops(self) -> None:
        """Send the drops due (each heartbeat tick; a rebalance makes 100,000), paced."""
        ctx = self.ctx
        drops, self._drops = self._drops, {}
        owned = ctx.store.owned
        for name, due in drops.items():

            def still_due(tokens: list[str], name: str = name, due: dict[str, int] = due) -> list[tuple[str, int]]:
                # Not to a member that is this session's backup again by now: a REPLICATE
                # to it may already be on its way.
                return [(t, due[t]) for t in tokens if (o := owned.get(t)) is None or o.backup != name]

            # (tokens queued, epochs looked up when they leave: 100,000 (token, epoch)
            # tuples waiting seconds in the queue set off long collections)
            ctx.trickle.add(ctx.channel(name), m.Drop, due, still_due)

    def rebalance_soon(self, refill: str | None = None) -> None:
        """Membership changed: re-replicate whatever now has another backup (``refill``:
        that member lost its copies, so everything it backed up goes to it again)."""
        if refill is not None:
            self._refill.add(refill)
        self._rebalance_due.set()

    async def rebalancer(self) -> None:
        ctx = self.ctx
        while True:
            await self._rebalance_due.wait()
            await asyncio.sleep(0)  # coalesce a burst of membership changes
            self._rebalance_due.clear()
            refill, self._refill = self._refill, set()
            owned = ctx.store.owned
            self._resent_from = {t: old for t, old in self._resent_from.items() if t in owned}
            self._passes += 1
            self._rebalancing = True
            try:
                await self._rebalance(refill)
            finally:
                self._rebalancing = False

    async def _rebalance(self, refill: set[str]) -> None:
        ctx = self.ctx
        owned = ctx.store.owned
        slicer = Slicer(ctx.mono)
        rate = Rate(BULK_RATE)
        moved = 0
        pairs = ctx.members.candidate_pairs()  # (read again after every pause)
        for entry in list(owned.values()):
            if owned.get(entry.token) is entry and entry.version > 0:
                backup = ctx.members.backup_for(entry.token, pairs=pairs)
                if backup != entry.backup or backup in refill:
                    self.resend(entry, pairs, to=backup)
                    moved += 1
            if slicer.due():
                await slicer.pause()
                await rate.spend(moved)
                moved = 0
                pairs = ctx.members.candidate_pairs()

    @property
    def rebalancing(self) -> bool:
        """A rebalance pass runs or is due."""
        return self._rebalancing or self._rebalance_due.is_set()

    def _moving_away(self, name: str) -> bool:
        """Whether sessions may be leaving ``name`` as their backup: a rebalance pass runs
        or is due, resends (a pass's moves) or a write's move to a new backup are not
        answered yet, or ``name``'s DROPs are not all published (once published, they
        reach it before anything we send later). (Not ``_resent_from``: a resend skipped
        because its session was given away meanwhile stays there until the next pass.)"""
        ctx = self.ctx
        return (
            self.rebalancing
            or ctx.outbox.resending()
            or name in self._drops
            or ctx.trickle.pending_on(ctx.channel(name), m.Drop)
            or name in self._moved.values()
        )

    async def _digest_for(self, name: str) -> m.Digest:
        """The digest of our sessions that ``name`` backs up, taken when none are moving
        away from it (SETTLE_FOR seconds at most). While a rebalance moves half of them
        to a new member, ``name`` still holds those copies until their DROPs come: a
        digest taken then differed in all 64 buckets, and its NEED listed and checked
        every session it backs up, in the middle of the rebalance."""
        ctx = self.ctx
        deadline = ctx.mono() + SETTLE_FOR
        while True:
            while self._moving_away(name) and ctx.mono() < deadline:
                await asyncio.sleep(ctx.timing.heartbeat / 5)
            passes = self._passes
            mine = await select(list(ctx.store.owned.values()), lambda e: e.backup == name and e.version > 0, ctx.mono)
            hashes = tuple(await digest(mine, ctx.mono))
            if (passes == self._passes and not self._rebalancing) or ctx.mono() >= deadline:
                return m.Digest(hashes)

    def resend(self, entry: Entry, pairs: list[tuple[str, str]] | None = None, *, to: str | None = None) -> None:
        """Queue an owned session for its backup again, in the background: a pass's
        resend (resync, rebalance, adoption, retry), which nobody waits for, which
        requests' writes overtake and which the outbox paces (see outbox.py). The
        backup's answer is acted on when it comes (:meth:`resent`). ``pairs``: the
        candidates, read by a pass once per slice; ``to``: the backup it just chose from
        them (the same choice, not hashed twice)."""
        old = entry.backup
        backup: str | None
        if to is not None and entry.owner == self.ctx.name:
            entry.backup = backup = to
        else:
            backup = self._pick_backup(entry, pairs)
        if backup is None:
            return
        if old is not None and old != backup:
            self._resent_from.setdefault(entry.token, old)  # (the first move counts until answered)
        self.ctx.outbox.resend(self.ctx.channel(backup), entry)

    def resent(self, entry: Entry, refusal: m.Refusal | None) -> None:
        """The backup answered a resend of ``entry``."""
        self.settled(entry, refusal, self._resent_from.pop(entry.token, None), entry.backup)

    async def send_accesses(self, since: float, only: str | None = None) -> int:
        """Send the idle time of every owned session used at or after ``since`` to its
        backup (``only``: to that backup only); returns how many sessions that covered."""
        ctx = self.ctx
        by_backup: dict[str, list[Entry]] = {}
        async for e in paced(list(ctx.store.owned.values()), ctx.mono):
            if e.last_accessed >= since and e.backup is not None and (only is None or e.backup == only):
                by_backup.setdefault(e.backup, []).append(e)
        owned = ctx.store.owned
        for dest, entries in by_backup.items():

            def idle_times(entries: list[Entry], dest: str = dest) -> list[tuple[str, int, float]]:
                # (read when the message leaves: still ours, still backed up there)
                now = ctx.wall()
                return [
                    (e.token, e.epoch, max(0.0, now - e.last_accessed))
                    for e in entries
                    if owned.get(e.token) is e and e.backup == dest
                ]

            ctx.trickle.add(ctx.channel(dest), m.Accessed, entries, idle_times)
        return sum(map(len, by_backup.values()))

    # -- logouts -----------------------------------------------------------------------------
    def buried(self, tokens: dict[str, str | None]) -> None:
        """These sessions were logged out or rotated away here (token -> its backup):
        tell everyone, and get the backup's acknowledgement."""
        ctx = self.ctx
        ttl = ctx.timing.tombstone_ttl
        for t in tokens:
            ctx.outbox.requeue.pop(t, None)
        items = tuple((t, ttl) for t in tokens)
        fut = ctx.outbox.send(ctx.ch_all, m.Invalidate(items), counted=True)
        assert fut is not None
        fut.add_done_callback(consume)
        self.unsettled.append(fut)
        by_backup: dict[str, list[str]] = {}
        for t, backup in tokens.items():
            if backup is not None:
                by_backup.setdefault(backup, []).append(t)
        for backup, ts in by_backup.items():
            self._invalidate_at(backup, ts)

    def _invalidate_at(self, backup: str, tokens: list[str], *, awaited: bool = True) -> None:
        ctx = self.ctx
        now = ctx.wall()
        items = tuple((t, max(0.0, ctx.store.tombstones.get(t, now) - now)) for t in tokens)
        fut = ctx.outbox.send_acked(ctx.channel(backup), m.Invalidate(items))
        if awaited:
            self.unsettled.append(fut)  # the request that logged out waits for it

        def done(f: asyncio.Future[m.Ack]) -> None:
            if f.cancelled() or f.exception() is not None:
                for t in tokens:
                    self._tombstones_due[t] = backup
            else:
                for t in tokens:
                    self._tombstones_due.pop(t, None)

        fut.add_done_callback(done)

    async def settle(self) -> bool:
        """Wait until the logouts sent so far are acknowledged by their backups (sync
        mode), bounded; True if they all were, while this node was healthy."""
        ctx = self.ctx
        if not self.unsettled:
            return True
        pending = self.unsettled.copy()
        self.unsettled.clear()
        if ctx.config.replication != "sync":
            return False
        done, not_done = await asyncio.wait(pending, timeout=ctx.timing.ack_timeout)
        for f in not_done:
            f.add_done_callback(consume)
        ok = not not_done and all(not f.cancelled() and f.exception() is None for f in done)
        return ok and ctx.healthy()

    def retry_tombstones(self) -> None:
        """Logouts whose backup did not acknowledge them: send them again."""
        ctx = self.ctx
        if not self._tombstones_due or not ctx.healthy():
            return
        due, self._tombstones_due = self._tombstones_due, {}
        now = ctx.wall()
        by_backup: dict[str, list[str]] = {}
        items: list[tuple[str, float]] = []
        for t, backup in due.items():
            if ctx.store.is_dead(t, now):
                items.append((t, ctx.store.tombstones[t] - now))
                if backup in ctx.members.members:
                    by_backup.setdefault(backup, []).append(t)
        # To everyone again, too: the broadcast was most likely lost the same way (a node
        # cut off while it logged a user out), and the session may have been taken over
        # meanwhile by a member that is not its backup.
        send_items(ctx, ctx.ch_all, m.Invalidate, items)
        for backup, ts in by_backup.items():
            self._invalidate_at(backup, ts, awaited=False)

    # == backup side =========================================================================
    def on_replicate(self, member: Member, env: m.Envelope) -> None:
        ctx = self.ctx
        body = env.body
        assert isinstance(body, m.Replicate)
        store = ctx.store
        now = ctx.wall()
        refusals: list[m.Refusal] = []
        handed: list[Entry] = []
        if body.handoff:
            member.leaving = True  # never pick it as a backup again
        for st in body.sessions:
            token = st.token
            moving = store.rotating.get(token)
            if moving is not None:
                # Ours, being rotated away by a request that has not committed: its death
                # is not news yet. An older owner steps down; a newer one takes it over
                # again, and our FETCH answer waits for the request.
                why = m.Refused.SUPERSEDED if st.epoch < moving.epoch else m.Refused.DIVERGED
                refusals.append(m.Refusal(token, why, moving.epoch, moving.vv))
                continue
            if store.is_dead(token, now):
                ctx.stats.messages_dropped_stale += 1
                refusals.append(m.Refusal(token, m.Refused.DEAD, 0, ()))
                continue
            cur = store.owned.get(token) or store.backups.get(token)
            if cur is None:
                copy = self._apply(st, None, now)
                if body.handoff:
                    handed.append(copy)
                continue
            order = versions.compare(st.vv, cur.vv)
            if body.handoff:
                # The sender is leaving and hands the session to us: whatever we hold,
                # we own it now, with the newest writes of both copies.
                if order is versions.Order.CONCURRENT:
                    handed.append(self._resolve(cur, st, now))
                elif order is versions.Order.OLDER:
                    handed.append(cur)  # ours holds every write of theirs, and more
                else:
                    handed.append(self._apply(st, cur, now))
                continue
            if st.epoch < cur.epoch:
                refusals.append(m.Refusal(token, m.Refused.SUPERSEDED, cur.epoch, cur.vv))
                continue
            if order is versions.Order.EQUAL and st.epoch == cur.epoch:
                cur.last_accessed = max(cur.last_accessed, now - st.idle)
                continue
            if order in (versions.Order.NEWER, versions.Order.EQUAL):
                if store.owned.get(token) is cur:
                    del store.owned[token]
                    log.info("clustersess: a session moved to %s at a newer epoch", member.name)
                self._apply(st, cur, now)
                continue
            if order is versions.Order.OLDER and st.epoch == cur.epoch and store.owned.get(token) is not cur:
                continue  # an earlier state from the same owner: we hold a later one of its
            refusals.append(m.Refusal(token, m.Refused.DIVERGED, cur.epoch, cur.vv))
        ctx.outbox.send(ctx.channel(member.name), m.Ack(env.seq, tuple(refusals)))
        for copy in handed:
            self.take_handoff(copy, member)

    def _apply(self, st: m.SessionState, cur: Entry | None, now: float) -> Entry:
        ctx = self.ctx
        copy = entry_from(st, now)
        if cur is not None:
            copy.last_accessed = max(copy.last_accessed, cur.last_accessed)
            if cur.session is not None and ctx.store.owned.get(st.token) is cur:
                copy.session = None  # ownership moved away; the live object is dropped
        ctx.store.owned.pop(st.token, None)
        ctx.store.backups[st.token] = copy
        ctx.stats.replications_applied += 1
        if self._asked:
            asked = self._asked.get(st.owner)
            if asked is not None:
                asked.fresh.add(st.token)
        if cur is None:
            heap.took_copy(len(ctx.store.backups))
        ctx.events.replicated(copy, cur is None)
        return copy

    def _resolve(self, cur: Entry, st: m.SessionState, now: float) -> Entry:
        """Both copies hold writes the other lacks (a hand-off after a split): keep the
        deterministic winner, with a vector that dominates both."""
        ctx = self.ctx
        theirs = entry_from(st, now)
        a = versions.Candidate(cur.vv, cur.epoch, cur.owner, cur.payload, cur)
        b = versions.Candidate(theirs.vv, theirs.epoch, theirs.owner, theirs.payload, theirs)
        winner, vv, losers = versions.choose([a, b])
        keep: Entry = winner.item
        keep.vv = vv
        keep.version = versions.total(vv)
        ctx.stats.conflicts += len(losers)
        log.warning("clustersess: conflicting writes to one session on both sides of a split; kept one")
        ctx.events.conflict(keep, [c.payload for c in losers])
        if keep is theirs:
            ctx.store.owned.pop(cur.token, None)
            ctx.store.backups[cur.token] = theirs
        return keep

    def on_ack(self, member: Member, env: m.Envelope) -> None:
        assert isinstance(env.body, m.Ack)
        self.ctx.outbox.acked(self.ctx.channel(member.name), env.body)

    def on_accessed(self, member: Member, env: m.Envelope) -> None:
        body = env.body
        assert isinstance(body, m.Accessed)
        now = self.ctx.wall()
        backups = self.ctx.store.backups
        for token, epoch, idle in body.items:
            copy = backups.get(token)
            if copy is not None and copy.epoch == epoch:
                copy.last_accessed = max(copy.last_accessed, now - idle)

    def on_invalidate(self, member: Member, env: m.Envelope) -> None:
        ctx = self.ctx
        body = env.body
        assert isinstance(body, m.Invalidate)
        now = ctx.wall()
        for token, left in body.items:
            had = ctx.store.owned.get(token) or ctx.store.backups.get(token)
            ctx.store.bury(token, now + min(left, ctx.timing.tombstone_ttl), extend=False)
            if had is not None:
                ctx.events.destroyed(had, "expired" if body.reason == "expired" else "invalidated")
        if env.channel != ctx.ch_all:
            ctx.outbox.send(ctx.channel(member.name), m.Ack(env.seq))

    def on_drop(self, member: Member, env: m.Envelope) -> None:
        body = env.body
        assert isinstance(body, m.Drop)
        backups = self.ctx.store.backups
        for token, epoch in body.items:
            # From the owner of a newer epoch: after a rebalance (we were its backup), or
            # after a takeover that merged our copy (we answered its FETCH). Its backup
            # has acknowledged what replaces our copy.
            # Not while we are taking it back: our copy holds writes the sender lacks
            # (we learnt it from its OWNED or a refusal), and the takeover merges them.
            copy = backups.get(token)
            if copy is not None and copy.epoch <= epoch and not self.reclaiming(token):
                del backups[token]

    # == resync ===============================================================================
    def request_resync(self, since: float) -> None:
        """We may have missed ``since`` seconds of messages: ask the owners. Rate-limited
        (a burst of gaps costs one request, asking for the longest of them) and
        reliable: a request that could not be published is sent again."""
        start = self.ctx.mono() - since
        if self._resync_from is None or start < self._resync_from:
            self._resync_from = start
        self._resync_due = True
        self.send_resync()

    def send_resync(self) -> None:
        """Send the pending resync request if the interval allows (the heartbeat retries)."""
        ctx = self.ctx
        now = ctx.mono()
        if not self._resync_due or now - self._last_resync_request < ctx.timing.resync_interval:
            return
        if ctx.proof.state is not State.HEALTHY:
            # Joining or rejoining: members admit this incarnation only once it holds our
            # name, and would drop the request meanwhile (while counting it as heard).
            return
        self._last_resync_request = now
        start, self._resync_from = self._resync_from, None
        since = 0.0 if start is None else now - start
        self._resync_due = False
        ctx.stats.resyncs_requested += 1
        fut = ctx.outbox.send(ctx.ch_all, m.Resync(since), counted=True)
        assert fut is not None

        def done(f: asyncio.Future[int]) -> None:
            if f.cancelled() or f.exception() is not None or f.result() <= 1:
                # Not published, or nobody but us heard it: ask again next time.
                if start is not None and (self._resync_from is None or start < self._resync_from):
                    self._resync_from = start
                self._resync_due = True

        fut.add_done_callback(done)

    def on_resync(self, member: Member, env: m.Envelope) -> None:
        body = env.body
        assert isinstance(body, m.Resync)
        name = member.name
        # When the gap started, on our clock: the answer may come many seconds later (it
        # waits for a rebalance to settle), and must still cover the whole gap.
        start = self.ctx.mono() - body.since
        if name in self._resync_waiting:
            self._resync_waiting[name] = min(self._resync_waiting[name], start)
            return
        self._resync_waiting[name] = start
        self.ctx.spawn(self._answer_resync(name), "clustersess-resync")

    async def _answer_resync(self, name: str) -> None:
        ctx = self.ctx
        # At most one answer per asker per interval: a burst of requests is one answer.
        wait = self._resync_at.get(name, float("-inf")) + ctx.timing.resync_interval - ctx.mono()
        if wait > 0:
            await asyncio.sleep(wait)
        digest = await self._digest_for(name) if name in ctx.members.members else None
        # (requests that came while the digest waited and was taken are answered by it;
        # the gap it covers runs until now)
        since = ctx.mono() - self._resync_waiting.pop(name, ctx.mono())
        self._resync_at[name] = ctx.mono()
        if digest is None or name not in ctx.members.members:
            return
        ctx.stats.resyncs += 1
        ctx.outbox.send(ctx.channel(name), digest)
        margin = ctx.timing.access_every + ctx.timing.heartbeat
        await self.send_accesses(ctx.wall() - since - margin, name)
        # Logouts of the gap's length, with what is left of their lifetime.
        now = ctx.wall()
        young = now + ctx.timing.tombstone_ttl - since - margin
        rotating = ctx.store.rotating  # (not dead before it commits)
        young_ones = await select(
            list(ctx.store.tombstones.items()),
            lambda i: i[1] > now and i[1] >= young and i[0] not in rotating,
            ctx.mono,
        )
        send_items(ctx, ctx.channel(name), m.Invalidate, [(t, until - now) for t, until in young_ones])

    def on_digest(self, member: Member, env: m.Envelope) -> None:
        body = env.body
        assert isinstance(body, m.Digest)
        self.ctx.spawn(self._compare_digest(member.name, body.hashes), "clustersess-resync")

    async def _compare_digest(self, owner: str, hashes: tuple[int, ...]) -> None:
        ctx = self.ctx
        copies = await select(list(ctx.store.backups.values()), lambda e: e.owner == owner, ctx.mono)
        ours = await digest(copies, ctx.mono)
        differ = tuple(i for i, (a, b) in enumerate(zip(ours, hashes, strict=True)) if a != b)
        if differ and owner in ctx.members.members:
            self._ask(owner, await _by_bucket(copies, differ, ctx.mono))
            ctx.outbox.send(ctx.channel(owner), m.Need(differ, listing=True))

    def _ask(self, owner: str, by_bucket: dict[int, list[Entry]]) -> None:
        """We ask ``owner`` for the buckets of ``by_bucket`` (our copies of its sessions in
        each). Its PRUNE lists what it held when it read its table, in many slices; a
        session it made meanwhile is not listed, and its copy may reach us before the
        PRUNE does: from now until the PRUNE of each bucket, the copies we apply of
        ``owner``'s are kept whatever the PRUNE says (ASKED_FOR seconds at most, should a
        PRUNE never come). Each PRUNE is checked against our copies in its own buckets
        only, not all of them: a listing of 200,000 sessions comes in twenty parts."""
        asked = self._asked.get(owner)
        if asked is None:
            asked = self._asked[owner] = _Asked()
            asyncio.get_running_loop().call_later(ASKED_FOR, self._asked_expired, owner, asked)
        for b, held in by_bucket.items():
            asked.copies.setdefault(b, []).extend(held)

    def _asked_expired(self, owner: str, asked: _Asked) -> None:
        if self._asked.get(owner) is asked:
            del self._asked[owner]

    def on_need(self, member: Member, env: m.Envelope) -> None:
        body = env.body
        assert isinstance(body, m.Need)
        self.ctx.spawn(self._send_buckets(member.name, body.buckets, body.listing), "clustersess-resync")

    async def _send_buckets(self, name: str, buckets: tuple[int, ...], listing: bool) -> None:
        """Answer a NEED: list our sessions in ``buckets`` that ``name`` backs up (PRUNE),
        so it drops copies we no longer have; with ``listing``, with their states, and it
        asks (WANT) for the ones it lacks; without (a node that predates listings), send
        them all again. Buckets differ for more reasons than loss: a digest taken while
        a rebalance moves backups away from the asker differs in all 64, and answering
        with every session re-sent every one it still held (100,000 in a rebalance)."""
        ctx = self.ctx
        wanted = set(buckets)
        owned = ctx.store.owned
        entries = await select(
            list(owned.values()), lambda e: e.backup == name and bucket_of(e.token) in wanted, ctx.mono
        )
        # PRUNE first (control messages leave before replication in a flush): the asker
        # drops its copies we no longer have, then gets the current ones. Whole buckets
        # per message, at most PRUNE_TOKENS tokens each (unless one bucket has more): all
        # 64 buckets of a node holding 200,000 sessions listed more tokens than a message
        # may carry, the asker dropped it as malformed, saw a gap, and asked again.
        # (in slices: grouping and listing 110,000 sessions in one piece stalled the
        # loop for 100 ms in a rebalance, whose digest caught every bucket differing)
        by_bucket = await _by_bucket(entries, sorted(wanted), ctx.mono)
        resend: list[Entry] = [] if listing else entries
        group: list[int] = []
        listed: list[Entry] = []
        for b, in_bucket in by_bucket.items():
            if len(in_bucket) > m.MAX_ITEMS:
                # (6.4 million sessions to one backup) not pruned: its stale copies expire
                # by idle time instead of being dropped now; its sessions go again
                ctx.warn.warning("prune", "clustersess: resync bucket of %d sessions too big to prune", len(in_bucket))
                if listing:
                    resend.extend(in_bucket)
                continue
            if group and len(listed) + len(in_bucket) > PRUNE_TOKENS:
                ctx.outbox.send(ctx.channel(name), await _prune_of(group, listed, listing, ctx.mono))
                group, listed = [], []
            group.append(b)
            listed.extend(in_bucket)
        if group:
            ctx.outbox.send(ctx.channel(name), await _prune_of(group, listed, listing, ctx.mono))
        await self._resend_owned(name, resend)

    def on_want(self, member: Member, env: m.Envelope) -> None:
        body = env.body
        assert isinstance(body, m.Want)
        owned = self.ctx.store.owned
        entries = [e for t in body.tokens if (e := owned.get(t)) is not None]
        self.ctx.spawn(self._resend_owned(member.name, entries), "clustersess-resync")

    async def _resend_owned(self, name: str, entries: list[Entry]) -> None:
        """Send ``entries`` to ``name`` again where they are still ours and it still
        backs them up (a WANT names only sessions it is listed for)."""
        ctx = self.ctx
        owned = ctx.store.owned
        sent = 0
        async for e in paced(entries, ctx.mono):
            if owned.get(e.token) is e and e.backup == name and e.version > 0:
                self.resend(e)
                sent += 1
        ctx.stats.resync_sessions_sent += sent

    def on_prune(self, member: Member, env: m.Envelope) -> None:
        body = env.body
        assert isinstance(body, m.Prune)
        # The copies held now (one C-level copy of the table); the REPLICATEs behind the
        # PRUNE may be applied before the pass is done, and must not be judged by it.
        # (entries, not items(): 200,000 (token, copy) tuples alive across the slices
        # were what set off full collections during a resync; a copy's token is fixed)
        # Those of the PRUNE's buckets when we asked for them; the copies applied since
        # we asked are newer than the owner's listing, and stay (``fresh``).
        fresh: set[str] = set()
        asked = self._asked.get(member.name)
        if asked is not None and all(b in asked.copies for b in body.buckets):
            held = [e for b in body.buckets for e in asked.copies[b]]
        else:
            held = list(self.ctx.store.backups.values())
        if asked is not None:
            fresh = asked.fresh
            for b in body.buckets:
                asked.copies.pop(b, None)
            if not asked.copies:
                del self._asked[member.name]
        self.ctx.spawn(self._prune(member.name, body, held, fresh), "clustersess-resync")

    async def _prune(self, owner: str, body: m.Prune, held: list[Entry], fresh: set[str]) -> None:
        """Drop the copies in ``held`` of ``owner``'s sessions in the PRUNE's buckets that
        it does not list, in slices, except those in ``fresh`` (applied since we asked). A
        copy applied meanwhile is a new object, and stays. A listing's sessions that we
        lack or hold at another state, we ask for (WANT)."""
        ctx = self.ctx
        backups = ctx.store.backups
        buckets, keep = set(body.buckets), set(body.tokens)

        def stale_copy(e: Entry) -> bool:
            return e.owner == owner and e.token not in keep and e.token not in fresh and bucket_of(e.token) in buckets

        stale = await select(held, stale_copy, ctx.mono)
        async for e in paced(stale, ctx.mono):
            if backups.get(e.token) is e:
                del backups[e.token]
        epochs, numbers = body.epochs, body.versions
        if epochs is None or numbers is None:
            return
        tokens = body.tokens

        def lacking(i: int) -> bool:
            # Another state either way: older (missed writes), or newer or another
            # owner's, which the owner must learn of (its resend is refused and says why).
            copy = backups.get(tokens[i])
            return copy is None or copy.epoch != epochs[i] or copy.version != numbers[i]

        want = [tokens[i] for i in await select(range(len(tokens)), lacking, ctx.mono)]
        if want and owner in ctx.members.members:
            send_items(ctx, ctx.channel(owner), m.Want, want)


async def _by_bucket(
    entries: list[Entry], buckets: Iterable[int], clock: Callable[[], float]
) -> dict[int, list[Entry]]:
    """``entries`` in ``buckets``, grouped by bucket (the others left out), in slices."""
    out: dict[int, list[Entry]] = {b: [] for b in buckets}
    async for e in paced(entries, clock):
        if (group := out.get(bucket_of(e.token))) is not None:
            group.append(e)
    return out


class _Asked:
    """A NEED we sent and whose PRUNEs have not all come: per bucket, our copies of the
    owner's sessions when we asked; and the copies of its applied since."""

    __slots__ = ("copies", "fresh")

    def __init__(self) -> None:
        self.copies: dict[int, list[Entry]] = {}
        self.fresh: set[str] = set()


async def _prune_of(buckets: list[int], entries: list[Entry], listing: bool, clock: Callable[[], float]) -> m.Prune:
    """The PRUNE listing ``entries`` (the sessions in ``buckets``), made in slices."""
    tokens: list[str] = []
    epochs: list[int] = []
    numbers: list[int] = []
    async for e in paced(entries, clock):
        tokens.append(e.token)
        epochs.append(e.epoch)
        numbers.append(e.version)
    if not listing:
        return m.Prune(tuple(buckets), tuple(tokens))
    return m.Prune(tuple(buckets), tuple(tokens), tuple(epochs), tuple(numbers))


def _time_out(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())
