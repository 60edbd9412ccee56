"""Starlette's own session tests (``tests/middleware/test_session.py`` of the installed
Starlette, see :mod:`tests.peer`) with ``ClusterSessionMiddleware`` in place of
``SessionMiddleware``.

Twice: with Starlette's settings (``session_cookie="session"``, ``max_age`` 14 days) every
test passes; with our defaults (``JSESSIONID``, a browser-session cookie) the tests that
fail are marked, each with the entry of README's "Deliberate differences" that says why
(strict: a marked test that passes fails the run, so the list stays true).
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
from starlette.testclient import TestClient

from clustersess import ClusterSessionMiddleware
from tests import peer

STARLETTE_SETTINGS = {"session_cookie": "session", "max_age": 14 * 24 * 3600}

# The entries of README's "Deliberate differences" the failures with our defaults follow from.
COOKIE_NAME = "deliberate difference: the cookie is JSESSIONID by default, not 'session' (the test names it)"
NO_MAX_AGE = "deliberate difference: no Max-Age by default (a browser-session cookie, as in Tomcat)"
EXPECTED_WITH_OUR_DEFAULTS = {
    "test_session": NO_MAX_AGE,
    "test_session_expires": COOKIE_NAME,
    "test_session_cookie": COOKIE_NAME,
}


def _suite(name: str, defaults: dict[str, Any]) -> dict[str, Any]:
    module = peer.load(
        name,
        "starlette",
        "tests/middleware/test_session.py",
        stubs={"tests.types": {"TestClientFactory": TestClient}},  # the peer's own typing helper
    )

    def middleware(app: Any, **options: Any) -> ClusterSessionMiddleware:
        return ClusterSessionMiddleware(app, **{**defaults, **options})

    module.SessionMiddleware = middleware  # what every Middleware(SessionMiddleware, ...) builds
    return peer.tests_of(module)


@pytest.fixture
def test_client_factory() -> Any:
    """What Starlette's conftest provides (asyncio backend)."""
    return functools.partial(TestClient)


class TestWithStarlettesSettings:
    """``ClusterSessionMiddleware(app, session_cookie="session", max_age=14 days, ...)``."""

    locals().update({k: staticmethod(f) for k, f in _suite("starlette_peer_settings", STARLETTE_SETTINGS).items()})


class TestWithOurDefaults:
    """``ClusterSessionMiddleware(app, ...)`` with the test's own keywords only."""

    locals().update(
        {
            k: staticmethod(
                peer.expect_failure(f, EXPECTED_WITH_OUR_DEFAULTS[k]) if k in EXPECTED_WITH_OUR_DEFAULTS else f
            )
            for k, f in _suite("starlette_peer_defaults", {}).items()
        }
    )


def test_the_expected_failures_name_real_tests() -> None:
    assert set(EXPECTED_WITH_OUR_DEFAULTS) <= set(vars(TestWithOurDefaults))
