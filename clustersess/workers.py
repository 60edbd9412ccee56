"""Several worker processes of one server on one port: detect them, name each one.

``uvicorn --workers N`` and ``gunicorn -w N`` (any worker class: sync, gthread, uvicorn's)
run N processes behind one listening socket, and the kernel hands each new connection to
whichever worker accepts it. Each process has its own memory, so:

* **without Redis** every worker would be a separate single node, and a request that
  lands on another worker than the one holding its session would silently start a new
  one. :func:`for_this_process` refuses that layout with a :class:`ConfigError` that says
  what to run instead;
* **with Redis** each worker becomes a cluster member of its own, with a route derived
  from the configured name: ``<name>_w<pid>`` (:func:`worker_route`). Sessions stay exact:
  a request that lands on another worker takes its session over (a Redis round trip), and
  the load balancer templates route every ``<name>_w<N>`` to the server named ``<name>``.
  One log line says that this layout is slower and what to run instead:
  ``clustersess node --workers N`` (one port per worker, see :mod:`clustersess.supervisor`).

Detection looks at the call stacks for the server's own frames (uvicorn's
``Process.target`` in ``uvicorn.supervisors.multiprocess``, which only exists with
``--workers`` above 1; gunicorn's ``Arbiter.spawn_worker``, which a forked worker runs
in), and reads the worker count from them. The probes are a small registry
(:data:`PROBES`); a server not in it is not detected, and two of its workers with one
name then meet the cluster's duplicate-name refusal at start.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from .config import Config

__all__ = ["PROBES", "ServerWorkers", "base_route", "detect", "for_this_process", "is_worker_route", "worker_route"]

log = logging.getLogger("clustersess")

#: ``<base>_w<number>``: a worker's route; the load balancer templates match it
WORKER_ROUTE_RE = re.compile(r"(?P<base>[A-Za-z0-9_]+?)_w(?P<number>[0-9]+)")

#: the longest process id on Linux (pid_max is at most 2**22)
_PID_DIGITS = 7


@dataclasses.dataclass(frozen=True)
class ServerWorkers:
    """This process is one of ``workers`` worker processes that ``server`` runs on one socket."""

    server: str
    workers: int
    #: how to run one worker per port instead, for the messages
    instead: str = ""


def worker_route(base: str, number: int) -> str:
    """The route of worker ``number`` of the server named ``base``: ``base_w<number>``."""
    return f"{base}_w{number}"


def is_worker_route(name: str) -> bool:
    """True for a route of the ``<base>_w<number>`` form."""
    return WORKER_ROUTE_RE.fullmatch(name) is not None


def base_route(name: str) -> str:
    """``node1`` for ``node1_w3`` (and ``node1`` itself): the server a route belongs to."""
    m = WORKER_ROUTE_RE.fullmatch(name)
    return m.group("base") if m else name


# -- detection ----------------------------------------------------------------------------------


def _uvicorn(frame: FrameType) -> ServerWorkers | None:
    # uvicorn.supervisors.multiprocess.Process.target(self, sockets): the worker's main
    # function, only used when uvicorn runs more than one worker.
    config = getattr(frame.f_locals.get("self"), "config", None)
    workers = getattr(config, "workers", None)
    if not isinstance(workers, int):
        return None
    return ServerWorkers("uvicorn", workers, "uvicorn --workers")


def _gunicorn(frame: FrameType) -> ServerWorkers | None:
    # gunicorn.arbiter.Arbiter.spawn_worker(self): the forked worker runs inside it.
    workers = getattr(frame.f_locals.get("self"), "num_workers", None)
    if not isinstance(workers, int):
        return None
    return ServerWorkers("gunicorn", workers, "gunicorn -w")


#: (module, function) of a server's frame -> what it says about this process
PROBES: dict[tuple[str, str], Callable[[FrameType], ServerWorkers | None]] = {
    ("uvicorn.supervisors.multiprocess", "target"): _uvicorn,
    ("gunicorn.arbiter", "spawn_worker"): _gunicorn,
}


def _stacks() -> Iterator[FrameType]:
    """Every frame of this thread's stack, then of the main thread's.

    The main thread's too: the WSGI middleware builds its manager on its own loop thread,
    while the server's frames are on the main thread, which waits for it.
    """
    frames: list[FrameType | None] = [sys._getframe(1)]
    main = threading.main_thread().ident
    if main is not None and main != threading.get_ident():
        frames.append(sys._current_frames().get(main))
    for frame in frames:
        while frame is not None:
            yield frame
            frame = frame.f_back


def detect() -> ServerWorkers | None:
    """Which server runs this process as one of several workers on one socket, if any."""
    for frame in _stacks():
        probe = PROBES.get((frame.f_globals.get("__name__", ""), frame.f_code.co_name))
        if probe is not None:
            found = probe(frame)
            if found is not None:
                return found
    return None


# -- what it means for the node ---------------------------------------------------------------


def for_this_process(config: Config, found: ServerWorkers | None = None) -> Config:
    """``config`` for this process, given the server layout ``found`` (default: detected).

    A single process, or a node name that already is a worker route (set per worker, say
    by a gunicorn ``post_fork`` hook), keeps ``config`` unchanged. One of several workers
    on one socket gets the route ``<node_name>_w<pid>``, if it is clustered.

    Raises:
        ConfigError: several workers without Redis (they cannot share sessions), or a node
            name too long to derive worker routes from.
    """
    found = detect() if found is None else found
    if found is None or found.workers <= 1 or is_worker_route(config.node_name):
        return config
    name, n, server = config.node_name, found.workers, found.server
    run_instead = f"clustersess node --name {name} --workers {n} --port PORT APP"
    if config.redis_url is None:
        raise ConfigError(
            f"{server} runs {n} worker processes on one port, and without Redis each keeps its own "
            "sessions: a request that lands on another worker would lose its session. "
            f"Run `{run_instead}` instead (one port per worker, behind a load balancer; "
            "`clustersess lb-config` writes its config), or set CLUSTERSESS_REDIS_URL so the workers "
            f"share sessions, or run a single worker ({found.instead} 1)"
        )
    if len(name) > 32 - 2 - _PID_DIGITS:
        raise ConfigError(
            f"node name {name!r} is too long to name {server}'s workers after it ({name}_w<pid> must fit "
            f"32 characters): use at most {32 - 2 - _PID_DIGITS} characters (CLUSTERSESS_NODE)"
        )
    route = worker_route(name, os.getpid())
    log.warning(
        "clustersess: %s runs %d workers on one port, so this one is cluster member %s; a request that "
        "lands on another worker than its session's takes the session over through Redis, which is slower "
        "than one worker per port: run `%s` behind the load balancer instead",
        server, n, route, run_instead,
    )  # fmt: skip
    return dataclasses.replace(config, node_name=route)
