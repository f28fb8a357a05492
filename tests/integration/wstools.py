"""Raw-socket tools for the integration tests: HTTP exchanges and hand-made WebSocket frames.

Written from RFC 6455 / RFC 9112 directly, on purpose independent of ``selectws.protocol``: a test that encoded
its frames with the code under test could not catch a bug both sides share. Every blocking call has a deadline.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from websockets.sync.client import ClientConnection

__all__ = [
    "GUID",
    "OP_BINARY",
    "OP_CLOSE",
    "OP_CONT",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "Frame",
    "HttpReply",
    "PeerClosed",
    "RawWS",
    "close_payload",
    "connect",
    "encode_frame",
    "expected_accept",
    "http_exchange",
    "parse_close",
    "read_head",
    "read_until_eof",
    "upgrade_request",
    "ws_key",
]

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def _xor(payload: bytes, mask: bytes) -> bytes:
    return bytes(b ^ mask[i & 3] for i, b in enumerate(payload)) if len(payload) < 4096 else _xor_big(payload, mask)


def _xor_big(payload: bytes, mask: bytes) -> bytes:
    n = len(payload)
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


def encode_frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bool | bytes = True,
    length: int | None = None,
) -> bytes:
    """One frame. ``mask``: True for a random key, a 4-byte key, or False for an (illegal from a client) unmasked
    frame. ``length`` overrides the announced payload length (to lie in the header)."""
    n = len(payload) if length is None else length
    first = (0x80 if fin else 0) | ((rsv & 7) << 4) | (opcode & 0x0F)
    mask_bit = 0x80 if mask is not False else 0
    if n < 126:
        head = struct.pack("!BB", first, mask_bit | n)
    elif n < 65536:
        head = struct.pack("!BBH", first, mask_bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, mask_bit | 127, n)
    if mask is False:
        return head + payload
    key = os.urandom(4) if mask is True else mask
    return head + key + _xor(payload, key)


def close_payload(code: int | None, reason: str | bytes = b"") -> bytes:
    if code is None:
        return b""
    raw = reason.encode() if isinstance(reason, str) else reason
    return struct.pack("!H", code) + raw


def parse_close(payload: bytes) -> tuple[int | None, bytes]:
    if not payload:
        return None, b""
    return struct.unpack("!H", payload[:2])[0], payload[2:]


def ws_key() -> str:
    return base64.b64encode(os.urandom(16)).decode()


def expected_accept(key: str) -> str:
    return base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()


def upgrade_request(
    path: str,
    host: str = "127.0.0.1",
    *,
    key: str | None = None,
    method: str = "GET",
    version: str | None = "13",
    upgrade: bool = True,
    extra: list[tuple[str, str]] | None = None,
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    if upgrade:
        lines += ["Upgrade: websocket", "Connection: Upgrade"]
    if key is not None:
        lines.append(f"Sec-WebSocket-Key: {key}")
    if version is not None:
        lines.append(f"Sec-WebSocket-Version: {version}")
    lines += [f"{k}: {v}" for k, v in extra or []]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@dataclass
class HttpReply:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    eof: bool  # the server closed the connection (clean EOF) after answering
    elapsed: float
    raw: bytes = field(repr=False, default=b"")

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def tokens(self, name: str) -> list[str]:
        return [t.strip().lower() for v in self.all(name) for t in v.split(",") if t.strip()]


def _parse_head(data: bytes) -> tuple[int, str, list[tuple[str, str]], int]:
    end = data.find(b"\r\n\r\n")
    if end < 0:
        raise AssertionError(f"no complete HTTP response head in {data[:300]!r}")
    lines = data[:end].decode("latin-1").split("\r\n")
    version, status, *reason = lines[0].split(" ", 2)
    assert version == "HTTP/1.1", lines[0]
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        assert sep, f"malformed header line {line!r}"
        headers.append((name, value.strip()))
    return int(status), (reason[0] if reason else ""), headers, end + 4


def read_until_eof(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """Everything the peer sends until it closes (True) or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    chunks = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return b"".join(chunks), False
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return b"".join(chunks), False
        except ConnectionResetError:
            raise AssertionError("connection reset by the server (RST instead of a clean close)") from None
        if not chunk:
            return b"".join(chunks), True
        chunks.append(chunk)


def read_head(sock: socket.socket, timeout: float = 5.0) -> HttpReply:
    """Read one response head (not to EOF: for a 101, the connection stays open)."""
    start = time.monotonic()
    deadline = start + timeout
    data = b""
    while b"\r\n\r\n" not in data:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before a complete response head: {data[:300]!r}")
        data += chunk
    status, reason, headers, used = _parse_head(data)
    return HttpReply(status, reason, headers, data[used:], False, time.monotonic() - start, data)


def http_exchange(port: int, request: bytes, *, timeout: float = 5.0, host: str = "127.0.0.1") -> HttpReply:
    """Send ``request`` (all of it), read the answer until the server closes or ``timeout`` passes."""
    start = time.monotonic()
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(request)
        data, eof = read_until_eof(sock, timeout)
    status, reason, headers, used = _parse_head(data)
    return HttpReply(status, reason, headers, data[used:], eof, time.monotonic() - start, data)


@dataclass
class Frame:
    fin: bool
    rsv: int
    opcode: int
    payload: bytes
    masked: bool

    @property
    def close_code(self) -> int | None:
        return parse_close(self.payload)[0]

    @property
    def close_reason(self) -> bytes:
        return parse_close(self.payload)[1]


class PeerClosed(AssertionError):
    """The server closed the TCP connection while a frame was expected."""


class RawWS:
    """A WebSocket client on a bare socket: the test decides every byte it sends."""

    def __init__(self, port: int, path: str = "/echo", *, host: str = "127.0.0.1", timeout: float = 5.0,
                 extra_headers: list[tuple[str, str]] | None = None, handshake: bool = True,
                 rcvbuf: int | None = None) -> None:
        self.port = port
        self.path = path
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # a small receive window makes the server buffer what we do not read
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        self.buf = bytearray()
        self.status: int | None = None
        self.headers: list[tuple[str, str]] = []
        self.eof = False
        if handshake:
            self.handshake(extra_headers)

    def __enter__(self) -> RawWS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    # ---------------------------------------------------------------- handshake
    def handshake(self, extra_headers: list[tuple[str, str]] | None = None, *, trailing: bytes = b"") -> None:
        key = ws_key()
        self.sock.sendall(upgrade_request(self.path, key=key, extra=extra_headers) + trailing)
        deadline = time.monotonic() + self.timeout
        while b"\r\n\r\n" not in self.buf:
            self._fill(deadline)
        status, _reason, headers, used = _parse_head(bytes(self.buf))
        del self.buf[:used]
        self.status, self.headers = status, headers
        assert status == 101, f"handshake answered {status}: {headers}"
        accept = [v for k, v in headers if k.lower() == "sec-websocket-accept"]
        assert accept == [expected_accept(key)], f"bad Sec-WebSocket-Accept {accept}"

    # ---------------------------------------------------------------- sending
    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_frame(self, opcode: int, payload: bytes = b"", **kwargs: object) -> None:
        self.sock.sendall(encode_frame(opcode, payload, **kwargs))  # type: ignore[arg-type]

    def send_text(self, text: str) -> None:
        self.send_frame(OP_TEXT, text.encode())

    def send_close(self, code: int | None = 1000, reason: str = "") -> None:
        self.send_frame(OP_CLOSE, close_payload(code, reason))

    # ---------------------------------------------------------------- receiving
    def _fill(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no data from the server in time")
        self.sock.settimeout(left)
        chunk = self.sock.recv(262144)
        if not chunk:
            self.eof = True
            raise PeerClosed(f"server closed the connection; {len(self.buf)} bytes unparsed")
        self.buf += chunk

    def _need(self, n: int, deadline: float) -> None:
        while len(self.buf) < n:
            self._fill(deadline)

    def recv_frame(self, timeout: float | None = None) -> Frame:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        self._need(2, deadline)
        b0, b1 = self.buf[0], self.buf[1]
        n = b1 & 0x7F
        pos = 2
        if n == 126:
            self._need(4, deadline)
            n = struct.unpack("!H", self.buf[2:4])[0]
            pos = 4
        elif n == 127:
            self._need(10, deadline)
            n = struct.unpack("!Q", self.buf[2:10])[0]
            pos = 10
        masked = bool(b1 & 0x80)
        key = b""
        if masked:
            self._need(pos + 4, deadline)
            key = bytes(self.buf[pos : pos + 4])
            pos += 4
        self._need(pos + n, deadline)
        payload = bytes(self.buf[pos : pos + n])
        del self.buf[: pos + n]
        if masked:
            payload = _xor(payload, key)
        return Frame(bool(b0 & 0x80), (b0 >> 4) & 7, b0 & 0x0F, payload, masked)

    def recv_message(self, timeout: float | None = None) -> tuple[int, bytes]:
        """The next data message (fragments joined); control frames other than close are skipped."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        opcode, parts = None, []
        while True:
            frame = self.recv_frame(max(0.0, deadline - time.monotonic()))
            assert not frame.masked, "server frames must not be masked"
            if frame.opcode in (OP_PING, OP_PONG):
                continue
            if frame.opcode == OP_CLOSE:
                raise AssertionError(f"close frame {frame.close_code} {frame.close_reason!r} instead of a message")
            if opcode is None:
                assert frame.opcode in (OP_TEXT, OP_BINARY), f"unexpected opcode {frame.opcode:#x}"
                opcode = frame.opcode
            else:
                assert frame.opcode == OP_CONT
            parts.append(frame.payload)
            if frame.fin:
                return opcode, b"".join(parts)

    def expect_close(self, timeout: float | None = None, *, skip_data: bool = False) -> Frame:
        """Read until a close frame; fails on anything else unless ``skip_data`` (pings are always skipped)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            frame = self.recv_frame(max(0.0, deadline - time.monotonic()))
            if frame.opcode == OP_CLOSE:
                assert frame.fin and not frame.masked
                return frame
            if frame.opcode == OP_PING or (skip_data and frame.opcode in (OP_TEXT, OP_BINARY, OP_CONT)):
                continue
            raise AssertionError(f"expected a close frame, got opcode {frame.opcode:#x} {frame.payload[:80]!r}")

    def wait_eof(self, timeout: float = 3.0) -> bool:
        """True when the server closes TCP (clean FIN) within ``timeout``; buffered/extra bytes are discarded."""
        if self.eof:
            return True
        data, eof = read_until_eof(self.sock, timeout)
        self.buf += data
        self.eof = eof
        return eof


def connect(url: str, **kwargs: Any) -> ClientConnection:
    """``websockets.sync.client.connect`` with deadlines on everything and no proxy or client-side keepalive.

    Usable with or without ``with``. Options a given websockets version does not know (``proxy`` came in 15,
    ``legacy`` in 17.1) are left out rather than breaking older versions.
    """
    import inspect

    from websockets.sync.client import connect as ws_connect

    known = inspect.signature(ws_connect).parameters
    options: dict[str, Any] = {"open_timeout": 5, "close_timeout": 5, "ping_interval": None}
    if "proxy" in known:
        options["proxy"] = None  # never route loopback tests through an HTTP(S)_PROXY from the environment
    if "legacy" in known:
        options["legacy"] = True  # connect() without "with" is allowed (17.1+ warns otherwise)
    options.update(kwargs)
    return ws_connect(url, **options)
