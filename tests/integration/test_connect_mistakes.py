"""``selectws connect`` against the real daemon when the user makes a mistake: a ``--once --binary`` line that is
not hex, a ``ws://`` URL for a TLS port. Each says what is wrong at once, with a non-zero exit."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from conftest import subprocess_env
from test_tls import TLS_TOML, make_cert

RUN_TIMEOUT = 60.0


def connect(cwd: Path, *args: str, stdin: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """``python -m selectws connect ARGS`` with ``stdin``: the finished process and how long it took."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "selectws", "connect", *args], input=stdin, capture_output=True,
                          text=True, timeout=RUN_TIMEOUT, env=subprocess_env(), cwd=cwd)
    return proc, time.monotonic() - start


def test_once_binary_with_a_line_that_is_not_hex_fails_at_once(daemon, tmp_path: Path):
    # --timeout 30: the old client sent nothing, then waited all of it for the reply to that nothing.
    proc, took = connect(tmp_path, "--once", "--binary", "--timeout", "30", daemon.url("/echo"), stdin="zz\n")
    assert proc.returncode == 1, proc
    assert "not hex" in proc.stderr and "'zz'" in proc.stderr, proc.stderr
    assert proc.stdout == ""
    assert took < 15, f"waited {took:.1f} s for the reply to a message that was never sent"

    # One bad line among good ones: the others are sent and answered, no reply is awaited for it, and the run
    # still fails (a line was lost).
    proc, took = connect(tmp_path, "--once", "--binary", "--timeout", "30", daemon.url("/echo"),
                         stdin="0102\nnot-hex\n")
    assert proc.returncode == 1, proc
    assert proc.stdout == "0102\n"
    assert "not hex" in proc.stderr, proc.stderr
    assert took < 15, took


def test_ws_url_to_a_tls_port_suggests_wss(start_daemon, tmp_path: Path):
    make_cert(tmp_path, "server")
    daemon = start_daemon(TLS_TOML)
    proc, _ = connect(tmp_path, "--timeout", "10", f"ws://127.0.0.1:{daemon.port}/echo", stdin="hi\n")
    assert proc.returncode == 1, proc
    assert "handshake failed" in proc.stderr and "is it wss://?" in proc.stderr, proc.stderr
    # and wss:// to the same port works
    proc, _ = connect(tmp_path, "--once", "--cafile", str(tmp_path / "server.pem"), "--timeout", "10",
                      f"wss://localhost:{daemon.port}/echo", stdin="hi\n")
    assert (proc.returncode, proc.stdout) == (0, "hi\n"), proc
