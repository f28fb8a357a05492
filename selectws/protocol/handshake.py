"""The WebSocket opening handshake, RFC 6455 section 4, for both roles, sans-I/O.

:class:`ServerProtocol` and :class:`ClientProtocol` are the connection of :mod:`selectws.protocol.connection` in
its two roles, starting in CONNECTING. Bytes go in with ``receive_data``; the handshake comes out as values the
caller may inspect and change before anything is written, in the manner of python-websockets:

* server: ``receive_data`` gives a :class:`Request` event (or :class:`HandshakeFailed` for a malformed head);
  ``accept(request, ...)`` or ``reject(status, reason)`` return a :class:`Response`; ``send_response(response)``
  queues it and moves to OPEN (101) or CLOSED (anything else);
* client: ``connect(...)`` returns the :class:`Request`; ``send_request(request)`` queues it; ``receive_data``
  gives the :class:`Response` and moves to OPEN, or to CLOSED with ``handshake_error`` set.

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
from collections.abc import Callable, Iterable, Sequence

from selectws.protocol.connection import CLIENT, SERVER, Connection, State
from selectws.protocol.deflate import (
    DeflateSettings,
    PerMessageDeflate,
    accept_response,
    client_offer,
    negotiate_server,
)
from selectws.protocol.errors import HandshakeError
from selectws.protocol.events import Event, HandshakeFailed, RequestBody
from selectws.protocol.http11 import (
    Headers,
    HttpLimits,
    Request,
    Response,
    build_response,
    make_response,
    parse_query,
    parse_request,
    parse_response,
)

__all__ = [
    "WS_GUID",
    "ClientProtocol",
    "ServerProtocol",
    "accept_key",
    "build_accept_response",
    "build_client_request",
    "check_accept_response",
    "check_upgrade_request",
    "choose_subprotocol",
    "make_key",
    "upgrade_request",
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
    """The ``101 Switching Protocols`` answer, serialized."""
    return build_response(101, accept_headers(key, subprotocol, extensions, extra_headers), close=False)


def accept_headers(
    key: str,
    subprotocol: str | None = None,
    extensions: str | None = None,
    extra_headers: Iterable[tuple[str, str]] = (),
) -> list[tuple[str, str]]:
    """The header fields of the ``101 Switching Protocols`` answer."""
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
    return headers


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
    """The client's upgrade request, serialized (tests and tools; :class:`ClientProtocol` uses the value)."""
    return upgrade_request(
        host, target, key, subprotocols=subprotocols, extensions=extensions, origin=origin,
        extra_headers=extra_headers,
    ).serialize()


def upgrade_request(
    host: str,
    target: str,
    key: str,
    *,
    subprotocols: Sequence[str] = (),
    extensions: str | None = None,
    origin: str | None = None,
    extra_headers: Iterable[tuple[str, str]] = (),
) -> Request:
    """The client's upgrade request (RFC 6455 section 4.1), as a value."""
    fields = [
        ("Host", host),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", key),
        ("Sec-WebSocket-Version", "13"),
    ]
    if subprotocols:
        fields.append(("Sec-WebSocket-Protocol", ", ".join(subprotocols)))
    if extensions:
        fields.append(("Sec-WebSocket-Extensions", extensions))
    if origin:
        fields.append(("Origin", origin))
    fields.extend(extra_headers)
    path, _, query_string = target.partition("?")
    return Request("GET", target, (1, 1), Headers(fields), path=path, query_string=query_string,
                   query=parse_query(query_string))


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


_S_CONNECTING = State.CONNECTING
_DEFAULT_LIMITS = HttpLimits()


class ServerProtocol(Connection):
    """The server side of one connection, from the first request byte (CONNECTING) to CLOSED."""

    __slots__ = ("_hs",)

    def __init__(
        self,
        *,
        http_limits: HttpLimits = _DEFAULT_LIMITS,
        max_message_size: int = 1 << 20,
        max_frame_size: int | None = None,
        max_frames: int = 1 << 30,
    ) -> None:
        super().__init__(
            SERVER, state=_S_CONNECTING, max_message_size=max_message_size, max_frame_size=max_frame_size,
            max_frames=max_frames,
        )
        # The handshake's state, one slot for what never coexists: the limits while a request head is read; then
        # None, or (request, size) while the request waits for this many body bytes (expect_body).
        self._hs: HttpLimits | tuple[Request, int] | None = http_limits
        # While CONNECTING, _deflate holds what accept() negotiated; it takes effect with send_response(101).

    def expect_body(self, request: Request, size: int) -> list[Event]:
        """Read ``size`` bytes of body after the head of ``request`` (a plain HTTP request such as a POST to the
        server API; the caller bounds ``size``, from ``Content-Length``). A :class:`RequestBody` event comes from
        ``receive_data`` once all of it is in, or is returned at once if it already is. If the body is not all
        in and the client sent ``Expect: 100-continue``, a ``100 Continue`` is queued. Bytes past ``size`` are
        ignored: the answer ends the connection."""
        if self.state is not _S_CONNECTING or self._hs is not None:
            raise RuntimeError("expect_body: no request head waiting for its answer")
        self._hs = (request, size)
        events = self._receive_handshake(b"")
        if not events and "100-continue" in request.headers.tokens("Expect"):
            self._output().append(b"HTTP/1.1 100 Continue\r\n\r\n")
        return events

    def _receive_handshake(self, data: bytes | bytearray | memoryview) -> list[Event]:
        limits = self._hs
        if self._buf:
            self._buf += data
        else:
            self._buf = bytearray(data)
        if not isinstance(limits, HttpLimits):
            # The request is in and its answer not yet sent: what follows waits for the 101 (frames), or is
            # dropped with the connection (anything else), unless it is the body the caller expects.
            body = limits
            if body is not None and len(self._buf) >= body[1]:
                self._hs = None
                content, self._buf = bytes(self._buf[: body[1]]), b""
                return [RequestBody(body[0], content)]
            return []
        buf = self._buf
        try:
            parsed = parse_request(buf, limits)
        except HandshakeError as exc:
            self._hs = None
            self._buf = b""
            return [HandshakeFailed(exc.status, exc.reason, exc.headers)]
        if parsed is None:
            return []
        request, used = parsed
        self._hs = None
        self._buf = bytearray(buf[used:]) if used < len(buf) else b""
        return [request]

    def accept(
        self,
        request: Request,
        *,
        subprotocol: str | None = None,
        deflate: DeflateSettings | None = None,
        headers: Iterable[tuple[str, str]] = (),
    ) -> Response:
        """The answer to ``request``: a 101 (with permessage-deflate when ``deflate`` is given and the client
        offers it), or the 4xx that a request which is no valid upgrade deserves (RFC 6455 section 4.2.1)."""
        try:
            key = check_upgrade_request(request)
            ext_header = None
            self._deflate = None
            if deflate is not None:
                offers = request.headers.get_all("Sec-WebSocket-Extensions")
                agreed = negotiate_server(offers, deflate) if offers else None
                if agreed is not None:
                    ext_header, params = agreed
                    self._deflate = PerMessageDeflate(
                        params, is_server=True, memory_level=deflate.memory_level, min_size=deflate.min_size
                    )
        except HandshakeError as exc:
            return self.reject(exc.status, exc.reason, exc.headers)
        return make_response(101, accept_headers(key, subprotocol, ext_header, headers), close=False)

    def reject(self, status: int, reason: str, headers: Iterable[tuple[str, str]] = ()) -> Response:
        """A refusal: ``status`` with ``reason`` as a plain-text body; it always ends the connection."""
        # "close" even when the refusal carries a Connection header of its own (426 has "Connection: Upgrade").
        fields = [
            (k, f"{v}, close") if k.lower() == "connection" and "close" not in v.lower() else (k, v)
            for k, v in headers
        ]
        return make_response(status, fields, f"{status} {reason}\n".encode())

    def send_response(self, response: Response) -> None:
        """Queue ``response``: a 101 opens the connection (frames that came with the request are then parsed by
        ``receive_data(b"")``: see ``events_held``); any other status ends it once written."""
        if self.state is not _S_CONNECTING:
            raise RuntimeError(f"send_response in state {self.state.name}")
        self._output().append(response.serialize())
        if response.status == 101:
            self._open(self._deflate)
        else:
            self._set_closed()


class ClientProtocol(Connection):
    """The client side of one connection: ``connect`` and ``send_request``, then frames once the 101 is in."""

    __slots__ = ("_deflate_settings", "_key", "_offered", "_requested", "handshake_error", "response", "subprotocol")

    def __init__(
        self,
        *,
        max_message_size: int = 1 << 20,
        max_frame_size: int | None = None,
        mask_source: Callable[[], bytes] | None = None,
        key: str | None = None,
    ) -> None:
        super().__init__(
            CLIENT, state=_S_CONNECTING, max_message_size=max_message_size, max_frame_size=max_frame_size,
            mask_source=mask_source,
        )
        self._key = key or make_key()
        self._offered: Sequence[str] = ()
        self._deflate_settings: DeflateSettings | None = None
        self._requested = False
        self.handshake_error: HandshakeError | None = None
        self.response: Response | None = None
        self.subprotocol: str | None = None

    def connect(
        self,
        host: str,
        target: str,
        *,
        subprotocols: Sequence[str] = (),
        deflate: DeflateSettings | None = None,
        origin: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
    ) -> Request:
        """The upgrade request for ``target`` on ``host`` (a value: add fields before :meth:`send_request`)."""
        self._offered = tuple(subprotocols)
        self._deflate_settings = deflate
        return upgrade_request(
            host, target, self._key, subprotocols=subprotocols,
            extensions=client_offer(deflate) if deflate is not None else None, origin=origin, extra_headers=headers,
        )

    def send_request(self, request: Request) -> None:
        """Queue the upgrade request (once)."""
        if self.state is not _S_CONNECTING or self._requested:
            raise RuntimeError("send_request twice" if self._requested else f"send_request in state {self.state.name}")
        self._requested = True
        self._output().append(request.serialize())

    def _receive_handshake(self, data: bytes | bytearray | memoryview) -> list[Event]:
        if self._buf:
            self._buf += data
        else:
            self._buf = bytearray(data)
        buf = self._buf
        try:
            parsed = parse_response(buf)
        except HandshakeError as exc:
            return [self._handshake_failed(exc)]
        if parsed is None:
            return []
        response, used = parsed
        rest = bytes(buf[used:])
        self._buf = b""
        self.response = response
        try:
            if response.status != 101:
                response.body = rest
                raise HandshakeError(response.status, f"server answered {response.status} {response.reason}".strip())
            self.subprotocol = check_accept_response(response, self._key, self._offered)
            extension = None
            settings = self._deflate_settings
            values = response.headers.get_all("Sec-WebSocket-Extensions")
            if values:
                if settings is None:
                    raise HandshakeError(400, "server accepted an extension that was not offered")
                params = accept_response(values, settings)
                if params is not None:
                    extension = PerMessageDeflate(
                        params, is_server=False, memory_level=settings.memory_level, min_size=settings.min_size
                    )
        except HandshakeError as exc:
            self.handshake_error = exc
            self._set_closed()
            return [response]
        self._open(extension)
        events: list[Event] = [response]
        if rest:
            events += self.receive_data(rest)
        return events

    def _handshake_failed(self, exc: HandshakeError) -> HandshakeFailed:
        self.handshake_error = exc
        self._set_closed()
        return HandshakeFailed(exc.status, exc.reason, exc.headers)

