"""One accepted TCP connection: thin glue between its socket and its :class:`ServerProtocol`.

A :class:`ServerConnection` walks through four phases (:class:`Phase`):

``HANDSHAKE``  the protocol object reads an HTTP request head (bounded, under the handshake timeout); the answer
               is decided from values by :func:`selectws.server.handshake.answer_request`;
``OPEN``       a WebSocket connection: bytes go to the protocol object, events to the plugin, output is coalesced
               and written once per loop iteration;
``DRAINING``   our side is done (the lingering close): a FIN goes out after the last queued byte, then input is
               discarded until the peer closes, for at most ``[timeouts] linger`` and ``[limits]
               linger_max_bytes`` (closing a socket with unread input would send a RST that can destroy the
               close frame or HTTP answer still in flight). A 1009 close frame the protocol holds back while the
               peer finishes sending the oversized message (``holding_close``) waits first, bounded the same way;
``CLOSED``     the socket is closed and the object forgotten.

The WebSocket state itself (CONNECTING, OPEN, CLOSING, CLOSED) belongs to the protocol object alone: this module
reads it and never writes it. The one driver rule: after any call into the protocol object, if it has output, the
connection goes on the server's flush list (once); the flush writes ``data_to_send()``, and once the protocol
says ``close_transport`` and everything is written, the transport is shut down.

Plugins never see this object: they get its :class:`PluginSession`, which exposes the plugin API and nothing of
the transport.
"""

from __future__ import annotations

import _socket
import selectors
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from enum import Enum
from itertools import islice
from typing import TYPE_CHECKING, Any

from selectws.protocol.connection import State
from selectws.protocol.errors import CloseCode
from selectws.protocol.events import Closed, HandshakeFailed, Message, Pong, Request, RequestBody
from selectws.protocol.handshake import ServerProtocol
from selectws.protocol.http11 import Headers, parse_query
from selectws.protocol.ondemand import OnDemand
from selectws.server.handshake import Outcome, answer_body, answer_later, answer_request
from selectws.server.history import Position, Recovery
from selectws.server.ratelimit import TokenBucket
from selectws.server.refusals import level_of
from selectws.server.routing import HttpResult, Pending, Route, Router
from selectws.transport.loop import TimerEntry

if TYPE_CHECKING:  # the annotation only: the server module builds connections (one package, one direction)
    from selectws.server.server import Server

__all__ = ["Phase", "PluginSession", "ServerConnection"]


class Phase(Enum):
    HANDSHAKE = "handshake"
    OPEN = "open"
    DRAINING = "draining"
    CLOSED = "closed"


HANDSHAKE, OPEN, DRAINING, CLOSED = Phase.HANDSHAKE, Phase.OPEN, Phase.DRAINING, Phase.CLOSED
_S_OPEN = State.OPEN
_S_CLOSING = State.CLOSING
_S_CLOSED = State.CLOSED


_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE
# ServerConnection._flags, one small int instead of six slots (memory per connection): the interest registered with
# the selector in its two low bits (_READ | _WRITE), three booleans, and the kind of the connection's one timer.
_INTEREST = _READ | _WRITE
_PAUSED = 4  # not reading what this peer sends until it reads what we send (its backlog passed high_water)
_BACKLOG = 8  # parsed input left for the next iteration (FRAMES_PER_TURN): not reading meanwhile
_COUNTED = 16  # an open WebSocket in the server's registry, counted per address (Server.on_open .. on_closed)
_T_IDLE = 0  # the timer: the handshake timeout, then the keepalive
_T_CLOSE = 32  # waiting for the peer's close frame
_T_LINGER = 64  # waiting for the peer's FIN after ours
_T_HOLD = 96  # our 1009 close frame waits for the end of the peer's oversized message
_T_KIND = 96
_NEVER = float("inf")
_TOKEN_EXPIRED = 3000  # close code for an expired token (IANA registry: Unauthorized)
_HOLD_IDLE = 0.5  # seconds without input after which a held close frame goes anyway (nginx's lingering_timeout)
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() resets and frees the kernel's buffers
_EMPTY_HEADERS = Headers()
#: Fairness: the most frames parsed for one connection in one loop iteration. A peer sending a flood of tiny
#: frames (a million one-byte fragments, pings) gets this many, then every other ready connection its turn.
FRAMES_PER_TURN = 512
_JOIN_MAX = 65536  # a payload larger than this is not copied to go out behind its header (sendmsg)
_IOV = 128  # buffers per sendmsg (IOV_MAX is 1024 on Linux)
_SMALL = 2048  # queued pieces smaller than this are appended to a bytearray tail rather than kept one by one
_TAIL = 65536  # ... up to this size of tail
# Request heads kept for the plugins (PluginSession.headers, query), by their rest without the Sec-WebSocket-Key
# value: clients that send the same head but for the key (a fleet of one app, a load generator) share one rest, each
# session keeping only its key. The first head of a kind is kept whole and only its rest is remembered here; at
# most _HEAD_KINDS of them, forgotten all at once when that many are (sessions keep theirs), and none longer than
# _HEAD_KIND_MAX (a long head carries cookies: it is one client's).
_head_kinds: dict[bytes, bytes] = {}
_HEAD_KINDS = 64
_HEAD_KIND_MAX = 2048


def _compact_head(head: bytes, key: str | None) -> tuple[bytes, bytes | None]:
    """``(head, None)``, or ``(rest, at + key)``: the head without the key, shared, and where the key goes back
    (four bytes, big-endian) followed by the key (:func:`_whole_head` puts it back, byte for byte)."""
    if not key:
        return head, None
    value = key.encode("latin-1")
    at = head.find(value)
    if at < 0 or len(head) > _HEAD_KIND_MAX:
        return head, None
    rest = head[:at] + head[at + len(value) :]
    shared = _head_kinds.get(rest)
    if shared is None:
        if len(_head_kinds) >= _HEAD_KINDS:
            _head_kinds.clear()
        _head_kinds[rest] = rest
        return head, None
    return shared, at.to_bytes(4, "big") + value


def _whole_head(head: bytes, key: bytes | None) -> bytes:
    if key is None:
        return head
    at = int.from_bytes(key[:4], "big")
    return head[:at] + key[4:] + head[at:]


class PluginSession:
    """One open WebSocket connection as a plugin sees it (:class:`selectws.server.api.Session`).

    It holds the connection's identity and plugin state, and sends through the protocol object; the socket, the
    buffers and the timers stay out of reach.
    """

    __slots__ = ("_claims", "_conn", "_groups", "_head", "_key", "_state", "_user", "_ws", "params", "subprotocol")

    def __init__(
        self, conn: ServerConnection, ws: ServerProtocol, head: bytes, params: dict[str, str],
        subprotocol: str | None, key: str | None = None,
    ) -> None:
        self._conn = conn
        self._ws = ws
        # The upgrade request head (headers and query are read from it on demand): whole, or the rest shared with
        # the sessions whose head differs only in ``key``, the Sec-WebSocket-Key, kept in _key (_compact_head).
        self._head, self._key = _compact_head(head, key)
        self._state: dict[str, Any] | None = None
        self._groups: set[str] | None = None
        self._user: str | None = None  # set on an auth = "jwt" route (the token's sub), with _claims
        self._claims: dict[str, Any] | None = None
        self.params = params
        self.subprotocol = subprotocol

    @property
    def id(self) -> str:
        """``<instance_id>.<n>``: unique across instances (the server API and webhooks name sessions by it)."""
        return self._conn.session_id

    @property
    def path(self) -> str:
        return self._conn.path

    @property
    def remote(self) -> tuple[str, int]:
        return self._conn.remote

    @property
    def headers(self) -> Headers:
        head = _whole_head(self._head, self._key)
        return Headers.from_head(head) if head else _EMPTY_HEADERS

    @property
    def query(self) -> dict[str, str]:
        head = _whole_head(self._head, self._key)
        target = head[: head.find(b"\r\n")].split(b" ")[1] if head else b""
        _, _, query_string = target.decode("ascii").partition("?")
        return parse_query(query_string.partition("#")[0])

    @property
    def state(self) -> dict[str, Any]:
        if self._state is None:
            self._state = {}
        return self._state

    @property
    def user(self) -> str | None:
        """The ``sub`` of the verified token on an ``auth = "jwt"`` route; None elsewhere."""
        return self._user

    @property
    def claims(self) -> dict[str, Any]:
        """The verified token's claims on an ``auth = "jwt"`` route; ``{}`` elsewhere."""
        claims = self._claims
        return claims if claims is not None else {}

    @property
    def groups(self) -> frozenset[str]:
        return frozenset(self._groups or ())

    @property
    def open(self) -> bool:
        return self._ws.state is _S_OPEN and self._conn.phase is OPEN

    # send_text / send_bytes repeat their few lines on purpose: they run once per message, and a shared helper
    # would add a call to the hot path. A True from the protocol object means it has output (the driver rule).
    def send_text(self, text: str) -> bool:
        if not self._ws.send_text(text):
            return False
        conn = self._conn
        server = conn.server
        server.counters.messages_out += 1
        if not conn.dirty:
            conn.dirty = True
            server.dirty.append(conn)
        return True

    def send_bytes(self, data: bytes | bytearray | memoryview) -> bool:
        if not self._ws.send_binary(data):
            return False
        conn = self._conn
        server = conn.server
        server.counters.messages_out += 1
        if not conn.dirty:
            conn.dirty = True
            server.dirty.append(conn)
        return True

    def send(self, message: str | bytes) -> bool:
        # The lines of send_text / send_bytes once more: most plugins call this one, and a call less counts here.
        if not (self._ws.send_text(message) if isinstance(message, str) else self._ws.send_binary(message)):
            return False
        conn = self._conn
        server = conn.server
        server.counters.messages_out += 1
        if not conn.dirty:
            conn.dirty = True
            server.dirty.append(conn)
        return True

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        self._conn.close(code, reason)

    def join(self, group: str, *, info: dict[str, Any] | None = None, since: Position | None = None,
             then: Callable[[Recovery], None] | None = None) -> None:
        self._conn.server.join(self, group, info=info, since=since, then=then)

    def leave(self, group: str) -> None:
        self._conn.server.leave(self, group)

    def __repr__(self) -> str:
        return f"<Session #{self.id} {self.remote[0]}:{self.remote[1]} {self.path}>"


class _Extra:
    """What few connections ever need, in one object a :class:`ServerConnection` makes when it first does (an idle
    connection holds a None instead: memory per connection): its own router (the operator listener's), when its
    token expires, the lingering close's discarded bytes and hold deadline, a server API answer that waits."""

    __slots__ = ("awaiting_pong", "discarded", "expires", "linger_until", "pending_answer", "router")

    def __init__(self) -> None:
        self.router: Router | None = None
        self.awaiting_pong = 0.0  # loop time of the keepalive ping that waits for its pong; 0.0: none
        #: Loop time at which the token of an authenticated connection expires (exp + leeway): the idle timer is
        #: never armed past it, and closes with 3000 when it fires. Infinity: no token, or one without exp.
        self.expires = _NEVER
        # The lingering close (DRAINING): bytes read and thrown away so far (at most ws.max_discard, that is
        # [limits] linger_max_bytes), and when a held close frame must go.
        self.discarded = 0
        self.linger_until = 0.0
        self.pending_answer: Pending | None = None  # a server API answer that waits for the broker

    @property
    def unused(self) -> bool:
        """Everything at its default: the connection lets go of it (a keepalive ping's, once answered)."""
        return (self.router is None and self.expires == _NEVER and not self.awaiting_pong and not self.discarded
                and self.pending_answer is None and not self.linger_until)


class _WriteQueue(deque[bytes | bytearray | memoryview]):
    """What the socket has not taken yet (ServerConnection._wq), and ``size``, its byte count (``_wsize``)."""

    __slots__ = ("size",)

    size: int


class ServerConnection(TimerEntry):
    """A TCP connection from accept to close, driving one :class:`ServerProtocol`; its own timer (TimerEntry)."""

    __slots__ = (
        "_extra",
        "_flags",
        "_plugin_failed",
        "_rate",
        "_wq",
        "bytes_in",
        "bytes_out",
        "dirty",
        "host",
        "id",
        "last_seen",
        "opened_at",
        "path",
        "phase",
        "port",
        "route",
        "server",
        "session",
        "sock",
        "ws",
    )

    #: What a non-blocking recv/send raises for "not now" (the TLS subclass adds TLS's want-read / want-write).
    _would_block: tuple[type[BaseException], ...] = (BlockingIOError, InterruptedError)

    def __init__(
        self, server: Server, sock: _socket.socket, remote: tuple[str, int], conn_id: int,
        router: Router | None = None,
    ) -> None:
        self._tnext = self._tprev = None  # its timer (TimerEntry): not armed yet
        self.server = server
        self._extra: _Extra | None = None
        if router is not None:  # the operator listener's; None: the server's current router
            self.router = router
        self.sock: _socket.socket | None = sock  # a bare _socket.socket, from the server's accept (or an SSLSocket)
        self.host, self.port = remote  # the peer (remote); host is shared by the connections of one address
        self.id = conn_id
        self.phase = HANDSHAKE
        limits = server.config.limits
        self.ws = ServerProtocol(
            http_limits=server.http_limits, max_message_size=limits.max_message_size,
            max_frame_size=limits.max_frame_size, max_frames=FRAMES_PER_TURN,
        )
        self.session: PluginSession | None = None
        self.route: Route | None = None
        self.path = ""
        # What the socket has not taken yet, oldest first, as the very objects the protocol produced: a frame
        # encoded once for a broadcast is queued, not copied, on every recipient that cannot take it now (small
        # pieces are coalesced into a bytearray tail). None while nothing waits; _wsize is its byte count (kept in
        # the queue), also summed over all connections in server.buffered_total (the max_buffered_total budget).
        self._wq: _WriteQueue | None = None
        self._flags = _READ  # see _PAUSED and the others: not paused, no backlog, not counted, timer kind IDLE
        self.dirty = False  # on the server's flush list
        self._plugin_failed = False
        self._rate: TokenBucket | None = None  # the route's per-connection rate limit (ratelimit.py), if it has one
        self.bytes_in = 0
        self.bytes_out = 0
        self.opened_at = server.loop.now
        self.last_seen = self.opened_at
        self.ws.max_discard = limits.linger_max_bytes
        self._set_timer(server.config.timeouts.handshake, _T_IDLE)

    def _more(self) -> _Extra:
        extra = self._extra
        if extra is None:
            extra = self._extra = _Extra()
        return extra

    #: The connection's own router (the operator listener's); None: the server's current one.
    router: OnDemand[Router | None] = OnDemand(None, "_extra", _Extra)
    #: Loop time of the keepalive ping that waits for its pong; 0.0: none (any input answers it too). Set back to
    #: 0.0, it lets go of the _Extra if nothing else is in it.
    _awaiting_pong: OnDemand[float] = OnDemand(0.0, "_extra", _Extra)
    #: Loop time at which the token expires (see _Extra.expires).
    _expires: OnDemand[float] = OnDemand(_NEVER, "_extra", _Extra)

    @property
    def remote(self) -> tuple[str, int]:
        """The peer's (address, port): the client's, behind a trusted proxy, once the request head is read."""
        return self.host, self.port

    @remote.setter
    def remote(self, remote: tuple[str, int]) -> None:
        self.host, self.port = remote

    @property
    def _wsize(self) -> int:
        """Bytes in the write queue (``_wq``); 0 when there is none."""
        wq = self._wq
        return wq.size if wq is not None else 0

    @_wsize.setter
    def _wsize(self, size: int) -> None:
        wq = self._wq
        if wq is not None:
            wq.size = size

    @property
    def registered(self) -> bool:
        """In the server's registry of open WebSockets (set and cleared by the server: on_open, on_closed)."""
        return bool(self._flags & _COUNTED)

    @registered.setter
    def registered(self, value: bool) -> None:
        self._flags = self._flags | _COUNTED if value else self._flags & ~_COUNTED

    @property
    def session_id(self) -> str:
        """The id plugins, the server API and webhooks see: ``<instance_id>.<id>``, unique across instances
        (``id`` is this process's registry key, and what log lines call ``conn``)."""
        return f"{self.server.instance_id}.{self.id}"

    @property
    def buffered(self) -> int:
        """Bytes accepted for this peer and not yet written to its socket."""
        return self._wsize + self.ws.pending_output

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Start the closing handshake (plugins, server shutdown)."""
        if self.ws.close(code, reason):
            self._start_close_timer()
            self._flush_later()

    def send_frame(self, frame: bytes) -> bool:
        """Queue a frame encoded once for many recipients (broadcast)."""
        if not self.ws.send_frame_bytes(frame):
            return False
        if not self.dirty:
            self.dirty = True
            self.server.dirty.append(self)
        return True

    def send_message(self, message: str | bytes) -> bool:
        """Queue ``message`` through this connection's own compression context (broadcast, uncounted)."""
        if not self.ws.send_message(message):
            return False
        self._flush_later()
        return True

    def __repr__(self) -> str:
        return f"<ServerConnection #{self.id} {self.remote[0]}:{self.remote[1]} {self.path or '-'}>"

    # ================================================================== selector callbacks
    def handle_event(self, mask: int) -> None:
        """The selector's callback. Readable, the common case, is handled right here (the read itself, not a call
        to :meth:`_on_readable`): one Python call less per received message."""
        if mask != _READ:
            if mask & _WRITE:
                self._on_writable()
            if not mask & _READ or self.sock is None:
                return
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
        if self.phase is DRAINING:
            self._discard(n)
            return
        ws = self.ws
        events = ws.receive_data(server.recv_view, n)  # the buffer and the count: no slice of it per read
        if events:
            # One message from this read, the common case of request/response traffic: dispatched right here, as
            # _handle_events' Message branch does it (no rate limit on the route, the plugin has not failed), with
            # one Python call less per message. Everything else goes through _handle_events.
            if len(events) == 1 and type(event := events[0]) is Message and self._rate is None and (
                not self._plugin_failed
            ):
                server.counters.messages_in += 1
                try:
                    self.route.on_message(self.session, event.data)  # type: ignore[union-attr]
                except Exception:
                    self._plugin_error("on_message")
            else:
                self._handle_events(events)
            while ws.held is not None:
                self._handle_events(ws.receive_data(b""))
        if ws.input_pending and self.sock is not None:
            self._defer_input()
        if not self.dirty and (ws.has_output or ws.close_transport):
            self._flush_later()

    def _on_readable(self) -> None:
        """Read once and act on what came (the body of :meth:`handle_event`, for the TLS subclass's loop)."""
        ServerConnection.handle_event(self, _READ)

    def _defer_input(self) -> None:
        """The protocol stopped at FRAMES_PER_TURN with frames left: parse them next iteration, after the other
        connections had their turn, and read nothing more from this socket until they are done."""
        if not self._flags & _BACKLOG:
            self._flags |= _BACKLOG
            self._update_interest()
        self.server.loop.call_soon(self._resume_input)

    def _resume_input(self) -> None:
        if self.sock is None or self.phase is not OPEN:
            self._flags &= ~_BACKLOG
            return
        ws = self.ws
        events = ws.receive_data(b"")
        if events:
            self._handle_events(events)
            while ws.held is not None:
                self._handle_events(ws.receive_data(b""))
        if ws.input_pending and self.sock is not None:
            self.server.loop.call_soon(self._resume_input)
        else:
            self._flags &= ~_BACKLOG
            self._update_interest()
            self._input_resumed()
        if ws.has_output or ws.close_transport:
            self._flush_later()

    def _input_resumed(self) -> None:
        """The deferred input is parsed and the socket is watched again (TLS also checks its own buffer)."""

    def _on_writable(self) -> None:
        wq = self._wq
        if wq is None:  # dropped meanwhile
            self._update_interest()
            return
        try:
            sent = self.sock.send(wq[0]) if len(wq) == 1 else self._send_pieces(list(islice(wq, _IOV)))  # type: ignore[union-attr]
        except self._would_block:
            return
        except OSError as exc:
            self._abort(f"send failed: {exc}")
            return
        self._sent_from_queue(sent)
        if self._wq is None:
            self._after_drain()
        elif self._flags & _PAUSED and self._wsize <= self.server.low_water:
            self._flags &= ~_PAUSED
            self._update_interest()

    def _send_pieces(self, pieces: list[bytes | bytearray | memoryview]) -> int:
        """One non-blocking gathered write of ``pieces`` (the TLS subclass joins them instead)."""
        assert self.sock is not None
        return self.sock.sendmsg(pieces)

    def _sent_from_queue(self, sent: int) -> None:
        """``sent`` bytes from the front of the queue went out: let go of them."""
        self.bytes_out += sent
        self._wsize -= sent
        self.server.buffered_total -= sent
        wq = self._wq
        assert wq is not None
        while sent:
            front = wq[0]
            n = len(front)
            if sent < n:
                if type(front) is bytearray:
                    del front[:sent]  # in place, from the front of a bytearray: no copy
                else:
                    wq[0] = memoryview(front)[sent:]  # a view: the shared frame itself stays as it is
                break
            wq.popleft()
            sent -= n
        if not wq:
            self._wq = None
            self.server.backlogged.discard(self)

    def _on_eof(self) -> None:
        events = self.ws.receive_eof()
        if events:
            self._handle_events(events)
        self._close_socket()

    # ================================================================== events
    def _handle_events(self, events: list[Any]) -> None:
        counters = self.server.counters
        session = self.session
        on_message = self.route.on_message if self.route is not None else None  # hoisted: the hot path
        # The route's rate limit (ratelimit.py), hoisted too: without one a message costs one local "is not None"
        # more; with one, the bucket is asked once per batch (the loop's clock stands still) and counted down here.
        rate = self._rate
        allowed = left = rate.allowance() if rate is not None else 0
        for event in events:
            kind = type(event)
            if kind is Message:
                counters.messages_in += 1
                if self._plugin_failed:
                    continue
                if rate is not None:
                    if not left:  # over the limit
                        self._rate_limited(rate)
                        continue
                    left -= 1
                try:
                    on_message(session, event.data)  # type: ignore[misc]
                except Exception:
                    self._plugin_error("on_message")
            elif kind is Closed:
                self._on_ws_closed(event)
            elif kind is Pong:
                self._awaiting_pong = 0.0
            elif kind is Request:  # alone in its batch; what follows a 101 comes through events_held
                self._on_request(event)
            elif kind is HandshakeFailed:
                self._refuse(event.status, event.reason, "bad_request", event.headers)
            elif kind is RequestBody:
                self._on_body(event)
        if rate is not None:
            rate.spend(allowed - left)

    def _on_request(self, request: Request) -> None:
        server = self.server
        ws = self.ws
        self.path = request.path
        router = server.router if self.router is None else self.router
        outcome = answer_request(ws, request, self.remote, router, server.admission())
        self.remote = outcome.remote
        if outcome.raised is not None:  # answered 500
            matched = router.match(request.path)
            server.log.error("plugin on_handshake failed" if matched else "http handler failed",
                             plugin=matched[0].plugin_name if matched else None, path=request.path,
                             exc_info=outcome.raised)
        if outcome.endpoint is not None:  # the answer needs the body (the server API): under the handshake timeout
            events = ws.expect_body(request, outcome.body_size)
            if events:
                self._handle_events(events)
            elif ws.has_output:  # a 100 Continue
                self._flush_later()
            return
        ws.send_response(outcome.response)
        route = outcome.route
        if route is None:
            self._answered(outcome, request.path)
            return
        self.route = route
        self.phase = OPEN
        if self.path == route.path:  # a literal route: its own string, not one copy per connection
            self.path = route.path
        if route.max_messages_per_second:  # a full bucket per connection; a reload changes new connections only
            self._rate = TokenBucket(server.loop, route.max_messages_per_second, route.burst,
                                     route.rate_limit_action == "drop")
        session = self.session = PluginSession(
            self, ws, request.head, outcome.params, outcome.response.headers.get("Sec-WebSocket-Protocol"),
            request.headers.get("Sec-WebSocket-Key"),
        )
        identity = outcome.identity
        if identity is not None:  # an auth = "jwt" route (server.on_open joins it to user:<sub>)
            session._user = identity.user
            session._claims = identity.claims
            if identity.expires is not None:  # exp is wall-clock time; the loop counts monotonic time
                self._more().expires = server.loop.now + max(0.0, identity.expires - time.time())
        server.on_open(self)
        self._reset_idle_timer()
        try:
            route.plugin.on_open(session)
        except Exception:
            self._plugin_error("on_open")

    def _on_body(self, event: RequestBody) -> None:
        """The body of a request to a :class:`~selectws.server.routing.BodyHandler` is in: answer it."""
        router = self.server.router if self.router is None else self.router
        request = event.request
        endpoint = router.body_handler(request.path)
        if endpoint is None:  # switched off by a reload meanwhile
            outcome = Outcome(self.ws.reject(404, f"no route for {request.path}"), self.remote,
                              f"no route for {request.path}", failure="no_route")
        else:
            outcome = answer_body(request, self.remote, endpoint, event.body)
            pending = outcome.pending
            if pending is not None:  # the answer needs the broker (history, presence): it comes within a second or
                self._more().pending_answer = pending  # two, and the handshake timeout still bounds the wait
                pending.then(lambda result: self._answer_later(pending, request, result))
                return
        if outcome.raised is not None:
            self.server.log.error("http handler failed", path=request.path, exc_info=outcome.raised)
        self.ws.send_response(outcome.response)
        self._answered(outcome, request.path)

    def _answer_later(self, pending: Pending, request: Request, result: HttpResult) -> None:
        extra = self._extra
        if extra is None or extra.pending_answer is not pending:  # timed out (408), or the connection is gone
            return
        extra.pending_answer = None
        outcome = answer_later(request, self.remote, result)
        self.ws.send_response(outcome.response)
        self._answered(outcome, request.path)
        self._flush_later()

    def _answered(self, outcome: Outcome, path: str) -> None:
        """An HTTP answer (not a 101) went into the protocol's output: count a refusal; end the connection."""
        if outcome.response.status >= 400:
            self._refused(outcome.response.status, outcome.reason, path, outcome.failure)
        self._end_handshake()

    def _refuse(self, status: int, reason: str, failure: str, headers: list[tuple[str, str]] | None = None) -> None:
        """Answer a request head we cannot read, or one that never came, with ``status`` (and end the connection)."""
        extra = self._extra
        if extra is not None and extra.pending_answer is not None:
            extra.pending_answer.cancel()
            extra.pending_answer = None
        self._refused(status, reason, None, failure)
        self.ws.send_response(self.ws.reject(status, reason, headers or ()))
        self._end_handshake()

    def _refused(self, status: int, reason: str, path: str | None, failure: str) -> None:
        """Count a refusal (by status, and by ``failure``: the ``reason`` label of handshake_failures_total) and
        log it at the level its kind deserves (selectws/server/refusals.py: scanners' noise at debug, then
        summarised once a minute)."""
        server = self.server
        counters = server.counters
        counters.rejected[status] = counters.rejected.get(status, 0) + 1
        counters.handshake_failures += 1
        failure = failure or "http"
        reasons = counters.handshake_failure_reasons
        reasons[failure] = reasons.get(failure, 0) + 1
        getattr(server.log, level_of(failure))(
            "handshake refused", conn=self.id, peer=self.remote[0], path=path or self.path or None, status=status,
            reason=reason, kind=failure)
        server.refusals.add(str(status))

    def _end_handshake(self) -> None:
        """An HTTP answer went into the protocol's output (the protocol is CLOSED): it ends the connection once
        written."""
        self.server.handshaking.pop(self.id, None)
        self.phase = DRAINING
        self._flush_later()

    def _plugin_error(self, hook: str) -> None:
        route = self.route
        self.server.log.exception(
            "plugin raised; closing the connection with 1011",
            plugin=route.plugin_name if route else None, hook=hook, conn=self.id, path=self.path,
        )
        self.server.counters.plugin_errors += 1
        self._plugin_failed = True
        self.close(CloseCode.INTERNAL_ERROR, "internal server error")

    def _rate_limited(self, rate: TokenBucket) -> None:
        """A message over the route's rate limit, not handed to the plugin: dropped (``rate_limit_action = "drop"``),
        or the connection closed with 1008 at once (close frame, then TCP, as for a keepalive timeout: a client
        flooding us is not waited for). Counted per route; logged once per connection."""
        ws = self.ws
        if ws.state is not _S_OPEN:  # we are closing: what still arrives is not the plugin's, nor a refusal
            return
        server = self.server
        path = self.route.path if self.route is not None else self.path
        counters = server.counters
        counters.rate_limited[path] = counters.rate_limited.get(path, 0) + 1
        if not rate.limited:
            rate.limited = True
            server.log.warning(
                "rate limit exceeded", conn=self.id, peer=self.remote[0], path=self.path, rate=rate.rate,
                burst=int(rate.burst), action="drop" if rate.drop else "close",
            )
        if rate.drop:
            return
        counters.rate_limit_closes[path] = counters.rate_limit_closes.get(path, 0) + 1
        rate.stop()  # what follows in this batch is refused too
        closed = ws.fail(CloseCode.POLICY_VIOLATION, "rate limit exceeded")
        if closed is not None:
            self._on_ws_closed(closed)
        self._flush_later()

    def _on_ws_closed(self, event: Closed) -> None:
        """The WebSocket is over (handshake done, failed or transport lost): tell the plugin, log, forget."""
        server = self.server
        if event.error:
            server.log.warning(
                "protocol error", conn=self.id, peer=self.remote[0], path=self.path, code=event.code,
                reason=event.error,
            )
        route = self.route
        if route is not None and self.session is not None:
            try:
                route.plugin.on_close(self.session, event.code, event.reason)
            except Exception:
                server.log.exception("plugin on_close raised", plugin=route.plugin_name, conn=self.id)
        server.on_closed(self, event)

    # ================================================================== output
    def _flush_later(self) -> None:
        """The driver rule: the protocol object has output (or wants the transport closed): flush this iteration."""
        if not self.dirty:
            self.dirty = True
            self.server.dirty.append(self)

    def flush(self) -> None:
        """Called once per loop iteration for connections with new output: one ``send`` for all of it."""
        self.dirty = False
        sock = self.sock
        if sock is None:
            return
        ws = self.ws
        pieces = ws.take_output()
        if pieces:
            if len(pieces) == 1 and self._wq is None:  # the common case, _write's first branch inline
                piece = pieces[0]
                try:
                    sent = sock.send(piece)
                except self._would_block:
                    sent = 0
                except OSError as exc:
                    self._abort(f"send failed: {exc}")
                    return
                self.bytes_out += sent
                if sent != len(piece):  # the rest is queued as _write does: the piece, or a view of its rest
                    self._enqueue([memoryview(piece)[sent:] if sent else piece], len(piece) - sent)
                    self._check_backpressure()
            else:
                self._write(pieces)
        if ws.close_transport and self._wq is None and self.sock is not None:
            self._shutdown_transport()

    def _write(self, pieces: list[bytes | bytearray | memoryview]) -> None:
        """Send ``pieces`` now, as far as the socket takes them; queue the rest, shared, not copied."""
        sock = self.sock
        if sock is None:
            return
        if self._wq is not None:  # behind a backlog: queue
            total = sum(map(len, pieces))
            if self._wsize + total > self.server.hard_limit:  # never queue past the hard cap
                self._drop_slow_consumer(self._wsize + total)
                return
            self._enqueue(pieces, total)
        else:
            n = len(pieces)
            try:
                if n == 1:
                    total = len(pieces[0])
                    sent = sock.send(pieces[0])
                elif n == 2 and len(pieces[1]) > _JOIN_MAX:  # a header and a large payload: no copy
                    total = len(pieces[0]) + len(pieces[1])
                    sent = self._send_pieces(pieces)
                else:  # small pieces: one copy and one send() beat a gathered write
                    data = b"".join(pieces)
                    total = len(data)
                    sent = sock.send(data)
            except self._would_block:
                sent = 0
            except OSError as exc:
                self._abort(f"send failed: {exc}")
                return
            self.bytes_out += sent
            if sent == total:
                return
            # Queue the rest as the original pieces (a frame shared by many recipients stays shared).
            rest: list[bytes | bytearray | memoryview] = []
            for piece in pieces:
                size = len(piece)
                if sent >= size:
                    sent -= size
                    continue
                rest.append(memoryview(piece)[sent:] if sent else piece)
                sent = 0
            self._enqueue(rest, sum(map(len, rest)))
        self._check_backpressure()

    def _enqueue(self, pieces: list[bytes | bytearray | memoryview], total: int) -> None:
        wq = self._wq
        server = self.server
        if wq is None:
            wq = self._wq = _WriteQueue()
            wq.size = 0
            server.backlogged.add(self)
        for piece in pieces:
            if len(piece) < _SMALL:
                tail = wq[-1] if wq else None
                if type(tail) is bytearray and len(tail) < _TAIL:
                    tail += piece
                else:
                    wq.append(bytearray(piece))
            else:
                wq.append(piece)
        wq.size += total
        server.buffered_total += total
        if server.buffered_total > server.max_buffered_total:
            server.shed_write_buffers()

    def _check_backpressure(self) -> None:
        size = self._wsize
        server = self.server
        if self.sock is None:  # dropped by the global budget
            return
        if size > server.hard_limit:
            self._drop_slow_consumer(size)
            return
        if size > server.high_water and not self._flags & _PAUSED:
            self._flags |= _PAUSED  # stop reading what this peer sends until it reads what we send
        self._update_interest()

    def _drop_slow_consumer(self, size: int, over_budget: bool = False) -> None:
        """The peer does not read what it is sent: holding more would let one client grow our memory without
        bound (and a broadcast wait for it). Nothing more is queued. With ``slow_consumer_action = "close"`` one
        non-blocking attempt sends what is queued plus a close frame; unless all of it went out the socket is
        reset (SO_LINGER 0), which also frees what the kernel still holds for it."""
        server = self.server
        code = server.slow_consumer_close_code
        if over_budget:  # one line for the whole shedding comes from the server; this one is detail
            server.log.info(
                "dropping a connection over the write buffer budget", conn=self.id, peer=self.remote[0],
                path=self.path, buffered=size, code=code,
            )
            server.counters.budget_dropped += 1
        else:
            server.log.warning(
                "dropping a slow consumer", conn=self.id, peer=self.remote[0], path=self.path, buffered=size,
                limit=server.hard_limit, code=code, action=server.slow_consumer_action,
            )
            server.counters.slow_consumers_dropped += 1
        sock = self.sock
        ws = self.ws
        delivered = False
        closed = None
        if server.slow_consumer_action == "close" and ws.state is _S_OPEN:
            closed = ws.fail(code, "slow consumer")  # the protocol object frames the close
            frame = ws.data_to_send()
            if sock is not None:
                try:
                    wq = self._wq
                    # The close frame may only follow the whole queue (pieces are headers and payloads, the
                    # first maybe a partly sent one): behind a queue longer than one gathered write, no attempt.
                    if wq is None or len(wq) < _IOV:
                        pieces = [*(wq or ()), frame]
                        want = sum(map(len, pieces))
                        sent = self._send_pieces(pieces)
                        self.bytes_out += sent
                        delivered = sent == want
                except OSError:
                    pass
        if sock is not None and not delivered:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except OSError:
                pass
        if closed is None:
            closed = ws.abort("slow consumer: write buffer over its hard limit", code)
        if closed is not None and self.phase is OPEN:
            self._on_ws_closed(closed)
        self._close_socket()

    def drop_over_budget(self) -> None:
        """Dropped by the server's ``max_buffered_total`` budget (see :meth:`Server.shed_write_buffers`)."""
        if self.sock is not None:
            self._drop_slow_consumer(self._wsize, over_budget=True)

    def _after_drain(self) -> None:
        """The write buffer just emptied."""
        self._flags &= ~_PAUSED
        if self.ws.close_transport:
            self._shutdown_transport()
        else:
            self._update_interest()

    def _update_interest(self) -> None:
        sock = self.sock
        if sock is None:
            return
        flags = self._flags
        events = (0 if (flags & _PAUSED and self.phase is OPEN) or flags & _BACKLOG else _READ) | (
            _WRITE if self._wq is not None else 0
        )
        if events != flags & _INTEREST:
            loop = self.server.loop
            if events == 0:
                loop.unregister(sock)
            elif not flags & _INTEREST:
                loop.register(sock, events, self)
            else:
                loop.modify(sock, events, self)
            self._flags = flags & ~_INTEREST | events

    def _shutdown_transport(self) -> None:
        """The lingering close (DRAINING in the module docstring): our FIN after the last byte, then input read and
        discarded until the peer's FIN, for ``linger`` seconds and ``linger_max_bytes`` at most.

        While the protocol holds a 1009 close frame (the peer is still sending the message it refused) there is
        nothing to write yet: we keep reading, so that the protocol finds the end of that message, for at most
        ``linger`` seconds, or ``_HOLD_IDLE`` without input. A browser reports a close frame that reaches it
        before its own send has finished as unclean (Chromium: ``wasClean`` false), whatever TCP does after it."""
        sock = self.sock
        ws = self.ws
        if sock is None or ws.state is not _S_CLOSED:
            return
        kind = self._flags & _T_KIND
        if self.phase is DRAINING and self._tnext is not None and kind == _T_LINGER:
            return  # our FIN is out
        server = self.server
        self.phase = DRAINING
        server.handshaking.pop(self.id, None)
        linger = server.config.timeouts.linger
        if ws.holding_close:
            if kind != _T_HOLD:
                self._more().linger_until = server.loop.now + linger
                self._set_timer(min(_HOLD_IDLE, linger), _T_HOLD)
                self._update_interest()
            return
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close_socket()
            return
        self._set_timer(linger, _T_LINGER)
        self._update_interest()

    def _discard(self, n: int) -> None:
        """DRAINING: ``n`` bytes arrived in the shared receive buffer; they are thrown away (no copy). A held close
        frame learns from them where the oversized message ends (then it is flushed); other input counts against
        ``linger_max_bytes``, past which the socket is closed (a reset, if the peer is still sending)."""
        ws = self.ws
        if ws.holding_close:
            server = self.server
            ws.receive_data(server.recv_view, n)  # frame headers only: the payload is skipped, never copied
            if ws.holding_close:
                self._set_timer(min(_HOLD_IDLE, self._more().linger_until - server.loop.now), _T_HOLD)
            else:
                self._flush_later()
            return
        extra = self._more()
        extra.discarded += n
        if extra.discarded > self.ws.max_discard:  # [limits] linger_max_bytes
            self._close_socket()

    def _end_hold(self) -> None:
        """The oversized message did not end within ``linger`` (or the peer paused): our close frame goes now."""
        self.ws.release_close()
        self._flush_later()

    # ================================================================== timers
    def _set_timer(self, delay: float, kind: int) -> None:
        """One timer per connection, the connection itself (a :class:`TimerEntry`: ``__call__`` when it fires),
        re-armed in place for its next deadline, later or earlier: no Timer object, no bound method, no float per
        connection (the loop keeps the entries due in the same tick together, with one deadline for all).
        The idle timer of an authenticated connection is never armed past its token's expiry (``_expires``), so
        the same timer closes it with 3000 then: no second timer per connection."""
        loop = self.server.loop
        when = loop.now + delay
        if kind == _T_IDLE:
            extra = self._extra
            if extra is not None and when > extra.expires:
                when = extra.expires
        self._flags = self._flags & ~_T_KIND | kind
        loop.arm(self, when)

    def __call__(self) -> None:
        """The connection's timer fired."""
        kind = self._flags & _T_KIND
        if kind == _T_IDLE:
            self._on_timer()
        elif kind == _T_CLOSE:
            self._on_close_timeout()
        elif kind == _T_HOLD:
            self._end_hold()
        else:
            self._close_socket()  # linger over

    def _reset_idle_timer(self) -> None:
        self._set_timer(self.server.config.timeouts.ping_interval, _T_IDLE)

    def _start_close_timer(self) -> None:
        self._set_timer(self.server.config.timeouts.close, _T_CLOSE)

    def _on_timer(self) -> None:
        """Handshake timeout, or idle keepalive: ping after ``ping_interval`` idle, fail if no answer in time."""
        server = self.server
        timeouts = server.config.timeouts
        now = server.loop.now
        ws = self.ws
        if self.phase is HANDSHAKE:
            self._refuse(408, "handshake timeout", "timeout")
            return
        if self.phase is not OPEN or ws.state is not _S_OPEN:
            return
        if now >= self._expires:  # the token expired (exp + leeway): the client reconnects with a fresh one
            session = self.session
            server.log.info("token expired; closing", conn=self.id, peer=self.remote[0], path=self.path,
                            user=session.user if session is not None else None)
            self.close(_TOKEN_EXPIRED, "token expired")
            return
        if self._awaiting_pong:
            if self.last_seen >= self._awaiting_pong:
                self._awaiting_pong = 0.0  # any input proves the peer alive
            else:
                server.log.warning("keepalive timeout", conn=self.id, peer=self.remote[0], path=self.path,
                                   timeout=timeouts.ping_timeout)
                closed = ws.fail(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
                if closed is not None:
                    self._on_ws_closed(closed)
                self._flush_later()
                return
        idle = now - self.last_seen
        if idle < timeouts.ping_interval:
            self._set_timer(timeouts.ping_interval - idle, _T_IDLE)
            return
        ws.send_ping(b"keepalive")
        self._awaiting_pong = now
        self._flush_later()
        self._set_timer(timeouts.ping_timeout, _T_IDLE)

    def _on_close_timeout(self) -> None:
        if self.ws.state is _S_CLOSING:
            closed = self.ws.abort("close timeout: no close frame from the peer")
            if closed is not None:
                self._on_ws_closed(closed)
        self._close_socket()

    # ================================================================== teardown
    def _abort(self, why: str) -> None:
        """Drop the transport now (I/O error, peer gone)."""
        closed = self.ws.abort(why)
        if closed is not None and self.phase is OPEN:
            self._on_ws_closed(closed)
        self._close_socket()

    def _close_socket(self) -> None:
        sock = self.sock
        if sock is None:
            return
        closed = self.ws.abort("connection closed")
        if closed is not None and self.phase is OPEN:
            self._on_ws_closed(closed)
        self.sock = None
        self.phase = CLOSED
        self.server.loop.disarm(self)
        if self._flags & _INTEREST:
            self.server.loop.unregister(sock)
            self._flags &= ~_INTEREST
        try:
            sock.close()
        except OSError:
            pass
        if self._wq is not None:
            self.server.buffered_total -= self._wsize
            self.server.backlogged.discard(self)
            self._wq = None
            self._wsize = 0
        extra = self._extra
        if extra is not None and extra.pending_answer is not None:
            extra.pending_answer.cancel()
            extra.pending_answer = None
        self.server.on_gone(self)
        # The session and the connection refer to each other: let go of it here, so that reference counting frees
        # both now (a plugin that keeps its session still has a harmless, closed one).
        self.session = None

    def shutdown_now(self) -> None:
        """Close the socket at once (the server stops: grace period over, or a second stop signal)."""
        self._close_socket()

    def shutdown(self, code: int, reason: str) -> None:
        """Server shutdown: close handshake for open connections, plain close for the others."""
        if self.phase is OPEN:
            self.close(code, reason)
        elif self.phase is HANDSHAKE:
            self._close_socket()

