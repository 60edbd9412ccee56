"""The ``clustersess`` command: argument parsing only; it builds config and hands over."""

from __future__ import annotations

import os
import sys

import click

from . import lb
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
@click.option("--port", type=int, default=9091, show_default=True, help="Port to bind (the first one, with --workers).")
@click.option("--workers", type=click.IntRange(1, 256), default=1, show_default=True,
              help="Worker processes, on ports PORT..PORT+N-1, one cluster member each (NAME_w1, NAME_w2, ...), "
                   "supervised: a worker that dies is restarted.")  # fmt: skip
@click.option("--redis-url", envvar="CLUSTERSESS_REDIS_URL", default=None, help="Redis for replication.")
@click.option("--replication", type=click.Choice(["sync", "async"]), envvar="CLUSTERSESS_REPLICATION", default=None)
@click.option("--zone", envvar="CLUSTERSESS_ZONE", default=None,
              help="Failure domain for backup placement  [default: the host name]")  # fmt: skip
@click.option("--log-level", default="info", show_default=True)
@click.argument("app", default="demo_app:app")
def node(
    name: str,
    host: str,
    port: int,
    workers: int,
    redis_url: str | None,
    replication: str | None,
    zone: str | None,
    log_level: str,
    app: str,
) -> None:
    """Run APP (default: the test.jsp demo) as one cluster node under uvicorn + uvloop.

    With --workers N, run N such nodes on N ports instead, for N cores: each is its own
    cluster member, the load balancer routes every session to the worker that owns it, and
    the lines to give it are printed at start (see also: clustersess lb-config).
    """
    os.environ["CLUSTERSESS_NODE"] = name
    if redis_url:
        os.environ["CLUSTERSESS_REDIS_URL"] = redis_url
    if replication:
        os.environ["CLUSTERSESS_REPLICATION"] = replication
    if zone:
        os.environ["CLUSTERSESS_ZONE"] = zone
    try:
        config = Config.from_env()  # fail fast, with the variable's name, before starting a server
    except ConfigError as exc:
        click.echo(f"clustersess: {exc}", err=True)
        sys.exit(2)
    if workers > 1:
        from .supervisor import Supervisor, SupervisorError, WorkerPlan

        if config.redis_url is None:
            click.echo(
                f"clustersess: {workers} workers need Redis to share their sessions: set CLUSTERSESS_REDIS_URL "
                "(or --redis-url)",
                err=True,
            )
            sys.exit(2)
        try:
            plan = WorkerPlan(name=name, workers=workers, host=host, port=port, app=app, log_level=log_level)
            status = Supervisor(plan).run()
        except SupervisorError as exc:
            raise click.UsageError(str(exc)) from None
        sys.exit(status)
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
@click.option("--workers", type=click.IntRange(1, 16), default=1, show_default=True,
              help="Workers per node (clustersess node --workers): nodeK_w1.. on consecutive ports.")  # fmt: skip
@click.option("--port-base", type=int, default=9090, show_default=True,
              help="Node ports start at PORT_BASE+1 (nodeK on PORT_BASE+K with one worker each).")  # fmt: skip
@click.option("--lb", type=click.Choice(["auto", "haproxy", "nginx", "none"]), default="auto", show_default=True,
              help="Load balancer in front of the nodes (auto: HAProxy, else nginx, if installed).")
@click.option("--lb-port", type=int, default=None, help="Load balancer port  [default: PORT_BASE]")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address everything binds to.")
def demo(nodes: int, workers: int, port_base: int, lb: str, lb_port: int | None, host: str) -> None:
    """Run Redis, N test.jsp nodes and a sticky load balancer here; Ctrl-C stops them all.

    Redis: CLUSTERSESS_REDIS_URL if set, else a Redis >= 7 on PATH, else the one the
    'demo' extra installs. The secret: CLUSTERSESS_SECRET, else a random one per run.
    """
    from .demo import DemoError, DemoOptions, run

    try:
        options = DemoOptions(nodes=nodes, workers=workers, port_base=port_base, lb=lb, lb_port=lb_port, host=host)  # type: ignore[arg-type]
    except DemoError as exc:
        raise click.UsageError(str(exc)) from None
    sys.exit(run(options))


@main.command("lb-config")
@click.option("--lb", "kind", type=click.Choice(["haproxy", "nginx"]), required=True, help="Which load balancer.")
@click.option("--listen", default=None, help="Where it accepts clients  [default: :80 (HAProxy), 80 (nginx)]")
@click.option("--cookie", envvar="CLUSTERSESS_COOKIE", default="JSESSIONID", show_default=True,
              help="The session cookie's name.")  # fmt: skip
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write the configuration here instead of to stdout.")  # fmt: skip
@click.argument("nodes", nargs=-1, required=True, metavar="NODE=HOST:PORT...")
def lb_config(kind: lb.Kind, listen: str | None, cookie: str, output: str | None, nodes: tuple[str, ...]) -> None:
    """Print the shipped HAProxy or nginx configuration for these nodes.

    Each NODE is a node name, exactly as the node calls itself (with `clustersess node
    --workers N`, NAME_w1 ... NAME_wN, one per port, as it prints at start). A server
    named NAME also gets the routes of its workers when several share its port
    (NAME_w<pid>, under uvicorn --workers or gunicorn -w). Example:

        clustersess lb-config --lb haproxy node1=10.0.0.11:9091 node2=10.0.0.12:9091
    """
    try:
        backends = [lb.parse_backend(spec) for spec in nodes]
        text = lb.render(kind, backends, listen=listen or lb.DEFAULT_LISTEN[kind], cookie=cookie)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if output is None:
        click.echo(text, nl=False)
    else:
        with open(output, "w", encoding="utf-8") as f:
            f.write(text)
        click.echo(f"wrote {output} ({kind}, {len(backends)} node(s))", err=True)


if __name__ == "__main__":  # pragma: no cover
    main()
