"""The Redis ACL recipe of docs/redis-acl.md, against a real redis-server and real nodes.

The rules are read from the document, so the recipe and the test cannot drift apart. The
server has only an administrator (for the test) and the application's user; the default
user is off. Run against every distinct ``redis-server`` found (PATH, and Debian's 7.x).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.cluster_utils import FAST, Client, status, wait_members
from tests.utils import REPO_ROOT, NodeProcess, RedisServer, wait_until

pytestmark = pytest.mark.timeout(120)

#: how Redis 6.2 and 7.x word a refusal (a command, a key, a channel, a key in a script)
REFUSED = "NOPERM|permission|can't access"

DOC = REPO_ROOT / "docs" / "redis-acl.md"
PASSWORD = "acl-test-password-7d1e4b"
ADMIN = ("admin", "acl-test-admin-password")


def recipe_rules() -> tuple[str, list[str]]:
    """(user name, rules) of the ``ACL SETUSER`` line in docs/redis-acl.md."""
    line = next(ln for ln in DOC.read_text().splitlines() if ln.startswith("ACL SETUSER "))
    _, _, user, *rules = line.split()
    return user, [f">{PASSWORD}" if r.startswith(">") else r for r in rules]


def _version(exe: str) -> str:
    out = subprocess.run([exe, "--version"], check=False, capture_output=True, text=True, timeout=10).stdout
    found = re.search(r"v=(\d+\.\d+\.\d+)", out)
    return found.group(1) if found else "unknown"


def _servers() -> list[tuple[str, str]]:
    seen: dict[str, str] = {}
    for exe in (shutil.which("redis-server"), "/usr/bin/redis-server"):
        if exe and Path(exe).exists():
            seen.setdefault(_version(exe), exe)
    return sorted(seen.items())


@pytest.fixture(params=_servers(), ids=lambda p: f"redis-{p[0]}")
def acl_redis(request: pytest.FixtureRequest) -> Iterator[tuple[RedisServer, str]]:
    """A redis-server whose only users are the recipe's and an administrator."""
    _, exe = request.param
    server = RedisServer(executable=exe).start()
    try:
        admin = redis.Redis(host=server.host, port=server.port)
        user, rules = recipe_rules()
        admin.execute_command("ACL", "SETUSER", user, *rules)
        admin.execute_command("ACL", "SETUSER", ADMIN[0], "on", f">{ADMIN[1]}", "~*", "&*", "+@all")
        admin.execute_command("ACL", "SETUSER", "default", "off")
        admin.close()
        yield server, user
    finally:
        server.cleanup()


def _admin(server: RedisServer) -> redis.Redis:
    return redis.Redis(host=server.host, port=server.port, username=ADMIN[0], password=ADMIN[1])


def test_a_cluster_runs_as_the_recipes_user_and_that_user_can_do_nothing_else(
    acl_redis: tuple[RedisServer, str],
) -> None:
    server, user = acl_redis
    url = f"redis://{user}:{PASSWORD}@{server.host}:{server.port}/0"
    admin = _admin(server)
    admin.execute_command("ACL", "LOG", "RESET")
    nodes = [NodeProcess(f"node{i}", redis_url=url, env=FAST) for i in (1, 2)]
    try:
        for node in nodes:
            node.start()
        wait_members(nodes, 2)
        node1, node2 = nodes
        user_a, user_b = Client(), Client()
        user_a.post(node1, {"who": "a"})
        user_a.incr(node1)
        user_b.post(node2, {"who": "b"})
        assert user_b.get(node1)["node"] == "node1"  # a takeover: FETCH, reply, OWNED
        wait_until(lambda: status(node1)["pending_replication"] == 0, timeout=10, what="acked")
        claims = sorted(k.decode() for k in admin.keys("*"))
        node1.kill(signal.SIGKILL)  # failover: node2 adopts node1's sessions
        assert user_a.get(node2)["data"] == {"who": "a", "n": 1}
        assert user_b.get(node2)["data"] == {"who": "b"}
        denied = [
            (str(e.get(b"reason", b""), "ascii"), str(e.get(b"object", b""), "ascii"))
            for e in _acl_log(admin)
            if e.get(b"username") == user.encode()
        ]
        # redis-py's CLIENT SETINFO at connect, refused and ignored (docs/redis-acl.md)
        unexpected = [d for d in denied if d != ("command", "client")]
        assert not unexpected, f"the recipe refuses something a node does: {unexpected}"
        assert claims and all(k.startswith("clustersess:") for k in claims), claims
    finally:
        for node in nodes:
            node.kill()

    app = redis.Redis(host=server.host, port=server.port, username=user, password=PASSWORD)
    assert app.ping()
    admin.set("other:key", "secret")
    for forbidden in (
        lambda: app.get("other:key"),
        lambda: app.set("other:key", "x"),
        lambda: app.delete("other:key"),
        lambda: app.publish("other:all", b"x"),
        lambda: app.publish("clustersess2:all", b"x"),
        lambda: app.eval("return redis.call('GET', KEYS[1])", 1, "other:key"),
        lambda: app.eval("return redis.call('SET', 'other:key', 'x')", 0),
        lambda: app.keys("*"),
        lambda: app.flushall(),
        lambda: app.config_get("*"),
        lambda: app.client_list(),
    ):
        with pytest.raises(redis.ResponseError, match=REFUSED):
            forbidden()
    sub = app.pubsub()
    with pytest.raises(redis.ResponseError, match=REFUSED):
        sub.subscribe("other:all")
        sub.get_message(timeout=2.0)
    sub.close()
    assert admin.get("other:key") == b"secret"
    # and what it may do, it may do only on its own cluster's names
    assert app.publish("clustersess:all", b"not a message") >= 0
    app.close()
    admin.close()


def _acl_log(admin: redis.Redis) -> list[dict[bytes, object]]:
    """ACL LOG entries as dicts (RESP2 gives flat lists, RESP3 maps)."""
    entries = admin.execute_command("ACL", "LOG", "128")
    out = []
    for entry in entries:
        if isinstance(entry, dict):
            out.append({(k if isinstance(k, bytes) else str(k).encode()): v for k, v in entry.items()})
        else:
            it = iter(entry)
            out.append({(k if isinstance(k, bytes) else str(k).encode()): v for k, v in zip(it, it)})
    return out
