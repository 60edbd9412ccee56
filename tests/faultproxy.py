"""A fault-injecting TCP proxy for tests: one listening port in front of one upstream.

The proxy runs in the test process, on an event loop in a thread of its own, and is
steered from the test while connections are open:

* :meth:`FaultProxy.forward` ("pass"): bytes flow both ways (the initial mode).
* :meth:`FaultProxy.blackhole`: every connection stays open (no FIN, no RST) but the bytes
  of one or both directions vanish silently: the "NAT dropped it / cable cut" case. New
  connections are accepted and connected upstream, and get the same treatment (so a
  client that reconnects finds the link just as dead).
* :meth:`FaultProxy.drop`: every current connection is closed now (RST by default) and
  new ones are refused (nothing listens) or accepted and closed at once.
* :meth:`FaultProxy.delay`: every chunk is held this long before it is passed on, in order.
* :meth:`FaultProxy.heal`: all of the above off.

What it cannot model: TCP keepalive. The proxy's own kernel answers a client's keepalive
probes, so a blackholed link looks alive to keepalive; only application-level checks
(read timeouts, PINGs) can notice it. Losing packets for real needs iptables/tc.

Healing a blackhole: a real network never delivers a stream with a hole in it. TCP either
retransmits the lost bytes (the cable is back) or the peer resets the connection (the NAT
forgot it). A userspace proxy that threw bytes away cannot retransmit them, so
:meth:`heal` resets every connection that lost bytes (the NAT case) and resumes the ones
that lost nothing.

Counters (:meth:`FaultProxy.stats`) say how many bytes went each way or were dropped and
how many connections were accepted, are open, or were closed by a fault.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import struct
import threading
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

__all__ = ["Direction", "FaultProxy", "ProxyStats"]

Direction = Literal["both", "c2s", "s2c"]  # c2s: client -> server (upstream), s2c: back

_T = TypeVar("_T")
_CHUNK = 65536
_CALL_TIMEOUT = 10.0  # no control call may hang a test


@dataclasses.dataclass(frozen=True, slots=True)
class ProxyStats:
    """A snapshot of one proxy's counters."""

    accepted: int  # connections accepted from clients
    open: int  # connections open right now
    refused: int  # connections accepted during a drop and closed at once
    upstream_failures: int  # accepted, but the upstream refused (closed at once)
    closed_by_fault: int  # open connections closed by drop() or by heal() (they lost bytes)
    bytes_c2s: int  # forwarded client -> upstream
    bytes_s2c: int  # forwarded upstream -> client
    dropped_c2s: int  # read from the client and thrown away (blackhole)
    dropped_s2c: int  # read from the upstream and thrown away (blackhole)


@dataclasses.dataclass(eq=False)
class _Pipe:
    """One direction of one connection: a reader, a FIFO of timed chunks, a writer."""

    name: Literal["c2s", "s2c"]
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    queue: asyncio.Queue[tuple[float, bytes] | None] = dataclasses.field(default_factory=asyncio.Queue)
    eof: bool = False  # the reading side sent FIN (or broke)


@dataclasses.dataclass(eq=False)
class _Conn:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    pipes: tuple[_Pipe, _Pipe]
    tasks: list[asyncio.Task[None]] = dataclasses.field(default_factory=list)
    damaged: bool = False  # bytes were thrown away: the stream has a hole
    closed: bool = False


class FaultProxy:
    """A TCP proxy from ``host:port`` (default: a free port on 127.0.0.1) to ``upstream``.

    Use it as a context manager, or call :meth:`start` and :meth:`close` (idempotent);
    ``close`` stops the thread and closes every socket. Control methods may be called
    from any thread while connections are open; each returns once the fault is in force.
    """

    def __init__(self, upstream: tuple[str, int], *, host: str = "127.0.0.1", port: int = 0, name: str = "") -> None:
        self.upstream = upstream
        self.host = host
        self.port = port
        self.name = name or f"faultproxy->{upstream[0]}:{upstream[1]}"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._tasks: set[asyncio.Task[None]] = set()  # every task of this proxy, for close()
        # the fault in force; read by the pumps on every chunk
        self._blackholed: set[str] = set()
        self._delay = 0.0
        self._dropping = False
        self._reset = True
        self._closing = False
        # counters (changed only on the loop thread)
        self._accepted = self._refused = self._upstream_failures = self._closed_by_fault = 0
        self._bytes = {"c2s": 0, "s2c": 0}
        self._dropped = {"c2s": 0, "s2c": 0}

    # -- life cycle -----------------------------------------------------------------------
    def start(self) -> Self:
        assert self._thread is None, "already started"
        loop = asyncio.new_event_loop()
        self._loop = loop
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()
        ready.wait(_CALL_TIMEOUT)
        try:
            self._call(self._listen)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Close the listener and every connection, stop the loop, join the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if thread.is_alive():
            with contextlib.suppress(Exception):
                self._call(self._shutdown)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(_CALL_TIMEOUT)
        if not thread.is_alive():
            loop.close()
        self._loop = None
        self._thread = None

    def __enter__(self) -> Self:
        if self._thread is None:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- faults -----------------------------------------------------------------------------
    def forward(self) -> None:
        """"pass": bytes flow both ways and new connections are accepted (delay unchanged)."""
        self._call(self._set_forward)

    def blackhole(self, direction: Direction = "both") -> None:
        """Silently throw away the bytes of ``direction`` on every connection, now and new."""
        assert direction in ("both", "c2s", "s2c"), direction
        dirs: set[str] = {"c2s", "s2c"} if direction == "both" else {direction}

        async def apply() -> None:
            await self._set_forward()
            self._blackholed = dirs

        self._call(apply)

    def drop(self, *, refuse: bool = True, reset: bool = True) -> None:
        """Close every open connection now (with an RST if ``reset``, else a FIN).

        New connections are refused while the drop lasts (``refuse=True``: nothing
        listens on the port), or accepted and closed at once (``refuse=False``).
        """

        async def apply() -> None:
            self._dropping, self._reset = True, reset
            for conn in list(self._conns):
                self._closed_by_fault += 1
                self._close_conn(conn, reset=reset)
            if refuse and self._server is not None:
                self._server.close()
                self._server = None

        self._call(apply)

    def delay(self, seconds: float) -> None:
        """Hold every chunk ``seconds`` before passing it on (order is kept); 0 turns it off."""
        assert seconds >= 0, seconds

        async def apply() -> None:
            self._delay = float(seconds)

        self._call(apply)

    def heal(self) -> None:
        """Turn every fault off. Connections that lost bytes in a blackhole are reset (a
        stream with a hole cannot go on; see the module docstring); the others resume."""

        async def apply() -> None:
            await self._set_forward()
            self._delay = 0.0
            for conn in list(self._conns):
                if conn.damaged:
                    self._closed_by_fault += 1
                    self._close_conn(conn, reset=True)

        self._call(apply)

    def stats(self) -> ProxyStats:
        async def snapshot() -> ProxyStats:
            return ProxyStats(
                accepted=self._accepted,
                open=len(self._conns),
                refused=self._refused,
                upstream_failures=self._upstream_failures,
                closed_by_fault=self._closed_by_fault,
                bytes_c2s=self._bytes["c2s"],
                bytes_s2c=self._bytes["s2c"],
                dropped_c2s=self._dropped["c2s"],
                dropped_s2c=self._dropped["s2c"],
            )

        return self._call(snapshot)

    # -- on the loop thread -----------------------------------------------------------------
    def _call(self, fn: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
        assert self._loop is not None and self.running, "the proxy is not running"
        return asyncio.run_coroutine_threadsafe(fn(), self._loop).result(_CALL_TIMEOUT)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._on_client, self.host, self.port, reuse_address=True)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _set_forward(self) -> None:
        self._blackholed = set()
        self._dropping = False
        if self._server is None:
            await self._listen()  # the same port again (SO_REUSEADDR)

    async def _shutdown(self) -> None:
        self._closing = True
        if self._server is not None:
            self._server.close()
            self._server = None
        for conn in list(self._conns):
            self._close_conn(conn, reset=False)
        current = asyncio.current_task()
        pending = [t for t in self._tasks if t is not current]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=2.0)

    def _close_conn(self, conn: _Conn, *, reset: bool) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._conns.discard(conn)
        for writer in (conn.client, conn.upstream):
            _close_writer(writer, reset=reset)
        current = asyncio.current_task()
        for task in conn.tasks:
            if task is not current:
                task.cancel()

    async def _on_client(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(creader, cwriter)
        except asyncio.CancelledError:
            # close() cancels the handlers; asyncio's start_server callback would log a
            # cancelled handler as an error, so the handler ends quietly, and only then.
            if not self._closing:
                raise
        finally:
            self._tasks.discard(task)

    async def _serve(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        self._accepted += 1
        if self._dropping:
            self._refused += 1
            _close_writer(cwriter, reset=self._reset)
            return
        try:
            ureader, uwriter = await asyncio.wait_for(asyncio.open_connection(*self.upstream), 5.0)
        except (OSError, TimeoutError):
            self._upstream_failures += 1
            _close_writer(cwriter, reset=True)
            return
        if self._dropping:  # a drop began while we connected upstream
            self._refused += 1
            _close_writer(cwriter, reset=self._reset)
            _close_writer(uwriter, reset=self._reset)
            return
        conn = _Conn(
            client=cwriter,
            upstream=uwriter,
            pipes=(_Pipe("c2s", creader, uwriter), _Pipe("s2c", ureader, cwriter)),
        )
        self._conns.add(conn)
        for pipe in conn.pipes:
            for coro in (self._read(conn, pipe), self._write(conn, pipe)):
                task = asyncio.create_task(coro)
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                conn.tasks.append(task)
        await asyncio.gather(*conn.tasks, return_exceptions=True)
        self._close_conn(conn, reset=False)

    async def _read(self, conn: _Conn, pipe: _Pipe) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    data = await pipe.reader.read(_CHUNK)
                except OSError:
                    data = b""
                if not data:
                    break
                if pipe.name in self._blackholed:
                    self._dropped[pipe.name] += len(data)
                    conn.damaged = True
                    continue
                pipe.queue.put_nowait((loop.time() + self._delay, data))
        finally:
            pipe.eof = True
        if pipe.name in self._blackholed:
            # The FIN is lost in the blackhole too: the other side never hears of it, and
            # the connection is reset when the blackhole heals.
            conn.damaged = True
            return
        pipe.queue.put_nowait(None)

    async def _write(self, conn: _Conn, pipe: _Pipe) -> None:
        loop = asyncio.get_running_loop()
        while True:
            item = await pipe.queue.get()
            if item is None:
                # The reading side closed: pass the FIN on, and when both directions are
                # finished the connection is closed.
                with contextlib.suppress(OSError, RuntimeError):
                    if pipe.writer.can_write_eof():
                        pipe.writer.write_eof()
                other = conn.pipes[1] if pipe is conn.pipes[0] else conn.pipes[0]
                if other.eof:
                    self._close_conn(conn, reset=False)
                return
            due, data = item
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if pipe.name in self._blackholed:  # the fault began while the chunk waited
                self._dropped[pipe.name] += len(data)
                conn.damaged = True
                continue
            try:
                pipe.writer.write(data)
                await pipe.writer.drain()
            except (OSError, RuntimeError):
                self._close_conn(conn, reset=True)
                return
            self._bytes[pipe.name] += len(data)


def _close_writer(writer: asyncio.StreamWriter, *, reset: bool) -> None:
    """Close a connection: with an RST (SO_LINGER 0, then abort) or with a FIN."""
    transport = writer.transport
    if reset:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    else:
        transport.close()
