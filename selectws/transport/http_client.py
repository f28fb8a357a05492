"""A non-blocking HTTP/1.1 client in the server's loop: one keep-alive connection, one request at a time.

The webhooks (:mod:`selectws.server.hooks`) POST through it. The HTTP itself is h11's (a sans-I/O HTTP/1.1 state
machine, on which wsproto builds its handshake): h11 turns a request into bytes and bytes into a response, checks
framing (Content-Length, chunked, keep-alive or not) and refuses a malformed answer; this module only moves bytes
between it and one socket:

* ``connect_ex`` on a non-blocking socket to an address resolved beforehand (never ``getaddrinfo`` here: the
  application resolves host names before the loop starts), then, for https, the TLS handshake step by step
  (:func:`selectws.transport.tls.step_tls_handshake`);
* write interest only while request bytes are pending, read interest while waiting for the answer;
* one timer per request, covering connecting, TLS, sending and the whole response: past it the request fails;
* the response body is read and thrown away (only the status matters), at most ``max_body`` bytes are counted;
* after a complete exchange that both sides allow to continue, the connection is kept for the next request and
  closed after ``idle_timeout`` unused (shorter than common server keep-alive timeouts) or as soon as the peer
  closes it (an idle connection is watched for readability).

The result of a request is one :class:`HttpResult` handed to its callback, exactly once, from the loop.
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import h11

from selectws.transport.loop import EventLoop, Timer
from selectws.transport.tls import step_tls_handshake

__all__ = ["HttpClient", "HttpResult", "client_context"]

_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE
_RECV = 65536
_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


@dataclass(frozen=True, slots=True)
class HttpResult:
    """How one request ended: ``status`` (None when no response came) or ``error`` (None on a response)."""

    status: int | None
    error: str | None
    #: Whether any byte of the request reached the socket: False means the receiver cannot have seen it.
    sent: bool
    elapsed: float

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def client_context(cafile: str | None = None) -> ssl.SSLContext:
    """A client TLS context that verifies the server (against ``cafile``, or the system's CA certificates).

    Reads files: call it outside the loop (the application does, at start and on reload)."""
    context = ssl.create_default_context(cafile=cafile or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    return context


class HttpClient:
    """One origin (``addresses`` resolved beforehand, ``host`` for the Host header and TLS server name)."""

    def __init__(
        self,
        loop: EventLoop,
        addresses: Sequence[tuple[int, Any]],
        host: str,
        port: int,
        tls: ssl.SSLContext | None = None,
        *,
        idle_timeout: float = 4.0,
        max_body: int = 65536,
        user_agent: str = "selectws",
    ) -> None:
        if not addresses:
            raise ValueError("no address to connect to")
        self.loop = loop
        self.addresses = list(addresses)
        self.host = host
        self.port = port
        self.tls = tls
        self.idle_timeout = idle_timeout
        self.max_body = max_body
        default_port = 443 if tls is not None else 80
        shown = f"[{host}]" if ":" in host else host
        self.host_header = shown if port == default_port else f"{shown}:{port}"
        self.user_agent = user_agent
        self._next_address = 0
        self.sock: socket.socket | None = None
        self.events = 0
        self.h11: h11.Connection | None = None
        self.phase = "closed"  # closed, connecting, tls, request, idle
        self.out = bytearray()
        self._done: Callable[[HttpResult], None] | None = None
        self._timer: Timer | None = None
        self._idle_timer: Timer | None = None
        self._pending: tuple[str, str, list[tuple[str, str]], bytes] = ("", "", [], b"")
        self._started = 0.0
        self._sent = False
        self._status: int | None = None
        self._body_bytes = 0
        self.connections = 0  # connection attempts so far (tests and metrics read it)

    @property
    def busy(self) -> bool:
        return self._done is not None

    # ------------------------------------------------------------------ requests
    def request(self, method: str, target: str, headers: Sequence[tuple[str, str]], body: bytes, timeout: float,
                done: Callable[[HttpResult], None]) -> None:
        """Send one request; ``done(result)`` is called once, later, from the loop (never from this call)."""
        if self._done is not None:
            raise RuntimeError("a request is already in flight")
        self._done = done
        self._started = time.monotonic()
        self._sent = False
        self._status = None
        self._body_bytes = 0
        self._timer = self.loop.call_later(timeout, self._timed_out)
        self._pending = (method, target, list(headers), body)
        if self.phase == "idle":
            self._cancel_idle()
            self._begin_request()
            return
        self._connect()

    def close(self) -> None:
        """Drop the connection; a request in flight is abandoned without its callback."""
        self._done = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._close_socket()

    # ------------------------------------------------------------------ connection
    def _connect(self) -> None:
        family, address = self.addresses[self._next_address % len(self.addresses)]
        self.connections += 1
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            self._fail(f"socket: {exc.strerror or exc}")
            return
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self.sock = sock
        self.events = 0
        self.h11 = h11.Connection(h11.CLIENT)
        self.phase = "connecting"
        err = sock.connect_ex(address)
        if err not in (0, errno.EINPROGRESS, errno.EAGAIN):
            self._connect_failed(err)
            return
        self._set_events(_WRITE)

    def _connect_failed(self, err: int) -> None:
        self._next_address += 1  # the next attempt tries the next address
        self._fail(f"connect: {os.strerror(err)}")

    def _set_events(self, events: int) -> None:
        sock = self.sock
        if sock is None or events == self.events:
            return
        if self.events == 0:
            self.loop.register(sock, events, self)
        elif events == 0:
            self.loop.unregister(sock)
        else:
            self.loop.modify(sock, events, self)
        self.events = events

    def _close_socket(self) -> None:
        sock = self.sock
        self._cancel_idle()
        if sock is not None:
            self._set_events(0)
            self.sock = None
            try:
                sock.close()
            except OSError:
                pass
        self.h11 = None
        self.phase = "closed"
        self.out.clear()

    def handle_event(self, mask: int) -> None:
        phase = self.phase
        if phase == "connecting":
            self._on_connected()
        elif phase == "tls":
            self._handshake()
        elif phase == "request":
            if mask & _WRITE and self.out:
                self._write()
            if mask & _READ and self.phase == "request":
                self._read()
        elif phase == "idle":
            self._close_socket()  # the peer closed (or sent something unasked): start afresh next time

    def _on_connected(self) -> None:
        sock = self.sock
        assert sock is not None
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._connect_failed(err)
            return
        if self.tls is None:
            self._begin_request()
            return
        self._set_events(0)  # the SSLSocket takes over the descriptor: register it afresh
        try:
            self.sock = self.tls.wrap_socket(sock, server_hostname=self.host, do_handshake_on_connect=False)
        except (ssl.SSLError, OSError) as exc:
            self._fail(f"TLS: {exc}")
            return
        self.phase = "tls"
        self._handshake()

    def _handshake(self) -> None:
        sock = self.sock
        assert isinstance(sock, ssl.SSLSocket)
        try:
            waiting_for = step_tls_handshake(sock)
        except OSError as exc:
            self._fail(f"TLS handshake: {exc}")
            return
        if waiting_for:
            self._set_events(waiting_for)
            return
        self._begin_request()

    # ------------------------------------------------------------------ one exchange
    def _begin_request(self) -> None:
        conn = self.h11
        assert conn is not None
        method, target, headers, body = self._pending
        head = [("Host", self.host_header), ("User-Agent", self.user_agent), ("Content-Length", str(len(body))),
                *headers]
        try:
            data = conn.send(h11.Request(method=method, target=target, headers=head))
            if body:
                data = (data or b"") + (conn.send(h11.Data(data=body)) or b"")
            data = (data or b"") + (conn.send(h11.EndOfMessage()) or b"")
        except h11.LocalProtocolError as exc:
            self._fail(f"request: {exc}")
            return
        self.phase = "request"
        self.out += data
        self._write()

    def _write(self) -> None:
        sock = self.sock
        assert sock is not None
        try:
            sent = sock.send(self.out)
        except _WOULD_BLOCK:
            sent = 0
        except OSError as exc:
            self._fail(f"send: {exc.strerror or exc}")
            return
        if sent:
            self._sent = True
            del self.out[:sent]
        self._set_events(_READ | _WRITE if self.out else _READ)

    def _read(self) -> None:
        sock = self.sock
        conn = self.h11
        assert sock is not None and conn is not None
        for _ in range(16):  # bounded: a fast peer does not keep the loop here
            try:
                data = sock.recv(_RECV)
            except _WOULD_BLOCK:
                return
            except ssl.SSLEOFError:
                data = b""  # a TLS peer that closed without close_notify: end of stream all the same
            except OSError as exc:
                self._fail(f"receive: {exc.strerror or exc}")
                return
            conn.receive_data(data)
            if not self._events() or not data:
                return

    def _events(self) -> bool:
        """Handle what h11 parsed; False once the exchange is over (finished or failed)."""
        conn = self.h11
        assert conn is not None
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._fail(f"bad response: {exc}")
                return False
            if event is h11.NEED_DATA:
                return True
            if isinstance(event, h11.Response):
                self._status = event.status_code
            elif isinstance(event, h11.Data):
                self._body_bytes += len(event.data)  # thrown away: only the status matters
            elif isinstance(event, h11.EndOfMessage):
                self._finish()
                return False
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                self._fail("connection closed before the response ended")
                return False
            # InformationalResponse (100 Continue): nothing to do

    def _finish(self) -> None:
        conn = self.h11
        assert conn is not None
        status = self._status
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
            self.phase = "idle"
            self._set_events(_READ)
            self._idle_timer = self.loop.call_later(self.idle_timeout, self._close_socket)
        else:
            self._close_socket()
        self._complete(HttpResult(status, None, True, time.monotonic() - self._started))

    def _cancel_idle(self) -> None:
        timer = self._idle_timer
        if timer is not None:
            timer.cancel()
            self._idle_timer = None

    def _timed_out(self) -> None:
        self._timer = None
        phase = {"connecting": "connecting", "tls": "in the TLS handshake"}.get(
            self.phase, "waiting for the response" if not self.out else "sending")
        self._fail(f"timed out {phase}")

    def _fail(self, error: str) -> None:
        self._close_socket()
        self._complete(HttpResult(None, error, self._sent, time.monotonic() - self._started))

    def _complete(self, result: HttpResult) -> None:
        done = self._done
        self._done = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if done is None:
            return
        # Never call back from inside request(): a connect that fails at once reports in the next iteration.
        self.loop.call_soon(lambda: done(result))
