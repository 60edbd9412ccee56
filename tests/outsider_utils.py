"""An outsider on the cluster's Redis, and helpers for the tests that use one.

The outsider has what anyone with access to a shared Redis has: a plain ``redis``
client and no secret. It SUBSCRIBEs to the cluster's channels, records real messages,
and PUBLISHes byte-for-byte copies of them (on the same or another channel, now or
later). It never builds or alters a message, so what it can do does not depend on the
wire format; it only needs to tell a message's type and sender apart to pick which one
to copy (:func:`describe`), and that reading is best-effort.
"""

from __future__ import annotations

import contextlib
import dataclasses
import email.utils
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Self

import httpx
import redis

from tests.cluster_utils import FAST, Client, status
from tests.utils import NodeProcess, RedisServer, wait_until

CLUSTER = "clustersess"  # the default cluster_name

__all__ = [
    "CLUSTER",
    "Captured",
    "Outsider",
    "Sniffer",
    "broadcast",
    "clock_offset",
    "counter",
    "describe",
    "direct",
    "faketime_env",
    "members",
    "pending",
    "problems_while",
    "send",
    "start_node",
    "stats",
    "write_all",
]


def broadcast(cluster: str = CLUSTER) -> str:
    """The channel every node of ``cluster`` listens on."""
    return f"{cluster}:all"


def direct(node: str, cluster: str = CLUSTER) -> str:
    """The channel only ``node`` listens on."""
    return f"{cluster}:node:{node}"


# -- reading captured bytes -------------------------------------------------------------

_TYPE_RE = re.compile(rb'"t"\s*:\s*"([a-z_]+)"')
_SRC_RE = re.compile(rb'"src"\s*:\s*"([A-Za-z0-9_]+)"')
_SEQ_RE = re.compile(rb'"seq"\s*:\s*(\d+)')


def describe(data: bytes) -> tuple[str | None, str | None, int | None]:
    """(type, sender, sequence number) of a captured message, as far as it can be read.

    Wire v2 is ``CS2 | 32-byte HMAC | 4-byte header length | header JSON | blobs``, the
    header holding ``t``, ``src`` and ``seq``; v1 was ``<hex MAC><JSON envelope>``. Anything
    else: the fields are looked for in the first bytes.
    """
    header: Any = None
    if data[:3] == b"CS2" and len(data) >= 39:
        hlen = int.from_bytes(data[35:39], "big")
        with contextlib.suppress(ValueError):
            header = json.loads(data[39 : 39 + hlen])
    elif (start := data.find(b"{")) >= 0:
        with contextlib.suppress(ValueError):
            header = json.loads(data[start:])
    if isinstance(header, dict) and isinstance(header.get("t"), str):
        seq = header.get("seq")
        return header["t"], header.get("src"), seq if isinstance(seq, int) else None
    head = data[:4096]  # the envelope's fields come before the (large) body
    t, src, seq = _TYPE_RE.search(head), _SRC_RE.search(head), _SEQ_RE.search(head)
    return (
        t.group(1).decode() if t else None,
        src.group(1).decode() if src else None,
        int(seq.group(1)) if seq else None,
    )


@dataclasses.dataclass(frozen=True)
class Captured:
    """One message as the outsider saw it on Redis."""

    channel: str
    data: bytes
    type: str | None
    src: str | None
    seq: int | None
    at: float  # time.monotonic() when it arrived here


class Sniffer:
    """SUBSCRIBE to ``channels`` in a thread and keep every message (the outsider's tap).

    Survives being disconnected (``CLIENT KILL TYPE pubsub`` hits it too): it
    re-subscribes and goes on; what was published meanwhile is simply not recorded.
    """

    def __init__(self, url: str, channels: Sequence[str]) -> None:
        self._client = redis.Redis.from_url(url)
        self.channels = list(channels)
        self.captured: list[Captured] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._subscribed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outsider-sniffer", daemon=True)

    def start(self) -> Self:
        self._thread.start()
        if not self._subscribed.wait(10):
            raise TimeoutError(f"could not subscribe to {self.channels}")
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(*self.channels)
                self._subscribed.set()
                while not self._stop.is_set():
                    msg = pubsub.get_message(timeout=0.1)
                    if msg is None or msg.get("type") != "message":
                        continue
                    data = msg["data"]
                    channel = msg["channel"].decode() if isinstance(msg["channel"], bytes) else msg["channel"]
                    kind, src, seq = describe(data)
                    with self._lock:
                        self.captured.append(Captured(channel, data, kind, src, seq, time.monotonic()))
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                time.sleep(0.05)  # killed by CLIENT KILL, say: subscribe again
            finally:
                with contextlib.suppress(Exception):
                    pubsub.close()

    def messages(
        self, kind: str | None = None, *, src: str | None = None, channel: str | None = None
    ) -> list[Captured]:
        """What was captured so far, oldest first, optionally of one type/sender/channel."""
        with self._lock:
            found = list(self.captured)
        return [
            c
            for c in found
            if (kind is None or c.type == kind)
            and (src is None or c.src == src)
            and (channel is None or c.channel == channel)
        ]

    def wait_for(
        self,
        kind: str,
        *,
        src: str | None = None,
        channel: str | None = None,
        count: int = 1,
        timeout: float = 15.0,
    ) -> list[Captured]:
        """Wait until at least ``count`` such messages were captured; returns all of them."""
        return wait_until(  # type: ignore[no-any-return]
            lambda: (found := self.messages(kind, src=src, channel=channel)) and len(found) >= count and found,
            timeout=timeout,
            what=f"{count} {kind} message(s) from {src or 'anyone'} on {channel or self.channels}",
        )

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._client.close()


class Outsider:
    """Someone with a Redis password and nothing else: a plain client, no secret."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.redis = redis.Redis.from_url(url)
        self._sniffers: list[Sniffer] = []

    def sniff(self, channels: Sequence[str]) -> Sniffer:
        sniffer = Sniffer(self.url, channels).start()
        self._sniffers.append(sniffer)
        return sniffer

    def publish(self, channel: str, data: bytes) -> int:
        """PUBLISH ``data`` as is; returns how many subscribers received it."""
        return int(self.redis.publish(channel, data))

    def kill_pubsub(self) -> int:
        """``CLIENT KILL TYPE pubsub``: every subscriber connection is dropped at once."""
        return int(self.redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub"))

    @contextlib.contextmanager
    def kill_pubsub_every(self, seconds: float) -> Iterator[list[int]]:
        """Kill every subscriber connection every ``seconds`` while the block runs.

        Yields a list that gets one entry (connections killed) per round.
        """
        rounds: list[int] = []
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(seconds):
                with contextlib.suppress(redis.RedisError):
                    rounds.append(self.kill_pubsub())

        thread = threading.Thread(target=loop, name="outsider-kill-pubsub", daemon=True)
        thread.start()
        try:
            yield rounds
        finally:
            stop.set()
            thread.join(10)

    def close(self) -> None:
        for sniffer in self._sniffers:
            sniffer.close()
        self.redis.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- reading the nodes ------------------------------------------------------------------


def stats(node: NodeProcess) -> dict[str, Any]:
    return status(node)["stats"]  # type: ignore[no-any-return]


def counter(node_stats: Mapping[str, Any], name: str) -> int:
    """A counter of ``/cluster.json`` stats; fails clearly if the node does not have it."""
    assert name in node_stats, f"/cluster.json stats has no counter {name!r} (issue 12 adds it)"
    return int(node_stats[name])


def members(node: NodeProcess) -> dict[str, dict[str, Any]]:
    """The other members ``node`` lists in ``/cluster.json``, by name."""
    return {m["name"]: m for m in status(node)["members"] if not m.get("self")}


def pending(node: NodeProcess) -> int:
    return int(status(node).get("pending_replication", 0))


def problems_while(check: Callable[[], str | None], seconds: float, interval: float = 0.05) -> list[str]:
    """Call ``check`` repeatedly for ``seconds``; return what it reported (None = fine).

    For "this must never happen" properties: a correct node never reports anything, so
    no speed of the machine makes the test fail; a broken one is caught on any poll.
    """
    seen: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            found = check()
        except httpx.HTTPError as exc:
            found = f"status page did not answer: {exc!r}"
        if found and found not in seen:
            seen.append(found)
        time.sleep(interval)
    return seen


# -- starting nodes ---------------------------------------------------------------------


def faketime_env(offset: str) -> dict[str, str]:
    """Environment that runs a process with its wall clock ``offset`` away (``"+15s"``).

    Debian's libfaketime 0.9.10, preloaded directly rather than through the ``faketime``
    wrapper: the wrapper forks, so SIGKILL would hit the wrapper and leave the node
    running. This is what ``faketime -m --exclude-monotonic -f +15s`` sets up: the
    thread-safe library (a node has threads) and CLOCK_MONOTONIC left alone. Without
    that, libfaketime fakes the monotonic clock too (in 0.9.10 it then reads as the
    faked wall clock), which no real host does: clock skew between hosts is a wall-clock
    matter, and each host's monotonic clock is its own anyway.
    """
    lib = next((p for p in _FAKETIME_LIBS if os.path.exists(p)), None)
    assert lib, f"libfaketime is not installed (apt-get install faketime): none of {_FAKETIME_LIBS}"
    return {"LD_PRELOAD": lib, "FAKETIME": offset, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


_FAKETIME_LIBS = (
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/faketime/libfaketimeMT.so.1",
)


def start_node(
    name: str,
    server: RedisServer,
    *,
    env: Mapping[str, str] | None = None,
    clock: str | None = None,
    port: int | None = None,
    wait: bool = True,
) -> NodeProcess:
    """A demo node with the tests' fast timing; ``clock="+15s"`` runs it under faketime.

    The caller kills it (``node.kill()``), or puts it in a list the test kills.
    """
    skew = faketime_env(clock) if clock is not None else {}
    node = NodeProcess(name, port=port, redis_url=server.url, env={**FAST, **(env or {}), **skew})
    node.start(wait=wait)
    return node


def send(user: Client, method: str, node: NodeProcess, path: str, **kw: Any) -> httpx.Response:
    """:meth:`Client.request` that returns an error status instead of asserting on it."""
    headers = {"Cookie": f"JSESSIONID={user.cookie}"} if user.cookie else {}
    user._http.cookies.clear()
    resp = user._http.request(method, node.url + path, headers=headers, **kw)
    for value in resp.headers.get_list("set-cookie"):
        name, _, rest = value.partition("=")
        if name == "JSESSIONID":
            val = rest.split(";")[0]
            user.cookie = None if val == "null" else val
    return resp


def clock_offset(node: NodeProcess) -> float:
    """How far ``node``'s wall clock is from ours, in seconds (from its HTTP Date header,
    so to about a second): the check that faketime took."""
    resp = httpx.get(node.url + "/health", timeout=5.0)
    return email.utils.parsedate_to_datetime(resp.headers["date"]).timestamp() - time.time()


def write_all(
    node: NodeProcess, users: Sequence[Client], bodies: Sequence[dict[str, Any]], *, threads: int = 32
) -> list[int]:
    """POST ``bodies[i]`` as ``users[i]`` to ``node``, concurrently; the status codes
    (0: no answer)."""

    def one(pair: tuple[Client, dict[str, Any]]) -> int:
        user, body = pair
        try:
            return send(user, "POST", node, "/api/session", json=body).status_code
        except httpx.HTTPError:
            return 0

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, zip(users, bodies, strict=True)))
