"""Shop users for the clustersess demo; every step checks the user's own session.

Each simulated user runs journeys, one session each: log in (create the session, then
rotate its ID), add to a cart (writes), browse (reads), check out, log out (invalidate,
then check that the old cookie is dead). The user remembers what the cluster
acknowledged and checks every answer against it. A read that does not show the user's
own acknowledged writes, or a session that disappears, is a locust failure and a **lost
session** (``LEDGER.sessions_lost``); the journey then ends and a new one starts.

A request that gets no answer from the app (a node SIGKILLed mid-request: HAProxy's 502,
a reset connection) is *ambiguous*: its change may or may not have been applied. It is a
locust failure, but not a loss: the user accepts either outcome on its next read and
settles on what it sees. After an unanswered rotate or logout, the session being gone is
one of the accepted outcomes (the user missed the Set-Cookie, as a browser would); such a
journey ends as a *reset*, not a loss.

Cookies are handled explicitly, as the cluster expects a browser to: the HTTP client's
cookie jar is switched off, each journey sends ``Cookie: JSESSIONID=<value>`` itself, takes
the new value from every ``Set-Cookie`` and forgets it on ``JSESSIONID=null`` (the deletion
the middleware sends at logout). Every issued cookie must name the node that answered.

Against ``clustersess demo`` (HAProxy on port 9090)::

    locust -f loadtests/locustfile.py --headless -u 20 -r 10 -t 60s -H http://127.0.0.1:9090

Without a load balancer, list the nodes: each journey starts on the next node
round-robin and moves to the following one when a connection is refused or breaks::

    SHOP_NODES=http://127.0.0.1:9091,http://127.0.0.1:9092 locust -f loadtests/locustfile.py ...

``loadtests/chaos.py`` runs these users as a library while it kills and restarts a node.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import json
import os
import random
import time
from collections.abc import Callable
from http.cookiejar import DefaultCookiePolicy
from typing import Any

from locust import FastHttpUser, between, events, task

COOKIE = os.environ.get("CLUSTERSESS_COOKIE") or "JSESSIONID"
ITEMS = ("book", "mug", "pen", "lamp", "tea", "socks")

#: node base URLs for running without a load balancer (chaos.py sets this, or SHOP_NODES)
NODES: list[str] = [u.rstrip("/") for u in os.environ.get("SHOP_NODES", "").split(",") if u.strip()]

#: a possible server state meaning "no session": accepted only after an unanswered
#: rotate or logout, whose Set-Cookie the user may have missed
GONE = None
State = dict[str, Any] | None

_journey_numbers = itertools.count(1)
_round_robin = itertools.count()


# -- what the users saw -------------------------------------------------------------------------


@dataclasses.dataclass
class Ledger:
    """Counters shared by every user of this process (read by chaos.py after a run)."""

    started_at: float = dataclasses.field(default_factory=time.time)
    journeys_started: int = 0
    journeys_completed: int = 0
    #: sessions that disappeared or lost acknowledged data
    sessions_lost: int = 0
    #: an acknowledged logout whose old cookie still showed the session
    logouts_not_honoured: int = 0
    #: issued cookies whose route was not the node that answered
    cookie_mismatches: int = 0
    #: answers checked against the expected state
    checks: int = 0
    #: requests without an answer from the app (outcome unknown)
    unanswered: int = 0
    #: journeys ended because an unanswered login/rotate/logout left no usable session
    resets: int = 0
    #: connections refused (no load balancer): retried on the next node
    failovers: int = 0
    #: one record per problem, for the report
    problems: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def reset(self) -> None:
        fresh = Ledger()
        self.__dict__.update(fresh.__dict__)

    def problem(self, kind: str, journey: Journey, step: str, detail: str, reply: Reply | None) -> None:
        self.problems.append(
            {
                "kind": kind,
                "t": round(time.time() - self.started_at, 3),
                "user": journey.user,
                "step": step,
                "detail": detail,
                "node": reply.node if reply else None,
                "id": reply.id if reply else None,
                "expected": journey.possible,
                "got": reply.data if reply else None,
                "new": reply.new if reply else None,
                "history": list(journey.history),
            }
        )

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("problems", "started_at")}


LEDGER = Ledger()


class EndJourney(Exception):
    """The journey cannot go on (its session is gone or was never made)."""


@dataclasses.dataclass
class Journey:
    """One user session, from login to logout, and what the cluster has acknowledged."""

    user: str
    cookie: str | None = None
    token: str | None = None
    #: server states consistent with every answer so far (more than one after an
    #: unanswered write; GONE after an unanswered rotate or logout)
    possible: list[State] = dataclasses.field(default_factory=list)
    #: base URL of the node this journey talks to (no load balancer only)
    node_index: int = 0
    #: recent (time, step, node, status) for problem reports
    history: list[tuple[float, str, str, int]] = dataclasses.field(default_factory=list)

    def note(self, step: str, node: str, status: int) -> None:
        self.history.append((round(time.time() - LEDGER.started_at, 3), step, node, status))
        del self.history[:-8]


@dataclasses.dataclass
class Reply:
    """An answer from the demo's /api/session (the app answered: status < 500)."""

    status: int
    id: str
    node: str
    new: bool
    data: dict[str, Any]
    #: whether a Set-Cookie for our cookie came, and its value (None: deleted)
    cookie_seen: bool = False
    cookie_set: str | None = None
    #: what the checks found wrong, or None
    problem: str | None = None
    #: the session is gone, and that was one of the accepted outcomes
    gone: bool = False

    @property
    def token(self) -> str:
        return self.id.rpartition(".")[0]


def parse_set_cookies(values: list[str]) -> tuple[bool, str | None]:
    """``(seen, value)`` for our cookie in Set-Cookie headers; value None means deleted."""
    seen, value = False, None
    for header in values:
        name, _, rest = header.partition("=")
        if name.strip() != COOKIE:
            continue
        raw, _, attrs = rest.partition(";")
        raw = raw.strip().strip('"')
        lowered = attrs.lower().replace(" ", "")
        deleted = raw in ("", "null") or "max-age=0" in lowered.split(";")
        seen, value = True, None if deleted else raw
    return seen, value


def cookie_route(value: str) -> tuple[str, str]:
    """``(token, route)`` of a cookie value ``<token>~<signature>.<route>``."""
    signed, _, route = value.rpartition(".")
    return signed.partition("~")[0], route


def _refused(error: BaseException | None) -> bool:
    return isinstance(error, ConnectionRefusedError) or getattr(error, "errno", None) == errno.ECONNREFUSED


# -- the user ---------------------------------------------------------------------------------


class ShopUser(FastHttpUser):
    """Logs in, fills a cart, browses, checks out and logs out, checking every answer."""

    wait_time = between(0.05, 0.3)
    # Requests go to full node URLs when NODES is set; locust still wants a host.
    host = NODES[0] if NODES else None
    network_timeout = 10.0
    connection_timeout = 2.0
    # Never retry by itself: a retried write could be applied twice.
    max_retries = 0

    def on_start(self) -> None:
        # Explicit cookies: the jar accepts nothing, every request carries the journey's
        # cookie as a header, so what we check is exactly what a browser would send.
        self.client.cookiejar.set_policy(DefaultCookiePolicy(allowed_domains=[]))

    @task
    def shop(self) -> None:
        number = next(_journey_numbers)
        journey = Journey(user=f"user{number}", node_index=next(_round_robin))
        LEDGER.journeys_started += 1
        try:
            self.login(journey)
            self.wait()
            for _ in range(random.randint(2, 4)):
                self.add_to_cart(journey)
                self.wait()
                self.browse(journey)
                self.wait()
            self.checkout(journey)
            self.wait()
            self.browse(journey)
            self.wait()
            self.logout(journey)
            LEDGER.journeys_completed += 1
        except EndJourney:
            pass

    # -- steps ----------------------------------------------------------------------------
    def login(self, j: Journey) -> None:
        profile = {"user": j.user, "cart": {}}
        reply = self.call(
            j, "POST", "/api/session", "login", body=profile, check=lambda r: self.expect_fresh(j, r, profile)
        )
        if reply is None:
            LEDGER.resets += 1  # nothing was acknowledged: start again
            raise EndJourney
        if reply.problem:
            raise EndJourney
        j.token, j.possible = reply.token, [reply.data]
        self.wait()
        self.rotate(j)

    def rotate(self, j: Journey) -> None:
        """Rotate the ID after login (session fixation defence): new ID, same data."""
        old_token, old_cookie = j.token, j.cookie
        reply = self.call(
            j, "POST", "/api/session/rotate", "rotate", check=lambda r: self.expect_rotated(j, r, old_token, old_cookie)
        )
        if reply is None:
            # Rotated or not: the old cookie shows the session, or nothing.
            j.possible = [*j.possible, GONE]
            return
        self.settle(j, reply)
        j.token = reply.token

    def add_to_cart(self, j: Journey) -> None:
        if random.random() < 0.5:
            item = random.choice(ITEMS)
            known = next((s for s in j.possible if s is not GONE), {})
            cart = {**known.get("cart", {}), item: known.get("cart", {}).get(item, 0) + 1}
            body = {"cart": cart}
            self.write(j, "POST", "/api/session", "add to cart", lambda s: {**s, **body}, body)
        else:
            self.write(j, "POST", "/api/session/incr/items", "add to cart (incr)", _incr("items"))

    def browse(self, j: Journey) -> None:
        reply = self.call(j, "GET", "/api/session", "browse", check=lambda r: self.expect_state(j, r, j.possible))
        if reply is not None:
            self.settle(j, reply)

    def checkout(self, j: Journey) -> None:
        body = {"cart": {}, "last_order": f"{j.user}-{random.randrange(10**6)}"}
        self.write(j, "POST", "/api/session", "checkout", lambda s: {**s, **body}, body)
        # Orders are counted with incr, so a lost or repeated checkout shows up.
        self.write(j, "POST", "/api/session/incr/orders", "checkout (count)", _incr("orders"))

    def logout(self, j: Journey) -> None:
        old_cookie, before = j.cookie, list(j.possible)
        reply = self.call(j, "DELETE", "/api/session", "logout", check=lambda r: self.expect_logged_out(j, r))
        answered = reply is not None and not reply.problem
        # The old cookie must no longer work: checked with the cookie the user just dropped,
        # as a stale browser tab or an attacker holding it would send it.
        probe = Journey(user=j.user, cookie=old_cookie, token=j.token, node_index=j.node_index, history=j.history)
        probe.possible = [GONE] if answered else [*before, GONE]
        self.call(
            probe,
            "GET",
            "/api/session",
            "old cookie after logout",
            check=lambda r: self.expect_dead(probe, r, answered),
        )

    # -- the request and the checks -------------------------------------------------------
    def write(
        self,
        j: Journey,
        method: str,
        path: str,
        name: str,
        apply: Callable[[dict[str, Any]], dict[str, Any]],
        body: Any = None,
    ) -> None:
        after = [s if s is GONE else apply(s) for s in j.possible]
        reply = self.call(j, method, path, name, body=body, check=lambda r: self.expect_state(j, r, after))
        if reply is None:
            j.possible = _unique([*j.possible, *after])  # applied or not
        else:
            self.settle(j, reply)

    def call(
        self, j: Journey, method: str, path: str, name: str, *, body: Any = None, check: Callable[[Reply], str | None]
    ) -> Reply | None:
        """One request with the journey's cookie; None if the app gave no answer.

        ``check`` returns what is wrong with the answer (or None); a problem makes the
        request a locust failure and is kept on ``reply.problem``.
        """
        headers = {"Cookie": f"{COOKIE}={j.cookie}"} if j.cookie else {}
        for _attempt in range(max(1, len(NODES))):
            base = NODES[j.node_index % len(NODES)] if NODES else ""
            with self.client.request(
                method, base + path, name=name, headers=headers, json=body, catch_response=True
            ) as resp:
                status = resp.status_code or 0
                error = getattr(resp, "error", None)
                if status == 0 and NODES and _refused(error):
                    # Nothing reached the app: safe to send again to the next node.
                    resp.failure(f"connection refused by {base}; failing over to the next node")
                    LEDGER.failovers += 1
                    j.node_index += 1
                    continue
                if status == 0 or status >= 500:
                    resp.failure(f"no answer from the app ({status or type(error).__name__}): outcome unknown")
                    LEDGER.unanswered += 1
                    j.note(name, base, status)
                    if NODES and status == 0:
                        j.node_index += 1  # this node's connection broke: use the next one
                    return None
                try:
                    view = json.loads(resp.content or b"")
                    reply = Reply(status, str(view["id"]), str(view["node"]), bool(view["new"]), dict(view["data"]))
                except (ValueError, KeyError, TypeError) as exc:
                    resp.failure(f"HTTP {status}: not a session view ({exc})")
                    j.note(name, base, status)
                    raise EndJourney from None
                j.note(name, reply.node, status)
                seen, value = parse_set_cookies(resp.headers.getlist("set-cookie") if resp.headers else [])
                reply.cookie_seen, reply.cookie_set = seen, value
                problem = None
                if seen and value is not None:
                    token, route = cookie_route(value)
                    if (token, route) != (reply.token, reply.node):
                        LEDGER.cookie_mismatches += 1
                        problem = f"cookie names {token[:8]}….{route} but {reply.node} answered for {reply.id}"
                        LEDGER.problem("cookie", j, name, problem, reply)
                if seen:
                    j.cookie = value  # None: the cookie was deleted (JSESSIONID=null)
                LEDGER.checks += 1
                problem = check(reply) or problem
                reply.problem = problem
                if problem:
                    resp.failure(problem)
                return reply
        return None

    def settle(self, j: Journey, reply: Reply) -> None:
        """After a checked answer: the session is in the state the reply shows."""
        if reply.problem or reply.gone:
            raise EndJourney
        j.possible = [reply.data]

    def expect_state(self, j: Journey, r: Reply, allowed: list[State], *, rotating: bool = False) -> str | None:
        """The answer shows one of the ``allowed`` states of this journey's session."""
        if r.new or (r.token != j.token and not rotating):
            if GONE in allowed:
                LEDGER.resets += 1  # the user missed a Set-Cookie: logged out, not lost
                r.gone = True
                return None
            return self.lost(j, r, "the session disappeared" if r.new else f"another session answered ({r.id})")
        if r.data not in allowed:
            return self.lost(j, r, "the session does not show the user's acknowledged writes")
        return None

    def expect_fresh(self, j: Journey, r: Reply, profile: dict[str, Any]) -> str | None:
        if r.data != profile:
            return f"login stored {r.data!r}, not {profile!r}"
        if j.cookie is None:
            return "login answered without a session cookie"
        return None

    def expect_rotated(self, j: Journey, r: Reply, old_token: str | None, old_cookie: str | None) -> str | None:
        problem = self.expect_state(j, r, j.possible, rotating=True)
        if problem or r.gone:
            return problem
        if r.token == old_token:
            return "rotate kept the session ID"
        if j.cookie == old_cookie:
            return "rotate did not issue a new cookie"
        return None

    def expect_logged_out(self, j: Journey, r: Reply) -> str | None:
        if not r.cookie_seen or j.cookie is not None:
            return "logout did not delete the cookie (no JSESSIONID=null)"
        if r.data:
            return f"logout left data in the session: {r.data!r}"
        return None

    def expect_dead(self, j: Journey, r: Reply, answered: bool) -> str | None:
        if r.new and not r.data:
            return None
        if answered:
            LEDGER.logouts_not_honoured += 1
            LEDGER.problem("logout", j, "old cookie after logout", "the old cookie still works after logout", r)
            return "the old cookie still works after an acknowledged logout"
        if r.data in j.possible:
            return None  # the logout was never applied: fine
        return self.lost(j, r, "the session does not show the user's acknowledged writes")

    def lost(self, j: Journey, r: Reply, what: str) -> str:
        LEDGER.sessions_lost += 1
        LEDGER.problem("lost", j, j.history[-1][1] if j.history else "?", what, r)
        return f"session lost: {what}"


def _incr(key: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda s: {**s, key: s.get(key, 0) + 1}


def _unique(states: list[State]) -> list[State]:
    out: list[State] = []
    for s in states:
        if s not in out:
            out.append(s)
    return out


@events.quitting.add_listener
def _print_ledger(environment: Any, **_kw: Any) -> None:
    # Standalone `locust -f` runs: say what the users saw (chaos.py prints its own summary).
    if os.environ.get("SHOP_QUIET"):
        return
    print("shop users:", json.dumps(LEDGER.as_dict()))
    for p in LEDGER.problems[:10]:
        print("  problem:", json.dumps(p))
