"""The JWT verifier of ``[auth]`` (docs/auth.md): the secret or public key read, PyJWT checked for, at start, by
``check-config`` and on every reload.

The configuration layer validated the names (which key, which algorithms, that a route with ``auth = "jwt"`` has
one); here the key itself is read (:func:`~selectws.app.api_key.read_secret`, as for the API key) and handed to
:class:`~selectws.server.auth.JwtVerifier`. Every problem is a :class:`ConfigError` naming the key: PyJWT (or
``cryptography``) not installed says what to install; a missing or empty file, an unset variable, a secret too short
for its algorithm or a public key given as a secret name the ``[auth]`` key at fault.
"""

from __future__ import annotations

import os

from selectws.app.api_key import read_secret
from selectws.config import JWT_HMAC_ALGORITHMS, Config, ConfigError
from selectws.server.auth import JwtVerifier

__all__ = ["INSTALL_HINT", "load_jwt"]

INSTALL_HINT = "pip install 'selectws[jwt]' (PyJWT, and cryptography for RS/PS/ES/EdDSA keys)"


def load_jwt(config: Config) -> JwtVerifier | None:
    """The verifier for the routes with ``auth = "jwt"``; None when no route has it (nothing is read then)."""
    needing = [i for i, route in enumerate(config.routes) if route.auth == "jwt"]
    if not needing:
        return None
    route_key = f"routes[{needing[0]}].auth"
    try:
        import jwt  # noqa: F401 - only whether it is there
    except ImportError:
        raise ConfigError(route_key, f'auth = "jwt" needs PyJWT, which is not installed: {INSTALL_HINT}') from None
    auth = config.auth
    base = os.path.dirname(os.path.abspath(config.source)) if config.source else None
    if auth.jwt_public_key_file:
        key_name = "auth.jwt_public_key_file"
        pem = read_secret(key_name, path=auth.jwt_public_key_file, base=base)
        secret, public_key = None, pem
    else:
        key_name = "auth.jwt_secret_env" if auth.jwt_secret_env else "auth.jwt_secret_file"
        secret = read_secret(key_name, path=auth.jwt_secret_file, env=auth.jwt_secret_env, base=base)
        public_key = None
        if secret.startswith("-----BEGIN") or secret.startswith("ssh-"):
            raise ConfigError(key_name, "holds a PEM or SSH key, not an HMAC secret: give a public key as "
                                        "auth.jwt_public_key_file (with RS256, ES256, ...)")
    try:
        return JwtVerifier(secret=secret, public_key=public_key, algorithms=auth.algorithms,
                           audience=auth.audience, issuer=auth.issuer, leeway=auth.leeway)
    except ImportError as exc:
        raise ConfigError(route_key, f"{exc}: {INSTALL_HINT}") from None
    except ValueError as exc:
        hint = ""
        if secret is not None and any(a in JWT_HMAC_ALGORITHMS for a in auth.algorithms):
            hint = " (head -c 64 /dev/urandom | base64 -w0 makes a good one)"
        raise ConfigError(key_name, f"{exc}{hint}") from None
