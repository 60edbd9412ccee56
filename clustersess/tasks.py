"""Background tasks that survive their own errors.

Every long-running task of a node (receiver, flusher, heartbeat, sweeper, ...) runs under
:func:`supervise`: an unexpected exception is logged and counted, the task's state and
last error are visible in ``status()["tasks"]``, and the task starts again after a
jittered exponential backoff (redis-py's). Cancellation is how tasks stop; it is never
caught. A short-lived task runs under :func:`guarded`, which logs instead of letting an
exception tear down the task group that owns it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from redis.backoff import ExponentialWithJitterBackoff

log = logging.getLogger("clustersess")

T = TypeVar("T")


@dataclasses.dataclass(slots=True)
class TaskInfo:
    name: str
    state: str = "starting"  # running | restarting | finished
    restarts: int = 0
    last_error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "restarts": self.restarts, "last_error": self.last_error}


async def supervise(
    info: TaskInfo,
    factory: Callable[[], Awaitable[Any]],
    *,
    on_error: Callable[[], None] | None = None,
    cap: float = 5.0,
) -> None:
    """Run ``factory()`` again and again until cancelled; restart it after errors."""
    backoff = ExponentialWithJitterBackoff(cap=cap, base=0.05)
    failures = 0
    while True:
        info.state = "running"
        try:
            await factory()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failures += 1
            info.restarts += 1
            info.state = "restarting"
            info.last_error = f"{type(exc).__name__}: {exc}"[:300]
            if on_error is not None:
                on_error()
            log.exception("clustersess: background task %s failed; restarting it", info.name)
            await asyncio.sleep(backoff.compute(failures))
            continue
        info.state = "finished"
        return


async def guarded(coro: Coroutine[Any, Any, T], what: str, on_error: Callable[[], None] | None = None) -> T | None:
    """Await ``coro``; an exception is logged (and counted) and gives None."""
    try:
        return await coro
    except asyncio.CancelledError:
        raise
    except Exception:
        if on_error is not None:
            on_error()
        log.exception("clustersess: %s failed", what)
        return None
