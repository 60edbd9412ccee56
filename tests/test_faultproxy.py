"""The fault-injecting proxy (tests/faultproxy.py) against a real redis-server."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.faultproxy import FaultProxy
from tests.utils import RedisServer, wait_until

pytestmark = pytest.mark.timeout(60)

TCP_ESTABLISHED = 1  # tcpi_state, the first byte of struct tcp_info (linux/tcp.h)


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[FaultProxy]:
    with FaultProxy((redis_server.host, redis_server.port)) as p:
        yield p


def connect(proxy: FaultProxy, timeout: float = 2.0) -> socket.socket:
    sock = socket.create_connection(proxy.address, timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def command(sock: socket.socket, *args: str) -> bytes:
    """Send one RESP command and return the first chunk of the reply."""
    parts = [f"*{len(args)}\r\n".encode()]
    for a in args:
        parts.append(f"${len(a.encode())}\r\n{a}\r\n".encode())
    sock.sendall(b"".join(parts))
    return sock.recv(4096)


def established(sock: socket.socket) -> bool:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == TCP_ESTABLISHED


def closed_by_peer(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True if the peer closed the connection (EOF or RST) within ``timeout``."""
    sock.settimeout(timeout)
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def client_of(host: str, port: int, timeout: float = 2.0) -> redis.Redis:
    """redis-py, the client the nodes use, without its default retries (they would hide the fault)."""
    return redis.Redis(
        host=host, port=port, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0)
    )


def direct(server: RedisServer) -> redis.Redis:
    return client_of(server.host, server.port)


def test_ping_goes_through_and_is_counted(proxy: FaultProxy) -> None:
    with connect(proxy) as sock:
        assert command(sock, "PING") == b"+PONG\r\n"
        wait_until(lambda: proxy.stats().bytes_s2c == 7, timeout=5, what="the reply to be counted")
        stats = proxy.stats()
        assert (stats.accepted, stats.open) == (1, 1)
        assert stats.bytes_c2s == len(b"*1\r\n$4\r\nPING\r\n")
        assert (stats.dropped_c2s, stats.dropped_s2c) == (0, 0)
    client = client_of(proxy.host, proxy.port)
    try:
        assert client.ping()
        assert client.set("k", "v") and client.get("k") == b"v"
    finally:
        client.close()
    wait_until(lambda: proxy.stats().open == 0, timeout=5, what="closed connections to be forgotten")


def test_blackhole_times_the_client_out_while_the_socket_stays_established(
    proxy: FaultProxy, redis_server: RedisServer
) -> None:
    with connect(proxy) as sock:
        assert command(sock, "PING") == b"+PONG\r\n"
        clients_before = direct(redis_server).info("clients")["connected_clients"]
        proxy.blackhole()
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            command(sock, "PING")
        # No FIN and no RST reached either end: both connections are still there.
        assert established(sock)
        assert direct(redis_server).info("clients")["connected_clients"] == clients_before
        stats = proxy.stats()
        assert stats.open == 1 and stats.closed_by_fault == 0
        assert stats.dropped_c2s == len(b"*1\r\n$4\r\nPING\r\n")
        # A client that connects now gets a connection that is just as dead.
        client = client_of(proxy.host, proxy.port, 0.5)
        try:
            with pytest.raises(redis.TimeoutError):
                client.ping()
        finally:
            client.close()


@pytest.mark.parametrize("direction", ["c2s", "s2c"])
def test_blackhole_one_way(proxy: FaultProxy, redis_server: RedisServer, direction: str) -> None:
    """c2s: the command never reaches Redis. s2c: Redis runs it, the reply is lost."""
    with connect(proxy) as sock:
        assert command(sock, "PING") == b"+PONG\r\n"
        proxy.blackhole(direction)  # type: ignore[arg-type]
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            command(sock, "SET", "k", direction)
        applied = direct(redis_server).get("k")
        assert applied == (direction.encode() if direction == "s2c" else None)
        assert established(sock)
        stats = proxy.stats()
        if direction == "c2s":
            assert stats.dropped_c2s > 0 and stats.dropped_s2c == 0
        else:
            wait_until(lambda: proxy.stats().dropped_s2c == len(b"+OK\r\n"), timeout=5, what="the lost reply")
            assert proxy.stats().dropped_c2s == 0


def test_a_client_fin_is_lost_in_the_blackhole_too(proxy: FaultProxy, redis_server: RedisServer) -> None:
    r = direct(redis_server)
    baseline = r.info("clients")["connected_clients"]
    sock = connect(proxy)
    assert command(sock, "PING") == b"+PONG\r\n"
    proxy.blackhole()
    sock.close()
    time.sleep(0.3)
    assert r.info("clients")["connected_clients"] == baseline + 1  # Redis never heard the FIN
    proxy.heal()  # the connection lost bytes (its FIN): reset
    wait_until(
        lambda: r.info("clients")["connected_clients"] == baseline, timeout=5, what="Redis to see the reset"
    )


@pytest.mark.parametrize("refuse", [True, False], ids=["refuse", "accept-and-close"])
def test_drop_closes_open_connections_and_new_ones(proxy: FaultProxy, refuse: bool) -> None:
    with connect(proxy) as sock:
        assert command(sock, "PING") == b"+PONG\r\n"
        proxy.drop(refuse=refuse)
        assert closed_by_peer(sock)
    assert proxy.stats().closed_by_fault == 1
    if refuse:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(proxy.address, timeout=2.0).close()
    else:
        # Accepted, then reset at once: the RST may even beat connect()'s own return.
        try:
            late = connect(proxy)
        except ConnectionResetError:
            pass
        else:
            with late:
                assert closed_by_peer(late)
        wait_until(lambda: proxy.stats().refused == 1, timeout=5, what="the refused connection to be counted")
    client = client_of(proxy.host, proxy.port)
    try:
        with pytest.raises(redis.ConnectionError):
            client.ping()
    finally:
        client.close()
    proxy.heal()
    with connect(proxy) as sock:
        assert command(sock, "PING") == b"+PONG\r\n"


def test_drop_with_fin_is_an_eof(proxy: FaultProxy) -> None:
    with connect(proxy) as sock:
        assert command(sock, "PING") == b"+PONG\r\n"
        proxy.drop(reset=False)
        sock.settimeout(5.0)
        assert sock.recv(4096) == b""  # an orderly EOF, not ECONNRESET


def test_delay_adds_latency_each_way_and_keeps_order(proxy: FaultProxy) -> None:
    client = client_of(proxy.host, proxy.port, 10.0)
    try:
        assert client.ping()  # connected before the delay
        proxy.delay(0.3)
        started = time.monotonic()
        assert client.ping()
        assert time.monotonic() - started >= 0.59  # 0.3 s out and 0.3 s back; a lower bound only
        # Many chunks in flight at once come out in the order they went in.
        replies: list[int] = []

        def pipeline() -> None:
            pipe = client.pipeline(transaction=False)
            for _ in range(200):
                pipe.incr("order")
            replies.extend(pipe.execute())

        thread = threading.Thread(target=pipeline)
        thread.start()
        thread.join(30)
        assert replies == list(range(1, 201))
        # forward() ("pass") ends a blackhole but keeps the delay; heal() would end both.
        proxy.blackhole()
        proxy.forward()
        started = time.monotonic()
        assert client.ping()
        assert time.monotonic() - started >= 0.59
        proxy.delay(0)
        assert client.ping()
    finally:
        client.close()


def test_heal_resumes_intact_connections_and_resets_those_that_lost_bytes(proxy: FaultProxy) -> None:
    with connect(proxy) as lost, connect(proxy) as intact:
        assert command(lost, "PING") == b"+PONG\r\n"
        assert command(intact, "PING") == b"+PONG\r\n"
        proxy.blackhole()
        lost.settimeout(0.5)
        with pytest.raises(TimeoutError):
            command(lost, "PING")
        proxy.heal()
        assert closed_by_peer(lost)
        intact.settimeout(5.0)
        assert command(intact, "PING") == b"+PONG\r\n"
        with connect(proxy) as fresh:
            assert command(fresh, "PING") == b"+PONG\r\n"
    assert proxy.stats().closed_by_fault == 1


def test_upstream_down_closes_the_client_connection(redis_server: RedisServer) -> None:
    with FaultProxy((redis_server.host, redis_server.port)) as proxy:
        redis_server.stop()
        with connect(proxy) as sock:
            assert closed_by_peer(sock)
        wait_until(lambda: proxy.stats().upstream_failures == 1, timeout=5, what="the failure to be counted")


def test_close_stops_the_thread_and_every_socket(redis_server: RedisServer) -> None:
    proxy = FaultProxy((redis_server.host, redis_server.port), name="faultproxy-under-test").start()
    sock = connect(proxy)
    assert command(sock, "PING") == b"+PONG\r\n"
    proxy.blackhole()
    proxy.close()
    proxy.close()  # idempotent
    assert not proxy.running
    assert "faultproxy-under-test" not in {t.name for t in threading.enumerate()}
    assert closed_by_peer(sock)
    sock.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(proxy.address, timeout=2.0).close()


def test_the_context_manager_cleans_up_when_the_body_fails(redis_server: RedisServer) -> None:
    proxy = FaultProxy((redis_server.host, redis_server.port), name="faultproxy-failing")
    with pytest.raises(RuntimeError, match="boom"), proxy:
        connect(proxy).close()
        raise RuntimeError("boom")
    assert not proxy.running
    assert "faultproxy-failing" not in {t.name for t in threading.enumerate()}
