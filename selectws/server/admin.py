"""The live admin dashboard: ``/admin`` on the operator listener (``[ops] admin = true``, docs/operations.md).

Off unless configured, and served only on ``[ops] listen`` (never on the WebSocket port), with the server API key
(``[api] key_file`` / ``key_env``) as the credential:

* ``GET /admin`` without a valid session answers ``401`` with a login form; with one, ``200`` and the dashboard.
  ``/admin/admin.js`` and ``/admin/admin.css`` (no data in them) are served to anyone.
* ``POST /admin/login`` (form field ``key``) compares the key in constant time; right: ``303`` to ``/admin`` with
  ``Set-Cookie: selectws_admin=...; Path=/admin; HttpOnly; SameSite=Strict; Max-Age=43200``; wrong: ``401``.
  ``POST /admin/logout`` clears the cookie.
* ``/admin/ws`` is the page's feed: the upgrade is refused (``401``) without a valid session cookie, and (``403``)
  when a browser's ``Origin`` is not the page's own (a page elsewhere on the same site cannot open it with the
  viewer's cookie). Once open it gets a JSON snapshot (:meth:`OpsView.dashboard`) every second, from a timer that
  runs only while someone watches (in a worker the samples are published anyway, for ``/metrics``).

A browser cannot put a header on a WebSocket upgrade, hence the cookie. The session token is not stored anywhere:
it is ``v1.<expiry>.<nonce>.<HMAC-SHA256>`` keyed with a hash of the API key, so every worker (and a restarted
process) accepts it, it lasts 12 hours at most, and changing the API key (and reloading) ends every session.

The feed's connections are the operator's, not clients: they are not counted in the connection figures, the
message counters or the limits, are not seen by plugins or webhooks, and are closed (1001) on shutdown.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from selectws.protocol.http11 import Headers, Request
from selectws.server.api import Accept, HandshakeRequest, Plugin, Reject, ServerAPI, Session
from selectws.server.opsview import OpsView
from selectws.server.routing import BodyHandler, HttpHandler, HttpResult, Route

__all__ = ["ADMIN_PATH", "COOKIE", "SESSION_TTL", "AdminConsole"]

ADMIN_PATH = "/admin"
FEED_PATH = "/admin/ws"
LOGIN_PATH = "/admin/login"
LOGOUT_PATH = "/admin/logout"
COOKIE = "selectws_admin"
SESSION_TTL = 12 * 3600  # seconds a login lasts
_MAX_FORM = 4096
_ASSETS = Path(__file__).resolve().parent / "admin_web"
_ASSET_TYPES = {"admin.js": "text/javascript; charset=utf-8", "admin.css": "text/css; charset=utf-8"}
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
_PAGE_HEADERS = [
    ("Content-Type", "text/html; charset=utf-8"),
    ("Cache-Control", "no-store"),
    ("Content-Security-Policy", _CSP),
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "same-origin"),  # "no-referrer" would make a browser send "Origin: null" on the login
]
_CHALLENGE = ("WWW-Authenticate", 'apikey realm="selectws admin"')

_LOGIN_PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>selectws admin: log in</title>
  <link rel="icon" href="data:,">
  <link rel="stylesheet" href="/admin/admin.css">
</head>
<body class="login-page">
  <main class="login">
    <h1>selectws <span class="muted">admin</span></h1>
    <form method="post" action="/admin/login">
      <label>Server API key
        <input id="key" name="key" type="password" autocomplete="current-password" required autofocus>
      </label>
      <button id="login" type="submit">Log in</button>
    </form>
    <p id="login-error" class="error-text" role="alert">{error}</p>
    <p class="muted small">The key of <code>[api] key_file</code> / <code>key_env</code>. The session lasts 12 hours
    (a cookie for <code>/admin</code> on this listener only).</p>
  </main>
</body>
</html>
"""


def _cookies(headers: Headers) -> dict[str, str]:
    jar: dict[str, str] = {}
    for value in headers.get_all("Cookie"):
        for part in value.split(";"):
            name, eq, content = part.strip().partition("=")
            if eq and name not in jar:
                jar[name] = content.strip().strip('"')
    return jar


def same_origin(headers: Headers) -> bool:
    """Whether a browser's request comes from a page of this listener: no ``Origin`` (not a browser, or a
    same-origin GET), or one whose host and port are the request's ``Host``."""
    origin = headers.get("Origin")
    if origin is None:
        return True
    host = (headers.get("Host") or "").strip().lower()
    try:
        netloc = urlsplit(origin.strip()).netloc.lower()
    except ValueError:
        return False
    return bool(host) and netloc == host


class AdminConsole:
    """The admin page, its login and its feed, for one server (reconfigured on reload)."""

    def __init__(self, server: ServerAPI, view: OpsView, log: Callable[[], Any]) -> None:
        self.view = view
        self._log = log
        self.enabled = False
        self._key = b""
        self._secret = b""
        self._assets: dict[str, bytes] = {}
        self.feed = _AdminFeed(server, self)
        self._route = Route(FEED_PATH, self.feed, "admin", compression=False)
        self._login = _Login(self)
        self._logout = _Logout(self)

    @property
    def log(self) -> Any:
        return self._log()

    def configure(self, enabled: bool, key: str | None) -> None:
        """On at start or reload when ``[ops] admin`` is true and a key is configured (the configuration checks
        both); a new key ends every session."""
        self.enabled = bool(enabled and key)
        self._key = (key or "").encode("utf-8")
        secret = hashlib.sha256(b"selectws admin session\x00" + self._key).digest() if self.enabled else b""
        if secret != self._secret:  # switched off, or a new key: the open feeds end with the sessions
            self.feed.close_all()
        self._secret = secret

    # ------------------------------------------------------------------ what the server registers
    def routes(self) -> list[Route]:
        return [self._route] if self.enabled else []

    def http_handlers(self) -> dict[str, HttpHandler]:
        if not self.enabled:
            return {}
        return {ADMIN_PATH: self._page, ADMIN_PATH + "/": self._page, "/admin/admin.js": self._asset,
                "/admin/admin.css": self._asset}

    def body_handlers(self) -> dict[str, BodyHandler]:
        return {LOGIN_PATH: self._login, LOGOUT_PATH: self._logout} if self.enabled else {}

    # ------------------------------------------------------------------ sessions
    def issue(self, now: float | None = None) -> str:
        expires = int(time.time() if now is None else now) + SESSION_TTL
        payload = f"v1.{expires}.{secrets.token_hex(8)}"
        return f"{payload}.{self._mac(payload)}"

    def _mac(self, payload: str) -> str:
        return hmac.new(self._secret, payload.encode("ascii"), hashlib.sha256).hexdigest()

    def valid(self, token: str | None, now: float | None = None) -> bool:
        if not self.enabled or not token or len(token) > 200:
            return False
        payload, _, mac = token.rpartition(".")
        parts = payload.split(".")
        if len(parts) != 3 or parts[0] != "v1" or not parts[1].isdigit():
            return False
        if int(parts[1]) <= (time.time() if now is None else now):
            return False
        try:
            return hmac.compare_digest(mac.encode("ascii"), self._mac(payload).encode("ascii"))
        except (UnicodeEncodeError, ValueError):
            return False

    def authenticated(self, headers: Headers) -> bool:
        return self.valid(_cookies(headers).get(COOKIE))

    def check_key(self, offered: str) -> bool:
        return bool(self._key) and hmac.compare_digest(offered.encode("utf-8"), self._key)

    # ------------------------------------------------------------------ HTTP
    def login_page(self, status: int, error: str = "") -> HttpResult:
        body = _LOGIN_PAGE.replace("{error}", error).encode("utf-8")
        headers = list(_PAGE_HEADERS)
        if status == 401:
            headers.append(_CHALLENGE)
        return status, headers, body

    def _page(self, request: Request) -> HttpResult:
        if not self.authenticated(request.headers):
            return self.login_page(401)
        return 200, list(_PAGE_HEADERS), self._file("admin.html")

    def _asset(self, request: Request) -> HttpResult:
        name = request.path.rpartition("/")[2]
        return 200, [("Content-Type", _ASSET_TYPES[name]), ("Cache-Control", "no-cache"),
                     ("X-Content-Type-Options", "nosniff")], self._file(name)

    def _file(self, name: str) -> bytes:
        data = self._assets.get(name)
        if data is None:  # read once: three small files of the package
            data = self._assets[name] = (_ASSETS / name).read_bytes()
        return data


def _content_length(request: Request, limit: int) -> int | HttpResult:
    values = request.headers.get_all("Content-Length")
    if not values:
        return 0
    raw = values[0].strip()
    if len(values) > 1 or not raw.isascii() or not raw.isdigit() or len(raw) > 12:
        return 400, [], b"400 bad Content-Length\n"
    if request.headers.get("Transfer-Encoding") is not None:
        return 400, [], b"400 both Content-Length and Transfer-Encoding\n"
    size = int(raw)
    if size > limit:
        return 413, [], b"413 body too large\n"
    return size


class _Login:
    """``POST /admin/login`` (a :class:`BodyHandler`): the key from a form, a session cookie for it."""

    def __init__(self, console: AdminConsole) -> None:
        self.console = console

    def prepare(self, request: Request) -> HttpResult | int:
        if request.path != LOGIN_PATH:
            return 404, [], b"404 not found\n"
        if request.method != "POST":
            return 405, [("Allow", "POST")], b"405 use POST\n"
        if not same_origin(request.headers):
            return 403, [], b"403 cross-origin login refused\n"
        return _content_length(request, _MAX_FORM)

    def handle(self, request: Request, body: bytes) -> HttpResult:
        console = self.console
        try:
            form = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=8)
        except (UnicodeDecodeError, ValueError):
            form = {}
        offered = (form.get("key") or [""])[0].strip()
        if not console.check_key(offered):
            console.log.warning("admin login refused", reason="wrong key" if offered else "no key")
            return console.login_page(401, "Wrong key.")
        console.log.info("admin login")
        cookie = f"{COOKIE}={console.issue()}; Path={ADMIN_PATH}; Max-Age={SESSION_TTL}; HttpOnly; SameSite=Strict"
        return 303, [("Location", ADMIN_PATH), ("Set-Cookie", cookie), ("Cache-Control", "no-store")], b""


class _Logout:
    """``POST /admin/logout``: the cookie is cleared (the token itself stays valid until it expires)."""

    def __init__(self, console: AdminConsole) -> None:
        self.console = console

    def prepare(self, request: Request) -> HttpResult | int:
        if request.path != LOGOUT_PATH:
            return 404, [], b"404 not found\n"
        if request.method != "POST":
            return 405, [("Allow", "POST")], b"405 use POST\n"
        if not same_origin(request.headers):
            return 403, [], b"403 cross-origin request refused\n"
        return _content_length(request, _MAX_FORM)

    def handle(self, request: Request, body: bytes) -> HttpResult:
        cookie = f"{COOKIE}=; Path={ADMIN_PATH}; Max-Age=0; HttpOnly; SameSite=Strict"
        return 303, [("Location", ADMIN_PATH), ("Set-Cookie", cookie), ("Cache-Control", "no-store")], b""


_MAX_BEHIND = 1 << 20  # a watcher with this much unsent skips snapshots until it catches up


def _send(session: Session, text: str) -> None:
    """Send without counting: the feed is not client traffic (``selectws_messages_sent_total`` stays the clients')."""
    conn = getattr(session, "_conn", None)
    if conn is not None:
        if conn.buffered < _MAX_BEHIND:
            conn.send_message(text)
    else:  # pragma: no cover - every session of the server has its connection
        session.send_text(text)


class _AdminFeed(Plugin):
    """``/admin/ws``: a JSON snapshot to every watcher once a second (server-internal, not a configurable plugin)."""

    def __init__(self, server: ServerAPI, console: AdminConsole) -> None:
        super().__init__(server, {})
        self.console = console
        self.watchers: dict[int, Session] = {}
        self._ticking = False

    def on_handshake(self, request: HandshakeRequest) -> Accept | None:
        console = self.console
        if not console.enabled:
            raise Reject(404, "not found")
        if not same_origin(request.headers):
            raise Reject(403, "cross-origin admin feed refused")
        if not console.authenticated(request.headers):
            raise Reject(401, "admin session required: log in at /admin", [_CHALLENGE])
        return None

    def on_open(self, session: Session) -> None:
        self.watchers[id(session)] = session
        view = self.console.view
        view.watch()
        if not self._ticking:
            self._ticking = True
            view.on_tick.append(self._tick)
        self.console.log.info("admin watching", peer=session.remote[0], watchers=len(self.watchers))
        _send(session, self._snapshot())

    def on_message(self, session: Session, message: str | bytes) -> None:
        """The page sends nothing; whatever comes is ignored."""

    def on_close(self, session: Session, code: int, reason: str) -> None:
        if self.watchers.pop(id(session), None) is None:
            return
        view = self.console.view
        view.unwatch()
        if not self.watchers and self._ticking:
            self._ticking = False
            view.on_tick.remove(self._tick)
        self.console.log.info("admin left", peer=session.remote[0], watchers=len(self.watchers))

    def close_all(self) -> None:
        for session in list(self.watchers.values()):
            session.close(1008, "admin session ended (page switched off or key changed)")

    def _snapshot(self) -> str:
        return json.dumps(self.console.view.dashboard(), separators=(",", ":"))

    def _tick(self) -> None:
        if not self.watchers:
            return
        text = self._snapshot()
        for session in list(self.watchers.values()):
            if session.open:
                _send(session, text)

