"""Real-process fault tests, Jepsen style: a history of every request, and a checker over it.

* :class:`History` records every request a test client makes: which client, which node,
  which session, what it wrote, the HTTP status, and what the response showed.
* :class:`Client` is one user with one session (one cookie), writing to the demo app;
  :class:`Writers` runs several of them in threads until told to stop.
* :class:`FaultCluster` is a real ``redis-server`` and real demo nodes, some of them
  reaching Redis through a :class:`~tests.faultproxy.FaultProxy`, all stopped afterwards
  (stopped processes are continued first, proxies closed, logs shown if the test failed).
* :func:`check` is the checker: given the history (including the final reads through the
  survivors) it lists every broken rule:

  - a write answered 200 (a ``put`` of key ``w<i>``, or an increment) is in the session
    when it is read back through a survivor after its owner was SIGKILLed;
  - every survivor reads the same data for a session;
  - a counter is never lower than an acknowledged increment (nor higher than the
    increments attempted);
  - a logout answered 200 never comes back: the old cookie gets a new, empty session;
  - nothing appears that was never written.

The modes (``CLUSTERSESS_ON_REPLICATION_FAILURE``) differ in *when* the rules must hold,
not in the rules: with ``refuse`` at once (a 200 means replicated, so the owner is killed
right after the fault heals), with the default ``serve`` once the cluster has settled
(every node healthy and ``"pending_replication": 0``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Literal, Self

import httpx

from clustersess import ids
from tests.cluster_utils import FAST
from tests.faultproxy import FaultProxy
from tests.utils import NodeProcess, RedisServer

Kind = Literal["put", "incr", "logout", "read"]

#: timeouts: generous, so that a loaded 2-core machine never fails a test by being slow
REQUEST_TIMEOUT = 10.0
SETTLE_TIMEOUT = 20.0
HEAL_TIMEOUT = 15.0


# -- modes ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Mode:
    """What a node does with a write it cannot replicate (``CLUSTERSESS_ON_REPLICATION_FAILURE``).

    ``settle_before_kill``: the owner may only be killed once the cluster has settled
    (``serve``: 200 meant "in memory"); with ``refuse`` a 200 meant "replicated", so the
    owner is killed as soon as the fault has healed.
    """

    name: str
    env: dict[str, str]
    settle_before_kill: bool

    def __str__(self) -> str:
        return self.name


SERVE = Mode("serve", {}, settle_before_kill=True)  # the default: no variable set
REFUSE = Mode("refuse", {"CLUSTERSESS_ON_REPLICATION_FAILURE": "refuse"}, settle_before_kill=False)


# -- history ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Op:
    """One request and its outcome. ``status`` None: no answer (timeout, connection error)."""

    index: int
    client: str
    node: str
    session: str | None  # the token (stable across takeovers); None if unknown
    kind: Kind
    key: str | None  # "w<i>" for a put, "n" for an increment
    value: int | None  # the value written (put) or returned (incr)
    status: int | None
    data: dict[str, Any] | None  # the session as the response showed it
    new: bool | None  # the response's "new" flag
    phase: str
    start: float
    end: float
    final: bool = False  # a read of the final check, through a survivor

    @property
    def ok(self) -> bool:
        return self.status == 200

    def line(self) -> str:
        what = f"{self.kind} {self.key}={self.value}" if self.key else self.kind
        return f"#{self.index} {self.client}@{self.node} [{self.phase}] {what} -> {self.status}"


class History:
    """Every request of a test, in the order they finished (thread-safe)."""

    def __init__(self) -> None:
        self._ops: list[Op] = []
        self._lock = threading.Lock()
        self.phase = "before"
        self.t0 = time.monotonic()

    def add(self, **fields: Any) -> Op:
        with self._lock:
            op = Op(index=len(self._ops), **fields)
            self._ops.append(op)
            return op

    @property
    def ops(self) -> list[Op]:
        with self._lock:
            return list(self._ops)

    def dump(self) -> str:
        return "\n".join(op.line() for op in self.ops)


# -- clients ----------------------------------------------------------------------------


def token_of(session_id: object) -> str | None:
    parsed = ids.parse_id(session_id) if isinstance(session_id, str) else None
    return parsed.token if parsed is not None else None


class Client:
    """One user with one session cookie, talking to nodes directly (no balancer).

    Writes are ``put`` (adds key ``w<i>`` with value ``i``, a new key each time, so a lost
    write is a missing key) and ``incr`` (the demo's counter ``n``). Every request is
    recorded in the history, whatever its outcome.
    """

    def __init__(self, name: str, history: History, node: NodeProcess) -> None:
        self.name = name
        self.history = history
        self.home = node  # the node this user's requests go to
        self.cookie: str | None = None
        self.session: str | None = None
        self.logged_out: str | None = None  # the cookie a logout answered 200 killed
        self.abandoned = False  # a logout without a clear answer: the session is left alone
        self._seq = 0  # puts sent
        self._writes = 0  # writes sent
        self._http = httpx.Client(timeout=REQUEST_TIMEOUT)

    @property
    def route(self) -> str | None:
        """The node the cookie names (where a sticky balancer would send this user)."""
        return self.cookie.rsplit(".", 1)[1] if self.cookie else None

    @property
    def active(self) -> bool:
        return self.logged_out is None and not self.abandoned

    def close(self) -> None:
        self._http.close()

    def _request(
        self, method: str, node: NodeProcess, path: str, body: dict[str, Any] | None, cookie: str | None
    ) -> tuple[int | None, dict[str, Any] | None, str | None]:
        headers = {"Cookie": f"JSESSIONID={cookie}"} if cookie else {}
        self._http.cookies.clear()
        try:
            resp = self._http.request(method, node.url + path, headers=headers, json=body)
        except httpx.HTTPError:
            return None, None, cookie
        for value in resp.headers.get_list("set-cookie"):
            name, _, rest = value.partition("=")
            if name == "JSESSIONID":
                val = rest.split(";")[0]
                cookie = None if val in ("", "null", '""') else val
        try:
            payload = resp.json()
        except ValueError:
            payload = None
        return resp.status_code, payload if isinstance(payload, dict) else None, cookie

    def _record(
        self,
        kind: Kind,
        node: NodeProcess,
        started: float,
        status: int | None,
        payload: dict[str, Any] | None,
        *,
        key: str | None = None,
        value: int | None = None,
        final: bool = False,
        session: str | None = None,
    ) -> Op:
        data = payload.get("data") if payload else None
        return self.history.add(
            client=self.name,
            node=node.name,
            session=session or token_of(payload.get("id") if payload else None) or self.session,
            kind=kind,
            key=key,
            value=value,
            status=status,
            data=data if isinstance(data, dict) else None,
            new=payload.get("new") if payload else None,
            phase=self.history.phase,
            start=started - self.history.t0,
            end=time.monotonic() - self.history.t0,
            final=final,
        )

    def put(self, node: NodeProcess | None = None) -> Op:
        node = node or self.home
        self._seq += 1
        key, value = f"w{self._seq}", self._seq
        started = time.monotonic()
        status, payload, cookie = self._request("POST", node, "/api/session", {key: value}, self.cookie)
        op = self._record("put", node, started, status, payload, key=key, value=value)
        self._adopt_cookie(status, cookie, op)
        return op

    def incr(self, node: NodeProcess | None = None) -> Op:
        node = node or self.home
        started = time.monotonic()
        status, payload, cookie = self._request("POST", node, "/api/session/incr/n", None, self.cookie)
        value = None
        if status == 200 and payload and isinstance(payload.get("data"), dict):
            value = payload["data"].get("n")
        op = self._record("incr", node, started, status, payload, key="n", value=value)
        self._adopt_cookie(status, cookie, op)
        return op

    def write(self) -> Op:
        """The next write: puts and increments alternate."""
        self._writes += 1
        return self.incr() if self._writes % 2 == 0 else self.put()

    def logout(self, node: NodeProcess | None = None) -> Op:
        node = node or self.home
        started = time.monotonic()
        old = self.cookie
        status, payload, _ = self._request("DELETE", node, "/api/session", None, self.cookie)
        op = self._record("logout", node, started, status, payload, session=self.session)
        if status == 200:
            self.logged_out = old
        else:
            self.abandoned = True  # it may or may not have happened
        return op

    def read(self, node: NodeProcess, *, final: bool = False, cookie: str | None = None) -> Op:
        """GET the session; ``cookie`` reads with that cookie instead of (and without
        changing) this client's own. Retried while the node answers anything but 200: a
        read is no write, and a node that is still taking over may ask to come back."""
        own = cookie is None
        deadline = time.monotonic() + HEAL_TIMEOUT
        while True:
            started = time.monotonic()
            sent = self.cookie if own else cookie
            status, payload, new_cookie = self._request("GET", node, "/api/session", None, sent)
            if status == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        op = self._record("read", node, started, status, payload, final=final, session=None if own else self.session)
        if own and status == 200:
            self.cookie = new_cookie
        return op

    def _adopt_cookie(self, status: int | None, cookie: str | None, op: Op) -> None:
        if status == 200:
            self.cookie = cookie
            if self.session is None:
                self.session = op.session


class Writers:
    """Clients writing in threads, one request at a time each, until :meth:`stop`."""

    def __init__(self, clients: Sequence[Client], *, pause: float = 0.05) -> None:
        self.clients = list(clients)
        self.pause = pause
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []

    def start(self) -> Self:
        assert not self._threads, "already started"
        for client in self.clients:
            thread = threading.Thread(target=self._run, args=(client,), name=f"writer-{client.name}", daemon=True)
            self._threads.append(thread)
            thread.start()
        return self

    def _run(self, client: Client) -> None:
        try:
            while not self._stop.is_set() and client.active:
                op = client.write()
                # A node that does not answer (stopping, restarting) is not hammered.
                self._stop.wait(self.pause if op.status is not None else max(self.pause, 0.2))
        except Exception as exc:  # noqa: BLE001 - a bug in the test itself, re-raised by stop()
            self.errors.append(exc)

    def stop(self, *, check: bool = True) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(REQUEST_TIMEOUT * 3)
        if check:
            assert not any(t.is_alive() for t in self._threads), "a writer thread did not stop"
            assert not self.errors, self.errors

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.stop(check=exc_type is None)  # never hide the test's own exception


# -- the cluster ------------------------------------------------------------------------


def status(node: NodeProcess, timeout: float = 3.0) -> dict[str, Any] | None:
    """The node's /cluster.json, or None if it does not answer."""
    try:
        resp = httpx.get(node.url + "/cluster.json", timeout=timeout)
        body = resp.json()
    except (httpx.HTTPError, ValueError):
        return None
    return body if resp.status_code == 200 and isinstance(body, dict) else None


def health(node: NodeProcess, timeout: float = 3.0) -> int | None:
    """The HTTP status of the node's /health, or None if it does not answer."""
    try:
        return httpx.get(node.url + "/health", timeout=timeout).status_code
    except httpx.HTTPError:
        return None


def fresh_members(info: dict[str, Any], drop_time: float) -> set[str]:
    """The members a node's status shows as live and heard within ``drop_time``."""
    return {
        m["name"]
        for m in info.get("members", [])
        if not m.get("self") and m.get("state", "up") == "up" and m.get("last_seen", 0.0) < drop_time
    }


class FaultCluster:
    """A real redis-server and real demo nodes ``node1..nodeN``; ``proxied`` nodes reach
    Redis through a :class:`FaultProxy` of their own (``cluster.proxies[name]``)."""

    def __init__(
        self,
        n: int = 3,
        *,
        env: dict[str, str] | None = None,
        proxied: Sequence[str] = (),
        log_level: str = "warning",
    ) -> None:
        self.env = {**FAST, **(env or {})}
        self.drop_time = float(self.env["CLUSTERSESS_DROP_TIME"])
        self.redis = RedisServer()
        self.proxies: dict[str, FaultProxy] = {}
        self.nodes: list[NodeProcess] = []
        self.history = History()
        self.clients: list[Client] = []
        self._n = n
        self._proxied = tuple(proxied)
        self._log_level = log_level
        self._paused: set[int] = set()

    # life cycle
    def start(self) -> Self:
        self.redis.start()
        for i in range(1, self._n + 1):
            name = f"node{i}"
            url = self.redis.url
            if name in self._proxied:
                proxy = FaultProxy((self.redis.host, self.redis.port), name=f"proxy-{name}").start()
                self.proxies[name] = proxy
                url = f"redis://{proxy.host}:{proxy.port}/0"
            node = NodeProcess(name, redis_url=url, env=self.env, log_level=self._log_level)
            self.nodes.append(node)
            node.start()
        self.wait_members()
        return self

    def close(self, failed: bool = False) -> None:
        for pid in list(self._paused):
            self.resume(pid)
        for client in self.clients:
            client.close()
        for node in self.nodes:
            node.kill(signal.SIGKILL)
        for proxy in self.proxies.values():
            proxy.close()
        if failed:
            for node in self.nodes:
                sys.stderr.write(f"\n--- log of {node.name} ({node.log_path}) ---\n{node.log_text()[-3000:]}\n")
            fd, path = tempfile.mkstemp(prefix="clustersess-history-", suffix=".jsonl")
            with os.fdopen(fd, "w") as fh:
                for op in self.history.ops:
                    fh.write(json.dumps(dataclasses.asdict(op)) + "\n")
            sys.stderr.write(f"\n--- the whole history, one request per line: {path}\n")
        self.redis.cleanup()

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close(failed=True)
            raise

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.close(failed=exc_type is not None)

    # nodes
    def node(self, name: str) -> NodeProcess:
        return next(n for n in self.nodes if n.name == name)

    def live(self) -> list[NodeProcess]:
        return [n for n in self.nodes if n.running]

    def pause(self, pid: int | None) -> None:
        """SIGSTOP a process (a node's or Redis's); undone at exit if the test forgets."""
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        self._paused.add(pid)

    def resume(self, pid: int | None) -> None:
        assert pid is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        self._paused.discard(pid)

    def wait_members(self, timeout: float = 15.0) -> None:
        """Wait until every live node sees every other live node (or raise TimeoutError)."""
        deadline = time.monotonic() + timeout
        while not self.all_see_each_other():
            if time.monotonic() > deadline:
                views = {n.name: status(n) for n in self.live()}
                raise TimeoutError(f"members did not converge within {timeout}s: {views}")
            time.sleep(0.1)

    def all_see_each_other(self) -> bool:
        names = {n.name for n in self.live()}
        for node in self.live():
            info = status(node)
            if info is None or fresh_members(info, self.drop_time) != names - {node.name}:
                return False
        return True

    # clients
    def new_clients(self, node: NodeProcess, count: int, prefix: str) -> list[Client]:
        """``count`` users of ``node``, each with a session created by one acknowledged put."""
        made = []
        for i in range(count):
            client = Client(f"{prefix}{i}", self.history, node)
            op = client.put()
            assert op.ok and client.session, f"could not create a session on a healthy {node.name}: {op}"
            made.append(client)
        self.clients.extend(made)
        return made

    # waiting
    def settled(self) -> tuple[bool, str]:
        """Every live node healthy, seeing the others, and with nothing left to replicate."""
        names = {n.name for n in self.live()}
        for node in self.live():
            code = health(node)
            info = status(node)
            if code != 200 or info is None:
                return False, f"{node.name}: /health {code}, /cluster.json {'ok' if info else 'none'}"
            pending = info.get("pending_replication")
            if pending != 0:
                return False, f"{node.name}: pending_replication={pending}"
            if info.get("rebalancing"):
                return False, f"{node.name}: rebalancing"
            seen = fresh_members(info, self.drop_time)
            if seen != names - {node.name}:
                return False, f"{node.name} sees {sorted(seen)}"
            verdict = info.get("health")
            if isinstance(verdict, dict) and not verdict.get("ok", True):
                return False, f"{node.name}: health {verdict}"
        return True, "settled"

    def wait_settled(self, timeout: float = SETTLE_TIMEOUT) -> str | None:
        """Wait for :meth:`settled`; None, or what was still wrong at the timeout."""
        deadline = time.monotonic() + timeout
        while True:
            ok, why = self.settled()
            if ok:
                return None
            if time.monotonic() > deadline:
                return f"the cluster did not settle within {timeout:.0f}s ({why})"
            time.sleep(0.2)

    def wait_health(self, node: NodeProcess, want: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while health(node) != want:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def tasks_not_running(self) -> dict[str, dict[str, Any]]:
        """Background tasks (``/cluster.json`` "tasks") that are neither running nor
        finished, by node; empty if none (or if the node does not report tasks)."""
        bad: dict[str, dict[str, Any]] = {}
        for node in self.live():
            tasks = (status(node) or {}).get("tasks") or {}
            for name, info in tasks.items():
                if isinstance(info, dict) and info.get("state") not in ("running", "finished"):
                    bad.setdefault(node.name, {})[name] = info
        return bad

    def owners_total(self) -> int | None:
        """How many sessions the live nodes own, added up (None if a node does not answer)."""
        total = 0
        for node in self.live():
            info = status(node)
            if info is None:
                return None
            total += int(info.get("sessions_owned", 0))
        return total


# -- the checker ------------------------------------------------------------------------


@dataclasses.dataclass
class Verdict:
    """What the checker found, with the figures of the reproduction note."""

    scenario: str
    acknowledged: int = 0  # writes answered 200
    refused: int = 0  # writes answered 503
    unanswered: int = 0  # writes without an answer
    lost: int = 0  # acknowledged writes missing after the owner's death
    lost_by_phase: Counter[str] = dataclasses.field(default_factory=Counter)
    acknowledged_by_phase: Counter[str] = dataclasses.field(default_factory=Counter)
    sessions_lost: int = 0  # sessions a survivor no longer knew at all
    disagreements: int = 0  # sessions the survivors read differently
    resurrected: int = 0  # sessions whose logout was answered 200 and that came back
    duplicate_owners: int | None = None  # owned sessions counted beyond the live ones
    problems: list[str] = dataclasses.field(default_factory=list)
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def require(self, condition: bool, problem: str) -> bool:
        if not condition:
            self.problems.append(problem)
        return condition

    def summary(self) -> str:
        figures = {
            "acknowledged": self.acknowledged,
            "refused_503": self.refused,
            "unanswered": self.unanswered,
            "lost": self.lost,
            "lost_by_phase": dict(self.lost_by_phase),
            "acknowledged_by_phase": dict(self.acknowledged_by_phase),
            "sessions_lost": self.sessions_lost,
            "disagreements": self.disagreements,
            "resurrected": self.resurrected,
            "duplicate_owners": self.duplicate_owners,
            **self.notes,
        }
        return f"{self.scenario}: {json.dumps(figures, sort_keys=True)}"

    def report(self) -> str:
        shown = self.problems[:25] + ([f"... and {len(self.problems) - 25} more"] if len(self.problems) > 25 else [])
        return self.summary() + "\n" + "\n".join(f"  - {p}" for p in shown)


def check(history: Sequence[Op], verdict: Verdict) -> Verdict:
    """Apply the rules to a history whose final reads (``final=True``) were made through
    the survivors after the owners were killed; adds what it finds to ``verdict``."""
    by_client: dict[str, list[Op]] = {}
    for op in history:
        by_client.setdefault(op.client, []).append(op)
    for client, ops in sorted(by_client.items()):
        writes = [op for op in ops if op.kind in ("put", "incr") and not op.final]
        for op in writes:
            if op.ok:
                verdict.acknowledged += 1
                verdict.acknowledged_by_phase[op.phase] += 1
            elif op.status == 503:
                verdict.refused += 1
            elif op.status is None:
                verdict.unanswered += 1
            else:
                verdict.problems.append(f"{client}: a write got HTTP {op.status} ({op.line()})")
        logouts = [op for op in ops if op.kind == "logout"]
        finals = [op for op in ops if op.final]
        if any(op.ok for op in logouts):
            _check_logged_out(client, finals, verdict)
        elif not logouts:
            _check_session(client, writes, finals, verdict)
    return verdict


def _check_logged_out(client: str, finals: list[Op], verdict: Verdict) -> None:
    back = False
    for read in finals:
        if not verdict.require(read.ok, f"{client}: the final read on {read.node} got HTTP {read.status}"):
            continue
        if not read.new or read.data:
            back = True
            verdict.problems.append(f"{client}: logged out (200), but {read.node} served the session: {read.data}")
    verdict.resurrected += back


def _check_session(client: str, writes: list[Op], finals: list[Op], verdict: Verdict) -> None:
    if not verdict.require(bool(finals), f"{client}: no final read"):
        return
    acked_puts = {op.key: op for op in writes if op.kind == "put" and op.ok and op.key}
    attempted_puts = {op.key: op.value for op in writes if op.kind == "put" and op.key}
    acked_incrs = [op for op in writes if op.kind == "incr" and op.ok and isinstance(op.value, int)]
    attempted_incrs = sum(1 for op in writes if op.kind == "incr")
    views: list[tuple[str, dict[str, Any]]] = []
    worst_missing: list[Op] = []
    worst_low: list[Op] = []
    for read in finals:
        if not verdict.require(
            read.ok and read.data is not None, f"{client}: the final read on {read.node} got HTTP {read.status}"
        ):
            continue
        data = read.data or {}
        views.append((read.node, data))
        if read.new:
            verdict.sessions_lost += 1
        missing = [op for key, op in acked_puts.items() if data.get(key) != op.value]
        if len(missing) > len(worst_missing):
            worst_missing = missing
        for key, value in data.items():
            if key.startswith("w") and attempted_puts.get(key) != value:
                verdict.problems.append(f"{client}: {read.node} shows {key}={value!r}, which was never written")
        n = data.get("n", 0)
        if not isinstance(n, int):
            verdict.problems.append(f"{client}: counter {n!r} on {read.node} is not a number")
            continue
        # An acknowledged increment that returned v is lost if the counter is below v.
        low = [op for op in acked_incrs if (op.value or 0) > n]
        if len(low) > len(worst_low):
            worst_low = low
        if n > attempted_incrs:
            verdict.problems.append(
                f"{client}: counter {n} on {read.node}, but only {attempted_incrs} increments were sent"
            )
    for op in worst_missing + worst_low:
        verdict.lost += 1
        verdict.lost_by_phase[op.phase] += 1
    if worst_missing:
        verdict.problems.append(
            f"{client}: {len(worst_missing)} acknowledged put(s) lost: "
            + ", ".join(f"{op.key} ({op.phase}, on {op.node})" for op in worst_missing[:6])
        )
    if worst_low:
        top = max(op.value or 0 for op in worst_low)
        verdict.problems.append(
            f"{client}: {len(worst_low)} acknowledged increment(s) lost (counter below {top}; "
            + ", ".join(sorted({op.phase for op in worst_low}))
            + ")"
        )
    if len({json.dumps(d, sort_keys=True) for _, d in views}) > 1:
        verdict.disagreements += 1
        seen = "; ".join(f"{n}: {sorted(d)}" for n, d in views)
        verdict.problems.append(f"{client}: the survivors disagree: {seen}")


# -- the end of every scenario ----------------------------------------------------------


#: counters of /cluster.json "stats" worth showing next to the verdict
STATS_SHOWN = (
    "adopted", "takeovers", "takeover_conflicts", "ack_timeouts", "requeued", "writes_after_handoff",
    "messages_dropped_stale", "redis_reconnects", "resyncs", "handed_over", "writes_unreplicated",
    "writes_refused", "acks_refused", "conflicts", "stepped_down", "rejoins", "watchdog_resets", "task_restarts",
)  # fmt: skip


def finish(
    cluster: FaultCluster,
    verdict: Verdict,
    *,
    mode: Mode,
    victims: Sequence[NodeProcess],
    settle: bool | None = None,
    unanswered_ok: bool = False,
) -> Verdict:
    """SIGKILL the owner(s) and read every session back through every survivor, in turn.

    With ``settle`` (default: the mode's), first wait until the cluster has settled and
    check that every session has one owner; then kill. The reads go to each survivor in
    turn (each read takes the session over), so they also show whether the survivors agree.
    In ``serve`` mode every write must have been answered 200 (the node serves from
    memory whatever happens), and answered at all unless ``unanswered_ok`` (a node was
    down on purpose).
    """
    history = cluster.history
    if settle if settle is not None else mode.settle_before_kill:
        history.phase = "settle"
        problem = cluster.wait_settled()
        verdict.require(problem is None, problem or "")
        _check_owners(cluster, verdict)
    totals: Counter[str] = Counter()
    for node in cluster.live():
        stats = (status(node) or {}).get("stats") or {}
        totals.update({k: int(stats[k]) for k in STATS_SHOWN if isinstance(stats.get(k), int)})
    verdict.notes["stats_before_kill"] = dict(totals)
    history.phase = "final"
    for node in victims:
        node.kill(signal.SIGKILL)
    survivors = cluster.live()
    assert survivors, "nobody survived to read from"
    for client in cluster.clients:
        if client.abandoned:
            continue
        for node in survivors:
            if client.logged_out is not None:
                client.read(node, final=True, cookie=client.logged_out)
            else:
                client.read(node, final=True)
    check(history.ops, verdict)
    if mode is SERVE:
        verdict.require(verdict.refused == 0, f"serve mode answered {verdict.refused} write(s) with 503")
        verdict.require(
            unanswered_ok or verdict.unanswered == 0, f"{verdict.unanswered} write(s) got no answer at all"
        )
    return verdict


def _check_owners(cluster: FaultCluster, verdict: Verdict, timeout: float = 10.0) -> None:
    """One owner per session: the sessions owned, added up over the nodes, is the number
    of live sessions (within the logouts whose outcome is unknown)."""
    live = sum(1 for c in cluster.clients if c.active)
    unknown = sum(1 for c in cluster.clients if c.abandoned)
    deadline = time.monotonic() + timeout
    total = cluster.owners_total()
    while total is None or not live <= total <= live + unknown:
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
        total = cluster.owners_total()
    if total is not None:
        verdict.duplicate_owners = max(0, total - live - unknown)
        verdict.notes["sessions_owned_total"] = total
        verdict.notes["sessions_live"] = live
    verdict.require(
        total is not None and live <= total <= live + unknown,
        f"ownership did not converge: the nodes own {total} session(s) in all, {live} are live",
    )


def observe(
    cluster: FaultCluster, *, seconds: float, until: Callable[[], bool] | None = None, max_seconds: float | None = None
) -> None:
    """Let the fault last ``seconds``, and longer (up to ``max_seconds``) until ``until()``."""
    started = time.monotonic()
    limit = started + (max_seconds if max_seconds is not None else seconds)
    while True:
        now = time.monotonic()
        done = until() if until is not None else True
        if now >= limit or (now - started >= seconds and done):
            return
        time.sleep(0.1)


def emit(verdict: Verdict) -> None:
    """Print the figures (pytest shows them with -rA, or for a failure) and append them to
    ``$FAULTS_REPORT`` if set, one JSON line per scenario, for the reproduction note."""
    print("FAULTS " + verdict.summary())
    path = os.environ.get("FAULTS_REPORT")
    if path:
        with open(path, "a") as fh:
            fh.write(verdict.summary() + "\n")
