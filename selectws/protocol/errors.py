"""Errors of the protocol core.

The core never lets an exception escape :meth:`Connection.receive_data`: every violation is turned into the close
code (RFC 6455 section 7.4) or HTTP status the RFCs name. These classes are how the inner functions report a
violation to that boundary; they carry the code so the boundary does not have to guess.
"""

from __future__ import annotations

from enum import IntEnum


class CloseCode(IntEnum):
    """Close status codes, RFC 6455 section 7.4.1."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS = 1005  # never sent on the wire
    ABNORMAL = 1006  # never sent on the wire
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    MANDATORY_EXTENSION = 1010
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013
    BAD_GATEWAY = 1014
    TLS_HANDSHAKE = 1015  # never sent on the wire


def is_valid_close_code(code: int) -> bool:
    """True when ``code`` may appear in a close frame on the wire (RFC 6455 section 7.4)."""
    if 3000 <= code <= 4999:
        return True
    return code in _SENDABLE


_SENDABLE = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014})


class ProtocolError(Exception):
    """A violation of the WebSocket protocol on an open connection; ``code`` is the close code to send."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class HandshakeError(Exception):
    """An opening handshake that must be refused with an HTTP ``status`` (and optional extra headers)."""

    def __init__(self, status: int, reason: str, headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers or []


class NegotiationError(HandshakeError):
    """An extension offer that cannot be accepted as written (answered with 400)."""

    def __init__(self, reason: str) -> None:
        super().__init__(400, reason)
