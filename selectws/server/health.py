"""``/healthz``, ``/readyz`` and the table of operator endpoints (``[ops]`` in the configuration).

The health check answers ``200 ok`` while the server accepts WebSocket connections and ``503 draining`` once a
graceful shutdown has begun, so a load balancer stops sending new clients before the process goes away. Note that
the WebSocket listeners close when draining starts: to see the 503, serve the operator endpoints on their own
listener (``[ops] listen = "127.0.0.1:9100"``), which stays open until the process exits.

A broker that is down (Redis unreachable, or hung: silent past ``[broker] health_timeout``) only degrades the
server -- local delivery goes on -- so ``/healthz`` stays 200 and says ``down`` in its second line and its
``X-Broker`` header. ``/readyz`` is the check for a load balancer that should take such an instance out: the same
body and header, but ``503`` while the broker is down as well as while draining.

The endpoints read a :class:`~selectws.server.stats.ServerStats` snapshot from the provider they are given
(``Server.stats``), nothing else of the server.
"""

from __future__ import annotations

from collections.abc import Callable

from selectws.config import OpsConfig
from selectws.protocol.http11 import Request
from selectws.server.metrics import metrics_handler
from selectws.server.routing import HttpHandler, HttpResult
from selectws.server.stats import ServerStats

__all__ = ["healthz_handler", "ops_handlers", "readyz_handler"]

_HEADERS = [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store")]


def healthz_handler(stats: Callable[[], ServerStats]) -> HttpHandler:
    """An HTTP handler: ``200 ok`` while serving, ``503 draining`` once the snapshot says ``draining``."""

    def handle(request: Request) -> HttpResult:
        now = stats()
        # A broker that is down degrades (remote delivery) but does not stop serving: still 200, with a line saying so.
        broker = now.broker
        extra = f"{broker.status}\n".encode() if broker.status else b""
        if now.draining:
            return 503, [*_HEADERS, ("Retry-After", "5")], b"draining\n" + extra
        if broker.status is None:
            return 200, list(_HEADERS), b"ok\n"
        return 200, [*_HEADERS, ("X-Broker", "up" if broker.up else "down")], b"ok\n" + extra

    return handle


def readyz_handler(stats: Callable[[], ServerStats]) -> HttpHandler:
    """An HTTP handler: ``200 ready`` while serving with the broker up; ``503`` while draining or the broker is down."""

    def handle(request: Request) -> HttpResult:
        now = stats()
        broker = now.broker
        extra = f"{broker.status}\n".encode() if broker.status else b""
        headers = list(_HEADERS) if broker.status is None else [*_HEADERS, ("X-Broker", "up" if broker.up else "down")]
        if now.draining:
            return 503, [*headers, ("Retry-After", "5")], b"draining\n" + extra
        if not broker.up:
            return 503, [*headers, ("Retry-After", "5")], b"broker down\n" + extra
        return 200, headers, b"ready\n" + extra

    return handle


def ops_handlers(stats: Callable[[], ServerStats], ops: OpsConfig) -> dict[str, HttpHandler]:
    """The operator endpoints switched on in ``ops``, by URL path (for ``Router.http``)."""
    handlers: dict[str, HttpHandler] = {}
    if ops.healthz:
        handlers[ops.healthz_path] = healthz_handler(stats)
    if ops.readyz:
        handlers[ops.readyz_path] = readyz_handler(stats)
    if ops.metrics:
        handlers[ops.metrics_path] = metrics_handler(stats)
    return handlers
