"""The server's answer to a request head, decided from values alone (no socket in sight).

:func:`answer_request` takes the :class:`Request` event of a :class:`ServerProtocol`, the client's address, the
router and an :class:`Admission` (what the server's limits and state allow right now), and returns an
:class:`Outcome`: the :class:`Response` value to send (a 101, an HTTP answer for a plain route, or a refusal) and,
for a 101, the route and its parameters (for a refusal, ``Outcome.failure``: the ``reason`` label of
``selectws_handshake_failures_total``, see selectws/server/refusals.py). The order of the checks gives the most
useful status: routing (404 / 405; an upgrade request to a path no route serves is answered ``404 no route for
<path>`` even with static files on), the upgrade itself (426 / 400 / 405 from RFC 6455 section 4.2.1), the origin
allow-list (403), the per-address and global connection limits and draining (503), on an ``auth = "jwt"`` route
the token (401 without one, 403 when it does not verify, 429 past ``max_connections_per_user``;
``Outcome.identity`` then says who it is), the plugin's own ``on_handshake`` (its status, or 500 if it raised),
the subprotocol (400 when one is required), then permessage-deflate.

A request to an endpoint that reads a body (the server API, a :class:`BodyHandler`) is decided in two steps: from
its head (an answer at once, or ``Outcome.endpoint`` and ``body_size``: read that many bytes), then
:func:`answer_body` with the body.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network

from selectws.protocol.deflate import DeflateSettings
from selectws.protocol.errors import HandshakeError
from selectws.protocol.handshake import ServerProtocol, check_upgrade_request, choose_subprotocol
from selectws.protocol.http11 import Headers, Request, Response, make_response
from selectws.server.api import Accept, HandshakeRequest, Reject
from selectws.server.auth import Identity, JwtVerifier, TokenRejected, token_from_request
from selectws.server.proxy import client_address
from selectws.server.routing import BodyHandler, HttpResult, Pending, Route, Router

__all__ = ["Admission", "Outcome", "answer_body", "answer_request"]

_RETRY = [("Retry-After", "5")]
#: The interim answer to a request whose body is still to be read (sent only if the client asked for it).
_CONTINUE = Response(100, "Continue", (1, 1), Headers())


@dataclass(slots=True)
class Admission:
    """What the server allows at the moment a request is answered."""

    open_count: int = 0
    max_connections: int = 0  # 0: no limit
    per_ip: Mapping[str, int] = field(default_factory=dict)  # open WebSocket connections by client address
    max_per_ip: int = 0  # 0: no limit
    draining: bool = False
    deflate: DeflateSettings | None = None  # None: permessage-deflate is off
    trusted_proxies: tuple[IPv4Network | IPv6Network, ...] = ()
    jwt: JwtVerifier | None = None  # for routes with auth = "jwt" (None: such a route answers 500)
    per_user: Mapping[str, int] = field(default_factory=dict)  # open authenticated connections by user (sub)
    max_per_user: int = 0  # 0: no limit


@dataclass(slots=True)
class Outcome:
    """The answer and what it means: ``route`` is set for a 101 only."""

    response: Response
    remote: tuple[str, int]  # the client's address (from the proxy headers when they are trusted)
    reason: str = ""  # why a request was refused (for the log line)
    route: Route | None = None
    params: dict[str, str] = field(default_factory=dict)
    raised: Exception | None = None  # what a plugin's on_handshake or an HTTP handler raised (answered 500)
    # Set when the answer needs the request body: read ``body_size`` bytes (``ServerProtocol.expect_body``), then
    # call :func:`answer_body`. ``response`` is then only the interim ``100 Continue`` (which ``expect_body``
    # queues itself when the client asked for it).
    endpoint: BodyHandler | None = None
    body_size: int = 0
    #: Who the client is, for a 101 on an ``auth = "jwt"`` route (None elsewhere).
    identity: Identity | None = None
    #: For an answer of 400 or more: why, as a ``reason`` label of ``selectws_handshake_failures_total``
    #: (selectws/server/refusals.py: ``FAILURE_REASONS``; it also sets the level of the log line).
    failure: str = ""
    #: The body handler answers later (``response`` is a placeholder): wait for it, then :func:`answer_later`.
    pending: Pending | None = None


def answer_request(
    ws: ServerProtocol, request: Request, remote: tuple[str, int], router: Router, admission: Admission
) -> Outcome:
    """Decide on ``request``; nothing is sent (the caller passes ``outcome.response`` to ``ws.send_response``)."""
    if admission.trusted_proxies:  # behind a reverse proxy we trust: the client's address from its headers
        remote = client_address(remote, request.headers, admission.trusted_proxies)
    matched = router.match(request.path)
    if matched is None:
        endpoint = router.body_handler(request.path) if router.body_handlers else None
        if endpoint is not None:
            return _prepare_body(ws, request, remote, endpoint)
        # An upgrade to a path no route serves is a mistyped URL, not a static file to look for: say so.
        handler = router.http.get(request.path)
        if handler is None and "websocket" not in request.headers.tokens("Upgrade"):
            handler = router.fallback
        if handler is None:
            return _refuse(ws, remote, 404, f"no route for {request.path}", "no_route")
        if request.method not in ("GET", "HEAD"):
            return _refuse(ws, remote, 405, f"method {request.method} not allowed", "http", [("Allow", "GET, HEAD")])
        try:
            status, headers, body = handler(request)
        except Exception as exc:
            outcome = _refuse(ws, remote, 500, "internal error", "error")
            outcome.raised = exc  # the caller logs it, traceback included
            return outcome
        return _http_answer(request, remote, (status, headers, body))
    route, params = matched
    failure = "bad_request"
    try:
        check_upgrade_request(request)
        if route.origins:
            origin = (request.headers.get("Origin") or "").strip().lower().rstrip("/")
            if origin not in route.origins:
                failure = "origin"
                raise HandshakeError(403, f"origin {origin[:200]!r} not allowed" if origin else "Origin required")
        if admission.max_per_ip and admission.per_ip.get(remote[0], 0) >= admission.max_per_ip:
            failure = "client_limit"
            raise HandshakeError(503, f"too many connections from {remote[0]}", _RETRY)
        if admission.max_connections and admission.open_count >= admission.max_connections:
            failure = "limit"
            raise HandshakeError(503, "server is at its connection limit", _RETRY)
        if admission.draining:
            failure = "draining"
            raise HandshakeError(503, "server is shutting down")
    except HandshakeError as exc:
        return _refuse(ws, remote, exc.status, exc.reason, failure, exc.headers)
    identity = None
    if route.auth != "none":  # after the limits that cost nothing: a signature check costs a little
        refused = _authenticate(ws, request, remote, admission)
        if not isinstance(refused, Identity):
            return refused
        identity = refused
    offered = [t.strip() for v in request.headers.get_all("Sec-WebSocket-Protocol") for t in v.split(",")]
    plugin = route.plugin
    try:
        decision = plugin.on_handshake(HandshakeRequest(
            request.path, params, request.query, request.headers, remote, offered,
            user=identity.user if identity is not None else None,
            claims=identity.claims if identity is not None else None,
        ))
    except Reject as exc:
        return _refuse(ws, remote, exc.status, exc.reason, "plugin", exc.headers)
    except Exception as exc:
        outcome = _refuse(ws, remote, 500, "internal error", "error")
        outcome.raised = exc
        return outcome
    decision = decision or Accept()
    supported = route.subprotocols or tuple(plugin.subprotocols)
    subprotocol = decision.subprotocol or choose_subprotocol(request, supported)
    required = plugin.subprotocol_required if route.subprotocol_required is None else route.subprotocol_required
    if subprotocol is None and supported and required:
        return _refuse(ws, remote, 400, f"a subprotocol is required: one of {', '.join(supported)}", "subprotocol")
    deflate = admission.deflate if route.compression else None
    response = ws.accept(request, subprotocol=subprotocol, deflate=deflate, headers=decision.headers)
    if response.status != 101:  # an extension offer that cannot be accepted as written
        return Outcome(response, remote, response.body.decode("utf-8", "replace").strip().partition(" ")[2],
                       failure="bad_request")
    return Outcome(response, remote, route=route, params=params, identity=identity)


_BEARER = [("WWW-Authenticate", "Bearer")]


def _authenticate(ws: ServerProtocol, request: Request, remote: tuple[str, int],
                  admission: Admission) -> Identity | Outcome:
    """An ``auth = "jwt"`` route: the client's :class:`Identity`, or the refusal. No token: 401 with
    ``WWW-Authenticate: Bearer``; a token that does not verify: 403; a user at ``max_per_user``: 429. The body
    says only that much; ``Outcome.reason`` (the log line) says why."""
    verifier = admission.jwt
    if verifier is None:  # the configuration checks prevent it; a Server built by hand may not
        return _refuse(ws, remote, 500, "jwt authentication is not configured", "error")
    token = token_from_request(request)
    if token is None:
        return Outcome(ws.reject(401, "authentication required", _BEARER), remote, "no token", failure="auth")
    try:
        identity = verifier.verify(token)
    except TokenRejected as exc:
        return Outcome(ws.reject(403, "invalid token"), remote, f"invalid token: {exc.reason}", failure="auth")
    limit = admission.max_per_user
    if limit and admission.per_user.get(identity.user, 0) >= limit:
        return Outcome(ws.reject(429, "too many connections for this user"), remote,
                       f"user {identity.user[:100]!r} has {limit} connections (max_connections_per_user)",
                       failure="client_limit")
    return identity


def _prepare_body(ws: ServerProtocol, request: Request, remote: tuple[str, int], endpoint: BodyHandler) -> Outcome:
    """A request to an endpoint that reads a body: its answer from the head alone, or the body to read first."""
    try:
        decided = endpoint.prepare(request)
    except Exception as exc:
        outcome = _refuse(ws, remote, 500, "internal error", "error")
        outcome.raised = exc
        return outcome
    if isinstance(decided, int):
        return Outcome(_CONTINUE, remote, endpoint=endpoint, body_size=decided)
    return _http_answer(request, remote, decided)


def answer_body(request: Request, remote: tuple[str, int], endpoint: BodyHandler, body: bytes) -> Outcome:
    """The answer to a request whose body was read (an :class:`Outcome` with ``endpoint`` set, then ``body``)."""
    try:
        result = endpoint.handle(request, body)
    except Exception as exc:
        response = make_response(500, (), b"500 internal error\n")
        return Outcome(response, remote, "internal error", raised=exc, failure="error")
    if isinstance(result, Pending):  # answered later: the caller waits for it (answer_later)
        return Outcome(make_response(500, (), b""), remote, "", pending=result)
    return _http_answer(request, remote, result)


def answer_later(request: Request, remote: tuple[str, int], result: HttpResult) -> Outcome:
    """The answer of a :class:`Pending` that :func:`answer_body` returned, once it came."""
    return _http_answer(request, remote, result)


def _http_answer(request: Request, remote: tuple[str, int], result: HttpResult) -> Outcome:
    status, headers, body = result
    # For the log line of a refusal: the message of a JSON error object (the server API), else the first line.
    reason = failure = ""
    if status >= 400:
        # The handler's own answer (a /readyz 503 too; one that raised is "error"); a 401 is a credential refused
        # (the server API's key), counted and logged as "auth".
        failure = "auth" if status == 401 else "http"
        reason = body[:300].decode("utf-8", "replace").partition("\n")[0]
        if body[:10].startswith(b'{"error"'):
            try:
                reason = str(json.loads(body)["error"]["message"])
            except (ValueError, KeyError, TypeError):
                pass
    return Outcome(make_response(status, headers, body, head_only=request.method == "HEAD"), remote, reason,
                   failure=failure)


def _refuse(
    ws: ServerProtocol, remote: tuple[str, int], status: int, reason: str, failure: str,
    headers: list[tuple[str, str]] | None = None,
) -> Outcome:
    return Outcome(ws.reject(status, reason, headers or ()), remote, reason, failure=failure)
