"""The Redis URL forms (clustersess.redis_url) and their errors, checked at start-up."""

from __future__ import annotations

import pytest

from clustersess import Config, ConfigError
from clustersess.redis_url import parse_redis_url, redact


def test_plain_tls_and_unix_urls() -> None:
    t = parse_redis_url("redis://cache.internal:6380/2")
    assert (t.scheme, t.hosts, t.db, t.tls, t.username, t.password) == (
        "redis",
        (("cache.internal", 6380),),
        2,
        False,
        None,
        None,
    )
    assert parse_redis_url("redis://localhost").hosts == (("localhost", 6379),)
    t = parse_redis_url("rediss://app:s%3Acret@cache:6379/0?ssl_ca_certs=/etc/ca.pem&ssl_cert_reqs=required")
    assert t.tls and t.username == "app" and t.password == "s:cret"
    assert t.connection_kwargs() == {
        "db": 0, "username": "app", "password": "s:cret", "ssl": True,
        "ssl_ca_certs": "/etc/ca.pem", "ssl_cert_reqs": "required",
    }  # fmt: skip
    t = parse_redis_url("unix://:pw@/run/redis/redis.sock?db=3")
    assert (t.scheme, t.path, t.db, t.password, t.username) == ("unix", "/run/redis/redis.sock", 3, "pw", None)
    assert parse_redis_url("redis://[::1]:7000").hosts == (("::1", 7000),)


def test_sentinel_url() -> None:
    t = parse_redis_url("redis+sentinel://:datapw@s1:26379,s2,s3:26380/mymaster/1?sentinel_password=senpw")
    assert t.sentinel and t.service == "mymaster" and t.db == 1
    assert t.hosts == (("s1", 26379), ("s2", 26379), ("s3", 26380))
    assert (t.password, t.sentinel_password, t.sentinel_username) == ("datapw", "senpw", None)
    assert t.sentinel_kwargs() == {"username": None, "password": "senpw"}
    t = parse_redis_url("rediss+sentinel://s1:26379/mymaster?ssl_ca_certs=/ca.pem")
    assert t.tls and t.sentinel_kwargs()["ssl"] is True and t.describe() == "rediss+sentinel://s1:26379/mymaster"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://localhost", "must start with redis://"),
        ("localhost:6379", "no scheme"),
        ("redis+sentinel://s1:26379,s2:26379", "needs the service name"),
        ("redis+sentinel://s1:26379,s2:26379/", "needs the service name"),
        ("redis://a:6379,b:6379", "names one server"),
        ("redis://host:port", "is not a number"),
        ("redis://host:70000", "out of range"),
        ("redis://host/x", "must be a number"),
        ("redis://host/0/1", "at most one database"),
        ("redis://secret@host", "without a ':'"),
        ("redis://host?ssl_ca_certs=/ca.pem", "need a rediss://"),
        ("rediss://host?ssl_cert_reqs=maybe", "ssl_cert_reqs must be one of"),
        ("rediss://host?ssl_check_hostname=perhaps", "true or false"),
        ("redis://host?socket_timeout=5", "set by clustersess itself"),
        ("redis://host?sentinel_password=x", r"Sentinel credentials are for redis\+sentinel"),
        ("rediss://host?ssl_cert_req=none", "unknown option 'ssl_cert_req'"),
        ("unix://", "needs the socket path"),
        ("redis+sentinel://,s2/mymaster", "empty host"),
    ],
)
def test_bad_urls_say_how_to_fix_them(url: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_redis_url(url)


def test_config_refuses_a_bad_url_at_start_up_without_echoing_it() -> None:
    with pytest.raises(ConfigError, match="needs the service name") as info:
        Config(secret_key=("s",), redis_url="redis+sentinel://:hunter2@s1:26379")
    assert "hunter2" not in str(info.value)
    env = {"CLUSTERSESS_SECRET": "s", "CLUSTERSESS_REDIS_URL": "redis+sentinel://s1,s2,s3/mymaster"}
    assert Config.from_env(env).redis_url == "redis+sentinel://s1,s2,s3/mymaster"


def test_credentials_never_show() -> None:
    assert redact("redis://u:hunter2@h:1/0") == "redis://***@h:1/0"
    assert (
        redact("redis+sentinel://:a@s1,s2/m?sentinel_password=b")
        == "redis+sentinel://***@s1,s2/m?sentinel_password=***"
    )
    assert redact("unix:///run/r.sock?db=1") == "unix:///run/r.sock?db=1"
    cfg = Config(secret_key=("s",), redis_url="rediss+sentinel://:pw1@s1/m?sentinel_password=pw2")
    assert "pw1" not in repr(cfg) and "pw2" not in repr(cfg)
