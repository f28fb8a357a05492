"""``selectws connect``, run as a subprocess, against two servers:

* the selectws daemon itself (``python -m selectws serve`` on an ephemeral port), and
* a server built with the ``websockets`` library in a thread of the test, so the client's handshake, masking,
  permessage-deflate, close handshake and TLS are also checked against an implementation nobody here wrote.

The daemon comes from the ``daemon`` fixture of the conftest beside this file.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon

websockets_sync = pytest.importorskip("websockets.sync.server")
from websockets.exceptions import ConnectionClosed  # noqa: E402
from websockets.sync.server import Server, ServerConnection  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT = 30.0


# ------------------------------------------------------------------------------------------------ helpers


def _env() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        env.pop(name, None)
    return env


def connect(*args: str, stdin: str | bytes = "", timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """``python -m selectws connect ARGS`` with ``stdin``; stdout and stderr captured as text."""
    data = stdin.encode() if isinstance(stdin, str) else stdin
    proc = subprocess.run(
        [sys.executable, "-m", "selectws", "connect", *args],
        input=data, capture_output=True, timeout=timeout, env=_env(), cwd=REPO_ROOT,
    )
    return subprocess.CompletedProcess(
        proc.args, proc.returncode, proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")
    )


def ws_handler(ws: ServerConnection) -> None:
    """The ``websockets`` side: /echo echoes; /info describes the handshake first; /close/CODE closes so."""
    path = ws.request.path if ws.request is not None else "/"
    try:
        if path.startswith("/close/"):
            ws.recv()
            ws.close(int(path.rsplit("/", 1)[1]), "closing as asked")
            return
        if path == "/info":
            assert ws.request is not None and ws.response is not None
            ws.send(json.dumps({
                "headers": {k.lower(): v for k, v in ws.request.headers.raw_items()},
                "subprotocol": ws.subprotocol,
                "extensions": ws.response.headers.get("Sec-WebSocket-Extensions"),
            }))
        if path == "/slow":
            time.sleep(1.0)  # longer than a few --ping-interval periods
        for message in ws:
            ws.send(message)
    except ConnectionClosed:
        pass


def choose_subprotocol(ws: ServerConnection, offered: Any) -> Any:
    return "chat.v1" if "chat.v1" in offered else None


@pytest.fixture
def ws_server() -> Iterator[Callable[..., str]]:
    """A factory: ``ws_server(ssl=None)`` -> base URL of a ``websockets`` server running in a thread."""
    servers: list[tuple[Server, threading.Thread]] = []

    def start(ssl_context: ssl.SSLContext | None = None) -> str:
        server = websockets_sync.serve(
            ws_handler, "127.0.0.1", 0, ssl=ssl_context, select_subprotocol=choose_subprotocol, max_size=4 << 20,
        )
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        servers.append((server, thread))
        port = server.socket.getsockname()[1]
        return f"{'wss' if ssl_context else 'ws'}://127.0.0.1:{port}"

    yield start
    for server, thread in servers:
        server.shutdown()
        thread.join(10)


def closed_port() -> int:
    """A port nothing listens on: bound (so nobody else takes it meanwhile) but never listening."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------------------------ the daemon


def test_once_echo(daemon: Daemon) -> None:
    result = connect(daemon.url("/echo"), "--once", stdin="hi\n")
    assert (result.returncode, result.stdout, result.stderr) == (0, "hi\n", "")


def test_once_several_lines_in_order(daemon: Daemon) -> None:
    lines = ["first", "héllo wörld ✓", "", "last line without newline"]
    result = connect(daemon.url("/echo"), "--once", stdin="\n".join(lines))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:-1] == lines


def test_crlf_input_is_one_line(daemon: Daemon) -> None:
    result = connect(daemon.url("/echo"), "--once", stdin="windows\r\n")
    assert (result.returncode, result.stdout) == (0, "windows\n")


def test_without_once_stdin_eof_closes_cleanly(daemon: Daemon) -> None:
    # Without --once the close follows stdin's end at once (as websocat does). Messages that reach the daemon
    # before (or in the same read as) the close frame are still answered before the daemon's close.
    result = connect(daemon.url("/echo"), stdin="a\nb\n")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout == "a\nb\n"


def test_handshake_refused_404(daemon: Daemon) -> None:
    result = connect(daemon.url("/no/such/route"), "--once", stdin="hi\n")
    assert result.returncode == 1
    assert "selectws: handshake failed: 404 Not Found" in result.stderr
    assert result.stdout == ""


def test_plain_http_page_is_not_a_websocket(daemon: Daemon) -> None:
    result = connect(daemon.url("/"), "--once", stdin="hi\n")
    assert result.returncode == 1
    # the demo page is at /, but an upgrade there is not answered with it: no WebSocket route serves /
    assert "handshake failed: 404 Not Found" in result.stderr and "no route for /" in result.stderr


@pytest.mark.parametrize(
    ("fmt", "line"),
    [("hex", "00ff10abcdef7f80"), ("base64", base64.b64encode(bytes(range(256))).decode())],
)
def test_binary_round_trip(daemon: Daemon, fmt: str, line: str) -> None:
    result = connect(daemon.url("/echo"), "--once", "--binary", "--binary-format", fmt, stdin=line + "\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == line + "\n"


def test_binary_input_that_does_not_decode_is_skipped(daemon: Daemon) -> None:
    result = connect(daemon.url("/echo"), "--once", "--binary", stdin="zz-not-hex\n0102\n")
    assert result.returncode == 1  # a line was lost: the run did not do all it was asked
    assert result.stdout == "0102\n"
    assert "not hex" in result.stderr


def test_chat_login(daemon: Daemon) -> None:
    result = connect(daemon.url("/chat"), "--once", stdin='{"type":"login","name":"cli","room":"r1"}\n')
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"type": "welcome", "name": "cli", "room": "r1", "members": ["cli"]}


@pytest.mark.parametrize("flag", ["--compress", "--no-compress"])
def test_large_message_with_and_without_compression(daemon: Daemon, flag: str) -> None:
    text = "selectws " * 50_000  # 450 kB, very compressible
    result = connect(daemon.url("/echo"), "--once", flag, stdin=text + "\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == text + "\n"


def test_connection_refused() -> None:
    port = closed_port()
    result = connect(f"ws://127.0.0.1:{port}/echo", "--once", stdin="hi\n")
    assert result.returncode == 1
    assert f"cannot connect to 127.0.0.1:{port}: connection refused" in result.stderr


def test_bad_url_and_header() -> None:
    result = connect("ftp://example.invalid/", stdin="")
    assert result.returncode == 1
    assert "ws:// or wss://" in result.stderr
    result = connect("ws://127.0.0.1:1/", "-H", "no colon here", stdin="")
    assert result.returncode == 2  # a usage error, before any connection
    assert "Name: value" in result.stderr


def test_once_timeout_without_replies(daemon: Daemon) -> None:
    # A broadcast channel never sends a message back to its sender: nothing will come.
    started = time.monotonic()
    result = connect(daemon.url("/broadcast/quiet"), "--once", "--timeout", "1", stdin="anyone?\n")
    assert time.monotonic() - started < 15
    assert result.returncode == 1
    assert "timed out after 1 s: 0 of 1 replies" in result.stderr


def test_server_going_away_is_a_clean_exit(start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon()
    proc = subprocess.Popen(
        [sys.executable, "-m", "selectws", "connect", daemon.url("/echo"), "--keep-open"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), cwd=REPO_ROOT,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"ready?\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == b"ready?\n"  # connected and echoing
        assert daemon.terminate() == 0  # SIGTERM: the daemon closes every connection with 1001
        _, err = proc.communicate(timeout=RUN_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "connection closed by the server: 1001 (going away) server shutting down" in err.decode()


def test_server_closing_with_an_error_code_exits_1(start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon()
    too_big = "x" * ((1 << 20) + 10)  # over the daemon's default max_message_size
    result = connect(daemon.url("/echo"), "--once", "--no-compress", stdin=too_big + "\n")
    assert result.returncode == 1
    assert "connection closed by the server: 1009 (message too big)" in result.stderr


# ------------------------------------------------------------------------------------------------ websockets


def test_echo_against_websockets(ws_server: Callable[..., str]) -> None:
    base = ws_server()
    result = connect(f"{base}/echo", "--once", stdin="one\ntwo ✓\n")
    assert (result.returncode, result.stdout) == (0, "one\ntwo ✓\n"), result.stderr


def test_binary_against_websockets(ws_server: Callable[..., str]) -> None:
    base = ws_server()
    payload = bytes(range(256)) * 40
    result = connect(f"{base}/echo", "--once", "--binary", stdin=payload.hex() + "\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == payload.hex() + "\n"


def test_handshake_details_reach_websockets(ws_server: Callable[..., str]) -> None:
    base = ws_server()
    result = connect(
        f"{base}/info", "--once",
        "-H", "X-Token: abc 123", "-H", "X-Other:two",
        "--origin", "http://example.test",
        "--subprotocol", "chat.v2", "--subprotocol", "chat.v1",
        stdin="",  # no lines: --once waits for one message, the description
    )
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    headers = info["headers"]
    assert headers["x-token"] == "abc 123"
    assert headers["x-other"] == "two"
    assert headers["origin"] == "http://example.test"
    assert headers["sec-websocket-protocol"] == "chat.v2, chat.v1"
    assert headers["host"] == base.removeprefix("ws://")
    assert info["subprotocol"] == "chat.v1"
    assert "permessage-deflate" in info["extensions"]


def test_no_compress_offers_nothing(ws_server: Callable[..., str]) -> None:
    base = ws_server()
    result = connect(f"{base}/info", "--once", "--no-compress", stdin="")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert "sec-websocket-extensions" not in info["headers"]
    assert info["extensions"] is None


def test_compressed_large_messages_against_websockets(ws_server: Callable[..., str]) -> None:
    base = ws_server()
    lines = [f"{i} " + "compress me " * 20_000 for i in range(3)]  # context takeover across messages
    result = connect(f"{base}/echo", "--once", "--compress", stdin="\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "".join(line + "\n" for line in lines)


def test_pings_keep_a_slow_exchange_alive(ws_server: Callable[..., str]) -> None:
    base = ws_server()
    result = connect(f"{base}/slow", "--once", "--ping-interval", "0.2", stdin="patience\n")
    assert (result.returncode, result.stdout) == (0, "patience\n"), result.stderr


@pytest.mark.parametrize(("code", "status"), [(1000, 0), (1001, 0), (4000, 1), (1011, 1)])
def test_close_codes_from_websockets(ws_server: Callable[..., str], code: int, status: int) -> None:
    base = ws_server()
    result = connect(f"{base}/close/{code}", "--keep-open", stdin="bye\n")
    assert result.returncode == status, result.stderr
    assert f"connection closed by the server: {code} (" in result.stderr
    assert "closing as asked" in result.stderr


# ------------------------------------------------------------------------------------------------ TLS


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A throw-away certificate for localhost and 127.0.0.1: ``cryptography`` if installed, else openssl."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-days", "1",
             "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
            check=True, capture_output=True, timeout=60,
        )
        return cert, key
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(private, hashes.SHA256())
    )
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert, key


@pytest.fixture
def tls_server(ws_server: Callable[..., str], tmp_path: Path) -> tuple[str, Path]:
    cert, key = _self_signed(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return ws_server(context), cert


def test_wss_untrusted_certificate_fails(tls_server: tuple[str, Path]) -> None:
    base, _ = tls_server
    result = connect(f"{base}/echo", "--once", stdin="hi\n")
    assert result.returncode == 1
    assert "not trusted" in result.stderr
    assert "--insecure" in result.stderr


def test_wss_insecure(tls_server: tuple[str, Path]) -> None:
    base, _ = tls_server
    result = connect(f"{base}/echo", "--once", "--insecure", stdin="over tls\n")
    assert (result.returncode, result.stdout) == (0, "over tls\n"), result.stderr


def test_wss_cafile_verifies_the_name(tls_server: tuple[str, Path]) -> None:
    base, cert = tls_server
    port = base.rsplit(":", 1)[1]
    big = "tls " * 100_000  # many TLS records in one message
    result = connect(f"wss://localhost:{port}/echo", "--once", "--cafile", str(cert), stdin=f"verified\n{big}\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"verified\n{big}\n"
    result = connect(f"wss://127.0.0.1:{port}/info", "--once", "--cafile", str(cert), stdin="")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["headers"]["host"] == f"127.0.0.1:{port}"
