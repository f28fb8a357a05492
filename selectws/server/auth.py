"""JWT authentication of the opening handshake on ``auth = "jwt"`` routes (docs/auth.md).

The verification itself is PyJWT's (the optional extra ``selectws[jwt]``, with ``cryptography`` for RS/PS/ES/EdDSA
keys): algorithm confusion, ``alg=none``, base64url padding and the registered claims are where hand-written JWT
code breaks. This module only wraps it in values the handshake decision (:mod:`selectws.server.handshake`) can
use: :func:`token_from_request` finds the token, :meth:`JwtVerifier.verify` returns an :class:`Identity` or raises
:class:`TokenRejected` with the reason for the log line (never for the client).

PyJWT is imported when a :class:`JwtVerifier` is built, so the server runs without it until a route asks for JWT.
The key material comes from the application layer (``selectws/app/jwt_keys.py``), which reads the secret or the
public key file named by ``[auth]`` and turns a missing PyJWT into a configuration error saying what to install.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from selectws.protocol.http11 import Request

__all__ = ["Identity", "JwtVerifier", "TokenRejected", "token_from_request"]


class TokenRejected(Exception):
    """A token that does not verify: ``reason`` is for the log (the client only sees the status)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a verified token says the client is."""

    user: str  # the ``sub`` claim
    claims: dict[str, Any] = field(default_factory=dict)
    #: ``exp`` + leeway, in seconds since the epoch (wall clock); None: the token has no ``exp``.
    expires: float | None = None


def token_from_request(request: Request) -> str | None:
    """The token of an upgrade request: ``?token=``, else ``Authorization: Bearer <token>``, else the ``token``
    cookie (browsers cannot set headers on a WebSocket). Empty values count as none."""
    value = request.query.get("token")
    if value:
        return value
    raw = request.headers.get("Authorization")
    if raw:
        scheme, _, credentials = raw.strip().partition(" ")
        credentials = credentials.strip()
        if scheme.lower() == "bearer" and credentials:
            return credentials
    for line in request.headers.get_all("Cookie"):
        for pair in line.split(";"):
            name, eq, cookie = pair.strip().partition("=")
            cookie = cookie.strip().strip('"')
            if eq and name == "token" and cookie:
                return cookie
    return None


class JwtVerifier:
    """Verifies tokens against one key: an HMAC ``secret`` (HS256/384/512), or a PEM ``public_key``.

    Raises :class:`ImportError` when PyJWT (or, for a public key, ``cryptography``) is missing, and
    :class:`ValueError` when the key does not suit ``algorithms`` (an HMAC secret shorter than the hash, a
    public key given as a secret, an RSA key for ES256, ...): the application reports both as configuration
    errors.
    """

    __slots__ = ("_decode", "_errors", "algorithms", "audience", "issuer", "key", "leeway")

    def __init__(
        self, *, secret: str | None = None, public_key: str | None = None, algorithms: Sequence[str] = ("HS256",),
        audience: str = "", issuer: str = "", leeway: float = 0.0,
    ) -> None:
        import jwt  # the optional extra: imported only when a route needs it

        if (secret is None) == (public_key is None):
            raise ValueError("give an HMAC secret or a public key, one of them")
        if not algorithms or any(alg.lower() == "none" for alg in algorithms):
            raise ValueError("algorithms must be a non-empty list without 'none'")
        self.algorithms = list(algorithms)
        self.audience = audience or None
        self.issuer = issuer or None
        self.leeway = float(leeway)
        jws = jwt.PyJWS()
        raw: str | bytes = secret.encode("utf-8") if secret is not None else (public_key or "")
        prepared: Any = None
        for alg in self.algorithms:
            try:
                algorithm = jws.get_algorithm_by_name(alg)
            except NotImplementedError:
                raise ImportError(f"{alg} needs the cryptography package") from None
            try:
                prepared = algorithm.prepare_key(raw)  # a public key is parsed once, here, not per token
            except (jwt.InvalidKeyError, ValueError, TypeError) as exc:
                raise ValueError(f"not a key for {alg}: {exc}") from None
            check = getattr(algorithm, "check_key_length", None)  # PyJWT >= 2.10
            short = check(prepared) if check is not None else None
            if short:
                raise ValueError(short)
            raw = prepared if public_key is not None else raw
        self.key = prepared
        decoder = jwt.PyJWT(options={"require": ["sub"], "enforce_minimum_key_length": True})
        self._decode = decoder.decode
        self._errors: tuple[type[Exception], ...] = (jwt.PyJWTError, ValueError, TypeError)

    def verify(self, token: str) -> Identity:
        """The :class:`Identity` of ``token``; :class:`TokenRejected` (with the reason) if it does not verify:
        bad signature, an algorithm not in ``algorithms`` (``none`` never is), expired, not yet valid (``nbf``,
        ``iat``), wrong or unexpected audience, wrong issuer, no ``sub``."""
        try:
            claims = self._decode(token, self.key, algorithms=self.algorithms, audience=self.audience,
                                  issuer=self.issuer, leeway=self.leeway)
        except self._errors as exc:
            raise TokenRejected(f"{type(exc).__name__}: {exc}"[:200]) from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise TokenRejected("the sub claim is not a non-empty string")
        exp = claims.get("exp")
        expires = float(exp) + self.leeway if isinstance(exp, int | float) and not isinstance(exp, bool) else None
        return Identity(sub, claims, expires)

    @staticmethod
    def wall_clock() -> float:
        """Seconds since the epoch (what ``exp`` counts); the caller turns ``expires`` into a loop deadline."""
        return time.time()
