"""The WebSocket opening handshake, RFC 6455 section 4, for both roles, sans-I/O.

The server side checks an upgrade request in the order that gives the most useful status: a plain ``GET`` on a
WebSocket route is told to upgrade (426 with ``Upgrade: websocket``), another version is told which one we speak
(426 with ``Sec-WebSocket-Version: 13``), a bad or missing key is a 400. The article's handshake (lifted from
Workerman) only hashed the key; this module is the whole of section 4.2.1.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Iterable, Sequence

from selectws.protocol.errors import HandshakeError
from selectws.protocol.http11 import Headers, Request, Response, build_response

__all__ = [
    "WS_GUID",
    "accept_key",
    "build_accept_response",
    "build_client_request",
    "check_accept_response",
    "check_upgrade_request",
    "choose_subprotocol",
    "make_key",
]

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def accept_key(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a ``Sec-WebSocket-Key``: base64(SHA-1(key + GUID))."""
    return base64.b64encode(hashlib.sha1((key + WS_GUID).encode("ascii")).digest()).decode("ascii")


def make_key() -> str:
    """A fresh client nonce: base64 of 16 random bytes."""
    return base64.b64encode(os.urandom(16)).decode("ascii")


def check_upgrade_request(request: Request) -> str:
    """Validate a WebSocket upgrade request and return its key, or raise the :class:`HandshakeError` to answer."""
    if request.method != "GET":
        raise HandshakeError(405, f"method {request.method} not allowed", [("Allow", "GET")])
    if "websocket" not in request.headers.tokens("Upgrade"):
        raise HandshakeError(
            426, "this is a WebSocket endpoint: upgrade required", [("Upgrade", "websocket"), ("Connection", "Upgrade")]
        )
    if request.version < (1, 1):
        raise HandshakeError(400, "WebSocket needs HTTP/1.1 or later")
    if "upgrade" not in request.headers.tokens("Connection"):
        raise HandshakeError(400, "missing 'Connection: Upgrade'")
    if request.headers.get("Host") is None:
        raise HandshakeError(400, "missing Host header")
    versions = request.headers.get_all("Sec-WebSocket-Version")
    if versions != ["13"]:
        raise HandshakeError(
            426, f"unsupported WebSocket version {', '.join(versions) or '(none)'}", [("Sec-WebSocket-Version", "13")]
        )
    keys = request.headers.get_all("Sec-WebSocket-Key")
    if len(keys) != 1:
        raise HandshakeError(400, "missing Sec-WebSocket-Key" if not keys else "several Sec-WebSocket-Key headers")
    key = keys[0]
    try:
        raw = base64.b64decode(key.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raw = b""
    if len(raw) != 16:
        raise HandshakeError(400, "Sec-WebSocket-Key is not base64 of 16 bytes")
    return key


def choose_subprotocol(request: Request, supported: Sequence[str]) -> str | None:
    """The first subprotocol in the client's order that the server supports (RFC 6455 section 4.2.2)."""
    if not supported:
        return None
    offered = [t.strip() for value in request.headers.get_all("Sec-WebSocket-Protocol") for t in value.split(",")]
    for name in offered:
        if name and name in supported:
            return name
    return None


def build_accept_response(
    key: str,
    subprotocol: str | None = None,
    extensions: str | None = None,
    extra_headers: Iterable[tuple[str, str]] = (),
) -> bytes:
    """The ``101 Switching Protocols`` answer."""
    headers = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Accept", accept_key(key)),
    ]
    if subprotocol:
        headers.append(("Sec-WebSocket-Protocol", subprotocol))
    if extensions:
        headers.append(("Sec-WebSocket-Extensions", extensions))
    headers.extend(extra_headers)
    return build_response(101, headers, close=False)


def build_client_request(
    host: str,
    target: str,
    key: str,
    *,
    subprotocols: Sequence[str] = (),
    extensions: str | None = None,
    origin: str | None = None,
    extra_headers: Iterable[tuple[str, str]] = (),
) -> bytes:
    """The client's upgrade request."""
    lines = [
        f"GET {target} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    if subprotocols:
        lines.append(f"Sec-WebSocket-Protocol: {', '.join(subprotocols)}")
    if extensions:
        lines.append(f"Sec-WebSocket-Extensions: {extensions}")
    if origin:
        lines.append(f"Origin: {origin}")
    lines.extend(f"{k}: {v}" for k, v in extra_headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def check_accept_response(response: Response, key: str, subprotocols: Sequence[str] = ()) -> str | None:
    """Validate the server's answer (RFC 6455 section 4.1, client side); returns the chosen subprotocol."""
    if response.status != 101:
        raise HandshakeError(response.status, f"server answered {response.status} {response.reason}".strip())
    headers: Headers = response.headers
    if "websocket" not in headers.tokens("Upgrade") or "upgrade" not in headers.tokens("Connection"):
        raise HandshakeError(400, "101 response without Upgrade/Connection headers")
    if headers.get("Sec-WebSocket-Accept") != accept_key(key):
        raise HandshakeError(400, "wrong Sec-WebSocket-Accept")
    chosen = headers.get("Sec-WebSocket-Protocol")
    if chosen is not None and chosen not in subprotocols:
        raise HandshakeError(400, f"server chose a subprotocol we did not offer: {chosen!r}")
    return chosen
