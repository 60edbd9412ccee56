"""Peer suites: Starlette's and Flask's own session tests, run against clustersess.

The test module is taken at test time from the sdist of the *installed* version of the
framework (``pip download`` into a cache, once per version), never copied into this
repository: what is proven is parity with the framework actually in use. The module is
executed as it is; the test modules that use it swap our middleware in by rebinding a
name in its namespace, and provide the fixtures its conftest would.

Cache: ``$CLUSTERSESS_PEER_CACHE``, else ``~/.cache/clustersess/peer-suites``. Without
network access (and nothing cached) the peer suites skip, or fail under
``CLUSTERSESS_TEST_REQUIRE_ALL``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import subprocess
import sys
import tarfile
import tempfile
import types
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.utils import missing

CACHE = Path(os.environ.get("CLUSTERSESS_PEER_CACHE") or Path.home() / ".cache" / "clustersess" / "peer-suites")


def source(dist: str, member: str) -> tuple[str, str]:
    """(text, a path to show in tracebacks) of ``member`` in the installed ``dist``'s sdist."""
    version = importlib.metadata.version(dist)
    target = CACHE / f"{dist}-{version}" / member
    if not target.exists():
        _fetch(dist, version, member, target)
    return target.read_text(encoding="utf-8"), str(target)


def _fetch(dist: str, version: str, member: str, target: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="clustersess-peer-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
        cmd += ["--disable-pip-version-check", "--dest", tmp, f"{dist}=={version}"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        except subprocess.TimeoutExpired:
            missing(f"the {dist} {version} sdist (pip download timed out)", install="network access to PyPI")
        archives = list(Path(tmp).glob("*.tar.gz"))
        if done.returncode != 0 or not archives:
            missing(
                f"the {dist} {version} sdist for its own tests ({done.stderr.strip()[-300:]})",
                install="network access to PyPI, once (it is cached in " + str(CACHE) + ")",
            )
        with tarfile.open(archives[0]) as tar:
            names = [n for n in tar.getnames() if n.split("/", 1)[-1] == member]
            if not names:
                pytest.fail(f"{member} is not in the {dist} {version} sdist", pytrace=False)
            extracted = tar.extractfile(names[0])
            assert extracted is not None
            data = extracted.read()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_bytes(data)
    partial.replace(target)  # atomic: a concurrent run never reads half a file


def load(name: str, dist: str, member: str, *, stubs: Mapping[str, Mapping[str, Any]] = {}) -> types.ModuleType:
    """Execute the peer module as module ``name``.

    ``stubs`` maps module names the peer imports but that do not exist here (its own
    test helpers) to the attributes they must provide.
    """
    text, filename = source(dist, member)
    module = types.ModuleType(name)
    module.__file__ = filename
    with _stub_modules(stubs):
        exec(compile(text, filename, "exec"), module.__dict__)  # noqa: S102 - the framework's own test code
    return module


@contextlib.contextmanager
def _stub_modules(stubs: Mapping[str, Mapping[str, Any]]) -> Iterator[None]:
    saved = {key: sys.modules.get(key) for key in stubs}
    for key, attrs in stubs.items():
        stub = types.ModuleType(key)
        stub.__dict__.update(attrs)
        sys.modules[key] = stub
    try:
        yield
    finally:
        for key, previous in saved.items():
            if previous is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = previous


def tests_of(module: types.ModuleType, names: Callable[[str], bool] = lambda n: True) -> dict[str, Any]:
    """The module's test functions (with their marks) whose names pass ``names``."""
    return {k: v for k, v in vars(module).items() if k.startswith("test_") and callable(v) and names(k)}


def expect_failure(function: Any, reason: str) -> Any:
    """Mark a peer test as failing for a documented reason (strict: passing is an error)."""
    return pytest.mark.xfail(reason=reason, strict=True)(function)
