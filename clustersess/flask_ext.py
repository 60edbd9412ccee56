"""Flask integration: ``flask.session`` is the clustered session.

::

    from flask import Flask, session
    from clustersess.flask_ext import ClusterSession

    app = Flask(__name__)
    app.secret_key = "..."      # or CLUSTERSESS_SECRET, the same on every node
    ClusterSession(app)         # node name, Redis etc. from keywords or CLUSTERSESS_*

    @app.post("/login")
    def login():
        session.rotate()  # anti-fixation: new ID, same data
        session["user"] = "ann"
        return "ok"

:class:`ClusterSessionInterface` is a real Flask :class:`~flask.sessions.SessionInterface`
over a :class:`~clustersess.threaded.ThreadedNode`: Flask opens the session when it pushes
a request context (so ``app.test_request_context()`` has one too) and saves it after the
``after_request`` functions; a commit error (a session over ``max_session_size``) becomes
Flask's own 500 response (``errorhandler(500)`` sees it as ``original_exception``). It
reads the app's session settings per request, as Flask's ``SecureCookieSessionInterface``
does. (The module is not called ``flask.py`` so it never shadows the ``flask`` package.)
"""

from __future__ import annotations

import logging
import os
from typing import Any, cast

from flask import Flask, Request, Response
from flask.globals import request as current_request
from flask.sessions import NullSession, SessionInterface, SessionMixin

from .config import Config
from .cookies import DELETE, KEEP, CookieAction, find_cookie
from .errors import ConfigError, ReplicationUnavailable
from .manager import SessionManager
from .threaded import Opened, ThreadedNode, WSGISession

__all__ = ["ClusterSession", "ClusterSessionInterface", "FlaskSession"]

log = logging.getLogger("clustersess")

#: environ key: the requests' holds on their sessions, oldest first
_OPENED_KEY = "clustersess.flask.opened"

#: Config fields that Flask's own settings decide for a Flask node
_FLASK_DECIDES = {
    "max_age": "PERMANENT_SESSION_LIFETIME and session.permanent",
    "path": "SESSION_COOKIE_PATH (or APPLICATION_ROOT)",
    "domain": "SESSION_COOKIE_DOMAIN",
    "same_site": "SESSION_COOKIE_SAMESITE",
    "https_only": "SESSION_COOKIE_SECURE",
    "partitioned": "SESSION_COOKIE_PARTITIONED",
}


class FlaskSession(WSGISession):
    """The clustered session with the attributes Flask code expects (``SessionMixin``'s).

    * ``permanent``: kept in the ``"_permanent"`` key as Flask does; a permanent
      session's cookie lasts ``PERMANENT_SESSION_LIFETIME``. On the server every
      session lasts ``max_inactive`` since its last use.
    * ``modified``: set by a change to the dict in this request, as in Flask; assign it
      True after changing a nested value to re-send the cookie (the change itself is
      stored anyway: the node compares the committed JSON).
    * ``accessed``: set by Flask when the request uses ``flask.session``.
    * ``new``: same as ``is_new``.
    """

    __slots__ = ()  # the node assigns the class in place (see WSGISession)

    @property
    def permanent(self) -> bool:
        return bool(self.get("_permanent", False))

    @permanent.setter
    def permanent(self, value: bool) -> None:
        self["_permanent"] = bool(value)

    @property
    def new(self) -> bool:
        return self.is_new


# Flask's type for a session; FlaskSession has its interface but not its layout (a
# dict subclass with slots cannot also be a SessionMixin, which has none).
SessionMixin.register(FlaskSession)


class NoClusterSession(NullSession):
    """Stands in for the session when the app has no secret key, as Flask's does."""


class ClusterSessionInterface(SessionInterface):
    """Flask's session interface over a :class:`ThreadedNode`.

    Cookie name: the cluster's ``session_cookie`` if it was set explicitly (a keyword, or
    ``CLUSTERSESS_COOKIE``), because every node of a cluster must use the same one; else
    the app's ``SESSION_COOKIE_NAME``. Every other cookie attribute, the cookie lifetime
    and, unless the cluster's secret was set explicitly, the signing keys come from the
    app's config, read per request.
    """

    null_session_class = NoClusterSession
    pickle_based = False

    def __init__(self, node: ThreadedNode, *, cookie_name: str | None, follow_app_keys: bool) -> None:
        self.node = node
        self._cookie_name = cookie_name
        self._follow_app_keys = follow_app_keys
        self._keys = node.config.secret_key

    def get_cookie_name(self, app: Flask) -> str:
        return self._cookie_name or app.config["SESSION_COOKIE_NAME"]

    def open_session(self, app: Flask, request: Request) -> SessionMixin | None:
        if self._follow_app_keys and not self._use_app_keys(app):
            return None  # no secret key: Flask's null session, and its error message
        cookie = find_cookie(request.headers.get("Cookie", ""), self.get_cookie_name(app))
        try:
            opened = self.node.open(cookie)
        except ReplicationUnavailable:
            # refuse mode, and the session is on a member that did not answer: a null
            # session for this request, which the before_request hook answers with 503
            return _UnavailableSession()
        request.environ.setdefault(_OPENED_KEY, []).append(opened)
        session = opened.session
        assert isinstance(session, FlaskSession), "ClusterSession uses session_class=FlaskSession"
        return cast(SessionMixin, session)

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        opened = self._held(current_request.environ, session)
        if opened is None:
            return  # saved already (Flask saves once; a test's session_transaction twice)
        try:
            action = self.node.commit(opened)
        except ReplicationUnavailable as exc:  # on_replication_failure="refuse"
            _refuse(response, exc)
            action = exc.action if isinstance(exc.action, CookieAction) else KEEP
            if action is KEEP:
                return  # (a rotation that did happen still sends the new cookie below)
        assert isinstance(session, FlaskSession)
        if session.accessed or action is not KEEP:
            response.vary.add("Cookie")
        if action is not KEEP or self.should_set_cookie(app, session):
            _make_private(response)
        if action is DELETE:
            response.delete_cookie(
                self.get_cookie_name(app),
                domain=self.get_cookie_domain(app),
                path=self.get_cookie_path(app),
                secure=self.get_cookie_secure(app),
                partitioned=self.get_cookie_partitioned(app),
                samesite=self.get_cookie_samesite(app),
                httponly=self.get_cookie_httponly(app),
            )
            return
        # Flask's rule on top of the node's: a change, or a permanent session under
        # SESSION_REFRESH_EACH_REQUEST, re-sends the cookie (with a renewed expiry).
        if action is KEEP and (session.is_new or not self.should_set_cookie(app, session)):
            return
        response.set_cookie(
            self.get_cookie_name(app),
            self.node.cookie_value(opened),
            expires=self.get_expiration_time(app, session),
            httponly=self.get_cookie_httponly(app),
            domain=self.get_cookie_domain(app),
            path=self.get_cookie_path(app),
            secure=self.get_cookie_secure(app),
            partitioned=self.get_cookie_partitioned(app),
            samesite=self.get_cookie_samesite(app),
        )
        response.vary.add("Cookie")

    def release(self, exc: BaseException | None = None) -> None:
        """Teardown: give up the oldest session this request context still holds.

        A request context whose session was never saved (``test_request_context()``, a
        failure before the response) must not keep it locked. Oldest first, because a
        context opens its own session before anything else may.
        """
        held = current_request.environ.get(_OPENED_KEY)
        while held:
            opened = held.pop(0)
            if not opened.handle.closed or opened.locked:
                self.node.release(opened)
                return

    def _held(self, environ: dict[str, Any], session: SessionMixin) -> Opened | None:
        held: list[Opened] = environ.get(_OPENED_KEY, [])
        for opened in held:
            if opened.session is session and not opened.handle.closed:
                return opened
        return None

    def _use_app_keys(self, app: Flask) -> bool:
        """Sign with the app's keys, as Flask would; False if it has none."""
        if not app.secret_key:
            return False
        keys = _app_keys(app)
        if keys != self._keys:
            self._keys = keys
            self.node.call(self.node.manager.signer.set_keys, keys)
        return True


def _make_private(response: Response) -> None:
    """:func:`clustersess.cookies.make_private` for a Flask response."""
    cc = response.cache_control
    if not (cc.private or cc.no_store):
        cc.public = False
        cc.s_maxage = None
        cc.private = True


def _app_keys(app: Flask) -> tuple[str, ...]:
    """``SECRET_KEY_FALLBACKS`` then ``SECRET_KEY``: oldest first, the last one signs."""
    keys = [*(app.config.get("SECRET_KEY_FALLBACKS") or ()), app.secret_key]
    return tuple(k.decode() if isinstance(k, bytes) else str(k) for k in keys if k)


class ClusterSession:
    """Flask extension: ``ClusterSession(app, **options)`` or ``ClusterSession(**options).init_app(app)``.

    Options are :class:`Config` fields as keywords (``node_name``, ``redis_url``,
    ``max_inactive``, ...), else ``CLUSTERSESS_*`` variables, plus the node's
    ``request_timeout``, ``shutdown_timeout``, ``handle_signals``, ``clock``,
    ``transport`` and ``listeners`` (see :class:`~clustersess.threaded.ThreadedNode`).
    Where the app's config and the cluster's must agree:

    * the secret: the cluster's (``secret_key=`` or ``CLUSTERSESS_SECRET``) if given, as
      it must be the same on every node; else ``SECRET_KEY_FALLBACKS`` + ``SECRET_KEY``;
    * the cookie name: the cluster's (``session_cookie=`` or ``CLUSTERSESS_COOKIE``) if
      given; else ``SESSION_COOKIE_NAME``.

    Cookie attributes come from Flask's ``SESSION_COOKIE_*`` settings only; passing one
    of the middleware's (``path=``, ``domain=``, ``max_age=``...) is an error. One
    extension object serves one app; ``app.extensions["clustersess"]`` is the extension,
    ``.manager`` the manager.

    Raises:
        ConfigError: at construction (with ``app``) or in ``init_app``, naming the setting.
    """

    def __init__(self, app: Flask | None = None, **options: Any) -> None:
        self.options = options
        self.node: ThreadedNode | None = None
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        assert self.node is None, "one ClusterSession serves one app; create another for a second app"
        options = dict(self.options)
        wrong = sorted(set(options) & set(_FLASK_DECIDES))
        if wrong:
            hints = "; ".join(f"{name}: {_FLASK_DECIDES[name]}" for name in wrong)
            raise ConfigError(f"on a Flask node the app's config decides the cookie attributes ({hints})")
        node_options = {
            key: options.pop(key)
            for key in ("clock", "transport", "listeners", "request_timeout", "shutdown_timeout", "handle_signals")
            if key in options
        }
        given = {key: value for key, value in options.items() if value is not None}
        config = Config.from_env(**{**_flask_defaults(app, options), **given})
        cookie_name = config.session_cookie if _given(options, "session_cookie", "CLUSTERSESS_COOKIE") else None
        follow_app_keys = not _given(options, "secret_key", "CLUSTERSESS_SECRET")
        if cookie_name is not None and cookie_name != app.config["SESSION_COOKIE_NAME"] != "session":
            log.warning(
                "clustersess: SESSION_COOKIE_NAME=%r is ignored: the cluster's cookie name %r wins "
                "(every node must use the same one)",
                app.config["SESSION_COOKIE_NAME"],
                cookie_name,
            )
        self.node = ThreadedNode(config, session_class=FlaskSession, **node_options)
        self.node.manager.app_started()
        interface = ClusterSessionInterface(self.node, cookie_name=cookie_name, follow_app_keys=follow_app_keys)
        app.session_interface = interface
        app.teardown_request(interface.release)
        # refuse mode: rotate()/invalidate()/clear() on a fenced node raise this
        app.register_error_handler(ReplicationUnavailable, _unavailable)
        app.before_request(_refuse_unavailable)
        app.extensions["clustersess"] = self

    @property
    def manager(self) -> SessionManager:
        assert self.node is not None, "call init_app(app) first"
        return self.node.manager

    def close(self) -> None:
        """Hand sessions over and stop the node (also done at exit and on SIGTERM)."""
        if self.node is not None:
            self.node.close()


class _UnavailableSession(NullSession):
    """The session of a request whose session could not be reached (refuse mode)."""


def _refuse_unavailable() -> Any:
    from flask.globals import _cv_request

    # the context's own attribute: going through flask.session would mark it accessed
    if isinstance(getattr(_cv_request.get(None), "_session", None), _UnavailableSession):
        return _unavailable(ReplicationUnavailable("the session is on a member that did not answer"))
    return None


def _refuse(response: Response, exc: ReplicationUnavailable) -> None:
    log.warning("clustersess: answered 503: %s", exc.reason)
    response.status_code = 503
    response.set_data(b"session change could not be replicated; retry\n")
    response.mimetype = "text/plain"
    response.headers["Retry-After"] = "1"
    response.headers["Cache-Control"] = "no-store"


def _unavailable(exc: ReplicationUnavailable) -> Any:
    from flask import Response as FlaskResponse

    response = FlaskResponse()
    _refuse(response, exc)
    return response


def _given(options: dict[str, Any], field: str, variable: str) -> bool:
    return options.get(field) is not None or bool(os.environ.get(variable))


def _flask_defaults(app: Flask, options: dict[str, Any]) -> dict[str, Any]:
    """The app's settings as Config values, for what the cluster was not told."""
    defaults: dict[str, Any] = {}
    if not _given(options, "session_cookie", "CLUSTERSESS_COOKIE"):
        defaults["session_cookie"] = app.config["SESSION_COOKIE_NAME"]
    if not _given(options, "secret_key", "CLUSTERSESS_SECRET"):
        if not app.secret_key:
            raise ConfigError(
                "no secret key: set app.secret_key (SECRET_KEY) before ClusterSession(app), or "
                "CLUSTERSESS_SECRET (or secret_key=...), the same on every node of the cluster"
            )
        defaults["secret_key"] = _app_keys(app)
    return defaults
