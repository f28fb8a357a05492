"""Refused handshakes are summarised: one info line per window with the counts by status, only when there was
something, and no timer while there is nothing to report (selectws/server/refusals.py). A real :class:`Server`
in this process (tests/harness.py), its window shortened so the test need not wait a minute."""

from __future__ import annotations

import io
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from harness import in_process_server

from selectws.transport.logs import configure_logging

WINDOW = 0.3
SUMMARY = f"handshake refusals in the last {WINDOW:g} s"


@pytest.fixture
def log() -> Iterator[io.StringIO]:
    saved = structlog.get_config()
    out = io.StringIO()
    configure_logging("info", "json", out)
    yield out
    structlog.configure(**saved)


def records(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def summaries(out: io.StringIO) -> list[dict[str, Any]]:
    return [r for r in records(out) if r["event"] == SUMMARY]


def refused(harness: Any, request: bytes) -> bytes:
    """Send ``request`` on a fresh connection; the server's whole answer (it closes the connection after it)."""
    with socket.create_connection(("127.0.0.1", harness.port)) as sock:
        sock.setblocking(False)
        sock.sendall(request)
        answer = bytearray()
        done = []

        def read() -> bool:
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                return False
            answer.extend(data)
            if not data:
                done.append(True)
            return bool(done)

        harness.run_until(read)
        return bytes(answer)


PLAIN_GET = b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n"
POST_HEALTH = b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"


def test_refusals_are_summarised_once_per_window_and_only_when_there_were_some(log: io.StringIO) -> None:
    with in_process_server() as harness:
        server = harness.server
        server.refusals.interval = WINDOW  # a RefusalSummary (selectws/server/refusals.py)
        harness.step()
        idle_timers = server.loop.timer_count

        for _ in range(3):
            assert refused(harness, PLAIN_GET).startswith(b"HTTP/1.1 426 ")
        assert refused(harness, POST_HEALTH).startswith(b"HTTP/1.1 405 ")
        # each of them at debug only: nothing per request at the info level
        assert not [r for r in records(log) if r["event"] == "handshake refused"]

        harness.run_until(lambda: bool(summaries(log)), timeout=5.0)
        (first,) = summaries(log)
        assert first["level"] == "info"
        assert first["by_status"] == {"405": 1, "426": 3}
        assert first["total"] == 4

        # Nothing refused since: no second line, and no timer kept for it (an idle server is idle).
        harness.run_until(lambda: server.loop.timer_count == idle_timers, timeout=5.0)
        deadline = time.monotonic() + 2 * WINDOW
        while time.monotonic() < deadline:
            harness.step(1)
        assert len(summaries(log)) == 1
        assert server.loop.timer_count == idle_timers

        # The next refusal opens a new window.
        refused(harness, PLAIN_GET)
        harness.run_until(lambda: len(summaries(log)) == 2, timeout=5.0)
        assert summaries(log)[1]["by_status"] == {"426": 1}
