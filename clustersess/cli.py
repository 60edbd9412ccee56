"""The ``clustersess`` command: argument parsing only; it builds config and hands over."""

from __future__ import annotations

import os
import sys

import click

from .config import Config
from .errors import ConfigError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "CLUSTERSESS"})
@click.version_option(package_name="clustersess")
def main() -> None:
    """Tomcat-style session clustering for Python web apps.

    Nodes keep sessions in memory, replicate each change to one backup node over Redis
    pub/sub, and take sessions over when a node dies. Configuration comes from
    CLUSTERSESS_* environment variables (CLUSTERSESS_SECRET, CLUSTERSESS_NODE,
    CLUSTERSESS_REDIS_URL, ...).
    """


@main.command()
@click.option("--name", envvar="CLUSTERSESS_NODE", default="node1", show_default=True, help="Node name (route).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=int, default=9091, show_default=True, help="Port to bind.")
@click.option("--redis-url", envvar="CLUSTERSESS_REDIS_URL", default=None, help="Redis for replication.")
@click.option("--replication", type=click.Choice(["sync", "async"]), envvar="CLUSTERSESS_REPLICATION", default=None)
@click.option("--log-level", default="info", show_default=True)
@click.argument("app", default="demo_app:app")
def node(
    name: str, host: str, port: int, redis_url: str | None, replication: str | None, log_level: str, app: str
) -> None:
    """Run APP (default: the test.jsp demo) as one cluster node under uvicorn + uvloop."""
    os.environ["CLUSTERSESS_NODE"] = name
    if redis_url:
        os.environ["CLUSTERSESS_REDIS_URL"] = redis_url
    if replication:
        os.environ["CLUSTERSESS_REPLICATION"] = replication
    try:
        Config.from_env()  # fail fast, with the variable's name, before starting a server
    except ConfigError as exc:
        click.echo(f"clustersess: {exc}", err=True)
        sys.exit(2)
    import uvicorn

    uvicorn.run(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        log_level=log_level,
        log_config=_log_config(log_level),
        lifespan="on",
    )


def _log_config(level: str) -> dict[str, object]:
    """uvicorn's logging setup, plus the ``clustersess`` loggers on the same handler."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["clustersess"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return config


@main.command()
@click.option("--nodes", type=click.IntRange(1, 32), default=3, show_default=True, help="How many nodes.")
@click.option("--port-base", type=int, default=9090, show_default=True, help="nodeK listens on PORT_BASE+K.")
@click.option("--lb", type=click.Choice(["auto", "haproxy", "nginx", "none"]), default="auto", show_default=True,
              help="Load balancer in front of the nodes (auto: HAProxy, else nginx, if installed).")
@click.option("--lb-port", type=int, default=None, help="Load balancer port  [default: PORT_BASE]")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address everything binds to.")
def demo(nodes: int, port_base: int, lb: str, lb_port: int | None, host: str) -> None:
    """Run Redis, N test.jsp nodes and a sticky load balancer here; Ctrl-C stops them all.

    Redis: CLUSTERSESS_REDIS_URL if set, else a Redis >= 7 on PATH, else the one the
    'demo' extra installs. The secret: CLUSTERSESS_SECRET, else a random one per run.
    """
    from .demo import DemoError, DemoOptions, run

    try:
        options = DemoOptions(nodes=nodes, port_base=port_base, lb=lb, lb_port=lb_port, host=host)  # type: ignore[arg-type]
    except DemoError as exc:
        raise click.UsageError(str(exc)) from None
    sys.exit(run(options))


if __name__ == "__main__":  # pragma: no cover
    main()
