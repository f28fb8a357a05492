"""``/healthz``, ``/readyz`` and the table of operator endpoints (``[ops]`` in the configuration).

The health check answers ``200 ok`` while the server accepts WebSocket connections and ``503 draining`` once a
graceful shutdown has begun, so a load balancer stops sending new clients before the process goes away. Note that
the WebSocket listeners close when draining starts: to see the 503, serve the operator endpoints on their own
listener (``[ops] listen = "127.0.0.1:9100"``), which stays open until the process exits.

A broker that is down (Redis unreachable, or hung: silent past ``[broker] health_timeout``) only degrades the
server -- local delivery goes on -- so ``/healthz`` stays 200 and says ``down`` in its second line and its
``X-Broker`` header. ``/readyz`` is the check for a load balancer that should take such an instance out: the same
body and header, but ``503`` while the broker is down as well as while draining.

``/readyz`` also says 503 ``not listening`` when the WebSocket listeners are closed (the process is on its way out).
With ``[server] workers = N`` it answers for the instance, whichever worker takes the request: 200 while every
worker is ready (a worker whose loop has not run for :data:`~selectws.server.opsview.STALE_AFTER` seconds is listed
but not counted; the supervisor replaces it), else 503 with the first reason; a line per worker follows.
``/metrics`` then gives every worker's series, labelled ``worker="<slot>"`` (selectws/server/workerstats.py).

The endpoints read a :class:`~selectws.server.stats.ServerStats` snapshot from the provider they are given
(``Server.stats``), or the :class:`~selectws.server.opsview.OpsView` built on it, nothing else of the server.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from selectws.config import OpsConfig
from selectws.protocol.http11 import Request
from selectws.server.metrics import CONTENT_TYPE, metrics_handler
from selectws.server.opsview import OpsView, readiness
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


def readyz_handler(stats: Callable[[], ServerStats], listening: Callable[[], bool] | None = None,
                   view: OpsView | None = None) -> HttpHandler:
    """An HTTP handler: ``200 ready`` while listening with the broker up; ``503`` while draining, not listening or
    the broker is down. With ``view`` in a worker: the same for every worker (see the module docstring)."""
    if view is not None and view.worker is not None:
        return _workers_readyz(view)

    def handle(request: Request) -> HttpResult:
        now = stats()
        broker = now.broker
        extra = f"{broker.status}\n".encode() if broker.status else b""
        headers = list(_HEADERS) if broker.status is None else [*_HEADERS, ("X-Broker", "up" if broker.up else "down")]
        if now.draining:
            return 503, [*headers, ("Retry-After", "5")], b"draining\n" + extra
        if listening is not None and not listening():
            return 503, [*headers, ("Retry-After", "5")], b"not listening\n" + extra
        if not broker.up:
            return 503, [*headers, ("Retry-After", "5")], b"broker down\n" + extra
        return 200, headers, b"ready\n" + extra

    return handle


def _workers_readyz(view: OpsView) -> HttpHandler:
    def handle(request: Request) -> HttpResult:
        samples = view.samples()
        ready, first, lines = readiness(samples, time.time())
        headers = list(_HEADERS)
        brokers = [s["broker"] for s in samples]
        if any(b["kind"] != "memory" for b in brokers):
            headers.append(("X-Broker", "up" if all(b["up"] for b in brokers) else "down"))
        body = "\n".join([first, *lines]).encode() + b"\n"
        if ready:
            return 200, headers, body
        return 503, [*headers, ("Retry-After", "5")], body

    return handle


def _metrics_of(view: OpsView) -> HttpHandler:
    def handle(request: Request) -> HttpResult:
        return 200, [("Content-Type", CONTENT_TYPE), ("Cache-Control", "no-store")], view.metrics_text().encode()

    return handle


def ops_handlers(stats: Callable[[], ServerStats], ops: OpsConfig, view: OpsView | None = None,
                 listening: Callable[[], bool] | None = None) -> dict[str, HttpHandler]:
    """The operator endpoints switched on in ``ops``, by URL path (for ``Router.http``). ``view``: what a worker
    answers for the whole instance (``/readyz``, ``/metrics``); ``listening``: whether the WebSocket listeners are
    open (for ``/readyz``; by default the view's)."""
    if listening is None and view is not None:
        listening = view.listening
    handlers: dict[str, HttpHandler] = {}
    if ops.healthz:
        handlers[ops.healthz_path] = healthz_handler(stats)
    if ops.readyz:
        handlers[ops.readyz_path] = readyz_handler(stats, listening, view)
    if ops.metrics:
        handlers[ops.metrics_path] = _metrics_of(view) if view is not None else metrics_handler(stats)
    return handlers
