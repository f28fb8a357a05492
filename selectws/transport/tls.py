"""TLS pieces of the transport: the server context built from ``[tls]``, and one non-blocking handshake step.

Both the server's TLS connections (:mod:`selectws.server.tls_connection`) and the Redis broker's ``rediss://``
connection use :func:`step_tls_handshake`.
"""

from __future__ import annotations

import os
import selectors
import ssl

from selectws.config import ConfigError, TlsConfig

__all__ = ["build_context", "step_tls_handshake"]


def step_tls_handshake(sock: ssl.SSLSocket) -> int:
    """Advance a non-blocking TLS handshake: 0 once it is done, else the selector event it waits for.

    Errors (a bad peer, a reset) propagate as :class:`OSError` (``ssl.SSLError`` is one). Shared by the server's
    TLS connections and the Redis broker's ``rediss://`` connection.
    """
    try:
        sock.do_handshake()
    except ssl.SSLWantReadError:
        return selectors.EVENT_READ
    except ssl.SSLWantWriteError:
        return selectors.EVENT_WRITE
    return 0


def _resolve(path: str, base: str | None) -> str:
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) or base is None else os.path.join(base, path)


def _read_pem(key: str, path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror or exc}") from None


def _no_password() -> bytes:
    raise ValueError("the key is encrypted (selectws needs an unencrypted private key)")


def build_context(tls: TlsConfig, base: str | None = None) -> ssl.SSLContext:
    """A server-side context for ``tls`` (paths relative to ``base``); :class:`ConfigError` naming the key."""
    cert = _resolve(tls.cert, base)
    key = _resolve(tls.key, base)
    if b"-----BEGIN CERTIFICATE-----" not in _read_pem("tls.cert", cert):
        raise ConfigError("tls.cert", f"no PEM certificate in {cert}")
    if b"PRIVATE KEY-----" not in _read_pem("tls.key", key):
        raise ConfigError("tls.key", f"no PEM private key in {key}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3 if tls.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION  # a write can then never need a read (no want-read on send)
    context.set_alpn_protocols(["http/1.1"])
    if tls.ciphers:
        try:
            context.set_ciphers(tls.ciphers)
        except ssl.SSLError as exc:
            raise ConfigError("tls.ciphers", f"no usable cipher in {tls.ciphers!r}") from exc
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except ValueError as exc:
        raise ConfigError("tls.key", f"cannot load {key}: {exc}") from None
    except ssl.SSLError as exc:
        why = exc.reason or str(exc)
        if "KEY_VALUES_MISMATCH" in str(why).upper():
            raise ConfigError("tls.key", f"{key} is not the private key of the certificate in {cert}") from None
        raise ConfigError("tls.cert", f"cannot load certificate {cert} with key {key}: {why}") from None
    if tls.ca:
        ca = _resolve(tls.ca, base)
        _read_pem("tls.ca", ca)
        try:
            context.load_verify_locations(cafile=ca)
        except ssl.SSLError as exc:
            raise ConfigError("tls.ca", f"cannot load CA certificates from {ca}: {exc.reason or exc}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context
