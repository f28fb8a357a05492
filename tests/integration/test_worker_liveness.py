"""A worker that is alive but not running is found and replaced (``[server] worker_timeout``).

The real daemon runs with 2 workers; one of them is stopped with SIGSTOP (the process exists, its loop does not
run, it never exits: exactly what an endless loop in a plugin looks like from outside). The supervisor must notice
the missing heartbeats, SIGKILL it, say so in one log line naming the worker, its pid and how long it was silent,
and restart it; the daemon keeps serving. A second test checks the systemd side: with ``worker_timeout = 0`` the
supervisor cannot replace a silent worker, so it withholds ``WATCHDOG=1`` and lets systemd restart the unit.

``workers > 1`` needs ``[broker] url``; these tests are about processes, not groups, so the URL points at a port
nobody listens on (the broker stays down, logs warnings, and local delivery, all that ``/echo`` needs, goes on).
"""

from __future__ import annotations

import calendar
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from wstools import connect

pytest.importorskip("hiredis", reason="the Redis broker (needed by workers > 1) needs hiredis")

TIMEOUT = 10.0
WORKER_TIMEOUT = 1.5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(worker_timeout: float) -> str:
    return f"""
    [server]
    worker_timeout = {worker_timeout}

    [broker]
    url = "redis://127.0.0.1:{_free_port()}/0"
    reconnect_min = 0.5
    reconnect_max = 2.0
    """


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited (a zombie counts as exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _resume(pid: int) -> None:
    """SIGCONT ``pid`` if it still exists (the supervisor may kill it at any moment)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


def _wall(record: dict[str, Any]) -> float:
    """The ``timestamp`` of a log record (ISO 8601 UTC with microseconds) as seconds since the epoch."""
    stamp = record["timestamp"].rstrip("Z")
    whole, _, fraction = stamp.partition(".")
    return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + float("0." + (fraction or "0"))


def _echo(daemon: Any, n: int) -> set[int]:
    """``n`` echo round trips on fresh connections; the pids of the workers that served them (from their logs)."""
    for i in range(n):
        with connect(daemon.url("/echo")) as ws:
            ws.send(f"still serving {i}")
            assert ws.recv(timeout=TIMEOUT) == f"still serving {i}"
    return {r["pid"] for r in daemon.logs(event="open")}


def test_a_stopped_worker_is_killed_logged_and_replaced(start_daemon: Any) -> None:
    d = start_daemon(_config(WORKER_TIMEOUT), extra_args=("--workers", "2"), allow_errors=True)
    pids = d.wait_for(event="workers ready", timeout=15)["pids"]
    assert len(set(pids)) == 2
    victim, bystander = pids
    index = d.wait_for(event="worker started", worker_pid=victim)["worker"]

    stopped_at = time.time()
    os.kill(victim, signal.SIGSTOP)
    try:
        line = d.wait_for(event="worker unresponsive; killing it", timeout=WORKER_TIMEOUT + TIMEOUT)
    finally:
        _resume(victim)  # if the supervisor did not kill it: do not leave a stopped process behind
    detected = _wall(line) - stopped_at
    print(f"SIGSTOP -> 'worker unresponsive' log line: {detected:.3f} s (silent {line['silent']} s)")
    assert line["worker_pid"] == victim and line["worker"] == index, line
    assert line["level"] == "error"
    assert WORKER_TIMEOUT <= line["silent"] < WORKER_TIMEOUT + 2.0, line  # rounded to the millisecond
    assert line["worker_timeout"] == WORKER_TIMEOUT
    assert detected < WORKER_TIMEOUT + 2.0, detected

    died = d.wait_for(event="worker died; restarting", worker_pid=victim)
    assert died["exit"] == "signal SIGKILL" and died["cause"].startswith("unresponsive for"), died
    assert not _alive(victim), "the stopped worker is still there"

    started = d.wait_for(lambda r: r.get("worker_pid") not in pids, event="worker started", timeout=TIMEOUT)
    assert started["worker"] == index
    replacement = started["worker_pid"]
    d.wait_for(event="listening", pid=replacement, timeout=TIMEOUT)

    # Still serving, by the replacement too (the kernel gives each accept to whichever worker is first, so a
    # bounded number of connections, until both took some).
    deadline = time.monotonic() + TIMEOUT
    while (served := _echo(d, 4)) and replacement not in served:
        assert time.monotonic() < deadline, f"the replacement {replacement} served no connection"
    assert victim not in {r["pid"] for r in d.logs(event="open")}

    # Only the stopped worker was blamed; the other kept running (and beating) all along.
    assert _alive(bystander)
    assert [r["worker_pid"] for r in d.logs(event="worker unresponsive; killing it")] == [victim]
    unexpected = [r for r in d.errors() if r.get("worker_pid") != victim]
    assert not unexpected, unexpected

    assert d.terminate() == 0
    d.wait_for(event="all workers exited", failed=0)


# ---------------------------------------------------------------------------------------------- systemd watchdog
class _Notify:
    """Stands in for systemd's notification socket; datagrams are collected by a background thread."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="sdn", dir="/tmp")  # sun_path is at most 107 bytes
        self.path = os.path.join(self._dir, "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._done.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if "=" in line)
            self.messages.append((time.monotonic(), fields))

    def pings(self, since: float, until: float = float("inf")) -> int:
        return sum(1 for t, m in list(self.messages) if since <= t < until and m.get("WATCHDOG") == "1")

    def close(self) -> None:
        self._done.set()
        self._thread.join(2)
        self.sock.close()
        os.unlink(self.path)
        os.rmdir(self._dir)


class _Records:
    """A process's JSON log lines on stderr, collected by a background thread."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.records: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            try:
                record = json.loads(raw)
            except ValueError:
                record = {"event": None, "raw": raw.decode("utf-8", "replace")}
            with self._cond:
                self.records.append(record if isinstance(record, dict) else {"raw": record})
                self._cond.notify_all()

    def wait_for(self, event: str, timeout: float = TIMEOUT,
                 predicate: Callable[[dict[str, Any]], bool] = lambda r: True) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for record in self.records:
                    if record.get("event") == event and predicate(record):
                        return record
                left = deadline - time.monotonic()
                assert left > 0 and self._thread.is_alive(), f"no {event!r}; log: {self.records[-20:]}"
                self._cond.wait(min(left, 0.1))


@pytest.fixture
def notify() -> Iterator[_Notify]:
    sock = _Notify()
    yield sock
    sock.close()


def test_the_watchdog_is_withheld_while_a_worker_is_silent(tmp_path: Path, notify: _Notify) -> None:
    """``worker_timeout = 0``: the supervisor replaces nobody, so the systemd watchdog must not be fooled: no
    ``WATCHDOG=1`` while a worker is silent for longer than the ping interval (WatchdogSec/2), pings again once it
    beats again (SIGCONT)."""
    config = tmp_path / "selectws.toml"
    config.write_text(textwrap.dedent(_config(0)))
    env = {k: v for k, v in os.environ.items()
           if k not in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_PID")}
    here = str(Path(__file__).resolve().parent)
    env.update(NOTIFY_SOCKET=notify.path, WATCHDOG_USEC="2000000", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [here, env.get("PYTHONPATH")])))
    proc = subprocess.Popen(
        [sys.executable, "-m", "selectws", "serve", "--host", "127.0.0.1", "--port", "0", "--log-format", "json",
         "--workers", "2", "--config", str(config)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=tmp_path,
    )
    log = _Records(proc)
    victim = 0
    try:
        victim = log.wait_for("workers ready", timeout=15)["pids"][0]
        start = time.monotonic()
        time.sleep(2.5)
        assert notify.pings(start) >= 2, "no WATCHDOG=1 while every worker beats"  # every WatchdogSec/2 = 1 s

        os.kill(victim, signal.SIGSTOP)
        withheld = log.wait_for("worker silent; withholding the systemd watchdog ping")
        assert withheld["worker_pid"] == victim and withheld["silent"] > 1.0, withheld
        quiet = time.monotonic()
        time.sleep(2.5)
        assert notify.pings(quiet) == 0, "WATCHDOG=1 sent while a worker was silent"
        assert _alive(victim), "worker_timeout = 0 must not kill anybody"

        os.kill(victim, signal.SIGCONT)
        log.wait_for("workers beating again; watchdog pings resumed")
        resumed = time.monotonic()
        time.sleep(2.5)
        assert notify.pings(resumed) >= 2
    finally:
        if victim:
            _resume(victim)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            raise
    assert rc == 0
    errors = [r for r in log.records if r.get("level") in ("error", "critical")]
    assert [r["event"] for r in errors] == ["worker silent; withholding the systemd watchdog ping"], errors
