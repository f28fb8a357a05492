"""The operator's side of refused handshakes, on the real daemon: a mistyped WebSocket path is answered, logged and
counted (``selectws_handshake_failures_total{reason=...}``); scanners' requests are not warnings; console logs
print close codes as numbers. (The per-minute summary: tests/unit/test_refusal_summary.py.)"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import subprocess_env
from wstools import OP_TEXT, RawWS, http_exchange, upgrade_request, ws_key

TIMEOUT = 10.0
#: The reason labels of selectws_handshake_failures_total (selectws/server/refusals.py), all exported from the start.
FAILURE_REASONS = ("no_route", "bad_request", "timeout", "http", "origin", "auth", "subprotocol", "plugin",
                   "client_limit", "limit", "draining", "error", "tls")
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """GET /metrics, parsed by prometheus_client (so the exposition format must be valid)."""
    parser = pytest.importorskip("prometheus_client.parser")
    reply = http_exchange(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", timeout=TIMEOUT)
    assert reply.status == 200, reply.raw[:300]
    samples: Samples = {}
    for family in parser.text_string_to_metric_families(reply.body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def failures(samples: Samples) -> dict[str, float]:
    """selectws_handshake_failures_total by its reason label (a sample without one is keyed "")."""
    return {dict(labels).get("reason", ""): v for (name, labels), v in samples.items()
            if name == "selectws_handshake_failures_total"}


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("curl") is None:
        pytest.skip("needs curl")
    return subprocess.run(["curl", "-sS", "--max-time", "10", *args], capture_output=True, text=True, check=True)


# ============================================================================================ a mistyped path
def test_an_upgrade_to_a_path_no_route_serves_is_answered_logged_and_counted(start_daemon):
    daemon = start_daemon()  # the defaults: static files on, so every unknown GET is the static handler's
    before = failures(scrape(daemon.port))
    assert set(before) == set(FAILURE_REASONS), before  # every reason declared up front, no unlabelled sample
    assert all(v == 0 for v in before.values()), before

    done = curl("-i", "-H", "Connection: Upgrade", "-H", "Upgrade: websocket", "-H", "Sec-WebSocket-Version: 13",
                "-H", f"Sec-WebSocket-Key: {ws_key()}", f"http://127.0.0.1:{daemon.port}/nope")
    assert done.stdout.startswith("HTTP/1.1 404 "), done.stdout
    assert done.stdout.endswith("\n\n404 no route for /nope\n"), done.stdout  # text mode: CRLF read as LF

    record = daemon.wait_for(event="handshake refused", path="/nope", timeout=TIMEOUT)
    assert record["level"] == "info"  # a client error: findable at the default level, but not a warning
    assert record["status"] == 404 and record["kind"] == "no_route"
    assert record["reason"] == "no route for /nope"

    after = failures(scrape(daemon.port))
    assert after["no_route"] == 1
    assert sum(after.values()) == 1

    # A browser's GET of a file that is not there is still the static handler's 404, counted apart.
    missing = curl("-i", f"http://127.0.0.1:{daemon.port}/nope.png")
    assert missing.stdout.startswith("HTTP/1.1 404 ") and missing.stdout.endswith("404 Not Found\n")
    assert failures(scrape(daemon.port))["http"] == 1


def test_failure_reasons_add_up_to_the_refusals(start_daemon):
    daemon = start_daemon("""
        [[routes]]
        path = "/echo"
        plugin = "echo"

        [[routes]]
        path = "/only-example"
        plugin = "echo"
        origins = ["https://example.com"]

        [limits]
        max_connections = 1
    """)
    port = daemon.port
    assert http_exchange(port, b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n").status == 426  # not an upgrade
    assert http_exchange(port, b"HELLO\r\n\r\n").status == 400  # not HTTP
    assert http_exchange(port, upgrade_request("/only-example", key=ws_key(),
                                               extra=[("Origin", "https://evil.example")])).status == 403
    assert http_exchange(port, upgrade_request("/missing", key=ws_key())).status == 404
    with RawWS(port, "/echo"):  # the one connection allowed
        assert http_exchange(port, upgrade_request("/echo", key=ws_key())).status == 503
        got = failures(scrape(port))
    assert got == {**dict.fromkeys(FAILURE_REASONS, 0), "bad_request": 2, "origin": 1, "no_route": 1, "limit": 1}
    samples = scrape(port)
    rejected = sum(v for (name, _), v in samples.items() if name == "selectws_http_rejected_total")
    assert sum(failures(samples).values()) == rejected == 5


# ============================================================================================ log levels
def test_scanner_noise_is_debug_and_a_full_server_is_a_warning(start_daemon):
    daemon = start_daemon("""
        [[routes]]
        path = "/echo"
        plugin = "echo"

        [limits]
        max_connections = 1
    """, extra_args=("--log-level", "debug"))
    port = daemon.port
    assert http_exchange(port, b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n").status == 426
    assert http_exchange(port, b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n").status == 405
    plain = daemon.wait_for(event="handshake refused", status=426, timeout=TIMEOUT)
    post = daemon.wait_for(event="handshake refused", status=405, timeout=TIMEOUT)
    assert (plain["level"], plain["kind"]) == ("debug", "bad_request")
    assert (post["level"], post["kind"]) == ("debug", "http")
    with RawWS(port, "/echo"):
        assert http_exchange(port, upgrade_request("/echo", key=ws_key())).status == 503
        full = daemon.wait_for(event="handshake refused", status=503, timeout=TIMEOUT)
    assert (full["level"], full["kind"]) == ("warning", "limit")  # this one an operator must look at


def test_at_the_default_level_scanners_leave_no_line_per_request(start_daemon):
    daemon = start_daemon()
    port = daemon.port
    for _ in range(5):
        assert http_exchange(port, b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n").status == 426
        assert http_exchange(port, b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n").status == 405
    # A refusal after them, logged at info, proves the daemon has written everything up to here.
    assert http_exchange(port, upgrade_request("/nope", key=ws_key())).status == 404
    daemon.wait_for(event="handshake refused", path="/nope", timeout=TIMEOUT)
    assert [r["path"] for r in daemon.logs(event="handshake refused")] == ["/nope"]
    assert not daemon.logs(level="warning")


# ============================================================================================ console logs
def test_console_logs_print_close_codes_as_numbers(tmp_path: Path):
    config = tmp_path / "c.toml"
    config.write_text('[[routes]]\npath = "/echo"\nplugin = "echo"\n\n[limits]\nmax_message_size = 100\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "selectws", "serve", "--port", "0", "--host", "127.0.0.1", "--log-format", "console",
         "--config", str(config)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=subprocess_env(),
        cwd=tmp_path, text=True,
    )
    lines: list[str] = []
    seen = threading.Condition()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            with seen:
                lines.append(line.rstrip("\n"))
                seen.notify_all()

    threading.Thread(target=read, daemon=True).start()

    def wait_line(pattern: str) -> re.Match[str]:
        deadline = time.monotonic() + TIMEOUT
        with seen:
            while True:
                for line in lines:
                    if (found := re.search(pattern, line)) is not None:
                        return found
                left = deadline - time.monotonic()
                assert left > 0 and proc.poll() is None, f"no line matching {pattern!r}:\n" + "\n".join(lines)
                seen.wait(min(left, 0.1))

    try:
        port = int(wait_line(r"listening.*127\.0\.0\.1:(\d+)").group(1))
        with RawWS(port, "/echo") as ws:
            ws.send_frame(OP_TEXT, b"x" * 200)  # over max_message_size: closed with 1009
            assert ws.expect_close(TIMEOUT).close_code == 1009
        close = wait_line(r"^.*\bclose\b.*\bcode=.*$").group(0)
        assert re.search(r"\bcode=1009\b", close), close
        assert "CloseCode" not in "\n".join(lines)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0
