"""Helpers for authenticating the opening handshake in :meth:`Plugin.on_handshake`.

Browsers cannot set headers on a WebSocket, so a token comes in the query string (``?token=...``), a cookie,
or, from other clients, an ``Authorization: Bearer ...`` header. :func:`token_from` looks in all three;
:func:`require_token` turns the usual policy into two lines: missing -> 401, wrong -> 403::

    class Private(Plugin):
        def on_handshake(self, request):
            require_token(request, lambda token: token in self.options["tokens"])
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Collection

from selectws.plugins.api import HandshakeRequest, Reject

__all__ = ["require_token", "token_from"]


def token_from(
    request: HandshakeRequest, *, query: str | None = "token", header: str | None = "Authorization",
    cookie: str | None = "token",
) -> str | None:
    """The token of ``request``: the ``query`` parameter, else the ``header`` (``Bearer <token>`` for
    ``Authorization``, the whole value for any other header), else the ``cookie``; ``None`` for none of
    them (empty values count as none). Pass ``None`` for a place not to look in."""
    if query:
        value = request.query.get(query)
        if value:
            return value
    if header:
        raw = request.headers.get(header)
        if raw:
            if header.lower() == "authorization":
                scheme, _, credentials = raw.strip().partition(" ")
                if scheme.lower() == "bearer" and credentials.strip():
                    return credentials.strip()
            elif raw.strip():
                return raw.strip()
    if cookie:
        for line in request.headers.get_all("Cookie"):
            for pair in line.split(";"):
                name, eq, value = pair.strip().partition("=")
                if eq and name == cookie and value.strip('"'):
                    return value.strip('"')
    return None


def require_token(
    request: HandshakeRequest, valid: Callable[[str], bool] | Collection[str], **where: str | None
) -> str:
    """Return the request's token if ``valid`` accepts it; raise ``Reject(401)`` when there is none and
    ``Reject(403)`` when it is wrong. ``valid`` is a predicate or a collection of accepted tokens (compared in
    constant time). ``where`` is passed to :func:`token_from`."""
    token = token_from(request, **where)
    if token is None:
        raise Reject(401, "authentication required", [("WWW-Authenticate", "Bearer")])
    ok = valid(token) if callable(valid) else any(hmac.compare_digest(token.encode(), t.encode()) for t in valid)
    if not ok:
        raise Reject(403, "invalid token")
    return token
