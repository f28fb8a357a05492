"""Closed connections are released at once: churning 10,000 connections leaves the daemon's memory where it was.

The real daemon (``start_daemon`` of ``conftest.py``, built-in defaults: /echo) is churned by
``benchmarks/churn.py`` in a subprocess: 10,000 connections, half of them with permessage-deflate (so each of those
had two zlib contexts), each one message and a clean close. One second later the daemon's RSS must be at most
30 MiB above where it started, and /metrics must show no connection left open.
"""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

CHURN = Path(__file__).resolve().parents[2] / "benchmarks" / "churn.py"
CONNS = 10_000
RSS_BOUND_KIB = 30 * 1024

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def metrics(port: int) -> dict[str, list[tuple[str, float]]]:
    """GET /metrics on the WebSocket port (plain HTTP): ``{name: [(labels, value), ...]}``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        body = resp.read().decode("utf-8")
        assert resp.status == 200, body
    finally:
        conn.close()
    samples: dict[str, list[tuple[str, float]]] = {}
    for line in body.splitlines():
        m = _SAMPLE.match(line)
        if m:
            samples.setdefault(m.group(1), []).append((m.group(2) or "", float(m.group(3))))
    return samples


@pytest.mark.slow
def test_churning_10000_connections_releases_them(start_daemon: Any) -> None:
    daemon = start_daemon()
    pid = daemon.proc.pid
    rss_start = rss_kib(pid)

    proc = subprocess.run(
        [sys.executable, str(CHURN), "--port", str(daemon.port), "--path", "/echo", "--conns", str(CONNS),
         "--deflate-fraction", "0.5", "--concurrency", "200", "--timeout", "90", "--json"],
        capture_output=True, text=True, timeout=110, stdin=subprocess.DEVNULL,
    )
    assert proc.stdout.strip(), f"churn printed nothing (exit {proc.returncode}): {proc.stderr}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["failed"] == 0, result["failures"]
    assert result["completed"] == CONNS
    assert proc.returncode == 0, proc.stderr
    # The deflate half really negotiated it: those connections each held zlib contexts to release.
    assert result["deflate_accepted"] == CONNS // 2

    time.sleep(1.0)
    rss_end = rss_kib(pid)
    print(f"daemon VmRSS: start {rss_start} KiB, 1 s after churning {CONNS}: {rss_end} KiB "
          f"({(rss_end - rss_start) / 1024:+.1f} MiB); churn: {result}")
    assert rss_end - rss_start <= RSS_BOUND_KIB, (
        f"RSS grew by {(rss_end - rss_start) / 1024:.1f} MiB (from {rss_start} to {rss_end} KiB) after "
        f"churning {CONNS} connections; at most {RSS_BOUND_KIB // 1024} MiB allowed")

    samples = metrics(daemon.port)
    # The one socket open is this scrape's own HTTP connection (it is counted while it is being answered).
    assert samples["selectws_sockets_open"] == [("", 1.0)]
    open_by_route = samples["selectws_connections_open"]
    assert open_by_route and all(value == 0 for _, value in open_by_route), open_by_route
    # No connection left a live timer behind: what remains is the server's own (the status tick, this scrape).
    assert samples["selectws_timers"][0][1] < 10, samples["selectws_timers"]
