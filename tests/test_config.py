"""Config: validation at start-up, ``CLUSTERSESS_*`` environment variables, clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from clustersess import ClusterSessionMiddleware, Config, ConfigError
from tests.utils import REPO_ROOT, base_env


def test_defaults_follow_tomcat() -> None:
    cfg = Config(secret_key="s")
    assert cfg.secret_key == ("s",)
    assert cfg.session_cookie == "JSESSIONID"
    assert cfg.max_inactive == 1800
    assert cfg.max_age is None
    assert (cfg.path, cfg.domain, cfg.same_site, cfg.https_only) == ("/", None, "lax", False)
    assert cfg.redis_url is None


@pytest.mark.parametrize("name", ["node1", "A", "n_2", "x" * 32, "NODE_a_9"])
def test_good_node_names(name: str) -> None:
    assert Config(secret_key="s", node_name=name).node_name == name


@pytest.mark.parametrize("name", ["", "x" * 33, "node.1", "node-1", "node 1", "nöde", "a/b", "n~1", "n;1"])
def test_bad_node_name_is_a_clear_error(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config(secret_key="s", node_name=name)
    message = str(info.value)
    assert repr(name) in message and "CLUSTERSESS_NODE" in message and "A-Z a-z 0-9 _" in message


@pytest.mark.parametrize("secret", [(), [], "", ("",), ("a", "")])
def test_missing_secret_names_the_variable(secret: object) -> None:
    with pytest.raises(ConfigError, match="CLUSTERSESS_SECRET"):
        Config(secret_key=secret)  # type: ignore[arg-type]


def test_from_env_without_secret_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="CLUSTERSESS_SECRET"):
        Config.from_env({})
    with pytest.raises(ConfigError, match="CLUSTERSESS_SECRET"):
        Config.from_env({"CLUSTERSESS_SECRET": ""})
    with pytest.raises(ConfigError, match="CLUSTERSESS_SECRET"):
        Config.from_env({"CLUSTERSESS_SECRET": " , "})


def test_env_vars_are_parsed() -> None:
    env = {
        "CLUSTERSESS_SECRET": "old, new",
        "CLUSTERSESS_NODE": "web_3",
        "CLUSTERSESS_REDIS_URL": "redis://127.0.0.1:6390/1",
        "CLUSTERSESS_COOKIE": "SID",
        "CLUSTERSESS_MAX_INACTIVE": "90.5",
        "CLUSTERSESS_MAX_SIZE": "2048",
        "CLUSTERSESS_HTTPS_ONLY": "true",
        "CLUSTERSESS_REPLICATION": "async",
        "CLUSTERSESS_GC_FREEZE": "0",
    }
    assert Config.from_env({"CLUSTERSESS_SECRET": "s"}).gc_freeze is True
    cfg = Config.from_env(env)
    assert cfg.secret_key == ("old", "new")  # oldest first; the last one signs
    assert cfg.node_name == "web_3"
    assert cfg.redis_url == "redis://127.0.0.1:6390/1"
    assert cfg.session_cookie == "SID"
    assert cfg.max_inactive == 90.5
    assert cfg.max_session_size == 2048
    assert cfg.https_only is True
    assert cfg.replication == "async"
    assert cfg.gc_freeze is False


def test_keywords_win_over_env_and_none_means_not_given() -> None:
    env = {"CLUSTERSESS_SECRET": "from-env", "CLUSTERSESS_NODE": "envnode", "CLUSTERSESS_COOKIE": "ENVC"}
    cfg = Config.from_env(env, secret_key="from-code", node_name="codenode", session_cookie=None)
    assert cfg.secret_key == ("from-code",)
    assert cfg.node_name == "codenode"
    assert cfg.session_cookie == "ENVC"
    assert Config.from_env(env, secret_key=["a", "b"]).secret_key == ("a", "b")


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("CLUSTERSESS_MAX_INACTIVE", "soon"),
        ("CLUSTERSESS_MAX_INACTIVE", "-5"),
        ("CLUSTERSESS_MAX_INACTIVE", "0"),
        ("CLUSTERSESS_MAX_SIZE", "1.5k"),
        ("CLUSTERSESS_HTTPS_ONLY", "maybe"),
        ("CLUSTERSESS_REPLICATION", "eventually"),
        ("CLUSTERSESS_REDIS_URL", "localhost:6379"),
        ("CLUSTERSESS_NODE", "bad.name"),
        ("CLUSTERSESS_COOKIE", "bad cookie"),
    ],
)
def test_bad_env_values_are_config_errors(var: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_env({"CLUSTERSESS_SECRET": "s", var: value})
    assert str(info.value)  # a message, not a bare exception


def test_unparseable_env_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="CLUSTERSESS_MAX_INACTIVE"):
        Config.from_env({"CLUSTERSESS_SECRET": "s", "CLUSTERSESS_MAX_INACTIVE": "soon"})


def test_other_validation() -> None:
    with pytest.raises(ConfigError, match="https_only"):
        Config(secret_key="s", same_site="none")
    assert Config(secret_key="s", same_site="none", https_only=True).same_site == "none"
    with pytest.raises(ConfigError):
        Config(secret_key="s", same_site="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        Config(secret_key="s", path="api")
    # Starlette accepts a max_age of 0 or less (the cookie expires at once); so do we.
    assert (Config(secret_key="s", max_age=0).max_age, Config(secret_key="s", max_age=-1).max_age) == (0, -1)
    with pytest.raises(ConfigError, match="max_age"):
        Config(secret_key="s", max_age=1.5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown"):
        Config.from_env({"CLUSTERSESS_SECRET": "s"}, no_such_option=1)


def test_repr_never_shows_secrets() -> None:
    cfg = Config(secret_key=("hunter2-old", "hunter2-new"), redis_url="redis://user:pw123@db:6379/0")
    text = repr(cfg)
    assert "hunter2" not in text and "pw123" not in text
    assert "<hidden>" in text and "db:6379" in text


def test_middleware_accepts_starlette_keywords() -> None:
    mw = ClusterSessionMiddleware(
        None,
        secret_key="s",
        session_cookie="sid",
        max_age=60,
        path="/app",
        same_site="strict",
        https_only=True,
        domain="example.org",
        node_name="n7",
        max_inactive=30,
    )
    assert mw.manager is not None
    cfg = mw.manager.config
    assert (cfg.session_cookie, cfg.max_age, cfg.path, cfg.same_site, cfg.https_only, cfg.domain) == (
        "sid", 60, "/app", "strict", True, "example.org"
    )  # fmt: skip
    assert (cfg.node_name, cfg.max_inactive) == ("n7", 30)


def test_middleware_accepts_starlette_secret_type() -> None:
    from starlette.datastructures import Secret

    mw = ClusterSessionMiddleware(None, secret_key=Secret("abc"))
    assert mw.manager is not None and mw.manager.config.secret_key == ("abc",)


async def test_middleware_without_secret_fails_lifespan_startup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLUSTERSESS_SECRET", raising=False)
    inner_called = []

    async def app(scope: dict, receive: object, send: object) -> None:  # a lifespan-less app
        inner_called.append(scope["type"])
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()  # type: ignore[operator]
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})  # type: ignore[operator]
                else:
                    await send({"type": "lifespan.shutdown.complete"})  # type: ignore[operator]
                    return

    mw = ClusterSessionMiddleware(app)
    with pytest.raises(ConfigError, match="CLUSTERSESS_SECRET"):
        mw.manager  # noqa: B018
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "lifespan.startup"}

    async def send(message: dict) -> None:
        sent.append(message)

    # startup.failed, then the error itself (TestClient raises it from __enter__; uvicorn
    # has stopped waiting), and the app's own start-up never runs.
    with pytest.raises(ConfigError, match="CLUSTERSESS_SECRET"):
        await mw({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
    assert [m["type"] for m in sent] == ["lifespan.startup.failed"]
    assert "CLUSTERSESS_SECRET" in sent[0]["message"]
    assert inner_called == []
    # A request never reaches the app with no session configured.
    with pytest.raises(ConfigError, match="CLUSTERSESS_SECRET"):
        await mw({"type": "http", "headers": []}, receive, send)


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "clustersess.cli", *args],
        env=base_env(env),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_cli_node_without_secret_exits_naming_the_variable() -> None:
    result = _cli("node", "--name", "n1", "--port", "1")
    assert result.returncode != 0
    assert "CLUSTERSESS_SECRET" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_node_with_bad_name_exits_with_clear_error() -> None:
    result = _cli("node", "--name", "bad.name", "--port", "1", env={"CLUSTERSESS_SECRET": "s"})
    assert result.returncode != 0
    assert "bad.name" in result.stderr and "CLUSTERSESS_NODE" in result.stderr


def test_cli_help_is_useful() -> None:
    result = _cli("--help")
    assert result.returncode == 0
    assert "node" in result.stdout and "CLUSTERSESS_SECRET" in result.stdout
    node_help = _cli("node", "--help")
    assert node_help.returncode == 0
    for option in ("--name", "--port", "--host", "--redis-url", "APP"):
        assert option in node_help.stdout


def test_console_script_is_installed() -> None:
    import shutil

    exe = shutil.which("clustersess")
    if exe is None:
        pytest.skip("package not installed with its console script (pip install -e .)")
    result = subprocess.run([exe, "--help"], env=base_env(), capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0 and "node" in result.stdout


def test_zone_defaults_to_the_host_name_and_comes_from_the_environment() -> None:
    import socket

    assert Config(secret_key="s").zone == socket.gethostname()
    assert Config.from_env({"CLUSTERSESS_SECRET": "s", "CLUSTERSESS_ZONE": "rack-2.dc1"}).zone == "rack-2.dc1"
    assert Config.from_env({"CLUSTERSESS_SECRET": "s"}, zone="eu-west-1a").zone == "eu-west-1a"


@pytest.mark.parametrize("zone", ["rack 1", "a/b", "x" * 65, "zöne"])
def test_bad_zone_is_a_clear_error(zone: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config(secret_key="s", zone=zone)
    assert repr(zone) in str(info.value) and "CLUSTERSESS_ZONE" in str(info.value)
