"""Prometheus metrics of a node: an ASGI and a WSGI app that serve ``/metrics``.

Needs the ``metrics`` extra (``pip install 'clustersess[metrics]'``, which installs
``prometheus_client``)::

    # Starlette / FastAPI: mount it under the session middleware, which tells it the node
    from clustersess import metrics
    routes = [..., Route("/metrics", metrics.asgi_app())]  # an ASGI app as the endpoint

    # Flask (clustersess = ClusterSession(app))
    metrics_app = metrics.wsgi_app(clustersess.manager)

    @app.get("/metrics")
    def prometheus():
        body, content_type = metrics_app.render(request.headers.get("Accept"))
        return body, 200, {"Content-Type": content_type}

What is exported (all names start with ``clustersess_``):

* every counter of :class:`clustersess.stats.Stats`, generically, as ``<field>_total``
  (a counter added there appears here without an edit); fields that start with a prefix in
  :data:`FAMILIES` form one family with a label, e.g. ``messages_dropped_total{cause}``;
* every histogram of it as ``<field>_seconds`` (``ack_latency_seconds``: from publishing a
  REPLICATE to its ack);
* gauges from :meth:`SessionManager.status`: ``sessions_owned``, ``sessions_backed_up``,
  ``tombstones``, ``pending_replication``, ``members{state}``, ``zones``,
  ``redis_connected``, ``rebalancing``, ``lease_remaining_seconds``, ``gc_frozen_objects``, ``healthy``
  (:meth:`SessionManager.health`), and ``node_info{node, zone, incarnation, replication}``.

Several workers on one machine: in the fast layout (``clustersess node --workers N``) each
worker has its own port, so Prometheus scrapes each as a target of its own and nothing
more is needed. Where workers share one port (``uvicorn --workers N``, gunicorn), a scrape
reaches whichever worker accepts it; there, set ``PROMETHEUS_MULTIPROC_DIR`` (before
prometheus_client is imported) and :meth:`MetricsApp.bind` each app to the node it serves:
every worker then mirrors its values into prometheus_client's shared files once a second
and any worker answers for all of them (counters summed, ``sessions_*`` summed over live
workers, ``node_info`` per worker with a ``pid`` label). One node per process is mirrored:
the first bound source that leads to one.
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
import os
import re
import threading
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping
from typing import Any

try:
    import prometheus_client
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess
    from prometheus_client.exposition import choose_encoder
    from prometheus_client.metrics_core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        InfoMetricFamily,
        Metric,
    )
    from prometheus_client.registry import Collector
except ImportError:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "clustersess.metrics needs prometheus_client: pip install 'clustersess[metrics]'"
    ) from None

from .manager import SessionManager

__all__ = ["FAMILIES", "MetricsApp", "NodeCollector", "Snapshot", "asgi_app", "exposition", "snapshot", "wsgi_app"]

log = logging.getLogger("clustersess")

PREFIX = "clustersess"

#: Stats fields starting with a key here are one family; the rest of the name is the label
FAMILIES: dict[str, tuple[str, str]] = {"messages_dropped_": ("messages_dropped", "cause")}

#: how often a worker copies its values to the shared files in multiprocess mode
MIRROR_INTERVAL = 1.0

_HELP: dict[str, str] = {
    "sessions_created": "Sessions created on this node",
    "sessions_expired": "Sessions expired on this node",
    "sessions_invalidated": "Sessions invalidated (logout)",
    "sessions_rotated": "Session IDs rotated (login)",
    "commits": "Requests that committed a changed session",
    "takeovers": "Sessions taken over by this node (a request for another owner's session)",
    "takeover_conflicts": "Concurrent takeovers of one epoch resolved by yielding",
    "adopted": "Sessions adopted from a dead or leaving owner",
    "handed_over": "Sessions handed to their backup when this node stopped",
    "messages_sent": "Cluster messages published",
    "messages_received": "Cluster messages received",
    "bytes_sent": "Bytes of cluster messages published",
    "bytes_received": "Bytes of cluster messages received",
    "messages_dropped": "Cluster messages dropped, by cause",
    "replications_sent": "Session states sent to a backup",
    "replications_applied": "Session states applied as a backup copy",
    "ack_timeouts": "Sync writes whose backup did not ack within ack_timeout",
    "redis_reconnects": "Reconnections to Redis",
    "ack_latency": "Seconds from publishing a REPLICATE to its ack",
}

_MEMBER_STATES = ("up", "suspected", "leaving")


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """One reading of a node: what every exporter here turns into metrics."""

    counters: dict[str, int]
    #: name -> (bounds, per-bucket counts with +Inf last, sum)
    histograms: dict[str, tuple[tuple[float, ...], tuple[int, ...], float]]
    gauges: dict[str, float]
    members: dict[str, int]
    info: dict[str, str]


def snapshot(manager: SessionManager) -> Snapshot:
    """Read ``manager``'s counters and :meth:`~SessionManager.status` once.

    Safe from another thread than the manager's (a WSGI request thread, the multiprocess
    mirror): a status read that a concurrent change interrupts is read again.
    """
    for attempt in range(5):
        try:
            status = manager.status()
            break
        except RuntimeError:  # "dictionary changed size during iteration", on another thread
            if attempt == 4:
                raise
    stats = manager.stats
    histograms = {
        name: (h.bounds, tuple(h.counts), h.total) for name, h in stats.histograms().items()
    }
    members = dict.fromkeys(_MEMBER_STATES, 0)
    zones = set()
    me: dict[str, Any] = {}
    for member in status.get("members") or []:
        if member.get("self"):
            me = member
        state = "up" if member.get("self") else str(member.get("state", "up"))
        members[state] = members.get(state, 0) + 1
        if state == "up" and member.get("zone"):
            zones.add(member["zone"])
    if not status.get("clustered"):
        members["up"] = 1
    zone = str(me.get("zone") or manager.config.zone)
    zones.add(zone)
    clustered = bool(status.get("clustered"))
    connected = bool(status.get("connected", True))
    health = manager.health()
    gauges: dict[str, float] = {
        "sessions_owned": status.get("sessions_owned", 0),
        "sessions_backed_up": status.get("sessions_backed_up", 0),
        "tombstones": status.get("tombstones", 0),
        "pending_replication": status.get("pending_replication", 0),
        "zones": len(zones),
        "gc_frozen_objects": status.get("gc_frozen_objects", 0),
        # manager.health(): what a load balancer should know (a clustered node is not ok
        # while fenced, joining, rejoining or stopping)
        "healthy": 1.0 if health.ok else 0.0,
    }
    if clustered:
        gauges["redis_connected"] = 1.0 if connected else 0.0
        gauges["rebalancing"] = 1.0 if status.get("rebalancing") else 0.0
        if isinstance(status.get("lease_remaining"), (int, float)):
            gauges["lease_remaining_seconds"] = float(status["lease_remaining"])
    info = {
        "node": str(status.get("node", manager.node)),
        "zone": zone,
        "incarnation": str(status.get("incarnation", "")),
        "replication": str(status.get("replication") or "none"),
    }
    return Snapshot(stats.as_dict(), histograms, gauges, members, info)


_GAUGE_HELP = {
    "sessions_owned": "Sessions this node owns",
    "sessions_backed_up": "Backup copies this node holds for other owners",
    "tombstones": "Invalidated session IDs remembered so they cannot come back",
    "pending_replication": "Owned sessions whose latest version no backup has acknowledged yet",
    "zones": "Distinct zones among the live members (1: no backup can leave the zone)",
    "gc_frozen_objects": "Objects frozen out of the cyclic GC at start-up (gc_freeze)",
    "healthy": "1 while manager.health() is ok (a clustered node: not fenced, joining or stopping)",
    "lease_remaining_seconds": "Seconds left on this node's name lease in Redis",
    "redis_connected": "1 while connected to Redis",
    "rebalancing": "1 while a rebalance pass runs or is due (backups moving after a membership change)",
}


def _family(field: str) -> tuple[str, str | None, str | None]:
    """(family name, label name, label value) of a Stats field."""
    for prefix, (family, label) in FAMILIES.items():
        if field.startswith(prefix):
            return family, label, field[len(prefix) :]
    return field, None, None


def _help(name: str) -> str:
    return _HELP.get(name) or f"clustersess Stats.{name}"


def families(snap: Snapshot) -> Iterator[Metric]:
    """The metric families of one :class:`Snapshot` (a process's own values)."""
    grouped: dict[str, CounterMetricFamily] = {}
    for field, value in snap.counters.items():
        family, label, label_value = _family(field)
        if label is None:
            yield CounterMetricFamily(f"{PREFIX}_{field}", _help(field), value=value)
            continue
        metric = grouped.get(family)
        if metric is None:
            metric = grouped[family] = CounterMetricFamily(f"{PREFIX}_{family}", _help(family), labels=[label])
        metric.add_metric([str(label_value)], value)
    yield from grouped.values()
    for name, (bounds, counts, total) in snap.histograms.items():
        cumulative, running = [], 0
        for bound, count in zip((*map(_le, bounds), "+Inf"), counts):
            running += count
            cumulative.append((bound, float(running)))
        yield HistogramMetricFamily(f"{PREFIX}_{name}_seconds", _help(name), buckets=cumulative, sum_value=total)
    for gauge, level in snap.gauges.items():
        yield GaugeMetricFamily(f"{PREFIX}_{gauge}", _GAUGE_HELP.get(gauge, gauge), value=level)
    members = GaugeMetricFamily(f"{PREFIX}_members", "Live members this node sees, itself included", labels=["state"])
    for state, count in snap.members.items():
        members.add_metric([state], count)
    yield members
    yield InfoMetricFamily(f"{PREFIX}_node", "This node", value=snap.info)


def _le(bound: float) -> str:
    return repr(float(bound))


# -- finding the node ---------------------------------------------------------------------------

#: attributes that lead from an app object towards its session middleware
_INNER = ("manager", "middleware_stack", "wsgi_app", "app", "middleware")


def find_manager(source: Any, *, depth: int = 16) -> SessionManager | None:
    """The :class:`SessionManager` behind ``source``, or ``None`` if none (yet).

    ``source`` is a manager, a ``ClusterSessionMiddleware`` / ``ClusterSessionWSGIMiddleware``
    / Flask ``ClusterSession``, or an app with one of them in its stack (a Starlette app
    builds its middleware stack on its first ASGI call, so the answer can be ``None`` before).
    """
    seen: set[int] = set()
    todo = [source]
    for _ in range(depth * len(_INNER)):
        if not todo:
            return None
        obj = todo.pop(0)
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, SessionManager):
            return obj
        extensions = _attr(obj, "extensions")  # a Flask app
        if isinstance(extensions, dict) and "clustersess" in extensions:
            todo.append(extensions["clustersess"])
        todo.extend(_attr(obj, attr) for attr in _INNER)
    return None


def _attr(obj: Any, name: str) -> Any:
    try:
        return getattr(obj, name, None)
    except (AssertionError, RuntimeError):  # not ready: ClusterSession.manager before init_app
        return None


class _Source:
    """Where an exporter finds its node: a bound source, else each request's own."""

    def __init__(self, source: Any = None) -> None:
        self.source = source
        self._manager: weakref.ref[SessionManager] | None = None

    def get(self, fallback: Any = None) -> SessionManager | None:
        manager = self._manager() if self._manager is not None else None
        if manager is None:
            manager = find_manager(self.source) if self.source is not None else None
            if manager is None and isinstance(fallback, SessionManager):
                manager = fallback
            if manager is not None:
                self._manager = weakref.ref(manager)
        return manager


class NodeCollector:
    """A prometheus_client collector of one node's metrics (register it where you like).

    Arguments:
        source: the manager, or an object that leads to it (see :func:`find_manager`).
    """

    def __init__(self, source: Any) -> None:
        self._source = _Source(source)

    def collect(self) -> Iterable[Metric]:
        manager = self._source.get()
        return families(snapshot(manager)) if manager is not None else ()


# -- multiprocess mode --------------------------------------------------------------------------


def multiprocess_dir() -> str | None:
    """``PROMETHEUS_MULTIPROC_DIR`` if prometheus_client runs in multiprocess mode."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return path if path and os.path.isdir(path) else None


_LIVE_FILE = re.compile(r"gauge_live\w+?_(\d+)\.db")


def _reap_dead_workers(path: str) -> None:
    """Forget the live gauges of worker processes that are gone (what gunicorn's
    ``child_exit`` hook would do; uvicorn has none). The directory is per machine, so a
    process id says it all."""
    pids = {int(m.group(1)) for name in os.listdir(path) if (m := _LIVE_FILE.fullmatch(name))}
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]
        except PermissionError:
            pass  # alive, another user's


class _Mirror:
    """Copies one worker's values into prometheus_client metrics backed by the shared files."""

    def __init__(self, source: _Source) -> None:
        #: where the node may be found; the first that finds one is the process's node
        self.sources = [source]
        self._counters: dict[str, Counter] = {}
        self._last: dict[str, int] = {}
        self._gauges: dict[str, Gauge] = {}
        self._histograms: dict[str, Histogram] = {}
        self._info: Gauge | None = None
        self._members: Gauge | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="clustersess-metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(MIRROR_INTERVAL):
            try:
                self.sync()
            except Exception:  # keep mirroring: a bug here must not stop the exporter
                log.exception("clustersess: could not copy metrics to PROMETHEUS_MULTIPROC_DIR")

    def sync(self) -> None:
        manager = next((m for m in (source.get() for source in self.sources) if m is not None), None)
        if manager is None:
            return
        self.sources = [s for s in self.sources if s.get() is manager][:1]
        snap = snapshot(manager)
        with self._lock:  # the serving thread syncs too, right before a scrape
            self._sync(manager, snap)

    def _sync(self, manager: SessionManager, snap: Snapshot) -> None:
        for field, value in snap.counters.items():
            delta = value - self._last.get(field, 0)
            self._last[field] = value
            family, label, label_value = _family(field)
            counter = self._counters.get(family)
            if counter is None:
                counter = self._counters[family] = Counter(
                    f"{PREFIX}_{family}", _help(family), [label] if label else [], registry=None
                )
            if delta > 0:
                (counter.labels(label_value) if label else counter).inc(delta)
        for name, hist in manager.stats.histograms().items():
            if name not in self._histograms:
                self._histograms[name] = Histogram(
                    f"{PREFIX}_{name}_seconds", _help(name), buckets=hist.bounds, registry=None
                )
                hist.also = self._histograms[name].observe  # every value from now on
        for name, level in snap.gauges.items():
            gauge = self._gauges.get(name)
            if gauge is None:
                gauge = self._gauges[name] = _mirror_gauge(name)
            gauge.set(level)
        if self._members is None:
            # What every worker sees alike: the same from each.
            self._members = Gauge(f"{PREFIX}_members", "Live members this node sees, itself included", ["state"],
                                  registry=None, multiprocess_mode="livemax")  # fmt: skip
        for state, count in snap.members.items():
            self._members.labels(state).set(count)
        if self._info is None:
            self._info = Gauge(
                f"{PREFIX}_node_info", "This node", list(snap.info), registry=None, multiprocess_mode="liveall"
            )
            self._info.labels(**snap.info).set(1)


_MIRROR_LOCK = threading.Lock()
_mirror: tuple[int, _Mirror] | None = None


def _process_mirror(source: _Source) -> _Mirror:
    """This process's one mirror: two would write the same entries of the shared files.
    (A process forked after one was made, without its thread, gets its own.)"""
    global _mirror
    with _MIRROR_LOCK:
        if _mirror is None or _mirror[0] != os.getpid():
            _mirror = (os.getpid(), _Mirror(source))
        elif source not in _mirror[1].sources:
            # Another app of the process bound too (a module that imports a second app,
            # say): whichever of them leads to a running node is the one mirrored.
            _mirror[1].sources.append(source)
        return _mirror[1]


def _mirror_gauge(name: str) -> Gauge:
    # Sessions add up over a machine's workers; what every worker sees alike (zones) is the
    # same from each; the machine is healthy only if every worker is.
    mode = {"healthy": "livemin", "redis_connected": "livemin", "lease_remaining_seconds": "livemin",
            "zones": "livemax", "tombstones": "livemax"}  # fmt: skip
    return Gauge(f"{PREFIX}_{name}", _GAUGE_HELP.get(name, name), registry=None,
                 multiprocess_mode=mode.get(name, "livesum"))  # type: ignore[arg-type]  # fmt: skip


# -- the apps -----------------------------------------------------------------------------------


class MetricsApp:
    """What the ASGI and WSGI apps share: where the node is, and the exposition.

    Arguments:
        source: the manager or an object that leads to it (:func:`find_manager`); ``None``:
            each request's own (the session middleware puts it in the scope / environ).
        registry: also expose this registry's metrics (default prometheus_client's
            global one: process metrics, and your own); ``None`` for clustersess's only.
            Ignored in multiprocess mode, where the shared files hold everything.
    """

    def __init__(self, source: Any = None, *, registry: Collector | None = prometheus_client.REGISTRY) -> None:
        self._source = _Source(source)
        self._registry = registry
        self._multiprocess = multiprocess_dir()
        self._mirror: _Mirror | None = None
        if self._multiprocess is not None:
            self._shared = CollectorRegistry()
            multiprocess.MultiProcessCollector(self._shared, self._multiprocess)  # type: ignore[no-untyped-call]
            if source is not None:
                self._mirror = _process_mirror(self._source)

    def bind(self, source: Any) -> MetricsApp:
        """Export the node behind ``source`` (see :func:`find_manager`), found lazily.

        Needed in multiprocess mode, so every worker mirrors its values from its start
        rather than from the first scrape it happens to receive; returns ``self``.
        """
        self._source.source = source
        if self._multiprocess is not None and self._mirror is None:
            self._mirror = _process_mirror(self._source)
        return self

    def render(self, accept: str | None, request_manager: Any = None) -> tuple[bytes, str]:
        """The exposition for an ``Accept`` header: (body, content type)."""
        encoder, content_type = choose_encoder(accept or "")
        manager = self._source.get(request_manager)
        if self._multiprocess is not None:
            if self._mirror is None and manager is not None:
                self.bind(manager)
            if self._mirror is not None:
                self._mirror.sync()
            _reap_dead_workers(self._multiprocess)
            return encoder(self._shared), content_type
        return encoder(_Combined(manager, self._registry)), content_type

    def close(self) -> None:
        """Stop the multiprocess mirror thread (it is a daemon thread: optional)."""
        if self._mirror is not None:
            self._mirror.stop()


class _Combined:
    """One node's families, then another registry's: what one scrape returns."""

    def __init__(self, manager: SessionManager | None, registry: Collector | None) -> None:
        self._manager = manager
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        if self._manager is not None:
            yield from families(snapshot(self._manager))
        if self._registry is not None:
            yield from self._registry.collect()


_EXPOSITIONS: weakref.WeakKeyDictionary[SessionManager, MetricsApp] = weakref.WeakKeyDictionary()


def exposition(manager: SessionManager, accept: str | None = None) -> tuple[bytes, str]:
    """``manager``'s metrics (plus prometheus_client's global registry) for an ``Accept``
    header: (body, content type). For a view function of any framework."""
    app = _EXPOSITIONS.get(manager)
    if app is None:
        app = _EXPOSITIONS[manager] = MetricsApp(manager)
    return app.render(accept)


def _wants_gzip(accept_encoding: str | None) -> bool:
    return bool(accept_encoding) and "gzip" in str(accept_encoding).lower()


class ASGIMetricsApp(MetricsApp):
    """The ASGI app; see :func:`asgi_app`."""

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
        send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
    ) -> None:
        if scope["type"] == "lifespan":  # served on its own: nothing to start or stop
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        assert scope["type"] == "http", "the metrics app serves HTTP only"
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        manager = scope.get("clustersess.manager")
        if self._source.get(manager) is None and self._multiprocess is None:
            body, status, content_type = _NO_NODE, 500, "text/plain; charset=utf-8"
        else:
            body, content_type = self.render(headers.get("accept"), manager)
            status = 200
        response_headers = [(b"content-type", content_type.encode())]
        if _wants_gzip(headers.get("accept-encoding")):
            body = gzip.compress(body)
            response_headers.append((b"content-encoding", b"gzip"))
        await send({"type": "http.response.start", "status": status, "headers": response_headers})
        await send({"type": "http.response.body", "body": body})


class WSGIMetricsApp(MetricsApp):
    """The WSGI app; see :func:`wsgi_app`."""

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        manager = environ.get("clustersess.manager")
        if self._source.get(manager) is None and self._multiprocess is None:
            start_response("500 Internal Server Error", [("Content-Type", "text/plain; charset=utf-8")])
            return [_NO_NODE]
        body, content_type = self.render(environ.get("HTTP_ACCEPT"), manager)
        headers = [("Content-Type", content_type)]
        if _wants_gzip(environ.get("HTTP_ACCEPT_ENCODING")):
            body = gzip.compress(body)
            headers.append(("Content-Encoding", "gzip"))
        start_response("200 OK", headers)
        return [body]


_NO_NODE = (
    b"clustersess metrics: no node to report on. Mount the metrics app inside the session "
    b"middleware (it puts the node in the request), or pass it: metrics.asgi_app(manager) / "
    b"metrics.wsgi_app(manager), or .bind(app).\n"
)


def asgi_app(source: Any = None, *, registry: Collector | None = prometheus_client.REGISTRY) -> ASGIMetricsApp:
    """An ASGI app that serves the node's metrics (mount it at ``/metrics``).

    Mounted inside :class:`ClusterSessionMiddleware` it finds the node in each request's
    scope; elsewhere pass ``source`` (the manager, the middleware or the app). Arguments
    as :class:`MetricsApp`.
    """
    return ASGIMetricsApp(source, registry=registry)


def wsgi_app(source: Any = None, *, registry: Collector | None = prometheus_client.REGISTRY) -> WSGIMetricsApp:
    """A WSGI app that serves the node's metrics (e.g. with werkzeug's
    ``DispatcherMiddleware`` at ``/metrics``). Inside :class:`ClusterSessionWSGIMiddleware`
    it finds the node in the environ; elsewhere pass ``source`` (the manager, the
    middleware, the Flask app or its ``ClusterSession``). Arguments as :class:`MetricsApp`.
    """
    return WSGIMetricsApp(source, registry=registry)

