"""One accepted TCP connection: the glue between its socket and the sans-I/O core.

A :class:`Client` walks through four phases:

``HANDSHAKE``  reading an HTTP request head (bounded, under the handshake timeout);
``OPEN``       a WebSocket connection: bytes go to :class:`selectws.protocol.connection.Connection`, events to the
               plugin, output is coalesced and written once per loop iteration;
``DRAINING``   our side is done: a FIN went out after the last queued byte, input is discarded until the peer
               closes or a short linger expires (closing a socket with unread input would send a RST that can
               destroy the close frame or HTTP answer still in flight);
``CLOSED``     the socket is closed and the object forgotten.

(The WebSocket "closing" state is the core's ``State.CLOSING`` inside the ``OPEN`` phase.)

The class is also the plugins' :class:`selectws.plugins.api.Session`, so an idle connection costs one object,
its socket, its selector key, one timer and the core's state: that is what keeps 10,000 idle connections small.
"""

from __future__ import annotations

import selectors
import socket
import struct
from typing import TYPE_CHECKING, Any

from selectws.server.api import Accept, HandshakeRequest, Reject
from selectws.protocol.connection import Connection, State
from selectws.protocol.errors import CloseCode, HandshakeError
from selectws.protocol.events import Closed, Message, Pong
from selectws.protocol.frames import encode_frame
from selectws.protocol.handshake import build_accept_response, check_upgrade_request, choose_subprotocol
from selectws.protocol.http11 import Headers, Request, build_response, parse_query, parse_request
from selectws.server.proxy import client_address

if TYPE_CHECKING:
    from selectws.transport.loop import Timer
    from selectws.server.routing import Route, Router
    from selectws.server.server import Server

__all__ = ["Client"]

HANDSHAKE, OPEN, DRAINING, CLOSED = 0, 1, 2, 3
_T_IDLE, _T_CLOSE, _T_LINGER = 0, 1, 2  # what the connection's one timer is for (handshake timeout: _T_IDLE)
_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE
_LINGER = 2.0  # seconds to wait for the peer's FIN after ours
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() resets and frees the kernel's buffers
_EMPTY_HEADERS = Headers()


class Client:
    """A TCP connection from accept to close; a :class:`Session` for plugins once the upgrade is done."""

    __slots__ = (
        "_awaiting_pong",
        "_dirty",
        "_events",
        "_groups",
        "_head",
        "_inbuf",
        "_paused",
        "_plugin_failed",
        "_state",
        "_timer",
        "_timer_kind",
        "_wbuf",
        "bytes_in",
        "bytes_out",
        "id",
        "last_seen",
        "opened_at",
        "params",
        "path",
        "phase",
        "remote",
        "route",
        "router",
        "server",
        "sock",
        "subprotocol",
        "ws",
    )

    #: What a non-blocking recv/send raises for "not now" (TlsClient adds TLS's want-read / want-write).
    _would_block: tuple[type[BaseException], ...] = (BlockingIOError, InterruptedError)

    def __init__(
        self, server: Server, sock: socket.socket, remote: tuple[str, int], client_id: int, router: Router | None = None
    ) -> None:
        self.server = server
        self.router = router  # None: the server's current router (the operator listener passes its own)
        self.sock: socket.socket | None = sock
        self.remote = remote
        self.id = client_id
        self.phase = HANDSHAKE
        self.ws: Connection | None = None
        self.route: Route | None = None
        self.path = ""
        self.params: dict[str, str] = {}
        self._head = b""  # the upgrade request head; headers and query are read from it on demand
        self.subprotocol: str | None = None
        self._inbuf: bytes | bytearray = b""
        self._wbuf: bytes | bytearray = b""  # a bytearray only while something waits to be written
        self._events = _READ
        self._paused = False
        self._dirty = False
        self._groups: set[str] | None = None
        self._state: dict[str, Any] | None = None
        self._awaiting_pong = 0.0
        self._plugin_failed = False
        self.bytes_in = 0
        self.bytes_out = 0
        self.opened_at = server.loop.now
        self.last_seen = self.opened_at
        self._timer: Timer | None = None
        self._timer_kind = _T_IDLE
        self._set_timer(server.config.timeouts.handshake, _T_IDLE)

    # ================================================================== Session API (for plugins)
    @property
    def headers(self) -> Headers:
        return Headers.from_head(self._head) if self._head else _EMPTY_HEADERS

    @property
    def query(self) -> dict[str, str]:
        target = self._head[: self._head.find(b"\r\n")].split(b" ")[1] if self._head else b""
        _, _, query_string = target.decode("ascii").partition("?")
        return parse_query(query_string.partition("#")[0])

    @property
    def state(self) -> dict[str, Any]:
        if self._state is None:
            self._state = {}
        return self._state

    @property
    def groups(self) -> frozenset[str]:
        return frozenset(self._groups or ())

    @property
    def open(self) -> bool:
        return self.phase == OPEN and self.ws is not None and self.ws.state is State.OPEN

    # send_text / send_bytes repeat their few lines on purpose: they run once per message, and a shared helper
    # would add a call to the hot path.
    def send_text(self, text: str) -> bool:
        ws = self.ws
        if ws is None or not ws.send_text(text):
            return False
        self.server.messages_out += 1
        if not self._dirty:
            self._dirty = True
            self.server.dirty.append(self)
        return True

    def send_bytes(self, data: bytes | bytearray | memoryview) -> bool:
        ws = self.ws
        if ws is None or not ws.send_binary(data):
            return False
        self.server.messages_out += 1
        if not self._dirty:
            self._dirty = True
            self.server.dirty.append(self)
        return True

    def send(self, message: str | bytes) -> bool:
        if isinstance(message, str):
            return self.send_text(message)
        return self.send_bytes(message)

    def send_frame(self, frame: bytes) -> bool:
        """Queue a frame encoded once for many recipients (broadcast)."""
        ws = self.ws
        if ws is None or not ws.send_frame_bytes(frame):
            return False
        if not self._dirty:
            self._dirty = True
            self.server.dirty.append(self)
        return True

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        ws = self.ws
        if ws is not None and ws.close(code, reason):
            self._start_close_timer()
            self._mark_dirty()

    def join(self, group: str) -> None:
        self.server.join(self, group)

    def leave(self, group: str) -> None:
        self.server.leave(self, group)

    def __repr__(self) -> str:
        return f"<Client #{self.id} {self.remote[0]}:{self.remote[1]} {self.path or '-'}>"

    # ================================================================== selector callbacks
    def handle_event(self, mask: int) -> None:
        if mask & _WRITE:
            self._on_writable()
        if mask & _READ and self.sock is not None:
            self._on_readable()

    def _on_readable(self) -> None:
        sock = self.sock
        assert sock is not None
        server = self.server
        try:
            n = sock.recv_into(server.recv_buffer)
        except self._would_block:  # evaluated only when something was raised: free on the normal path
            return
        except OSError as exc:
            self._abort(f"recv failed: {exc}")
            return
        if n == 0:
            self._on_eof()
            return
        self.bytes_in += n
        self.last_seen = server.loop.now
        data = server.recv_view[:n]
        phase = self.phase
        if phase == OPEN:
            ws = self.ws
            assert ws is not None
            events = ws.receive_data(data)
            if events:
                self._handle_events(events)
            if ws.has_output or ws.close_transport:
                self._mark_dirty()
        elif phase == HANDSHAKE:
            self._on_handshake_data(data)
        # DRAINING: input is discarded.

    def _on_writable(self) -> None:
        sock = self.sock
        assert sock is not None
        try:
            sent = sock.send(self._wbuf)
        except self._would_block:
            return
        except OSError as exc:
            self._abort(f"send failed: {exc}")
            return
        self.bytes_out += sent
        wbuf = self._wbuf
        assert isinstance(wbuf, bytearray)
        del wbuf[:sent]  # O(1) from the front of a bytearray
        if not wbuf:
            self._wbuf = b""
            self._after_drain()
        elif self._paused and len(self._wbuf) <= self.server.low_water:
            self._paused = False
            self._update_interest()

    def _on_eof(self) -> None:
        if self.phase == OPEN and self.ws is not None:
            events = self.ws.receive_eof()
            if events:
                self._handle_events(events)
        self._close_socket()

    # ================================================================== handshake
    def _on_handshake_data(self, data: memoryview) -> None:
        self._inbuf += data
        server = self.server
        try:
            parsed = parse_request(self._inbuf, server.http_limits)
        except HandshakeError as exc:
            server.log_handshake_failure(self, exc.status, exc.reason)
            self._reject(exc.status, exc.reason, exc.headers)
            return
        if parsed is None:
            return
        request, used = parsed
        rest = bytes(self._inbuf[used:])
        self._inbuf = b""
        try:
            self._handle_request(request, rest)
        except HandshakeError as exc:
            server.log_handshake_failure(self, exc.status, exc.reason, request.path)
            self._reject(exc.status, exc.reason, exc.headers)

    def _handle_request(self, request: Request, rest: bytes) -> None:
        server = self.server
        self.path = request.path
        if server.trusted_proxies:  # behind a reverse proxy we trust: the client's address from its headers
            self.remote = client_address(self.remote, request.headers, server.trusted_proxies)
        router = server.router if self.router is None else self.router
        matched = router.match(request.path)
        if matched is None:
            handler = router.http_handler(request.path)
            if handler is None:
                raise HandshakeError(404, f"no route for {request.path}")
            if request.method not in ("GET", "HEAD"):
                raise HandshakeError(405, f"method {request.method} not allowed", [("Allow", "GET, HEAD")])
            status, headers, body = handler(request)
            self._respond(build_response(status, headers, body, head_only=request.method == "HEAD"))
            return
        route, params = matched
        key = check_upgrade_request(request)
        if route.origins:
            origin = (request.headers.get("Origin") or "").strip().lower().rstrip("/")
            if origin not in route.origins:
                raise HandshakeError(403, f"origin {origin[:200]!r} not allowed" if origin else "Origin required")
        per_ip = server.max_connections_per_ip
        if per_ip and server.connections_from(self.remote[0]) >= per_ip:
            raise HandshakeError(503, f"too many connections from {self.remote[0]}", [("Retry-After", "5")])
        if server.max_connections and server.open_count >= server.max_connections:
            raise HandshakeError(503, "server is at its connection limit", [("Retry-After", "5")])
        if server.draining:
            raise HandshakeError(503, "server is shutting down")
        offered = [t.strip() for v in request.headers.get_all("Sec-WebSocket-Protocol") for t in v.split(",")]
        hs = HandshakeRequest(request.path, params, request.query, request.headers, self.remote, offered)
        try:
            decision = route.plugin.on_handshake(hs)
        except Reject as exc:
            raise HandshakeError(exc.status, exc.reason, exc.headers) from None
        except Exception:
            server.log.exception("plugin on_handshake failed", plugin=route.plugin_name, path=request.path)
            raise HandshakeError(500, "internal error") from None
        decision = decision or Accept()
        supported = route.subprotocols or tuple(route.plugin.subprotocols)
        subprotocol = decision.subprotocol or choose_subprotocol(request, supported)
        required = route.subprotocol_required
        if required is None:
            required = route.plugin.subprotocol_required
        if subprotocol is None and supported and required:
            raise HandshakeError(400, f"a subprotocol is required: one of {', '.join(supported)}")
        extension = None
        ext_header = None
        if route.compression and server.deflate_settings is not None:
            offers = request.headers.get_all("Sec-WebSocket-Extensions")
            if offers:
                extension, ext_header = server.negotiate_deflate(offers)
        limits = server.config.limits
        self.ws = Connection(
            max_message_size=limits.max_message_size, max_frame_size=limits.max_frame_size, extension=extension
        )
        self.route = route
        self.params = params
        self._head = request.head
        self.subprotocol = subprotocol
        self.phase = OPEN
        self._write(build_accept_response(key, subprotocol, ext_header, decision.headers))
        server.on_client_open(self)
        self._reset_idle_timer()
        try:
            route.plugin.on_open(self)
        except Exception:
            self._plugin_error("on_open")
        if rest and self.phase == OPEN:
            self._handle_events(self.ws.receive_data(rest))
            self._mark_dirty()

    def _reject(self, status: int, reason: str, headers: list[tuple[str, str]] | None = None) -> None:
        self.server.rejected[status] = self.server.rejected.get(status, 0) + 1
        body = f"{status} {reason}\n".encode()
        # A refusal ends the connection, so it must say "close" even when it carries a Connection header of its
        # own (426 has "Connection: Upgrade", which would otherwise suppress build_response's "Connection: close").
        headers = [
            (k, f"{v}, close") if k.lower() == "connection" and "close" not in v.lower() else (k, v)
            for k, v in headers or []
        ]
        self._respond(build_response(status, headers, body))

    def _respond(self, data: bytes) -> None:
        """An HTTP answer that ends the connection (no keep-alive: this port is for WebSocket first)."""
        self.phase = DRAINING
        self.server.handshaking.pop(self.id, None)
        self._write(data)
        if not self._wbuf:
            self._after_drain()

    # ================================================================== open connection
    def _handle_events(self, events: list[Message | Closed | Any]) -> None:
        route = self.route
        assert route is not None
        on_message = route.plugin.on_message
        server = self.server
        for event in events:
            if type(event) is Message:
                server.messages_in += 1
                if self._plugin_failed:
                    continue
                try:
                    on_message(self, event.data)
                except Exception:
                    self._plugin_error("on_message")
            elif type(event) is Closed:
                self._on_ws_closed(event)
            elif type(event) is Pong:
                self._awaiting_pong = 0.0

    def _plugin_error(self, hook: str) -> None:
        route = self.route
        self.server.log.exception(
            "plugin raised; closing the connection with 1011",
            plugin=route.plugin_name if route else None, hook=hook, conn=self.id, path=self.path,
        )
        self.server.plugin_errors += 1
        self._plugin_failed = True
        self.close(CloseCode.INTERNAL_ERROR, "internal server error")

    def _on_ws_closed(self, event: Closed) -> None:
        """The WebSocket is over (handshake done, failed or transport lost): tell the plugin, log, forget."""
        server = self.server
        if event.error:
            server.log.warning(
                "protocol error", conn=self.id, peer=self.remote[0], path=self.path, code=event.code,
                reason=event.error,
            )
        route = self.route
        if route is not None:
            try:
                route.plugin.on_close(self, event.code, event.reason)
            except Exception:
                server.log.exception("plugin on_close raised", plugin=route.plugin_name, conn=self.id)
        server.on_client_closed(self, event)

    def _mark_dirty(self) -> None:
        if not self._dirty:
            self._dirty = True
            self.server.dirty.append(self)

    def flush(self) -> None:
        """Called once per loop iteration for connections with new output: one ``send`` for all of it."""
        self._dirty = False
        ws = self.ws
        if ws is None or self.sock is None:
            return
        data = ws.data_to_send()
        if data:
            self._write(data)
        if ws.close_transport and not self._wbuf and self.phase == OPEN:
            self._shutdown_transport()

    def _write(self, data: bytes) -> None:
        sock = self.sock
        if sock is None:
            return
        if self._wbuf:
            if len(self._wbuf) + len(data) > self.server.hard_limit:  # never queue past the hard cap
                self._drop_slow_consumer(len(self._wbuf) + len(data))
                return
            self._wbuf += data
        else:
            try:
                sent = sock.send(data)
            except self._would_block:
                sent = 0
            except OSError as exc:
                self._abort(f"send failed: {exc}")
                return
            self.bytes_out += sent
            if sent == len(data):
                return
            self._wbuf = bytearray(memoryview(data)[sent:])
        self._check_backpressure()

    def _check_backpressure(self) -> None:
        size = len(self._wbuf)
        server = self.server
        if size > server.hard_limit:
            self._drop_slow_consumer(size)
            return
        if size > server.high_water and not self._paused:
            self._paused = True  # stop reading what this peer sends until it reads what we send
        self._update_interest()

    def _drop_slow_consumer(self, size: int) -> None:
        """The peer does not read what it is sent: holding more would let one client grow our memory without
        bound (and a broadcast wait for it). Nothing more is queued. With ``slow_consumer_action = "close"`` one
        non-blocking attempt sends what is queued plus a close frame; unless all of it went out the socket is
        reset (SO_LINGER 0), which also frees what the kernel still holds for it."""
        server = self.server
        code = server.slow_consumer_close_code
        server.log.warning(
            "dropping a slow consumer", conn=self.id, peer=self.remote[0], path=self.path, buffered=size,
            limit=server.hard_limit, code=code, action=server.slow_consumer_action,
        )
        server.slow_consumers_dropped += 1
        sock = self.sock
        delivered = False
        ws = self.ws
        if sock is not None and server.slow_consumer_action == "close" and ws is not None and ws.state is State.OPEN:
            frame = encode_frame(0x8, code.to_bytes(2, "big") + b"slow consumer")
            try:
                pending = self._wbuf
                sent = sock.send(pending) if pending else 0
                self.bytes_out += sent
                if sent == len(pending):
                    sent = sock.send(frame)
                    self.bytes_out += sent
                    delivered = sent == len(frame)
            except OSError:
                pass
        if sock is not None and not delivered:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except OSError:
                pass
        self._abort("slow consumer: write buffer over its hard limit", code=code)

    def _after_drain(self) -> None:
        """The write buffer just emptied."""
        self._paused = False
        if self.phase == DRAINING or (self.ws is not None and self.ws.close_transport):
            self._shutdown_transport()
        else:
            self._update_interest()

    def _update_interest(self) -> None:
        sock = self.sock
        if sock is None:
            return
        events = (0 if self._paused and self.phase == OPEN else _READ) | (_WRITE if self._wbuf else 0)
        if events != self._events:
            loop = self.server.loop
            if events == 0:
                loop.unregister(sock)
            elif self._events == 0:
                loop.register(sock, events, self)
            else:
                loop.modify(sock, events, self)
            self._events = events

    def _shutdown_transport(self) -> None:
        """Send our FIN after the last byte, then wait briefly for the peer's (see the module docstring)."""
        sock = self.sock
        if sock is None:
            return
        if self.phase == OPEN and self.ws is not None and self.ws.state is not State.CLOSED:
            return
        if self.phase == DRAINING and self._timer is not None and self._timer_kind == _T_LINGER:
            return
        self.phase = DRAINING
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close_socket()
            return
        self._set_timer(_LINGER, _T_LINGER)
        self._update_interest()

    # ================================================================== timers
    def _set_timer(self, delay: float, kind: int) -> None:
        """One timer per connection, re-armed in place: a later deadline just moves ``when`` and the loop
        re-queues the timer when the old deadline comes, so re-arming costs no allocation and leaves no
        cancelled garbage in the heap. The client itself is the callback (``__call__``): no bound method kept."""
        loop = self.server.loop
        when = loop.now + delay
        self._timer_kind = kind
        timer = self._timer
        if timer is not None and not timer.cancelled:
            if timer.when <= when:
                timer.when = when
                return
            timer.cancel()
        self._timer = loop.call_at(when, self)

    def __call__(self) -> None:
        """The connection's timer fired."""
        self._timer = None
        kind = self._timer_kind
        if kind == _T_IDLE:
            self._on_timer()
        elif kind == _T_CLOSE:
            self._on_close_timeout()
        else:
            self._close_socket()  # linger over

    def _reset_idle_timer(self) -> None:
        self._set_timer(self.server.config.timeouts.ping_interval, _T_IDLE)

    def _start_close_timer(self) -> None:
        self._set_timer(self.server.config.timeouts.close, _T_CLOSE)

    def _on_timer(self) -> None:
        """Handshake timeout, or idle keepalive: ping after ``ping_interval`` idle, fail if no answer in time."""
        self._timer = None
        server = self.server
        timeouts = server.config.timeouts
        now = server.loop.now
        if self.phase == HANDSHAKE:
            server.log_handshake_failure(self, 408, "handshake timeout")
            self._reject(408, "handshake timeout")
            return
        ws = self.ws
        if self.phase != OPEN or ws is None or ws.state is not State.OPEN:
            return
        if self._awaiting_pong:
            if self.last_seen >= self._awaiting_pong:
                self._awaiting_pong = 0.0  # any input proves the peer alive
            else:
                closed = ws.fail(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
                if closed is not None:
                    self._on_ws_closed(closed)
                self._mark_dirty()
                return
        idle = now - self.last_seen
        if idle < timeouts.ping_interval:
            self._set_timer(timeouts.ping_interval - idle, _T_IDLE)
            return
        ws.send_ping(b"keepalive")
        self._awaiting_pong = now
        self._mark_dirty()
        self._set_timer(timeouts.ping_timeout, _T_IDLE)

    def _on_close_timeout(self) -> None:
        self._timer = None
        ws = self.ws
        if ws is not None and ws.state is State.CLOSING:
            closed = ws.fail(CloseCode.ABNORMAL, "close timeout: no close frame from the peer")
            if closed is not None:
                closed.error = None
                self._on_ws_closed(closed)
        self._close_socket()

    # ================================================================== teardown
    def _abort(self, why: str, code: int = CloseCode.ABNORMAL) -> None:
        """Drop the transport now (I/O error, peer gone, hopeless backlog)."""
        ws = self.ws
        if self.phase == OPEN and ws is not None and ws.state is not State.CLOSED:
            ws.state = State.CLOSED
            self._on_ws_closed(Closed(code, why, by_peer=False))
        self._close_socket()

    def _close_socket(self) -> None:
        sock = self.sock
        if sock is None:
            return
        if self.phase == OPEN and self.ws is not None and self.ws.state is not State.CLOSED:
            self.ws.state = State.CLOSED
            self._on_ws_closed(Closed(CloseCode.ABNORMAL, "connection closed", by_peer=True))
        self.sock = None
        self.phase = CLOSED
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._events:
            self.server.loop.unregister(sock)
            self._events = 0
        try:
            sock.close()
        except OSError:
            pass
        self._wbuf = b""
        self.server.on_client_gone(self)

    def shutdown(self, code: int, reason: str) -> None:
        """Server shutdown: close handshake for open connections, plain close for the others."""
        if self.phase == OPEN:
            self.close(code, reason)
        elif self.phase == HANDSHAKE:
            self._close_socket()

