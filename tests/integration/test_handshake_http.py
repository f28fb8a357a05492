"""The opening handshake from raw sockets: every refusal's status, headers and connection close; plugin decisions;
subprotocol negotiation; the handshake timeout."""

from __future__ import annotations

import socket
import time

import pytest
import websockets.exceptions
from wstools import (
    OP_TEXT,
    RawWS,
    connect,
    expected_accept,
    http_exchange,
    read_head,
    read_until_eof,
    upgrade_request,
    ws_key,
)

TIMEOUT = 10.0


def _check_refusal(reply, status: int) -> None:
    """What every refusal must look like: the status, ``Connection: close``, a body of the announced length, and
    the server really closing the connection afterwards."""
    assert reply.status == status, reply.raw[:500]
    assert "close" in reply.tokens("Connection"), f"{status} without 'Connection: close': {reply.headers}"
    assert reply.eof, f"the server did not close the connection after {status}"
    length = reply.header("Content-Length")
    assert length is not None and int(length) == len(reply.body), (length, reply.body)


def _key() -> str:
    return ws_key()


REFUSALS = [
    ("unknown-path", upgrade_request("/no/such/route", key=_key()), 404),
    ("unknown-ws-like-path", upgrade_request("/echo/extra", key=_key()), 404),
    ("post", upgrade_request("/echo", method="POST", key=_key()), 405),
    ("put-broadcast", upgrade_request("/broadcast/x", method="PUT", key=_key()), 405),
    ("plain-get", b"GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 426),
    ("upgrade-to-something-else", upgrade_request("/echo", key=_key()).replace(b"websocket", b"h2c"), 426),
    ("version-8", upgrade_request("/echo", key=_key(), version="8"), 426),
    ("no-version", upgrade_request("/echo", key=_key(), version=None), 426),
    ("missing-key", upgrade_request("/echo"), 400),
    ("bad-key-not-base64", upgrade_request("/echo", key="not base64 at all!"), 400),
    ("bad-key-8-bytes", upgrade_request("/echo", key="AAAAAAAAAAA="), 400),
    ("two-keys", upgrade_request("/echo", key=_key(), extra=[("Sec-WebSocket-Key", _key())]), 400),
    ("no-connection-upgrade", upgrade_request("/echo", key=_key()).replace(b"Connection: Upgrade\r\n", b""), 400),
    ("no-host", upgrade_request("/echo", key=_key()).replace(b"Host: 127.0.0.1\r\n", b""), 400),
    ("http-1.0", upgrade_request("/echo", key=_key()).replace(b"HTTP/1.1", b"HTTP/1.0"), 400),
    ("http-2.0", upgrade_request("/echo", key=_key()).replace(b"HTTP/1.1", b"HTTP/2.0"), 505),
    ("garbage-request-line", b"HELLO\r\n\r\n", 400),
    ("absolute-target", upgrade_request("http://127.0.0.1/echo", key=_key()), 400),
    ("header-folding", upgrade_request("/echo", key=_key(), extra=[("X-A", "1\r\n folded")]), 400),
    ("huge-header", upgrade_request("/echo", key=_key(), extra=[("X-Big", "b" * 20000)]), 431),
    ("too-many-headers", upgrade_request("/echo", key=_key(), extra=[(f"X-H{i}", "v") for i in range(150)]), 431),
    ("request-line-too-long", upgrade_request("/echo?" + "q" * 9000, key=_key()), 414),
    ("malformed-extensions", upgrade_request("/echo", key=_key(), extra=[("Sec-WebSocket-Extensions", "x; ;")]), 400),
]


@pytest.mark.parametrize("request_bytes,status", [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_refusals(daemon, request_bytes, status):
    reply = http_exchange(daemon.port, request_bytes, timeout=TIMEOUT)
    _check_refusal(reply, status)
    if status == 405:
        assert "GET" in (reply.header("Allow") or "")


def _accepted(reply, key: str) -> None:
    assert reply.status == 101, reply.raw[:300]
    assert reply.header("Sec-WebSocket-Accept") == expected_accept(key)
    assert reply.tokens("Upgrade") == ["websocket"]
    assert "upgrade" in reply.tokens("Connection")


def test_browser_style_and_lowercase_headers_are_accepted(daemon):
    """Header names are case-insensitive; Connection may list other tokens (Firefox: "keep-alive, Upgrade")."""
    key = _key()
    request = (
        "GET /echo?x=1 HTTP/1.1\r\nhost: 127.0.0.1\r\nupgrade: WebSocket\r\nconnection: keep-alive, Upgrade\r\n"
        f"sec-websocket-key: {key}\r\nsec-websocket-version: 13\r\norigin: http://example.test\r\n"
        "user-agent: tests\r\n\r\n"
    ).encode()
    with socket.create_connection((daemon.host, daemon.port), timeout=TIMEOUT) as sock:
        sock.sendall(request)
        _accepted(read_head(sock, TIMEOUT), key)


@pytest.mark.parametrize(
    "offer,agreed",
    [
        ("permessage-deflate; client_max_window_bits", "permessage-deflate"),
        ("permessage-deflate; unknown_param=1", None),  # declined, not refused: the connection runs uncompressed
        ("permessage-deflate; client_max_window_bits=20", None),
        ("x-webkit-deflate-frame", None),
        ("permessage-deflate; unknown=1, permessage-deflate", "permessage-deflate"),  # the next offer is tried
    ],
)
def test_extension_negotiation(daemon, offer, agreed):
    with RawWS(daemon.port, "/echo", extra_headers=[("Sec-WebSocket-Extensions", offer)]) as raw:
        answer = [v for k, v in raw.headers if k.lower() == "sec-websocket-extensions"]
        if agreed is None:
            assert answer == []
            raw.send_frame(OP_TEXT, b"plain")
            frame = raw.recv_frame()
            assert (frame.rsv, frame.payload) == (0, b"plain")
        else:
            assert len(answer) == 1 and answer[0].split(";")[0].strip() == agreed


def test_426_tells_the_client_to_upgrade(daemon):
    reply = http_exchange(daemon.port, b"GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", timeout=TIMEOUT)
    _check_refusal(reply, 426)
    assert reply.tokens("Upgrade") == ["websocket"]


def test_426_names_the_supported_version(daemon):
    reply = http_exchange(daemon.port, upgrade_request("/echo", key=_key(), version="8"), timeout=TIMEOUT)
    _check_refusal(reply, 426)
    assert reply.header("Sec-WebSocket-Version") == "13"


def test_refusals_are_logged(start_daemon):
    daemon = start_daemon(extra_args=("--log-level", "debug"))
    http_exchange(daemon.port, upgrade_request("/broadcast/logged", key=_key(), version="7"), timeout=TIMEOUT)
    record = daemon.wait_for(event="handshake refused", path="/broadcast/logged")
    assert record["status"] == 426
    # a malformed upgrade is what scanners send all day: debug (selectws/server/refusals.py), summarised per minute
    assert (record["level"], record["kind"]) == ("debug", "bad_request")


def test_huge_header_sent_slowly_is_refused_without_reading_it_all(daemon):
    """A client dribbling an endless header is answered 431 soon after the limit (16 KiB) is passed."""
    with socket.create_connection((daemon.host, daemon.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Endless: ")
        sent = 0
        data = b""
        while sent < 256 * 1024 and not data:
            try:
                sock.sendall(b"a" * 4096)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += 4096
            sock.settimeout(0.02)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                pass
        sock.settimeout(TIMEOUT)
        rest, eof = read_until_eof(sock, TIMEOUT)
    data += rest
    assert data.startswith(b"HTTP/1.1 431 "), data[:200]
    assert sent <= 96 * 1024, f"{sent} bytes of header sent before the server refused"
    assert eof


def test_plugin_reject_answers_401(plugin_daemon):
    for target in ("/token", "/token?token=wrong"):
        reply = http_exchange(plugin_daemon.port, upgrade_request(target, key=_key()), timeout=TIMEOUT)
        _check_refusal(reply, 401)
        assert reply.header("WWW-Authenticate") == 'Token realm="tests"'
        assert b"a valid token is required" in reply.body
    with pytest.raises(websockets.exceptions.InvalidStatus) as info:
        connect(plugin_daemon.url("/token"))
    assert info.value.response.status_code == 401


def test_plugin_accept_with_token(plugin_daemon):
    with connect(plugin_daemon.url("/token?token=secret")) as ws:
        assert ws.response.headers["X-Test-Accepted"] == "yes"
        ws.send("authenticated")
        assert ws.recv(timeout=TIMEOUT) == "authenticated"


def test_plugin_on_handshake_raising_answers_500(plugin_daemon):
    reply = http_exchange(plugin_daemon.port, upgrade_request("/boom?fail=handshake", key=_key()), timeout=TIMEOUT)
    _check_refusal(reply, 500)
    assert b"exploded" not in reply.body, "the traceback must not leak to the client"
    record = plugin_daemon.wait_for(lambda r: "on_handshake exploded" in r.get("exception", ""))
    assert record["level"] == "error"
    with connect(plugin_daemon.url("/boom")) as ws:  # the route and the server still work
        ws.send("ok")
        assert ws.recv(timeout=TIMEOUT) == "ok"


@pytest.mark.parametrize(
    "path,offered,chosen",
    [
        ("/proto", ["x", "chat.v1"], "chat.v1"),
        ("/proto", ["chat.v1", "chat.v2"], "chat.v1"),  # the client's order decides among supported ones
        ("/proto", ["chat.v2", "chat.v1"], "chat.v2"),
        ("/proto", ["x", "y"], None),
        ("/proto", None, None),
        ("/proto-override", ["chat.v1", "override.v1"], "override.v1"),  # the route's list replaces the plugin's
        ("/proto-override", ["chat.v1"], None),
        ("/proto-strict", ["chat.v1"], "chat.v1"),
    ],
)
def test_subprotocol_negotiation(plugin_daemon, path, offered, chosen):
    with connect(plugin_daemon.url(path), subprotocols=offered) as ws:
        assert ws.subprotocol == chosen
        assert ws.response.headers.get("Sec-WebSocket-Protocol") == chosen
        ws.send("which?")
        assert ws.recv(timeout=TIMEOUT) == (chosen or "none")


def test_subprotocol_offered_in_several_headers(plugin_daemon):
    with RawWS(plugin_daemon.port, "/proto", extra_headers=[("Sec-WebSocket-Protocol", "a, b"),
                                                            ("Sec-WebSocket-Protocol", "chat.v2")]) as raw:
        assert [v for k, v in raw.headers if k.lower() == "sec-websocket-protocol"] == ["chat.v2"]


def test_required_subprotocol_missing_is_400(plugin_daemon):
    reply = http_exchange(
        plugin_daemon.port,
        upgrade_request("/proto-strict", key=_key(), extra=[("Sec-WebSocket-Protocol", "x")]),
        timeout=TIMEOUT,
    )
    _check_refusal(reply, 400)


def test_frames_in_the_same_packet_as_the_handshake(daemon):
    """A client may send its first frames right behind the request head; they must not be lost."""
    from wstools import encode_frame

    with RawWS(daemon.port, "/echo", handshake=False) as raw:
        raw.handshake(trailing=encode_frame(OP_TEXT, b"first") + encode_frame(OP_TEXT, b"second"))
        assert raw.recv_message() == (OP_TEXT, b"first")
        assert raw.recv_message() == (OP_TEXT, b"second")


def test_handshake_request_in_tiny_pieces(daemon):
    key = _key()
    request = upgrade_request("/echo", key=key)
    with socket.create_connection((daemon.host, daemon.port), timeout=TIMEOUT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(0, len(request), 7):
            sock.sendall(request[i : i + 7])
            time.sleep(0.001)
        _accepted(read_head(sock, TIMEOUT), key)


# ---------------------------------------------------------------------------------------------- handshake timeout
HANDSHAKE_TIMEOUT_CONFIG = """
[timeouts]
handshake = 0.5
"""


@pytest.fixture(scope="module")
def slow_daemon(module_start_daemon):
    return module_start_daemon(HANDSHAKE_TIMEOUT_CONFIG, extra_args=("--log-level", "debug"))  # 408 is debug


def _timed_out(sock: socket.socket, start: float) -> None:
    data, eof = read_until_eof(sock, 3.0)
    elapsed = time.monotonic() - start
    assert data.startswith(b"HTTP/1.1 408 "), data[:200]
    assert b"Connection: close" in data
    assert eof, "the connection must be closed after the 408"
    assert 0.4 <= elapsed <= 1.5, f"408 after {elapsed:.2f}s, expected about 0.5s"


def test_handshake_timeout_when_nothing_is_sent(slow_daemon):
    start = time.monotonic()
    with socket.create_connection((slow_daemon.host, slow_daemon.port), timeout=TIMEOUT) as sock:
        _timed_out(sock, start)
    slow_daemon.wait_for(event="handshake refused", status=408)


def test_handshake_timeout_on_a_partial_request(slow_daemon):
    start = time.monotonic()
    with socket.create_connection((slow_daemon.host, slow_daemon.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgr")
        _timed_out(sock, start)


def test_handshake_timeout_is_not_reset_by_dribbled_bytes(slow_daemon):
    """A slowloris client sending one byte every 50 ms still gets 408 about 0.5 s after connecting."""
    start = time.monotonic()
    request = upgrade_request("/echo", key=_key(), extra=[("X-Pad", "p" * 200)])
    with socket.create_connection((slow_daemon.host, slow_daemon.port), timeout=TIMEOUT) as sock:
        for byte in request[:-4]:
            if time.monotonic() - start > 0.8:
                break
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.05)
            sock.setblocking(False)
            try:
                peek = sock.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                peek = b""
            sock.setblocking(True)
            sock.settimeout(TIMEOUT)
            if peek:
                break
        _timed_out(sock, start)


def test_handshake_completed_in_time_is_not_cut(slow_daemon):
    """The handshake deadline ends with the handshake: an open connection idle past it stays open."""
    with connect(slow_daemon.url("/echo")) as ws:
        time.sleep(0.8)
        ws.send("still here")
        assert ws.recv(timeout=TIMEOUT) == "still here"


# ---------------------------------------------------------------------------------------------- connection limit
def test_connection_limit_answers_503(start_daemon):
    d = start_daemon("""
    [limits]
    max_connections = 2
    """)
    with connect(d.url("/echo")) as a, connect(d.url("/echo")) as b:
        reply = http_exchange(d.port, upgrade_request("/echo", key=_key()), timeout=TIMEOUT)
        _check_refusal(reply, 503)
        assert reply.header("Retry-After") is not None
        for ws in (a, b):
            ws.send("the two open ones are unaffected")
            assert ws.recv(timeout=TIMEOUT) == "the two open ones are unaffected"
    d.wait_for(lambda r: r.get("conn") == 2, event="close")
    # A slot is free again once one has gone.
    with connect(d.url("/echo")) as c:
        c.send("in")
        assert c.recv(timeout=TIMEOUT) == "in"
