"""Flask integration: ``flask.session`` is the clustered session.

::

    from flask import Flask, session
    from clustersess.flask_ext import ClusterSession

    app = Flask(__name__)
    ClusterSession(app, node_name="node1")  # secret etc. from keywords or CLUSTERSESS_*

    @app.post("/login")
    def login():
        session.rotate()  # anti-fixation: new ID, same data
        session["user"] = "ann"
        return "ok"

:class:`ClusterSession` wraps ``app.wsgi_app`` in :class:`ClusterSessionWSGIMiddleware`
(which opens the session, holds the per-session lock and writes the cookie) and installs
a :class:`ClusterSessionInterface` that hands Flask the session the middleware opened and
commits it in ``save_session``, so a commit error (a session over ``max_session_size``)
becomes Flask's own 500 response (``errorhandler(500)`` sees it as ``original_exception``).
(The module is not called ``flask.py`` so it never shadows the ``flask`` package.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flask import Flask, Request, Response
from flask.sessions import NullSession, SessionInterface

from .wsgi import _STATE_KEY, SESSION_KEY, ClusterSessionWSGIMiddleware, WSGISession

if TYPE_CHECKING:  # pragma: no cover
    from .manager import SessionManager

__all__ = ["ClusterSession", "ClusterSessionInterface", "FlaskSession"]


class FlaskSession(WSGISession):
    """The clustered session with the attributes Flask code expects (``SessionMixin``).

    * ``permanent``: kept in the ``"_permanent"`` key as Flask does. The cookie lifetime
      comes from ``max_age`` and the server-side lifetime from ``max_inactive``, not
      from ``app.permanent_session_lifetime``.
    * ``modified``: always true and assignable (``session.modified = True`` after
      changing a nested value is harmless): the node compares the committed JSON itself,
      so nested changes are never missed.
    * ``new``: same as ``is_new``. ``accessed`` is set by Flask's request context.
    """

    __slots__ = ()  # the middleware assigns the class in place (see WSGISession)

    @property
    def permanent(self) -> bool:
        return bool(self.get("_permanent", False))

    @permanent.setter
    def permanent(self, value: bool) -> None:
        self["_permanent"] = bool(value)

    @property
    def modified(self) -> bool:
        return True

    @modified.setter
    def modified(self, value: bool) -> None:
        pass  # changes are detected by comparing the committed JSON

    @property
    def new(self) -> bool:
        return self.is_new


class NoClusterSession(NullSession):
    """Stands in for the session when a request did not pass through the middleware."""

    def _fail(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            "clustersess: no session in this request context: the request did not go through "
            "the clustersess WSGI middleware (app.test_request_context() does not run "
            "app.wsgi_app; use app.test_client(), or check that app.wsgi_app was not replaced "
            "after ClusterSession(app))."
        )

    __setitem__ = __delitem__ = clear = pop = popitem = update = setdefault = _fail


class ClusterSessionInterface(SessionInterface):
    """Hands Flask the session the middleware opened; commits it in ``save_session``."""

    null_session_class = NoClusterSession
    pickle_based = False

    def __init__(self, middleware: ClusterSessionWSGIMiddleware) -> None:
        self.middleware = middleware

    def open_session(self, app: Flask, request: Request) -> FlaskSession | None:  # type: ignore[override]
        session: FlaskSession | None = request.environ.get(SESSION_KEY)
        if session is None:
            return None  # Flask falls back to make_null_session()
        assert isinstance(session, FlaskSession), "ClusterSession passes session_class=FlaskSession"
        return session

    def save_session(self, app: Flask, session: Any, response: Response) -> None:
        if self.is_null_session(session):
            return
        from flask import request

        if _STATE_KEY in request.environ:
            self.middleware.commit(request.environ)


class ClusterSession:
    """Flask extension: ``ClusterSession(app, **options)`` or ``ClusterSession(**options).init_app(app)``.

    Options are those of :class:`ClusterSessionWSGIMiddleware` (every :class:`Config`
    field as a keyword, else ``CLUSTERSESS_*`` variables). One extension object serves one
    app; ``app.extensions["clustersess"]`` is the extension, ``.manager`` the manager.

    Raises:
        ConfigError: at construction (with ``app``) or in ``init_app``, naming the setting.
    """

    def __init__(self, app: Flask | None = None, **options: Any) -> None:
        self.options = options
        self.middleware: ClusterSessionWSGIMiddleware | None = None
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        assert self.middleware is None, "one ClusterSession serves one app; create another for a second app"
        options = {"session_class": FlaskSession, **self.options}
        self.middleware = ClusterSessionWSGIMiddleware(app.wsgi_app, **options)
        app.wsgi_app = self.middleware  # type: ignore[method-assign]
        app.session_interface = ClusterSessionInterface(self.middleware)
        app.extensions["clustersess"] = self

    @property
    def manager(self) -> SessionManager:
        assert self.middleware is not None, "call init_app(app) first"
        return self.middleware.manager

    def close(self) -> None:
        """Hand sessions over and stop the node (also done at exit and on SIGTERM)."""
        if self.middleware is not None:
            self.middleware.close()
