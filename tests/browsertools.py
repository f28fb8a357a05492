"""What the browser tests share: Debian's Chromium and its flags, the requirement check (a skip locally, a failure
under ``CI``), a free port and a throwaway redis-server.

Playwright drives ``/usr/bin/chromium`` (``executable_path=CHROMIUM``); it never downloads a browser of its own.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _missing(redis: bool, hiredis: bool) -> str | None:
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} not found (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install playwright)"
    if redis and shutil.which("redis-server") is None:
        return "redis-server not installed (apt-get install redis-server)"
    if hiredis:
        try:
            import hiredis as _hiredis  # noqa: F401
        except ImportError:
            return "the Redis broker needs hiredis (pip install 'selectws[redis]')"
    return None


def requirements(*, redis: bool = False, hiredis: bool = False) -> list[Any]:
    """The ``pytestmark`` of a browser test module: marked ``browser``, and skipped (saying why) when Chromium,
    Playwright or, if asked, redis-server or hiredis is missing -- except under ``CI``, which installs all of them
    (.ci/run): there a missing one is a failure, never a silent skip."""
    missing = _missing(redis, hiredis)
    if missing is not None and os.environ.get("CI"):
        raise RuntimeError(f"browser tests cannot run in CI: {missing}")
    return [pytest.mark.browser,
            pytest.mark.skipif(missing is not None, reason=f"browser tests cannot run here: {missing}")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def redis_process() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """One redis-server, without persistence, on a free loopback port, answering PING: its URL and its process (a
    test may kill it early: a broker outage). Killed after."""
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "redis-server did not start"
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0", proc
    finally:
        proc.kill()
        proc.wait(5)


@contextmanager
def redis_server() -> Iterator[str]:
    """:func:`redis_process`'s URL alone."""
    with redis_process() as (url, _proc):
        yield url
