"""Load balancer configurations: rendered from the templates in ``clustersess/templates/``.

The demo renders these templates for its local nodes, and ``deploy/haproxy.cfg`` and
``deploy/nginx.conf`` are the same templates rendered for three nodes (checked by
``tests/test_lb.py``), so the configuration an operator copies is the one the tests run.

Template syntax, deliberately tiny: ``{{name}}`` is replaced by a value, and a line that
mentions a per-node placeholder (``{{node}}`` or ``{{address}}``) is repeated once per node,
and a line starting with ``##`` is a note about the template itself and is dropped.

Routing: a server named ``node1`` gets the cookies whose route is ``node1`` and those of
its workers, ``node1_w<N>`` (:mod:`clustersess.workers`: a server that runs several
workers on one port makes each its own member). ``clustersess node --workers N`` instead
gives every worker its own port, so each worker is a server of its own, ``node1_w1``,
``node1_w2``, ...; :func:`render` refuses a mix of both in one configuration.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Literal

from .config import ROUTE_RE
from .workers import base_route

Kind = Literal["haproxy", "nginx"]
KINDS: tuple[Kind, ...] = ("haproxy", "nginx")

#: template file (in clustersess/templates/) and shipped file name (in deploy/) per kind
FILES: dict[Kind, str] = {"haproxy": "haproxy.cfg", "nginx": "nginx.conf"}

_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
_PER_NODE = frozenset({"node", "address"})


@dataclasses.dataclass(frozen=True)
class Backend:
    """One node behind the load balancer: its name (the route) and where it listens."""

    name: str
    host: str
    port: int

    def __post_init__(self) -> None:
        assert ROUTE_RE.fullmatch(self.name), f"node name {self.name!r} is not a valid route"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def template(kind: Kind) -> str:
    """The raw template text for ``kind``."""
    return resources.files("clustersess").joinpath("templates", FILES[kind]).read_text(encoding="utf-8")


def render(kind: Kind, backends: Sequence[Backend], *, listen: str, cookie: str = "JSESSIONID") -> str:
    """The ``kind`` configuration for ``backends``, accepting clients on ``listen``.

    ``listen`` is ``host:port`` or ``:port`` (HAProxy) / ``port`` (nginx).

    Raises:
        ValueError: two nodes with one name, a node whose routes another one's would
            catch (``node1`` and ``node1_w2``), or a cookie name nginx cannot read.
    """
    assert backends, "a load balancer needs at least one node"
    names = {b.name for b in backends}
    if len(names) != len(backends):
        raise ValueError("every node needs its own name: " + ", ".join(sorted(b.name for b in backends)))
    shadowed = sorted(b.name for b in backends if b.name != base_route(b.name) and base_route(b.name) in names)
    if shadowed:
        raise ValueError(
            f"{', '.join(shadowed)} would also match the server {base_route(shadowed[0])!r}, which gets "
            "every <name>_w<N> route (its workers'): rename one of them"
        )
    # nginx reads the cookie as the variable $cookie_<name>: letters, digits and '_' only
    if not re.fullmatch(r"\w{1,64}", cookie):
        raise ValueError(f"cookie name {cookie!r} cannot be routed on (nginx): use letters, digits and _ only")
    values = {"listen": listen, "cookie": cookie}
    out: list[str] = []
    for line in template(kind).splitlines(keepends=True):
        if line.lstrip().startswith("##"):
            continue
        names = set(_PLACEHOLDER.findall(line))
        if names & _PER_NODE:
            out.extend(_fill(line, {**values, "node": b.name, "address": b.address}) for b in backends)
        else:
            out.append(_fill(line, values))
    return "".join(out)


def node_lines(kind: Kind, backends: Sequence[Backend], *, cookie: str = "JSESSIONID") -> list[str]:
    """Only the lines of ``kind``'s configuration that name the nodes, unindented: what to
    add to a configuration of your own for ``backends`` (same checks as :func:`render`)."""
    render(kind, backends, listen="-", cookie=cookie)
    out: list[str] = []
    for line in template(kind).splitlines():
        if not line.lstrip().startswith("##") and set(_PLACEHOLDER.findall(line)) & _PER_NODE:
            values = {"cookie": cookie, "listen": "-"}
            out.extend(_fill(line, {**values, "node": b.name, "address": b.address}).strip() for b in backends)
    return out


def parse_backend(spec: str) -> Backend:
    """``NAME=HOST:PORT`` (what ``clustersess lb-config`` takes) as a :class:`Backend`.

    Raises:
        ValueError: with what is wrong and the expected form.
    """
    name, sep, address = spec.partition("=")
    host, colon, port = address.rpartition(":")
    if not sep or not colon or not host:
        raise ValueError(f"{spec!r} is not NAME=HOST:PORT (e.g. node1=10.0.0.11:9091)")
    if not ROUTE_RE.fullmatch(name):
        raise ValueError(f"node name {name!r} in {spec!r} is not a route: 1-32 characters from A-Z a-z 0-9 _")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"port {port!r} in {spec!r} is not a TCP port")
    return Backend(name, host, int(port))


def _fill(line: str, values: dict[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        try:
            return values[m.group(1)]
        except KeyError:
            raise KeyError(f"unknown placeholder {m.group(0)} in an LB template") from None

    return _PLACEHOLDER.sub(sub, line)


# -- the shipped deploy/ files --------------------------------------------------------------

#: what deploy/ is rendered for: the docker-compose services node1..node3 on 9091..9093
DEPLOY_BACKENDS = tuple(Backend(f"node{i}", f"node{i}", 9090 + i) for i in (1, 2, 3))
DEPLOY_LISTEN: dict[Kind, str] = {"haproxy": ":9090", "nginx": "9090"}
#: where ``clustersess lb-config`` listens unless told
DEFAULT_LISTEN: dict[Kind, str] = {"haproxy": ":80", "nginx": "80"}


def render_deploy(kind: Kind) -> str:
    """The exact text of ``deploy/<file>`` for ``kind``."""
    return render(kind, DEPLOY_BACKENDS, listen=DEPLOY_LISTEN[kind])


def write_deploy_files(directory: str | Path) -> list[Path]:
    """Regenerate ``deploy/haproxy.cfg`` and ``deploy/nginx.conf`` after editing a template."""
    written = []
    for kind in KINDS:
        path = Path(directory) / FILES[kind]
        path.write_text(render_deploy(kind), encoding="utf-8")
        written.append(path)
    return written


# -- running one ----------------------------------------------------------------------------


def find(kind: Kind) -> str | None:
    """Path of the ``haproxy`` or ``nginx`` binary, or None (Debian puts them in /usr/sbin)."""
    return shutil.which(kind) or shutil.which(kind, path="/usr/sbin:/usr/local/sbin:/sbin")


def command(kind: Kind, binary: str, config_path: Path) -> list[str]:
    """The foreground command line that runs ``config_path``.

    nginx's relative paths (pid, logs, temp files) resolve against the config's directory.
    """
    if kind == "haproxy":
        return [binary, "-db", "-f", str(config_path)]
    return [binary, "-p", f"{config_path.parent}/", "-c", str(config_path), "-e", "stderr", "-g", "daemon off;"]


if __name__ == "__main__":  # pragma: no cover - maintainer tool: python -m clustersess.lb deploy/
    import sys

    for written_path in write_deploy_files(sys.argv[1] if len(sys.argv) > 1 else "deploy"):
        print(f"wrote {written_path}")
