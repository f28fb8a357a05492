"""``selectws connect URL``: a websocat/wscat-like client on the same sans-I/O core the server uses.

One socket and stdin in a ``selectors`` loop, no threads, no asyncio:

* the opening handshake is a :class:`selectws.protocol.handshake.ClientProtocol`: ``connect(...)`` makes the
  upgrade request (permessage-deflate offered unless ``--no-compress``), its bytes go out on a blocking socket and
  the answer's bytes go back in under ``--timeout`` until the protocol object has left CONNECTING: OPEN with the
  chosen subprotocol and extension, or CLOSED with ``handshake_error`` saying why;
* then the socket goes non-blocking and the same object turns bytes into events and messages into masked frames;
  ``wss://`` is the same over an ``ssl`` socket (whose decrypted bytes may wait inside OpenSSL, so each readable
  event reads until it would block). The driver never writes the protocol's state: a lost transport or a close
  timeout is ``abort()``, the server's end of stream ``receive_eof()``;
* each stdin line is one message (text, or with ``--binary`` the line decoded from hex or base64); each message
  received is printed on a line of its own (binary ones in hex or base64).

Exit status: 0 after a clean close (1000, 1001 or a close frame without a code, from either side), 1 for
everything else (refused connection, failed TLS or opening handshake, protocol error, lost connection, other
close codes, ``--once`` replies missing when ``--timeout`` ran out, a ``--once --binary`` line that is not hex /
base64: skipped, no reply awaited for it, the run ends once the others are answered), 130 on Ctrl-C; 2 is click's
usage error. A ``ws://`` URL whose server resets or closes the connection without answering gets a hint: it may
be a TLS port (``wss://``).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import selectors
import socket
import ssl
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TextIO
from urllib.parse import quote, unquote, urlsplit

from selectws.protocol.connection import State
from selectws.protocol.deflate import DeflateSettings
from selectws.protocol.errors import CloseCode
from selectws.protocol.events import Closed, Event, HandshakeFailed, Message, Pong
from selectws.protocol.handshake import ClientProtocol
from selectws.protocol.http11 import REASONS, Response

__all__ = [
    "ClientError",
    "ConnectOptions",
    "Target",
    "WebSocketClient",
    "parse_header",
    "parse_target",
    "run",
]

_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_CLEAN_CODES = frozenset({CloseCode.NORMAL, CloseCode.GOING_AWAY, CloseCode.NO_STATUS})
_RECV_SIZE = 256 * 1024


class ClientError(Exception):
    """A failure reported as one ``selectws: ...`` line on stderr, exit status 1."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where a ``ws://`` / ``wss://`` URL points."""

    secure: bool
    host: str  # for connect() and TLS server_hostname (no brackets)
    port: int
    resource: str  # request target: path and query
    host_header: str
    authorization: str | None = None  # from user:password@ in the URL


@dataclass(slots=True)
class ConnectOptions:
    url: str
    headers: Sequence[tuple[str, str]] = ()
    subprotocols: Sequence[str] = ()
    origin: str | None = None
    ping_interval: float | None = None
    compress: bool = True
    once: bool = False
    keep_open: bool = False
    timeout: float = 10.0
    binary: bool = False
    binary_format: str = "hex"
    insecure: bool = False
    cafile: str | None = None
    max_message_size: int = 16 << 20
    deflate: DeflateSettings = field(default_factory=DeflateSettings)


def parse_target(url: str) -> Target:
    """Split a WebSocket URL; ``http(s)://`` is taken as ``ws(s)://``. Raises :class:`ClientError`."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise ClientError(f"invalid URL {url!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("ws", "wss", "http", "https"):
        raise ClientError(f"invalid URL {url!r}: the scheme must be ws:// or wss://")
    secure = scheme in ("wss", "https")
    host = parts.hostname
    if not host:
        raise ClientError(f"invalid URL {url!r}: no host")
    default = 443 if secure else 80
    port = port or default
    # RFC 6455 section 3: the resource name is path and query; a fragment is never sent.
    path = quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
    resource = path + (f"?{quote(parts.query, safe='/?%:@!$&()*+,;=-._~')}" if parts.query else "")
    shown = f"[{host}]" if ":" in host else host
    host_header = shown if port == default else f"{shown}:{port}"
    authorization = None
    if parts.username is not None:
        userpass = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        authorization = "Basic " + base64.b64encode(userpass.encode("utf-8")).decode("ascii")
    return Target(secure, host, port, resource, host_header, authorization)


def parse_header(text: str) -> tuple[str, str]:
    """``"Name: value"`` -> ``("Name", "value")``; raises ``ValueError`` for anything that is not one header."""
    name, sep, value = text.partition(":")
    name = name.strip()
    value = value.strip()
    if not sep or not _TOKEN.match(name):
        raise ValueError(f"{text!r} is not a header: expected 'Name: value'")
    if any(c in value for c in "\r\n\x00"):
        raise ValueError(f"header {name} has a line break or NUL in its value")
    return name, value


#: The first byte of a TLS record a server may send to a plain-text client: an alert (21) or a handshake (22).
_TLS_RECORDS = (b"\x15", b"\x16")


def _tls_hint(target: Target) -> str:
    """A ws:// server that resets or closes without a word may be a TLS port (the daemon drops plain HTTP there)."""
    return "" if target.secure else " (is it wss://? a TLS port drops a plain-text request like this)"


def _describe_close(code: int, reason: str) -> str:
    try:
        label = CloseCode(code).name.lower().replace("_", " ")
    except ValueError:
        label = "application code" if 3000 <= code <= 4999 else "unknown code"
    return f"{code} ({label})" + (f" {reason}" if reason else "")


class WebSocketClient:
    """One run of ``selectws connect``: connect, handshake, then pump stdin and the socket until closed."""

    def __init__(
        self,
        options: ConnectOptions,
        *,
        stdin_fd: int = 0,
        out: TextIO | None = None,
        err: TextIO | None = None,
    ) -> None:
        self.opts = options
        self.stdin_fd = stdin_fd
        self.out = out if out is not None else sys.stdout
        self.err = err if err is not None else sys.stderr
        self.sock: socket.socket | None = None
        self.conn: ClientProtocol | None = None
        self.subprotocol: str | None = None
        self.compressed = False
        self._wbuf = bytearray()
        self._inbuf = bytearray()
        self._stdin_open = True
        self._unsent = 0  # --binary lines that did not decode: not sent, so no reply is owed for them
        self._sent = 0
        self._received = 0
        self._status: int | None = None  # the exit status once decided
        self._closing_status = 0  # the status to end with when the close handshake we started completes
        self._close_deadline: float | None = None
        self._once_deadline: float | None = None
        self._next_ping: float | None = None
        self._awaiting_pong = False
        self._selector: selectors.BaseSelector | None = None
        self._events = 0

    # ------------------------------------------------------------------ entry point
    def run(self) -> int:
        try:
            self._connect()
            self._loop()
        except ClientError as exc:
            self._say(str(exc))
            self._status = 1
        except KeyboardInterrupt:
            self._interrupted()
            self._status = 130
        finally:
            self._teardown()
        return 1 if self._status is None else self._status

    def _say(self, text: str) -> None:
        try:
            self.err.write(f"selectws: {text}\n")
            self.err.flush()
        except (OSError, ValueError):
            pass

    # ------------------------------------------------------------------ connect and handshake
    def _connect(self) -> None:
        opts = self.opts
        target = parse_target(opts.url)
        where = f"{target.host}:{target.port}" if ":" not in target.host else f"[{target.host}]:{target.port}"
        deadline = time.monotonic() + opts.timeout
        try:
            sock = socket.create_connection((target.host, target.port), timeout=opts.timeout)
        except socket.gaierror as exc:
            raise ClientError(f"cannot resolve {target.host}: {exc.strerror or exc}") from None
        except ConnectionRefusedError:
            raise ClientError(f"cannot connect to {where}: connection refused") from None
        except TimeoutError:
            raise ClientError(f"cannot connect to {where}: timed out after {opts.timeout:g} s") from None
        except OSError as exc:
            raise ClientError(f"cannot connect to {where}: {exc.strerror or exc}") from None
        self.sock = sock
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        if target.secure:
            self.sock = sock = self._wrap_tls(sock, target, where)
        self._handshake(sock, target, where, deadline)

    def _handshake(self, sock: socket.socket, target: Target, where: str, deadline: float) -> None:
        """The opening handshake: the request's bytes out, the answer's bytes in, until the protocol object has
        left CONNECTING; then the events that came with the answer (frames right behind the 101)."""
        opts = self.opts
        headers = list(opts.headers)
        if target.authorization and not any(k.lower() == "authorization" for k, _ in headers):
            headers.append(("Authorization", target.authorization))
        self.conn = conn = ClientProtocol(max_message_size=opts.max_message_size)
        request = conn.connect(
            target.host_header,
            target.resource,
            subprotocols=opts.subprotocols,
            deflate=opts.deflate if opts.compress else None,
            origin=opts.origin,
            headers=headers,
        )
        conn.send_request(request)
        events: list[Event] = []
        answered = False
        try:
            while conn.state is State.CONNECTING:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
                if conn.has_output:
                    sock.sendall(conn.data_to_send())
                    continue
                chunk = sock.recv(65536)
                if not chunk:
                    conn.receive_eof()
                    how = "mid-answer" if answered else "without answering"
                    hint = "" if answered else _tls_hint(target)
                    raise ClientError(f"handshake failed: the server closed the connection {how}{hint}")
                if not answered and chunk[:1] in _TLS_RECORDS and not target.secure:
                    conn.abort("a TLS record instead of an HTTP answer")
                    raise ClientError(f"handshake failed: {where} answered in TLS, not HTTP (is it wss://?)")
                answered = True
                events = conn.receive_data(chunk)
        except TimeoutError:
            conn.abort("opening handshake timed out")
            raise ClientError(f"handshake failed: no answer from {where} within {opts.timeout:g} s") from None
        except OSError as exc:
            conn.abort("connection lost during the opening handshake")
            hint = _tls_hint(target) if not answered and isinstance(exc, ConnectionResetError) else ""
            raise ClientError(f"handshake failed: {exc.strerror or exc}{hint}") from None
        first = events[0] if events else None
        if type(first) is HandshakeFailed:  # not an HTTP response head at all
            raise ClientError(f"handshake failed: {first.reason} (is this a WebSocket server?)")
        error = conn.handshake_error
        if error is not None:
            response = first if type(first) is Response else None
            if response is not None and response.status != 101:
                reason = response.reason or REASONS.get(response.status, "")
                detail = self._error_body(response)
                raise ClientError(f"handshake failed: {response.status} {reason}".rstrip() + detail)
            raise ClientError(f"handshake failed: {error.reason}")
        self.subprotocol = conn.subprotocol
        self.compressed = conn.extension is not None
        sock.setblocking(False)
        # Frames that came right behind the 101 (a greeting, even a close) are events already.
        self._handle(events[1:])
        self._release_held()

    def _wrap_tls(self, sock: socket.socket, target: Target, where: str) -> ssl.SSLSocket:
        opts = self.opts
        try:
            context = ssl.create_default_context(cafile=opts.cafile)
        except (OSError, ssl.SSLError) as exc:
            sock.close()
            raise ClientError(f"cannot load --cafile {opts.cafile}: {exc}") from None
        if opts.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        try:
            return context.wrap_socket(sock, server_hostname=target.host)
        except ssl.SSLCertVerificationError as exc:
            sock.close()
            why = exc.verify_message or exc.reason or str(exc)
            raise ClientError(
                f"TLS certificate of {where} not trusted: {why} (--cafile FILE to trust it, --insecure to skip)"
            ) from None
        except (ssl.SSLError, OSError) as exc:
            sock.close()
            if isinstance(exc, TimeoutError):
                raise ClientError(f"TLS handshake with {where} timed out") from None
            raise ClientError(f"TLS handshake with {where} failed: {exc}") from None

    def _error_body(self, response: Response) -> str:
        """The first line of a refusal's body when it came with the head (the daemon says why it refused)."""
        rest = response.body
        if not rest or not (response.headers.get("Content-Type") or "").startswith("text/plain"):
            return ""
        line = rest.decode("utf-8", "replace").strip().splitlines()[:1]
        text = line[0][:200] if line else ""
        if not text or text in (f"{response.status} {response.reason}", str(response.status)):
            return ""
        return f"\nselectws: the server said: {text}"

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        sock, conn = self.sock, self.conn
        assert sock is not None and conn is not None
        sel = selectors.PollSelector() if hasattr(selectors, "PollSelector") else selectors.SelectSelector()
        self._selector = sel
        self._events = _READ
        sel.register(sock, _READ)
        try:
            # poll() takes pipes, terminals and regular files alike (epoll refuses regular files).
            sel.register(self.stdin_fd, _READ)
        except (OSError, ValueError):
            self._stdin_open = False
            self._on_stdin_eof()
        if self.opts.ping_interval:
            self._next_ping = time.monotonic() + self.opts.ping_interval
        if os.isatty(self.stdin_fd) and self._status is None:
            extras = [f"subprotocol {self.subprotocol}"] if self.subprotocol else []
            extras += ["compressed"] if self.compressed else []
            note = f" ({', '.join(extras)})" if extras else ""
            self._say(f"connected to {self.opts.url}{note}; one line per message, Ctrl-D to close")
        self._flush()
        while self._status is None:
            timeout = self._next_timeout()
            for key, mask in sel.select(timeout):
                if key.fileobj is sock:
                    if mask & _WRITE:
                        self._flush()
                    if mask & _READ and self._status is None:
                        self._read_socket()
                elif self._stdin_open and self._status is None:
                    self._read_stdin()
            if self._status is None:
                self._timers()
            if self._status is None:
                self._flush()

    def _next_timeout(self) -> float | None:
        deadlines = [d for d in (self._close_deadline, self._once_deadline, self._next_ping) if d is not None]
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _timers(self) -> None:
        now = time.monotonic()
        conn = self.conn
        assert conn is not None
        if self._close_deadline is not None and now >= self._close_deadline:
            self._say(f"no close frame from the server within {self.opts.timeout:g} s; closing the connection")
            conn.abort("no close frame from the server")
            self._status = self._closing_status
            return
        if self._once_deadline is not None and now >= self._once_deadline:
            self._once_deadline = None
            expected = self._owed()
            self._say(f"timed out after {self.opts.timeout:g} s: {self._received} of {expected} replies")
            self._start_close(CloseCode.NORMAL, status=1)
        if self._next_ping is not None and now >= self._next_ping and conn.state is State.OPEN:
            if self._awaiting_pong:
                self._say(f"no pong within {self.opts.ping_interval:g} s: the connection is dead")
                conn.fail(CloseCode.GOING_AWAY, "keepalive timeout")
                self._flush()
                self._status = 1
                return
            conn.send_ping(b"selectws")
            self._awaiting_pong = True
            assert self.opts.ping_interval is not None
            self._next_ping = now + self.opts.ping_interval

    # ------------------------------------------------------------------ socket
    def _read_socket(self) -> None:
        sock, conn = self.sock, self.conn
        assert sock is not None and conn is not None
        while self._status is None:
            try:
                data = sock.recv(_RECV_SIZE)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
                data = b""  # TLS ended without (or with) close_notify: an end of stream like any other
            except OSError as exc:
                self._lost(f"connection lost: {exc.strerror or exc}")
                return
            if not data:
                self._handle(conn.receive_eof())
                return
            self._handle(conn.receive_data(data))
            self._release_held()

    def _release_held(self) -> None:
        """Events held back behind messages (a close frame, a violation): once those are handled, the rest."""
        conn = self.conn
        assert conn is not None
        while conn.events_held:
            self._handle(conn.receive_data(b""))

    def _flush(self) -> None:
        sock, conn = self.sock, self.conn
        if sock is None or conn is None:
            return
        if conn.has_output:
            self._wbuf += conn.data_to_send()
        while self._wbuf:
            try:
                sent = sock.send(self._wbuf)
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                break
            except OSError as exc:
                self._lost(f"connection lost: {exc.strerror or exc}")
                return
            del self._wbuf[:sent]
        events = _READ | (_WRITE if self._wbuf else 0)
        if events != self._events and self._selector is not None:
            self._selector.modify(sock, events)
            self._events = events
        if conn.close_transport and not self._wbuf and self._status is None:
            # The close handshake is over (or the connection failed): our part is done.
            self._status = self._closing_status

    def _lost(self, why: str) -> None:
        conn = self.conn
        closing = conn is not None and conn.state is State.CLOSING
        if conn is not None:
            conn.abort(why)
        if closing:
            # We were closing anyway: everything we wanted arrived.
            self._status = self._closing_status
            return
        self._say(why)
        self._status = 1

    # ------------------------------------------------------------------ events
    def _handle(self, events: Sequence[Event]) -> None:
        for event in events:
            if type(event) is Message:
                self._print(event.data)
                self._received += 1
                if self._once_deadline is not None and self._received >= self._owed():
                    self._once_deadline = None
                    self._start_close(CloseCode.NORMAL, status=1 if self._unsent else 0)
            elif type(event) is Pong:
                self._awaiting_pong = False
            elif type(event) is Closed:
                self._on_closed(event)

    def _on_closed(self, event: Closed) -> None:
        if event.error:
            self._say(f"protocol error from the server: {event.error} (closed with {event.code})")
            self._closing_status = 1
        elif event.by_peer and event.code == CloseCode.ABNORMAL:
            if self._close_deadline is None:  # when we were closing anyway, EOF instead of a close frame is fine
                self._say("connection lost: the server closed the connection without a close frame")
                self._closing_status = 1
        elif event.by_peer:
            self._say(f"connection closed by the server: {_describe_close(event.code, event.reason)}")
            self._closing_status = 0 if event.code in _CLEAN_CODES else 1
        # else: the server answered the close we started; _closing_status already says how to end.
        self._close_deadline = None
        self._once_deadline = None
        self._flush()
        if self._status is None:
            self._status = self._closing_status

    def _print(self, data: str | bytes) -> None:
        if isinstance(data, str):
            line = data
        elif self.opts.binary_format == "base64":
            line = base64.b64encode(data).decode("ascii")
        else:
            line = data.hex()
        try:
            self.out.write(line + "\n")
            self.out.flush()
        except BrokenPipeError:
            # Nobody reads our output any more (``| head -1``): finish politely.
            self._start_close(CloseCode.NORMAL, status=0)

    # ------------------------------------------------------------------ stdin
    def _read_stdin(self) -> None:
        try:
            data = os.read(self.stdin_fd, 65536)
        except BlockingIOError:
            return
        except OSError as exc:
            self._say(f"cannot read stdin: {exc.strerror or exc}")
            data = b""
        if not data:
            if self._inbuf:
                self._send_line(bytes(self._inbuf))
                self._inbuf = bytearray()
            self._stdin_open = False
            if self._selector is not None:
                self._selector.unregister(self.stdin_fd)
            self._on_stdin_eof()
            return
        self._inbuf += data
        while True:
            end = self._inbuf.find(b"\n")
            if end < 0:
                break
            line = bytes(self._inbuf[:end])
            del self._inbuf[: end + 1]
            self._send_line(line)

    def _send_line(self, line: bytes) -> None:
        conn = self.conn
        assert conn is not None
        if line.endswith(b"\r"):
            line = line[:-1]
        if conn.state is not State.OPEN:
            return
        if self.opts.binary:
            text = line.decode("ascii", "replace").strip()
            try:
                payload = base64.b64decode(text, validate=True) if self.opts.binary_format == "base64" \
                    else bytes.fromhex(text)
            except (ValueError, binascii.Error):
                # With --once no reply is awaited for it, and the run ends with status 1 (a line was lost).
                self._unsent += 1
                self._say(f"not {self.opts.binary_format}, not sent: {text[:60]!r}"
                          + (" (--once will exit 1)" if self.opts.once else ""))
                return
            conn.send_binary(payload)
        else:
            conn.send_text(line.decode("utf-8", "replace"))
        self._sent += 1

    def _owed(self) -> int:
        """``--once``: the replies to wait for: one per message sent; one (a greeting) when stdin had no line at all,
        none when its lines were all undecodable ``--binary`` input (nothing was sent to answer)."""
        return self._sent if self._sent or self._unsent else 1

    def _on_stdin_eof(self) -> None:
        if self.opts.once:
            if self._received >= self._owed():
                self._start_close(CloseCode.NORMAL, status=1 if self._unsent else 0)
            else:
                self._once_deadline = time.monotonic() + self.opts.timeout
        elif not self.opts.keep_open:
            self._start_close(CloseCode.NORMAL, status=0)

    # ------------------------------------------------------------------ closing
    def _start_close(self, code: int, *, status: int) -> None:
        conn = self.conn
        if conn is None:
            return
        self._closing_status = status
        if conn.close(code):
            self._close_deadline = time.monotonic() + self.opts.timeout

    def _interrupted(self) -> None:
        """Ctrl-C: a best-effort close frame (1001: we are going away), without waiting for the answer."""
        conn, sock = self.conn, self.sock
        if conn is None or sock is None:
            return
        if conn.state is State.CONNECTING:
            conn.abort("interrupted")
            return
        conn.close(CloseCode.GOING_AWAY, "interrupted")
        data = bytes(self._wbuf) + conn.data_to_send()
        try:
            sock.setblocking(True)
            sock.settimeout(1.0)
            sock.sendall(data)
        except OSError:
            pass

    def _teardown(self) -> None:
        if self._selector is not None:
            self._selector.close()
            self._selector = None
        sock = self.sock
        self.sock = None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass


def run(options: ConnectOptions) -> int:
    """Run the client on this process's stdin/stdout/stderr; returns the exit status."""
    return WebSocketClient(options).run()
