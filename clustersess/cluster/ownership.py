"""Becoming a session's owner, and giving ownership up: takeover, adoption, hand-off.

* **Takeover** (Tomcat's JvmRouteBinderValve, and every reconciliation): the taker asks
  each live member for its copy (FETCH on each member's direct channel, one pipelined
  round trip) and waits for an answer from each member that has a subscriber, by name.
  Holders let requests in flight finish, give ownership up and answer; one that is
  taking the session over itself answers *busy*. The newest copy by version vector wins
  (a conflict, if writes on both sides, is resolved deterministically and reported); the
  taker owns it at the highest epoch seen + 1, replicates it and announces it (OWNED).
  A round that did not hear every member leaves the ownership *unconfirmed*: it is taken
  over again once the round can complete.
* **Adoption**: the sessions of a member whose lease lapsed (``node.py`` decides when) are
  taken at epoch + 1 by whoever holds their copies; versions stay, since moving a session
  is not a write.
* **Hand-off**: a stopping member's REPLICATE(handoff) makes the receiver the owner.
* **OWNED** makes holders of older epochs step down, or take the session over again when
  their copy holds writes the announced one lacks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
from collections.abc import Callable
from typing import Any

from .. import codec, versions
from ..errors import ReplicationUnavailable, SessionUnavailable
from ..pacing import BULK_RATE, Rate, Slicer, select
from ..session import Entry
from . import messages as m
from .context import ClusterContext, log
from .membership import Member
from .outbox import state_of
from .replication import Replication, entry_from, send_items
from .transport import TransportError


@dataclasses.dataclass(slots=True, eq=False)
class _Round:
    token: str
    expected: set[str]
    replies: dict[str, m.FetchReply] = dataclasses.field(default_factory=dict)
    done: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    #: a live member had no subscriber on its channel
    unheard: bool = False
    #: ``expected`` is known (the publish counts are in): only then can the round end
    counted: bool = False

    def complete(self) -> bool:
        return self.expected <= set(self.replies)


class _Unavailable:
    """A takeover's answer when no copy was found and not every member answered."""


UNAVAILABLE: Any = _Unavailable()


class _Pin:
    """One request waiting for a takeover; the takeover pins the entry it won for it."""

    __slots__ = ("entry",)

    def __init__(self) -> None:
        self.entry: Entry | None = None


class Ownership:
    def __init__(self, ctx: ClusterContext, replication: Replication) -> None:
        self.ctx = ctx
        self.replication = replication
        self._rounds: dict[str, _Round] = {}
        self._pins: dict[str, list[_Pin]] = {}
        #: token -> the running takeover task (shared by concurrent requests)
        self._taking: dict[str, asyncio.Task[Entry | None]] = {}
        #: tokens this node is taking over right now (FETCH out, not yet owned)
        self.contending: set[str] = set()
        #: owned sessions whose takeover did not hear every member: confirm them later
        self.unconfirmed: dict[str, str] = {}  # token -> "takeover" | "rejoin"
        #: sessions to take over again to reconcile (writes the current owner may lack)
        self._reclaim_due: dict[str, None] = {}
        self._reclaim_wake = asyncio.Event()
        #: the reclaims the reconciler is running now
        self._reclaim_batch: dict[str, None] = {}
        #: sessions we gave up to a FETCH, at the epoch we held, until a new owner speaks
        self._released: dict[str, int] = {}
        #: member -> our newer claims to tell it (it announced an older one)
        self._answers: dict[str, list[tuple[str, int, versions.VV]]] = {}
        #: token -> a rival claim (member, epoch, vector) heard while we were taking it
        #: over: weighed once our takeover ends
        self._rivals: dict[str, tuple[str, int, versions.VV]] = {}

    # == taking over ==========================================================================
    async def acquire(self, token: str, *, force: bool = False) -> Entry | None:
        """Take session ``token`` over (a request for it arrived here).

        Concurrent calls share one takeover, which runs as its own task: a caller that is
        cancelled (its client went away) cancels only its own wait, and every waiter gets
        an answer. The entry comes back *pinned* for the caller until it returns (counted
        in flight), so a FETCH from another node cannot take it away in between: the
        manager's own pin takes over from there without an await in between.
        """
        ctx = self.ctx
        owned = ctx.store.owned.get(token)
        if owned is not None and not force and token not in self.unconfirmed and token not in self._taking:
            return owned  # ours already (the client's cookie named a former owner)
        task = self._taking.get(token)
        if task is None:
            task = self._taking[token] = ctx.spawn(self._takeover(token), "clustersess-takeover")
        pin = _Pin()
        self._pins.setdefault(token, []).append(pin)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            self._unpin(token, pin)
            current = asyncio.current_task()
            if task.cancelled() and (current is None or not current.cancelling()):
                # The node is stopping (its task group cancelled the takeover), not us.
                raise ReplicationUnavailable("this node is stopping") from None
            raise
        except BaseException:
            self._unpin(token, pin)
            raise
        self._unpin(token, pin, keep=True)
        entry = pin.entry
        if entry is not None:
            entry.inflight -= 1  # handed to the caller, which pins it itself
        elif task.done() and not task.cancelled() and task.result() is UNAVAILABLE:
            raise SessionUnavailable("no copy of the session was found, and not every member answered")
        return entry

    def _unpin(self, token: str, pin: _Pin, *, keep: bool = False) -> None:
        pins = self._pins.get(token)
        if pins is not None and pin in pins:
            pins.remove(pin)
            if not pins:
                del self._pins[token]
        if not keep and pin.entry is not None:
            pin.entry.inflight -= 1
            pin.entry = None

    def _pin_waiters(self, token: str) -> None:
        """Pin the owned entry of ``token`` for every request waiting on its takeover."""
        entry = self.ctx.store.owned.get(token)
        if entry is None:
            return
        for pin in self._pins.get(token, ()):
            if pin.entry is None:
                pin.entry = entry
                entry.inflight += 1

    async def _takeover(self, token: str) -> Entry | None:
        ctx = self.ctx
        give_up = ctx.mono() + ctx.timing.takeover_deadline
        attempt = 0
        try:
            while True:
                # While our FETCH is out and until we own the session, we answer other
                # takeovers of it with "busy", so two nodes never both win one epoch.
                self.contending.add(token)
                replies, complete = await self._round(token)
                if not any(r.busy for r in replies.values()) or ctx.mono() >= give_up:
                    break
                # Another node is taking it over at this very moment: step aside (not
                # busy ourselves meanwhile) and ask again; it will hand it over then.
                self.contending.discard(token)
                attempt += 1
                ctx.stats.takeover_retries += 1
                await asyncio.sleep(random.uniform(0.001, 0.004) * min(attempt, 8))
            entry = await self._take(token, replies, complete)
            if entry is not None:
                self._pin_waiters(token)  # those who came while it replicated
            return entry
        finally:
            self.contending.discard(token)
            if self._taking.get(token) is asyncio.current_task():
                del self._taking[token]
            rival = self._rivals.pop(token, None)
            if rival is not None:
                # The requests that waited for this takeover hold the session now: weigh
                # the rival claim once they are done with it (bounded, as for a FETCH).
                ctx.spawn(self._weigh_when_idle(token, *rival), "clustersess-weigh")

    async def _round(self, token: str, *, peek: bool = False) -> tuple[dict[str, m.FetchReply], bool]:
        """Ask every live member for its copy; (answers heard in time, heard everyone)."""
        ctx = self.ctx
        names = ctx.members.live()
        # A suspected member is silent but not gone (its lease may still hold, and it may
        # hold the session): not worth waiting for, but the round cannot be complete.
        suspected = len(ctx.members.members) > len(names)
        if not names:
            # Alone, if we would have heard the others by now (not if we just joined,
            # rejoined or reconnected, or Redis stalls: then we know nothing yet).
            return {}, ctx.healthy() and not suspected and ctx.knows_everyone()
        if not ctx.transport.connected:
            return {}, False
        req = os.urandom(8).hex()
        rnd = self._rounds[req] = _Round(token, set(), unheard=suspected)
        try:
            counts = [
                (name, ctx.outbox.send(ctx.channel(name), m.Fetch(req, token, peek), counted=True)) for name in names
            ]
            for name, fut in counts:
                assert fut is not None
                n = await asyncio.wait_for(fut, ctx.timing.takeover_round)
                if n > 0:
                    rnd.expected.add(name)  # someone listens there: wait for its answer
                else:
                    # Nobody listens there: killed, or reconnecting with the session in
                    # its memory. Not worth waiting for, but not proof either: the
                    # ownership stays unconfirmed until that member answers or is gone.
                    rnd.unheard = True
            rnd.counted = True
            if not rnd.complete():
                await asyncio.wait_for(rnd.done.wait(), ctx.timing.takeover_round)
        except (TimeoutError, TransportError):
            ctx.warn.warning("fetch", "clustersess: takeover did not hear from every member in time")
        finally:
            del self._rounds[req]
        # Every member answered: whatever our own health, they all gave up what they had.
        # (Not if the publish counts never came in: then nobody was even asked; nor if we
        # may not know every member yet.)
        return rnd.replies, rnd.counted and rnd.complete() and not rnd.unheard and ctx.knows_everyone()

    async def _take(self, token: str, replies: dict[str, m.FetchReply], complete: bool) -> Entry | None:
        ctx = self.ctx
        now = ctx.wall()
        if any(r.dead for r in replies.values()) or ctx.store.is_dead(token, now):
            ctx.store.bury(token, now + ctx.timing.tombstone_ttl, extend=False)
            return None
        mine = ctx.store.owned.get(token)
        candidates = [
            versions.Candidate(e.vv, e.epoch, e.owner, e.payload, e)
            for e in (mine, ctx.store.backups.get(token))
            if e is not None and e.version > 0
        ]
        for r in replies.values():
            if r.state is not None:
                copy = entry_from(r.state, now)
                candidates.append(versions.Candidate(copy.vv, copy.epoch, copy.owner, copy.payload, copy))
        if not candidates:
            if mine is not None:  # ours, never stored (version 0): nothing to take
                self._pin_waiters(token)
                return mine
            ctx.stats.takeover_misses += 1
            # Nobody we heard has it. If someone did not answer, it may: that is not
            # "no such session" (a fresh one would hide the real one from its user).
            return None if complete else UNAVAILABLE
        winner, vv, losers = versions.choose(candidates)
        best: Entry = winner.item
        if now - best.last_accessed > ctx.config.max_inactive and mine is None:
            ctx.stats.takeover_misses += 1
            return None  # expired everywhere: no copy may come back
        epoch = max(c.epoch for c in candidates)
        if best is mine and epoch == mine.epoch and not losers and complete:
            # Already ours, and nobody holds anything newer (a re-confirmation, or a
            # client whose cookie named a former owner): nothing moves.
            self.unconfirmed.pop(token, None)
            self._pin_waiters(token)
            return mine
        entry = self.promote(best, epoch + 1, vv)
        self._pin_waiters(token)  # before the first await: nobody may take it back meanwhile
        if losers:
            self._conflict(entry, losers)
        if complete:
            self.unconfirmed.pop(token, None)
        else:
            self.unconfirmed[token] = "takeover"
            ctx.stats.takeovers_unconfirmed += 1
        ctx.stats.takeovers += 1
        self.announce(entry)
        fut = self.replication.enqueue(entry)
        if fut is not None:
            refusal: m.Refusal | None | BaseException = None
            try:
                refusal = await asyncio.wait_for(asyncio.shield(fut), ctx.timing.ack_timeout)
            except Exception as exc:  # noqa: BLE001 -- timeouts and refusals: counted, requeued by the outbox
                refusal = exc
            if refusal is None:
                # Its backup has it: the copies that were merged into it may go.
                for name, r in replies.items():
                    if r.state is not None and name != entry.backup:
                        self.replication.drop_later(name, token, entry.epoch - 1)
        return entry

    async def peek(self, token: str) -> Entry | None:
        """The newest copy of ``token`` in the cluster, read without taking it over (a
        detached :class:`Entry`, stored nowhere), or None if there is none. Raises
        :class:`SessionUnavailable` if none was found but not every member answered."""
        ctx = self.ctx
        owned = ctx.store.owned.get(token)
        if owned is not None:
            return owned
        replies, complete = await self._round(token, peek=True)
        now = ctx.wall()
        if any(r.dead for r in replies.values()) or ctx.store.is_dead(token, now):
            ctx.store.bury(token, now + ctx.timing.tombstone_ttl, extend=False)
            return None
        copies = [entry_from(r.state, now) for r in replies.values() if r.state is not None]
        local = ctx.store.backups.get(token)
        if local is not None and local.version > 0:
            copies.append(local)
        if not copies:
            if not complete:
                raise SessionUnavailable("no copy of the session was found, and not every member answered")
            return None
        winner, _, _ = versions.choose([versions.Candidate(c.vv, c.epoch, c.owner, c.payload, c) for c in copies])
        best: Entry = winner.item
        ctx.stats.peeks += 1
        return Entry(
            token=token, owner=best.owner, created=best.created, last_accessed=best.last_accessed,
            epoch=best.epoch, version=best.version, payload=best.payload, vv=best.vv,
        )  # fmt: skip

    def _conflict(self, entry: Entry, losers: list[versions.Candidate]) -> None:
        ctx = self.ctx
        ctx.stats.conflicts += len(losers)
        log.warning(
            "clustersess: conflicting writes to session %s….%s on both sides of a split; kept the copy "
            "of %s (epoch %d), discarded %d",
            entry.token[:6], entry.owner, entry.owner, entry.epoch, len(losers),
        )  # fmt: skip
        ctx.events.conflict(entry, [c.payload for c in losers])

    def promote(self, best: Entry, epoch: int, vv: versions.VV) -> Entry:
        """Make this node the owner of ``best``'s data at ``epoch``."""
        ctx = self.ctx
        token = best.token
        entry = ctx.store.owned.get(token)
        if entry is None:
            entry = ctx.store.backups.get(token)
            if entry is None or (entry.owner != ctx.name and entry is not best):
                entry = Entry(token=token, owner=ctx.name, created=best.created, last_accessed=best.last_accessed)
            # (else our copy, which an adoption of 100,000 sessions turns into the owned
            # entry in place: no new object per session for the GC to walk)
        if entry.session is not None and entry.payload != best.payload:
            entry.session.replace_all(codec.decode(best.payload))
        entry.payload = best.payload
        entry.vv = vv
        entry.version = versions.total(vv)
        entry.created = best.created
        entry.last_accessed = max(entry.last_accessed, best.last_accessed)
        entry.epoch = epoch
        entry.owner = ctx.name
        ctx.store.backups.pop(token, None)
        ctx.store.owned[token] = entry
        return entry

    def announce(self, entry: Entry) -> None:
        """Tell everyone that ``entry``'s session is ours (paced: an adoption announces
        100,000; the claim is read when it leaves)."""
        self.ctx.trickle.add(self.ctx.ch_all, m.Owned, (entry,), self._claims)

    def _claims(self, entries: list[Entry]) -> list[tuple[str, int, versions.VV]]:
        owned = self.ctx.store.owned
        # (not sent for a session we stepped down from or that ended meanwhile)
        return [(e.token, e.epoch, e.vv) for e in entries if owned.get(e.token) is e]

    def _answer(self, name: str, token: str, newer: Entry) -> None:
        """Tell member ``name``, which announced an older claim on ``token``, of ``newer``."""
        self._answers.setdefault(name, []).append((token, newer.epoch, newer.vv))
        if len(self._answers) == 1 and len(self._answers[name]) == 1:
            asyncio.get_running_loop().call_soon(self._send_answers)

    def _send_answers(self) -> None:
        answers, self._answers = self._answers, {}
        for name, items in answers.items():
            send_items(self.ctx, self.ctx.channel(name), m.Owned, items)

    def rejoined(self) -> None:
        """We rejoined as a new incarnation: announce every session we hold, provisional
        until the cluster had time to answer (a member that owns one at a newer epoch
        answers with its claim, and we step down or reconcile)."""
        ctx = self.ctx
        for entry in list(ctx.store.owned.values()):
            self.unconfirmed.setdefault(entry.token, "rejoin")
            self.announce(entry)
        asyncio.get_running_loop().call_later(2 * ctx.timing.takeover_round, self._confirm_rejoined)

    def _confirm_rejoined(self) -> None:
        if not self.ctx.healthy():
            asyncio.get_running_loop().call_later(self.ctx.timing.takeover_round, self._confirm_rejoined)
            return
        for token, why in list(self.unconfirmed.items()):
            if why == "rejoin":
                del self.unconfirmed[token]

    # == reconciliation ========================================================================
    def reclaiming(self, token: str) -> bool:
        """Whether we are about to take ``token`` over again (or doing it): our copy then
        holds writes the owner may lack, and must not be dropped meanwhile."""
        return token in self._reclaim_due or token in self._reclaim_batch or token in self._taking

    def reclaim(self, token: str) -> None:
        """Take ``token`` over again soon: our copy may hold writes its owner lacks."""
        self._reclaim_due[token] = None
        self._reclaim_wake.set()
        self.ctx.stats.reclaims += 1

    async def reconciler(self) -> None:
        """Runs the takeovers that reconciliation asks for, and re-confirms ownerships
        taken while some member could not be heard, whenever this node is healthy."""
        ctx = self.ctx
        while True:
            try:
                await asyncio.wait_for(self._reclaim_wake.wait(), ctx.timing.drop_time)
            except TimeoutError:
                pass
            self._reclaim_wake.clear()
            if not ctx.healthy():
                continue
            due, self._reclaim_due = self._reclaim_due, {}
            self._reclaim_batch = due
            for token, why in list(self.unconfirmed.items()):
                if token not in ctx.store.owned:
                    del self.unconfirmed[token]
                elif why == "takeover":
                    due[token] = None
            try:
                for token in due:
                    if ctx.store.is_dead(token, ctx.wall()):
                        continue
                    if token in ctx.store.owned or token in ctx.store.backups:
                        try:
                            await self.acquire(token, force=True)  # even if ours: another may own it too
                        except SessionUnavailable:
                            self._reclaim_due[token] = None  # not every member answered: again later
            finally:
                self._reclaim_batch = {}

    # == holder side ===========================================================================
    def on_fetch(self, member: Member, env: m.Envelope) -> None:
        body = env.body
        assert isinstance(body, m.Fetch)
        self._fetch(member.name, body, wait=True)

    def _fetch(self, src: str, body: m.Fetch, *, wait: bool) -> None:
        ctx = self.ctx
        store = ctx.store
        token = body.token
        reply = ctx.channel(src)
        # A request here is rotating the session away from this ID: dead if it commits,
        # ours again if it does not. Nobody hears of either before it ends.
        moving = store.rotating.get(token)
        if moving is None and store.is_dead(token, ctx.wall()):
            ctx.outbox.send(reply, m.FetchReply(body.request, token, None, dead=True))
            return
        if body.peek:
            copy = moving or store.owned.get(token) or store.backups.get(token)
            state = state_of(copy, ctx.wall()) if copy is not None and copy.version > 0 else None
            ctx.outbox.send(reply, m.FetchReply(body.request, token, state))
            return
        owned = store.owned.get(token)
        if (token in self.contending and owned is None) or (moving is not None and not wait):
            # We are taking it over ourselves right now (or still rotating it): the other
            # side steps aside. An owner always answers, so that a takeover never misses
            # the owner's copy.
            ctx.outbox.send(reply, m.FetchReply(body.request, token, None, busy=True))
            return
        held = owned or moving
        if wait and held is not None and (held.inflight > 0 or moving is not None):
            ctx.spawn(self._release_when_idle(src, body, held), "clustersess-release")
            return
        self._answer_fetch(src, body)

    async def _until_idle(self, busy: Callable[[], bool]) -> None:
        """Wait while ``busy()`` (requests in flight here), at most ``release_wait``."""
        deadline = self.ctx.mono() + self.ctx.timing.release_wait
        while busy() and self.ctx.mono() < deadline:
            await asyncio.sleep(0.002)

    async def _release_when_idle(self, src: str, body: m.Fetch, entry: Entry) -> None:
        # Let requests in flight here commit before the session leaves (bounded): a
        # rotation until its request decided whether it happened.
        await self._until_idle(lambda: entry.inflight > 0 or body.token in self.ctx.store.rotating)
        self._fetch(src, body, wait=False)

    def _answer_fetch(self, src: str, body: m.Fetch) -> None:
        ctx = self.ctx
        token = body.token
        owned = ctx.store.owned.pop(token, None)
        if owned is not None:
            # Give up ownership; keep the copy until the new owner's epoch is announced,
            # in case the new owner dies before replicating.
            ctx.store.backups[token] = owned
            self.unconfirmed.pop(token, None)
            # A FETCH can arrive late (its round long over) or its taker can die: if no
            # new owner announces itself in time, take the session back (by a takeover,
            # which finds a new owner if there is one), so that it is never orphaned.
            self._released[token] = owned.epoch
            asyncio.get_running_loop().call_later(2 * ctx.timing.takeover_round, self._unclaimed, token, owned.epoch)
        copy = owned or ctx.store.backups.get(token)
        state = state_of(copy, ctx.wall()) if copy is not None and copy.version > 0 else None
        ctx.outbox.send(ctx.channel(src), m.FetchReply(body.request, token, state))

    def _unclaimed(self, token: str, epoch: int) -> None:
        if self._released.get(token) != epoch:
            return  # a new owner announced itself (or we released it again since)
        del self._released[token]
        store = self.ctx.store
        if token not in store.owned and token in store.backups and not store.is_dead(token, self.ctx.wall()):
            self.ctx.stats.takebacks += 1
            self.reclaim(token)

    def on_fetch_reply(self, member: Member, env: m.Envelope) -> None:
        body = env.body
        assert isinstance(body, m.FetchReply)
        rnd = self._rounds.get(body.request)
        if rnd is None or body.token != rnd.token:
            return
        rnd.replies[member.name] = body
        if rnd.counted and rnd.complete():
            rnd.done.set()

    def on_owned(self, member: Member, env: m.Envelope) -> None:
        body = env.body
        assert isinstance(body, m.Owned)
        ctx = self.ctx
        store = ctx.store
        now = ctx.wall()
        dead: list[tuple[str, float]] = []
        for token, epoch, vv in body.items:
            if token in store.tombstones and token not in store.rotating and store.is_dead(token, now):
                # Logged out (or rotated away) while the claimant could not hear it: a
                # node rejoining after a cut-off announces what it held. Tell it.
                dead.append((token, store.tombstones[token] - now))
                continue
            released = self._released.get(token)
            if released is not None and epoch > released:
                del self._released[token]  # the taker we gave it to owns it now
            mine = store.owned.get(token)
            moving = store.rotating.get(token)
            if moving is not None and mine is None:
                if moving.epoch > epoch:
                    self._answer(member.name, token, moving)  # a rotation here is newer still
                continue
            if mine is not None:
                if token in self.contending:
                    # Our own takeover decides first; this claim is weighed when it ends
                    # (two takeovers can both win the same epoch).
                    self._rivals[token] = (member.name, epoch, vv)
                    continue
                self._weigh(token, member.name, epoch, vv)
                continue
            copy = store.backups.get(token)
            if copy is None or copy.epoch == epoch:
                continue
            if copy.epoch > epoch:
                if copy.owner != member.name:
                    # A copy of a newer owner's: the claimant is stale (it rejoined after a
                    # cut-off, say) and steps down, even if that owner cannot answer now.
                    self._answer(member.name, token, copy)
                continue
            # A copy the new owner's data dominates stays until the owner says its backup
            # has the session (DROP): the announcement alone proves nothing was copied.
            if not versions.dominates(vv, copy.vv):
                self.reclaim(token)  # an acknowledged write the new owner lacks
            else:
                # ...but it is a copy of the new owner's session now: if its former owner
                # is found dead later, adopting it would claim what another member owns.
                copy.owner = member.name
        send_items(ctx, ctx.channel(member.name), m.Invalidate, dead)

    async def _weigh_when_idle(self, token: str, name: str, epoch: int, vv: versions.VV) -> None:
        owned = self.ctx.store.owned
        await self._until_idle(lambda: (mine := owned.get(token)) is not None and mine.inflight > 0)
        self._weigh(token, name, epoch, vv)

    def _weigh(self, token: str, name: str, epoch: int, vv: versions.VV) -> None:
        """Member ``name`` claims ``token`` at ``epoch``, and we own it too: the newer
        claim stays (the tie goes to the lower name)."""
        ctx = self.ctx
        mine = ctx.store.owned.get(token)
        if mine is None:
            return
        if mine.epoch > epoch or (mine.epoch == epoch and ctx.name < name):
            # Ours is the newer claim (or wins the tie): tell the claimant, which steps
            # down (a node rejoining after a cut-off announces what it held).
            self._answer(name, token, mine)
            return
        del ctx.store.owned[token]
        ctx.store.backups[token] = mine
        self.unconfirmed.pop(token, None)
        ctx.stats.stepped_down += 1
        if not versions.dominates(vv, mine.vv):
            self.reclaim(token)  # we hold writes the new owner lacks

    # == adoption and hand-off =================================================================
    async def adopt_from(self, name: str) -> int:
        """Take every copy we hold of ``name``'s sessions (its lease lapsed, or it left)."""
        ctx = self.ctx
        backups = ctx.store.backups
        copies = await select(list(backups.values()), lambda c: c.owner == name, ctx.mono)
        n = spent = 0
        slicer = Slicer(ctx.mono)
        rate = Rate(BULK_RATE)
        pairs = ctx.members.candidate_pairs()  # (read again after every pause)
        now = ctx.wall()
        for copy in copies:
            if backups.get(copy.token) is copy and not ctx.store.is_dead(copy.token, now):
                entry = self.promote(copy, copy.epoch + 1, copy.vv)
                self.replication.resend(entry, pairs)
                self.announce(entry)
                n += 1
            if slicer.due():
                await slicer.pause()
                await rate.spend(n - spent)
                spent = n
                pairs = ctx.members.candidate_pairs()
                now = ctx.wall()
        ctx.stats.adopted += n
        if n:
            log.info("clustersess: adopted %d session(s) of %s", n, name)
        return n

    def take_handoff(self, copy: Entry, member: Member) -> None:
        """A stopping member handed ``copy``'s session to us."""
        ctx = self.ctx
        current = ctx.store.owned.get(copy.token) or ctx.store.backups.get(copy.token)
        base = current if current is not None else copy
        entry = self.promote(copy, max(copy.epoch, base.epoch) + 1, copy.vv)
        ctx.stats.adopted += 1
        self.replication.resend(entry)
        self.announce(entry)
