"""Events the core hands to whoever drives it.

They are tiny slotted classes rather than dataclasses because one is made per received message on the hot path.
"""

from __future__ import annotations

from selectws.protocol.http11 import Request, Response

__all__ = ["Closed", "Event", "HandshakeFailed", "Message", "Ping", "Pong", "Request", "RequestBody", "Response"]


class Message:
    """A complete data message: ``str`` for a text message (already UTF-8 validated), ``bytes`` for binary."""

    __slots__ = ("data",)

    def __init__(self, data: str | bytes) -> None:
        self.data = data

    def __repr__(self) -> str:
        return f"Message({self.data[:40]!r}{'...' if len(self.data) > 40 else ''})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Message) and type(other.data) is type(self.data) and other.data == self.data

    __hash__ = None  # type: ignore[assignment]


class Ping:
    """A ping arrived; the core has already queued the pong with the same payload."""

    __slots__ = ("payload",)

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def __repr__(self) -> str:
        return f"Ping({self.payload!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Ping) and other.payload == self.payload

    __hash__ = None  # type: ignore[assignment]


class Pong:
    """A pong arrived (the answer to our keepalive ping, or unsolicited)."""

    __slots__ = ("payload",)

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def __repr__(self) -> str:
        return f"Pong({self.payload!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pong) and other.payload == self.payload

    __hash__ = None  # type: ignore[assignment]


class Closed:
    """The WebSocket connection is over; emitted exactly once.

    ``code`` and ``reason`` are those of the close handshake: the peer's when ``by_peer``, ours otherwise; 1006 when
    the transport went away without a close frame. ``error`` is set when the connection was failed because of a
    protocol violation (RFC 6455 section 7.1.7), and says what the violation was.
    """

    __slots__ = ("by_peer", "code", "error", "reason")

    def __init__(self, code: int, reason: str = "", by_peer: bool = False, error: str | None = None) -> None:
        self.code = code
        self.reason = reason
        self.by_peer = by_peer
        self.error = error

    def __repr__(self) -> str:
        return f"Closed(code={self.code}, reason={self.reason!r}, by_peer={self.by_peer}, error={self.error!r})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Closed)
            and (other.code, other.reason, other.by_peer, other.error)
            == (self.code, self.reason, self.by_peer, self.error)
        )

    __hash__ = None  # type: ignore[assignment]


class HandshakeFailed:
    """The opening handshake failed: a malformed request head (server role: answer it with ``reject(status,
    reason, headers)``), or a malformed, refused or invalid response (client role: the connection is CLOSED)."""

    __slots__ = ("headers", "reason", "status")

    def __init__(self, status: int, reason: str, headers: list[tuple[str, str]] | None = None) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers or []

    def __repr__(self) -> str:
        return f"HandshakeFailed({self.status}, {self.reason!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HandshakeFailed) and (other.status, other.reason) == (self.status, self.reason)

    __hash__ = None  # type: ignore[assignment]


class RequestBody:
    """The body of a plain HTTP request (server role), once all of it is in: see ``ServerProtocol.expect_body``."""

    __slots__ = ("body", "request")

    def __init__(self, request: Request, body: bytes) -> None:
        self.request = request
        self.body = body

    def __repr__(self) -> str:
        return f"RequestBody({self.request.method} {self.request.target}, {len(self.body)} bytes)"


#: What ``receive_data`` returns: a ``Request`` (server role) or ``Response`` (client role) ends the opening
#: handshake's input (a ``RequestBody`` may follow a plain request), then messages, pings, pongs and one ``Closed``.
Event = Message | Ping | Pong | Closed | Request | Response | HandshakeFailed | RequestBody
