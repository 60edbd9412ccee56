"""Flask's own session and flash tests (from ``tests/test_basic.py`` of the installed
Flask, see :mod:`tests.peer`), every app given ``ClusterSession(app)``.

They run as Flask wrote them, with the fixtures of Flask's conftest (``app`` with
``SECRET_KEY="test key"``, ``client``, ``req_ctx``). Every one passes except where the
session holds values that are not JSON, which clustersess refuses on purpose (README,
"Deliberate differences"); those are marked, strictly. (``test_extended_flashing``
passes: its flashed ``(category, message)`` tuples are read back on the node that holds
the live session object; read from the stored JSON, on another node, they are lists.)
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from flask import Flask
from flask.ctx import RequestContext
from flask.testing import FlaskClient

from clustersess.flask_ext import ClusterSession
from tests import peer

#: Flask's session and flash tests, by name
SESSION_TESTS = {
    "test_session_accessed",
    "test_session_path",
    "test_session_using_application_root",
    "test_session_using_session_settings",
    "test_session_using_samesite_attribute",
    "test_missing_session",
    "test_session_secret_key_fallbacks",
    "test_session_expiration",
    "test_session_stored_last",
    "test_session_special_types",
    "test_session_cookie_setting",
    "test_session_vary_cookie",
    "test_session_refresh_vary",
    "test_flashes",
    "test_extended_flashing",
}
NOT_JSON = "deliberate difference: session values must be JSON"
EXPECTED_FAILURES = {
    # tuples, bytes, Markup, UUID and datetime values (Flask's tagged serializer keeps them)
    "test_session_special_types": NOT_JSON + " (bytes, UUID, datetime are refused)",
}

_module = peer.load("flask_peer_basic", "flask", "tests/test_basic.py")
_tests = peer.tests_of(_module, lambda name: name in SESSION_TESTS)
globals().update(
    {
        name: peer.expect_failure(f, EXPECTED_FAILURES[name]) if name in EXPECTED_FAILURES else f
        for name, f in _tests.items()
    }
)


@pytest.fixture
def app() -> Iterator[Flask]:
    """Flask's conftest ``app``, given ``ClusterSession(app)``."""
    app = Flask("flask_test", root_path=os.path.dirname(peer.source("flask", "tests/test_basic.py")[1]))
    app.config.update(TESTING=True, SECRET_KEY="test key")
    ext = ClusterSession(app)
    yield app
    ext.close()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def req_ctx(app: Flask) -> Iterator[RequestContext]:
    with app.test_request_context() as ctx:
        yield ctx


def test_all_fifteen_were_found() -> None:
    assert set(_tests) == SESSION_TESTS and set(EXPECTED_FAILURES) <= SESSION_TESTS
