"""The non-blocking HTTP client (h11 inside) in a real EventLoop against local servers.

The servers run in threads of the test (http.server); the client runs on the loop stepped here, as in the daemon.
"""

from __future__ import annotations

import http.server
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from selectws.transport.http_client import HttpClient, HttpResult, client_context
from selectws.transport.loop import EventLoop

IPV4 = socket.AF_INET


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    bodies: ClassVar[list[tuple[str, dict[str, str], bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).bodies.append((self.path, dict(self.headers), body))
        status = 503 if self.path.startswith("/fail") else 200
        reply = b'{"ok": true}'
        self.send_response(status)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[http.server.ThreadingHTTPServer]:
    Handler.bodies = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def run(loop: EventLoop, client: HttpClient, path: str, body: bytes = b"{}", timeout: float = 5.0) -> HttpResult:
    results: list[HttpResult] = []
    client.request("POST", path, [("Content-Type", "application/json")], body, timeout, results.append)
    deadline = time.monotonic() + timeout + 5
    while not results:
        assert time.monotonic() < deadline, "no result"
        loop.run_once(0.05)
    return results[0]


def test_post_and_keep_alive(server: http.server.ThreadingHTTPServer) -> None:
    loop = EventLoop()
    port = server.server_address[1]
    client = HttpClient(loop, [(IPV4, ("127.0.0.1", port))], "127.0.0.1", port)
    first = run(loop, client, "/hook?x=1", b'{"events": []}')
    assert first.ok and first.status == 200 and first.sent and first.error is None
    second = run(loop, client, "/hook", b"[]")
    assert second.status == 200
    assert client.connections == 1  # the second request reused the connection
    (path, headers, body), _ = Handler.bodies
    assert path == "/hook?x=1" and body == b'{"events": []}'
    assert headers["Host"] == f"127.0.0.1:{port}" and headers["Content-Type"] == "application/json"
    failed = run(loop, client, "/fail")
    assert failed.status == 503 and not failed.ok and failed.sent
    client.close()
    loop.close()


def test_connection_refused_is_an_error_and_nothing_was_sent() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again when the block ends: nothing listens there
    loop = EventLoop()
    client = HttpClient(loop, [(IPV4, ("127.0.0.1", port))], "127.0.0.1", port)
    result = run(loop, client, "/")
    assert result.status is None and result.error is not None and "refused" in result.error
    assert not result.sent
    loop.close()


def test_a_receiver_that_never_answers_times_out_without_blocking_the_loop() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # the kernel completes the handshake; nobody ever reads or answers
    port = listener.getsockname()[1]
    loop = EventLoop()
    ticks = 0

    def tick() -> None:
        nonlocal ticks
        ticks += 1
        loop.call_later(0.01, tick)

    tick()
    client = HttpClient(loop, [(IPV4, ("127.0.0.1", port))], "127.0.0.1", port)
    started = time.monotonic()
    result = run(loop, client, "/", timeout=0.5)
    elapsed = time.monotonic() - started
    assert result.error == "timed out waiting for the response" and result.sent
    assert 0.45 < elapsed < 2.0
    assert ticks > 20  # the loop kept running its timers meanwhile
    listener.close()
    loop.close()


def make_cert(directory: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-addext",
         "subjectAltName=DNS:localhost,IP:127.0.0.1", "-days", "1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


def test_https_verifies_the_receiver(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path)
    Handler.bodies = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    try:
        loop = EventLoop()
        trusted = HttpClient(loop, [(IPV4, ("127.0.0.1", port))], "localhost", port, client_context(str(cert)))
        result = run(loop, trusted, "/tls", b"secret")
        assert result.status == 200, result
        assert Handler.bodies[0][2] == b"secret"
        untrusted = HttpClient(loop, [(IPV4, ("127.0.0.1", port))], "localhost", port, client_context())
        refused = run(loop, untrusted, "/tls")
        assert refused.status is None and refused.error is not None and "TLS" in refused.error
        assert not refused.sent
        loop.close()
    finally:
        httpd.shutdown()
        httpd.server_close()
