"""The receive path: decode, authenticate, admit, check for replay and gaps, dispatch.

Every message from Redis is untrusted. In order: the frame (size, structure, MAC,
cluster and channel; ``wire.py``), our own messages (echoes of our heartbeats prove our
path works; another incarnation using our name is a twin), the sender's admission (a new
incarnation is a member only once Redis names it as the holder of its claim; until then
its messages wait in a small queue), replay (a sequence number not above the last one
seen on that channel from that incarnation), gaps (which ask for a resync), and finally a
typed handler per message type. Every drop is counted; nothing raises out of here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from . import messages as m
from .context import ClusterContext, log
from .membership import Member
from .transport import TransportError
from .wire import WireError

Handler = Callable[[Member, m.Envelope], None]

#: incarnations waiting for admission at once, and messages queued for each
PENDING_LIMIT = 16
PENDING_MESSAGES = 512
#: a refused incarnation is asked about again after this many seconds
REFUSED_RECHECK = 5.0
#: ... but a hello heartbeat from it (it just took its name) is checked after this long
HELLO_RECHECK = 1.0
REFUSED_LIMIT = 1024
#: Redis is asked this often, a heartbeat apart, before the queued messages are dropped
ADMISSION_TRIES = 8


class Inbox:
    def __init__(
        self,
        ctx: ClusterContext,
        *,
        on_echo: Callable[[int], None],
        on_twin: Callable[[str], None],
        on_joined: Callable[[Member, Member | None], None],
        on_back: Callable[[Member], None],
        on_gap: Callable[[str, int], None],
        on_leave: Callable[[Member], None],
        on_retired_sender: Callable[[str, str], None],
    ) -> None:
        self.ctx = ctx
        self.handlers: dict[m.MsgType, Handler] = {}
        self._on_echo = on_echo
        self._on_twin = on_twin
        self._on_joined = on_joined
        self._on_back = on_back
        self._on_gap = on_gap
        self._on_leave = on_leave
        self._on_retired_sender = on_retired_sender
        #: (src, incarnation, channel) -> highest sequence number seen
        self._last_seq: dict[tuple[str, str, str], int] = {}
        #: replay keys known at the last reconnect, until their first message since
        self._reconnected: set[tuple[str, str, str]] = set()
        self._pending: dict[tuple[str, str], list[tuple[str, m.Envelope]]] = {}
        self._refused: dict[tuple[str, str], float] = {}

    def on(self, kind: m.MsgType, handler: Handler) -> None:
        assert kind not in self.handlers, f"two handlers for {kind}"
        self.handlers[kind] = handler

    def check_complete(self) -> None:
        missing = set(m.MsgType) - set(self.handlers) - {m.MsgType.LEAVE}
        assert not missing, f"no handler for {sorted(t.value for t in missing)}"

    # -- entry point (the transport's callback) ---------------------------------------------
    def on_message(self, channel: str, raw: bytes) -> None:
        ctx = self.ctx
        stats = ctx.stats
        stats.messages_received += 1
        if isinstance(raw, (bytes, bytearray)):
            stats.bytes_received += len(raw)
        try:
            env = ctx.codec.decode_received(channel, raw, (ctx.name, ctx.outbox.incarnation))
            if env is None:
                return  # our own message (see _route)
        except WireError as exc:
            kind = exc.kind
            setattr(stats, f"messages_dropped_{kind}", getattr(stats, f"messages_dropped_{kind}") + 1)
            ctx.warn.warning(kind, "clustersess: dropped a cluster message (%s): %s", kind, exc)
            return
        except Exception:  # noqa: BLE001 -- a bug in decoding must not kill the receiver
            stats.messages_dropped_malformed += 1
            log.exception("clustersess: could not decode a cluster message")
            return
        try:
            self._route(channel, env)
        except Exception:  # noqa: BLE001 -- a bug in a handler must not kill the receiver
            stats.handler_errors += 1
            log.exception("clustersess: error while applying a %s message", env.body.TYPE.value)

    def _route(self, channel: str, env: m.Envelope) -> None:
        ctx = self.ctx
        if env.src == ctx.name:
            if env.inc == ctx.outbox.incarnation:
                if isinstance(env.body, m.Heartbeat):
                    self._on_echo(env.seq)
            else:
                self._on_twin(env.inc)
            return
        member = ctx.members.current(env.src, env.inc)
        if member is None:
            self._unknown(channel, env)
            return
        self._deliver(member, channel, env)

    def _deliver(self, member: Member, channel: str, env: m.Envelope) -> None:
        ctx = self.ctx
        key = (env.src, env.inc, channel)
        last = self._last_seq.get(key)
        if last is not None and env.seq <= last:
            ctx.stats.messages_dropped_replay += 1
            return
        self._last_seq[key] = env.seq
        covered = False
        if self._reconnected and key in self._reconnected:
            self._reconnected.discard(key)
            covered = True
        if last is not None and env.seq > last + 1:
            ctx.stats.gaps_detected += 1
            ctx.warn.warning(
                "gap", "clustersess: missed %d message(s) from %s on %s", env.seq - last - 1, env.src, channel
            )
            if not covered:
                self._on_gap(env.src, env.seq - last - 1)
        if ctx.members.heard(member, ctx.mono()):
            self._on_back(member)
        if isinstance(env.body, m.Leave):
            self.forget(env.src, env.inc)
            left = ctx.members.retire(env.src, env.inc)
            if left is not None:
                self._on_leave(left)
            return
        self.handlers[env.body.TYPE](member, env)

    def reconnected(self) -> None:
        """The subscription is back and the node asked for a resync covering the time
        away. The first message on each channel since then shows the gap of messages
        published while we were away, which that resync covers (the owners answer it
        from their state once they read it, after those messages left): such a gap asks
        for no second resync. Without this, every reconnect cost two full digest rounds,
        the second one often in the middle of the rebalance or adoption that followed."""
        self._reconnected = set(self._last_seq)

    def forget(self, src: str, inc: str) -> None:
        """Drop the replay marks of a retired incarnation (it is refused as a whole now)."""
        for key in [k for k in self._last_seq if k[0] == src and k[1] == inc]:
            del self._last_seq[key]

    # -- admission ---------------------------------------------------------------------------
    def _unknown(self, channel: str, env: m.Envelope) -> None:
        ctx = self.ctx
        ident = (env.src, env.inc)
        if ctx.members.is_retired(*ident):
            ctx.stats.messages_dropped_stale += 1
            self._on_retired_sender(*ident)  # it may not know: tell it (rate-limited)
            return
        queue = self._pending.get(ident)
        refused_at = self._refused.get(ident)
        if queue is None and refused_at is not None:
            age = ctx.mono() - refused_at
            # A hello says "I have just taken my name": worth asking Redis again before
            # the recheck time (a node refused while it rejoined, say), at most so often.
            hello = isinstance(env.body, m.Heartbeat) and env.body.hello and age >= HELLO_RECHECK
            if age < REFUSED_RECHECK and not hello:
                ctx.stats.messages_dropped_unknown_member += 1
                return
        if queue is None:
            if len(self._pending) >= PENDING_LIMIT:
                ctx.stats.messages_dropped_unknown_member += 1
                return
            queue = self._pending[ident] = []
            ctx.spawn(self._admit(ident), "clustersess-admission")
        if len(queue) >= PENDING_MESSAGES:
            ctx.stats.messages_dropped_unknown_member += 1
            return
        queue.append((channel, env))

    async def _admit(self, ident: tuple[str, str]) -> None:
        ctx = self.ctx
        name, inc = ident
        for attempt in range(ADMISSION_TRIES):
            try:
                holder = await ctx.transport.get(ctx.claim_key(name))
                break
            except (TimeoutError, TransportError):
                # Redis could not answer (it proves nothing about the sender): the
                # messages keep waiting, and we ask again shortly.
                holder = None
                if attempt + 1 < ADMISSION_TRIES:
                    await asyncio.sleep(ctx.timing.heartbeat)
        else:
            self._pending.pop(ident, None)
            return  # not refused: the sender's next message asks again
        admitted = holder == inc
        queue = self._pending.pop(ident, [])
        if not admitted:
            ctx.stats.messages_dropped_unknown_member += len(queue)
            self._refused[ident] = ctx.mono()
            while len(self._refused) > REFUSED_LIMIT:
                del self._refused[next(iter(self._refused))]
            if holder is not None:
                ctx.warn.warning(
                    "unknown", "clustersess: ignoring messages of %s: not the current holder of that name", name
                )
            return
        if ctx.members.is_retired(name, inc):  # retired while we asked
            ctx.stats.messages_dropped_stale += len(queue)
            return
        self._refused.pop(ident, None)
        member, replaced = ctx.members.admit(name, inc, ctx.mono())
        if replaced is not None:
            self.forget(name, replaced.incarnation)
        self._on_joined(member, replaced)
        for channel, env in queue:
            current = ctx.members.current(name, inc)
            if current is None:
                break
            try:
                self._deliver(current, channel, env)
            except Exception:  # noqa: BLE001 -- as in on_message
                ctx.stats.handler_errors += 1
                log.exception("clustersess: error while applying a %s message", env.body.TYPE.value)
