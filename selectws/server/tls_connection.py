"""TLS (``wss://``) in the same selectors loop: the server context, and :class:`TlsServerConnection`.

Each accepted socket on a TLS listener is wrapped with ``SSLContext.wrap_socket(server_side=True,
do_handshake_on_connect=False)``. An :class:`ssl.SSLSocket` keeps a real file descriptor, so it registers with the
selector like any socket; its non-blocking ``recv_into``/``send`` raise ``SSLWantReadError``/``SSLWantWriteError``
where a TCP socket raises ``BlockingIOError``. (``SSLObject`` + ``MemoryBIO`` would also work, but it means copying
every byte through two BIOs in Python; the wrapped socket lets OpenSSL read and write the descriptor itself.)

The choice is made once per connection, in :meth:`Server.accept_connection`: plain connections are a
:class:`ServerConnection` and run exactly the code they always ran; TLS connections are a
:class:`TlsServerConnection`, which

* drives ``do_handshake()`` from selector events first (want-read / want-write become read / write interest), under
  the same handshake timeout as the HTTP upgrade, closing the connection with a log line on any TLS error;
* treats the two "want" errors as "would block" on reads and writes (the write buffer is kept and retried with the
  same bytes, as OpenSSL requires);
* keeps reading after a read while the socket has more: TLS hands out one record per ``recv_into`` and may hold
  decrypted bytes (``pending()``) that the selector will never report.

Closing is TCP's: ``shutdown(SHUT_WR)`` after the last byte (an ``SSLSocket`` drops its TLS state there; no
``close_notify``, which WebSocket does not need: the close frame already ended the conversation).
"""

from __future__ import annotations

import _socket
import selectors
import socket
import ssl
from typing import TYPE_CHECKING, cast

from selectws.server.connection import _BACKLOG, _INTEREST, _PAUSED, HANDSHAKE, ServerConnection
from selectws.server.refusals import tls_failure_level
from selectws.transport.tls import step_tls_handshake

if TYPE_CHECKING:
    from selectws.server.server import Server

__all__ = ["TlsServerConnection"]

_READ_BUDGET = 64  # TLS records (<= 16 KiB each) read per readable event before giving other sockets a turn


def _describe(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    if reason == "HTTP_REQUEST":
        return "plain HTTP sent to the TLS port"
    if isinstance(exc, ssl.SSLError):
        return str(reason or exc)
    return str(exc) or type(exc).__name__


class TlsServerConnection(ServerConnection):
    """A :class:`ServerConnection` over an :class:`ssl.SSLSocket`: the TLS handshake first, then the same phases."""

    __slots__ = ("_tls_handshaking",)

    _would_block = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)

    def __init__(
        self, server: Server, sock: _socket.socket, remote: tuple[str, int], conn_id: int, context: ssl.SSLContext
    ) -> None:
        # Raises OSError if the peer is already gone (the SSLSocket then closes the descriptor itself). The server
        # accepts bare _socket.socket objects: wrap_socket() takes one (it only detaches its descriptor).
        tls_sock = context.wrap_socket(cast(socket.socket, sock), server_side=True, do_handshake_on_connect=False)
        self._tls_handshaking = True
        super().__init__(server, tls_sock, remote, conn_id)

    def handle_event(self, mask: int) -> None:
        if self._tls_handshaking:
            self._tls_handshake()
            return
        if mask & selectors.EVENT_WRITE:
            self._on_writable()
        if mask & selectors.EVENT_READ and self.sock is not None:
            self._on_readable()  # the loop below: TLS may hold decrypted bytes the selector does not report

    def _tls_handshake(self) -> None:
        sock = self.sock
        assert isinstance(sock, ssl.SSLSocket)
        try:
            waiting_for = step_tls_handshake(sock)
        except OSError as exc:  # SSLError (bad client, plain HTTP, no shared version), reset, EOF
            self._tls_failed(_describe(exc))
            return
        if waiting_for:
            self._tls_interest(waiting_for)
            return
        self._tls_handshaking = False
        self._tls_interest(selectors.EVENT_READ)
        self._on_readable()  # the request may have come with the last handshake flight

    def _tls_interest(self, events: int) -> None:
        flags = self._flags
        if events != flags & _INTEREST and self.sock is not None:
            self.server.loop.modify(self.sock, events, self)
            self._flags = flags & ~_INTEREST | events

    def _tls_failed(self, reason: str) -> None:
        server = self.server
        counters = server.counters
        counters.handshake_failures += 1
        counters.handshake_failure_reasons["tls"] = counters.handshake_failure_reasons.get("tls", 0) + 1
        # debug (scanners, plain HTTP on this port), warning when the client refused our certificate: refusals.py
        getattr(server.log, tls_failure_level(reason))("tls handshake failed", conn=self.id, peer=self.remote[0],
                                                      reason=reason)
        server.refusals.add("tls")
        self._close_socket()

    def _on_timer(self) -> None:
        if self._tls_handshaking and self.phase is HANDSHAKE:
            self._tls_failed("handshake timeout")
            return
        ServerConnection._on_timer(self)

    def _on_readable(self) -> None:
        sock = self.sock
        assert isinstance(sock, ssl.SSLSocket)
        for _ in range(_READ_BUDGET):
            before = self.bytes_in
            ServerConnection._on_readable(self)
            if self.bytes_in == before or self.sock is not sock or self._flags & (_PAUSED | _BACKLOG):
                return  # nothing more to read now (want-read), closed, paused by backpressure, or input left
        if sock.pending():
            # Budget spent with decrypted bytes left inside TLS: the selector would never report them.
            loop = self.server.loop
            loop.call_at(loop.now, self._read_pending)

    def _read_pending(self) -> None:
        if self.sock is not None and not self._flags & (_PAUSED | _BACKLOG) and not self._tls_handshaking:
            self._on_readable()

    def _input_resumed(self) -> None:
        sock = self.sock
        if isinstance(sock, ssl.SSLSocket) and sock.pending():  # decrypted bytes the selector cannot see
            self.server.loop.call_soon(self._read_pending)

    def _send_pieces(self, pieces: list[bytes | bytearray | memoryview]) -> int:
        """TLS has no gathered write: join (a retry after want-write joins the same front pieces again, so
        OpenSSL sees the same bytes, as SSL_write requires)."""
        assert self.sock is not None
        return self.sock.send(pieces[0] if len(pieces) == 1 else b"".join(pieces))

