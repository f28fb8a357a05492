"""URL routing: WebSocket routes with ``{name}`` path parameters, and plain HTTP handlers on the same port."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from selectws.protocol.http11 import Request
from selectws.server.api import Plugin

__all__ = ["BodyHandler", "HttpHandler", "HttpResult", "Pending", "Route", "Router", "compile_path"]

_NO_PARAMS: dict[str, str] = {}  # shared by every connection on a literal route; treat as read-only
_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")

#: An HTTP handler answers a request with (status, headers, body).
HttpResult = tuple[int, list[tuple[str, str]], bytes]
HttpHandler = Callable[[Request], HttpResult]


class Pending:
    """An HTTP answer that comes later (the server API waiting for the broker): the handler returns it, and calls
    :meth:`resolve` once, maybe before the connection asked with :meth:`then`."""

    __slots__ = ("_callback", "_result")

    def __init__(self) -> None:
        self._result: HttpResult | None = None
        self._callback: Callable[[HttpResult], None] | None = None

    def resolve(self, result: HttpResult) -> None:
        if self._result is not None:
            return
        self._result = result
        callback, self._callback = self._callback, None
        if callback is not None:
            callback(result)

    def then(self, callback: Callable[[HttpResult], None]) -> None:
        if self._result is not None:
            callback(self._result)
        else:
            self._callback = callback

    def cancel(self) -> None:
        """The connection went away: nobody wants the answer any more."""
        self._callback = None


class BodyHandler(Protocol):
    """An HTTP endpoint that reads a request body (the server API, ``POST /api/<method>``).

    ``prepare`` decides from the head alone: an answer at once (401, 405, 413, ...), or the number of body bytes to
    read (bounded by the handler). ``handle`` then answers the request with its body.
    """

    def prepare(self, request: Request) -> HttpResult | int: ...

    def handle(self, request: Request, body: bytes) -> HttpResult | Pending: ...


def compile_path(path: str) -> re.Pattern[str] | None:
    """A regex for a path with ``{name}`` segments (each matches one non-empty segment), or None if literal."""
    if "{" not in path:
        return None
    pattern, pos = "", 0
    for match in _PARAM.finditer(path):
        pattern += re.escape(path[pos : match.start()]) + f"(?P<{match.group(1)}>[^/]+)"
        pos = match.end()
    return re.compile(pattern + re.escape(path[pos:]) + r"\Z")


@dataclass(slots=True)
class Route:
    """A WebSocket route: where a plugin is mounted and how its handshake is negotiated."""

    path: str
    plugin: Plugin
    plugin_name: str
    subprotocols: tuple[str, ...] = ()
    compression: bool = True
    #: Allowed ``Origin`` values, lower-case; empty: any origin (and none) is accepted.
    origins: frozenset[str] = frozenset()
    #: Refuse clients offering none of the subprotocols (400); ``None``: the plugin's ``subprotocol_required``.
    subprotocol_required: bool | None = None
    pattern: re.Pattern[str] | None = field(default=None)
    #: Messages per second each connection may send on average, and how many at once (a token bucket,
    #: selectws/server/ratelimit.py); 0: no limit. Over it: close with 1008, or drop the message (``"drop"``).
    max_messages_per_second: float = 0.0
    burst: int = 0
    rate_limit_action: str = "close"
    #: ``"none"``, or ``"jwt"``: the handshake needs a verified token (selectws/server/auth.py, docs/auth.md).
    auth: str = "none"
    #: ``plugin.on_message``, bound once: the hot path calls it per message.
    on_message: Callable[..., None] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.pattern = compile_path(self.path)
        self.on_message = self.plugin.on_message


class Router:
    """Literal paths are looked up in a dict; parameterised ones are tried in config order."""

    def __init__(
        self, routes: list[Route], http: dict[str, HttpHandler] | None = None, fallback: HttpHandler | None = None
    ) -> None:
        self.routes = routes
        self._exact = {r.path: r for r in routes if r.pattern is None}
        self._patterns = [r for r in routes if r.pattern is not None]
        #: Plain HTTP handlers by exact path (health, metrics).
        self.http: dict[str, HttpHandler] = dict(http or {})
        #: Handler for any other plain HTTP GET/HEAD (the static files); None answers 404.
        self.fallback: HttpHandler | None = fallback
        #: Handlers of requests with a body, by path prefix (the server API under ``/api/``).
        self.body_handlers: dict[str, BodyHandler] = {}

    def http_handler(self, path: str) -> HttpHandler | None:
        return self.http.get(path) or self.fallback

    def body_handler(self, path: str) -> BodyHandler | None:
        for prefix, handler in self.body_handlers.items():
            if path.startswith(prefix):
                return handler
        return None

    def match(self, path: str) -> tuple[Route, dict[str, str]] | None:
        route = self._exact.get(path)
        if route is not None:
            return route, _NO_PARAMS
        for route in self._patterns:
            assert route.pattern is not None
            m = route.pattern.match(path)
            if m:
                return route, m.groupdict()
        return None
