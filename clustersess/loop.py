"""A private asyncio event loop in a daemon thread, for synchronous (WSGI) servers.

The async core (:class:`~clustersess.manager.SessionManager` and the cluster layer) runs
on this loop unchanged, so the wire protocol is written once. Request threads hand it
coroutines and block on the result; everything that touches the manager's state runs on
the loop thread, never in a request thread.
"""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def _default_loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    # uvloop (a dependency on POSIX) makes the thread hand-off cheaper; asyncio otherwise.
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows
        return asyncio.new_event_loop
    return uvloop.new_event_loop


class LoopThread:
    """An event loop running forever in its own daemon thread until :meth:`stop`.

    A daemon thread, so a server that exits without calling :meth:`stop` is not kept
    alive by it; the WSGI middleware stops it (after handing sessions over) at exit.
    """

    def __init__(
        self, *, name: str = "clustersess-loop", loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    ) -> None:
        self.loop = (loop_factory or _default_loop_factory())()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        try:
            self.loop.run_forever()
        finally:
            # Whatever is still pending (a request's close() after a timeout, say) is
            # cancelled and awaited, so nothing is left half-run when the loop closes.
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            if pending:
                self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self.loop.is_closed()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result (or exception) here.

        Raises:
            TimeoutError: it did not finish within ``timeout`` seconds; it is cancelled.
        """
        assert threading.current_thread() is not self._thread, "LoopThread.run() called from its own loop: deadlock"
        # Leaner than asyncio.run_coroutine_threadsafe (no concurrent Future, no chained
        # callbacks): this round trip is paid twice per request.
        done = threading.Lock()
        done.acquire()
        box: list[asyncio.Task[T]] = []

        def start() -> None:
            task = self.loop.create_task(coro)
            box.append(task)
            task.add_done_callback(lambda _: done.release())

        try:
            self.loop.call_soon_threadsafe(start)
        except RuntimeError:  # the loop is closed
            coro.close()
            raise
        if not done.acquire(timeout=-1 if timeout is None else timeout):
            self.loop.call_soon_threadsafe(lambda: box[0].cancel())
            raise TimeoutError(f"clustersess: the session manager did not answer within {timeout}s")
        return box[0].result()

    def call(self, fn: Callable[..., T], *args: Any, timeout: float | None = None) -> T:
        """Run the plain function ``fn(*args)`` on the loop thread and return its result."""

        async def call() -> T:
            return fn(*args)

        return self.run(call(), timeout)

    def describe_tasks(self, timeout: float = 1.0) -> str:
        """Where every task on the loop is waiting (for a diagnostic after a timeout)."""

        def describe() -> str:
            out = io.StringIO()
            for task in asyncio.all_tasks(self.loop):
                out.write(f"{task.get_name()}:\n")
                task.print_stack(limit=8, file=out)
            return out.getvalue()

        try:
            return self.call(describe, timeout=timeout)
        except TimeoutError:
            return "(the loop thread is busy)"

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop (cancelling what is left on it) and wait for the thread to end."""
        if self.loop.is_closed():
            return
        try:
            self.loop.call_soon_threadsafe(self.loop.stop)
        except RuntimeError:  # closed meanwhile
            return
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
