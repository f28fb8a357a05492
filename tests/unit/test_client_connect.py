"""Unit tests for ``selectws connect``: URLs, ``-H`` headers, and the opening handshake against a canned server on
loopback (the rest, against the daemon and the ``websockets`` library, is in integration)."""

from __future__ import annotations

import base64
import io
import os
import re
import socket
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any

import pytest

from selectws.app.connect import ClientError, ConnectOptions, Target, WebSocketClient, parse_header, parse_target
from selectws.protocol.connection import State
from selectws.protocol.handshake import accept_key


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ws://example.com/chat", Target(False, "example.com", 80, "/chat", "example.com")),
        ("ws://example.com", Target(False, "example.com", 80, "/", "example.com")),
        ("wss://example.com/a?b=1&c=2", Target(True, "example.com", 443, "/a?b=1&c=2", "example.com")),
        ("wss://example.com:443/", Target(True, "example.com", 443, "/", "example.com")),
        ("ws://127.0.0.1:8000/echo", Target(False, "127.0.0.1", 8000, "/echo", "127.0.0.1:8000")),
        ("ws://[::1]:9000/x", Target(False, "::1", 9000, "/x", "[::1]:9000")),
        ("ws://[::1]/x", Target(False, "::1", 80, "/x", "[::1]")),
        ("http://h/x", Target(False, "h", 80, "/x", "h")),
        ("https://h/x", Target(True, "h", 443, "/x", "h")),
        ("WS://Example.COM/Path", Target(False, "example.com", 80, "/Path", "example.com")),
        ("ws://h/x#fragment", Target(False, "h", 80, "/x", "h")),
        ("ws://h/caf\u00e9 ok", Target(False, "h", 80, "/caf%C3%A9%20ok", "h")),
        ("ws://h/already%20encoded", Target(False, "h", 80, "/already%20encoded", "h")),
    ],
)
def test_parse_target(url: str, expected: Target) -> None:
    assert parse_target(url) == expected


def test_userinfo_becomes_basic_auth() -> None:
    target = parse_target("ws://alice:s%40cret@h/x")
    assert target.host_header == "h"
    assert target.authorization == "Basic " + base64.b64encode(b"alice:s@cret").decode()


@pytest.mark.parametrize("url", ["ftp://h/", "h:80/x", "ws:///nohost", "ws://h:99999/", "ws://h:port/"])
def test_parse_target_rejects(url: str) -> None:
    with pytest.raises(ClientError):
        parse_target(url)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("X-Token: abc", ("X-Token", "abc")),
        ("X-Token:abc", ("X-Token", "abc")),
        ("  Authorization :  Bearer a:b  ", ("Authorization", "Bearer a:b")),
        ("X-Empty:", ("X-Empty", "")),
    ],
)
def test_parse_header(text: str, expected: tuple[str, str]) -> None:
    assert parse_header(text) == expected


@pytest.mark.parametrize("text", ["no colon", ": value", "Bad Name: x", "X: a\r\nInjected: 1", "X: nul\x00"])
def test_parse_header_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_header(text)


# ------------------------------------------------------------------------------------------------ the handshake
# The client's opening handshake against a canned server on loopback: one connection, one scripted answer.


class _CannedServer:
    """Accepts one connection, reads the request head, answers ``answer(head)`` and records what follows."""

    def __init__(self, answer: Callable[[bytes], bytes], hang_up: bool = False) -> None:
        self.hang_up = hang_up  # close right after the answer
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.head = b""
        self.after = b""  # what the client sent after the request head, until it closed
        self._answer = answer
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            conn.settimeout(5)
            buf = b""
            while b"\r\n\r\n" not in buf:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                buf += chunk
            self.head, _, self.after = buf.partition(b"\r\n\r\n")
            answer = self._answer(self.head)
            if answer:
                conn.sendall(answer)
            if self.hang_up:
                return
            try:
                while chunk := conn.recv(4096):
                    self.after += chunk
            except OSError:
                pass

    def join(self) -> None:
        self._thread.join(5)
        self.listener.close()


def _key(head: bytes) -> str:
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.lower() == "sec-websocket-key":
            return value.strip()
    raise AssertionError("no Sec-WebSocket-Key")


def _switching(head: bytes, *extra: str, accept: str | None = None) -> bytes:
    lines = [
        "HTTP/1.1 101 Switching Protocols", "Upgrade: websocket", "Connection: Upgrade",
        f"Sec-WebSocket-Accept: {accept or accept_key(_key(head))}", *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _run(
    answer: Callable[[bytes], bytes], *, stdin: bytes = b"", hang_up: bool = False, **options: Any
) -> tuple[int, str, str, bytes, bytes]:
    """Run the client against a canned answer: (status, stdout, stderr, request head, what the client sent after)."""
    server = _CannedServer(answer, hang_up)
    read_fd, write_fd = os.pipe()
    os.write(write_fd, stdin)
    os.close(write_fd)
    out, err = io.StringIO(), io.StringIO()
    try:
        options.setdefault("timeout", 5.0)
        opts = ConnectOptions(f"ws://127.0.0.1:{server.port}/x", **options)
        status = WebSocketClient(opts, stdin_fd=read_fd, out=out, err=err).run()
    finally:
        os.close(read_fd)
        server.join()
    return status, out.getvalue(), err.getvalue(), server.head, server.after


def _close_code(frame: bytes) -> int:
    """The code of one masked close frame from the client."""
    assert frame[0] == 0x88 and frame[1] & 0x80
    mask, payload = frame[2:6], frame[6 : 6 + (frame[1] & 0x7F)]
    return int.from_bytes(bytes(b ^ mask[i % 4] for i, b in enumerate(payload))[:2], "big")


def test_handshake_refused_with_the_servers_reason() -> None:
    body = b"no route for /x\n"
    refusal = (
        b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain; charset=utf-8\r\n"
        + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body
    )
    status, out, err, head, _ = _run(lambda _head: refusal, stdin=b"hi\n", once=True)
    assert (status, out) == (1, "")
    assert err == "selectws: handshake failed: 404 Not Found\nselectws: the server said: no route for /x\n"
    assert head.startswith(b"GET /x HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"\r\nSec-WebSocket-Extensions: permessage-deflate" in head


def test_handshake_answer_that_is_not_http() -> None:
    status, _, err, _, _ = _run(lambda _head: b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
    assert status == 1
    assert err == "selectws: handshake failed: malformed status line (is this a WebSocket server?)\n"


@pytest.mark.parametrize(
    ("answer", "how"),
    [(b"", "without answering (is it wss://? a TLS port drops a plain-text request like this)"),
     (b"HTTP/1.1 101 Switching Protocols\r\nUpg", "mid-answer")],
)
def test_handshake_server_closes(answer: bytes, how: str) -> None:
    status, _, err, _, _ = _run(lambda _head: answer, hang_up=True)
    assert status == 1
    assert err == f"selectws: handshake failed: the server closed the connection {how}\n"


def test_handshake_timeout() -> None:
    started = time.monotonic()
    status, _, err, _, _ = _run(lambda _head: b"", timeout=0.3)
    assert time.monotonic() - started < 4
    assert status == 1
    assert re.fullmatch(r"selectws: handshake failed: no answer from 127\.0\.0\.1:\d+ within 0\.3 s\n", err)


@pytest.mark.parametrize(
    ("extra", "options", "why"),
    [
        ((), {}, "wrong Sec-WebSocket-Accept"),
        (("Sec-WebSocket-Protocol: other",), {"subprotocols": ("chat",)}, "not offer"),
        (("Sec-WebSocket-Extensions: permessage-deflate",), {"compress": False}, "not offered"),
        (("Sec-WebSocket-Extensions: x-unknown",), {}, "not offered"),
    ],
)
def test_handshake_invalid_101(extra: tuple[str, ...], options: dict[str, Any], why: str) -> None:
    accept = "d3Jvbmcgd3Jvbmcgd3Jvbmc=" if not extra else None
    status, _, err, _, after = _run(lambda head: _switching(head, *extra, accept=accept), **options)
    assert status == 1
    assert err.startswith("selectws: handshake failed: ") and why in err, err
    assert after == b""  # nothing is sent on a connection whose handshake failed


def test_frames_right_behind_the_101_are_handled_in_order() -> None:
    # The head, a message and the server's close in one segment: the close was held back behind the message.
    frames = bytes((0x81, 5)) + b"hello" + bytes((0x88, 2)) + (1000).to_bytes(2, "big")
    status, out, err, _, after = _run(lambda head: _switching(head) + frames, keep_open=True)
    assert (status, out) == (0, "hello\n")
    assert err == "selectws: connection closed by the server: 1000 (normal)\n"
    assert _close_code(after) == 1000  # the close was answered


def test_subprotocol_and_deflate_are_taken_from_the_handshake() -> None:
    # A compressed message (RSV1) right behind the 101: printed only if permessage-deflate was agreed.
    deflater = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
    compressed = (deflater.compress(b"squeezed") + deflater.flush(zlib.Z_SYNC_FLUSH))[:-4]
    frames = bytes((0xC1, len(compressed))) + compressed + bytes((0x88, 2)) + (1000).to_bytes(2, "big")

    def answer(head: bytes) -> bytes:
        assert b"\r\nSec-WebSocket-Protocol: a, b\r\n" in head + b"\r\n"
        return _switching(head, "Sec-WebSocket-Protocol: b", "Sec-WebSocket-Extensions: permessage-deflate") + frames

    server = _CannedServer(answer)
    out, err = io.StringIO(), io.StringIO()
    opts = ConnectOptions(f"ws://127.0.0.1:{server.port}/", subprotocols=("a", "b"), keep_open=True, timeout=5.0)
    client = WebSocketClient(opts, stdin_fd=-1, out=out, err=err)
    try:
        status = client.run()
    finally:
        server.join()
    assert (status, out.getvalue()) == (0, "squeezed\n"), err.getvalue()
    assert client.subprotocol == "b" and client.compressed
    assert client.conn is not None and client.conn.state is State.CLOSED
    assert _close_code(server.after) == 1000
