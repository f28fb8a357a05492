"""Issue 12, defect 1: the daemon out of file descriptors. CPU, log lines and /healthz latency at the limit.

    python benchmarks/emfile.py [--nofile 256] [--clients 400] [--duration 10] [--ops] [--json]

Starts ``python -m selectws serve`` (the selectws on ``PYTHONPATH``, else the installed one) on 127.0.0.1 with
RLIMIT_NOFILE lowered to ``--nofile`` (soft and hard: the daemon raises soft to hard), opens ``--clients``
WebSocket clients to ``/echo`` (raw sockets that send the upgrade at once; a 101 is kept open, any other answer is
read and the socket closed, as a real client would), then for ``--duration`` seconds:

* samples the daemon's CPU time (utime + stime, /proc/PID/stat) at the start and end of the window: CPU %;
* counts the lines the daemon writes to stderr in the window, and those whose event starts with "accept";
* requests ``/healthz`` every 0.5 s (on the WebSocket port, or on the ``[ops] listen`` port with ``--ops``) with a
  2 s timeout: answered / timed out, median and max latency; then scrapes a few samples of ``/metrics``.

Then it closes the clients, stops the daemon (SIGTERM; SIGKILL after 10 s) and prints the figures (one JSON line
with ``--json``), with the log lines of the whole run (``*_total``) and which "accept" events they were. Bounded:
it never runs longer than about ``--duration`` + 30 s. Linux only.

    PYTHONPATH=/tmp/old-main python benchmarks/emfile.py     # before the fix
    python benchmarks/emfile.py                              # the work tree (editable install)
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import resource
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

HOST = "127.0.0.1"


class Daemon:
    def __init__(self, nofile: int, ops: bool, workdir: str) -> None:
        config = os.path.join(workdir, "selectws.toml")
        with open(config, "w") as fh:
            fh.write('[[routes]]\npath = "/echo"\nplugin = "echo"\n')
            if ops:
                fh.write('[ops]\nlisten = "127.0.0.1:0"\n')

        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        env = dict(os.environ, PYTHONUNBUFFERED="1")
        for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "WATCHDOG_USEC"):
            env.pop(name, None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "selectws", "serve", "--port", "0", "--host", HOST, "--log-format", "json",
             "--config", config],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=workdir, env=env,
            preexec_fn=limit,
        )
        self.lines = 0
        self.accept_lines = 0
        self.first: list[dict[str, Any]] = []  # the first lines (the "listening" one among them)
        self.accept_events: dict[str, int] = {}
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(15):
            self.proc.kill()
            raise SystemExit("the daemon did not log 'listening' within 15 s")
        listening = next(r for r in self.first if r.get("event") == "listening")
        self.port = int(listening["addresses"][0].rpartition(":")[2])
        ops_addresses = listening.get("ops_addresses") or []
        self.ops_port = int(ops_addresses[0].rpartition(":")[2]) if ops_addresses else None

    def _read(self) -> None:
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        rest = b""
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                self._ready.set()
                return
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            self.lines += len(lines)
            for line in lines:
                if b'"event": "accept' in line:
                    self.accept_lines += 1
                    if self.accept_lines <= 100:  # an unfixed daemon writes millions: the first ones say it all
                        try:
                            event = json.loads(line).get("event", "?")
                        except ValueError:
                            event = "?"
                        self.accept_events[event] = self.accept_events.get(event, 0) + 1
                elif len(self.first) < 20:
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue
                    self.first.append(record)
                    if record.get("event") == "listening":
                        self._ready.set()

    def cpu(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as fh:
            fields = fh.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> int | None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            rc = None
        self._reader.join(10)
        return rc


class Clients(threading.Thread):
    """The WebSocket clients, in a thread of their own: connect, upgrade, read the answer."""

    def __init__(self, port: int, count: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.count = count
        self.opened = 0  # got a 101 (kept open)
        self.refused: dict[int, int] = {}  # other answers, by status
        self.connect_failed = 0
        self.connected = threading.Event()
        self._halt = threading.Event()
        self._socks: list[socket.socket] = []

    @property
    def unanswered(self) -> int:
        return self.count - self.connect_failed - self.opened - sum(self.refused.values())

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        data: dict[socket.socket, bytes] = {}
        for _ in range(self.count):
            sock = socket.socket()
            sock.settimeout(3)
            try:
                sock.connect((HOST, self.port))
                key = base64.b64encode(os.urandom(16)).decode()
                sock.sendall(
                    f"GET /echo HTTP/1.1\r\nHost: {HOST}:{self.port}\r\nUpgrade: websocket\r\n"
                    f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
                )
            except OSError:
                self.connect_failed += 1
                sock.close()
                continue
            sock.setblocking(False)
            self._socks.append(sock)
            data[sock] = b""
            sel.register(sock, selectors.EVENT_READ)
        self.connected.set()
        while not self._halt.is_set():
            for ready, _ in sel.select(0.1):
                client = ready.fileobj
                assert isinstance(client, socket.socket)
                try:
                    chunk = client.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                got = data[client] + chunk
                if chunk and b"\r\n\r\n" not in got:
                    data[client] = got
                    continue
                sel.unregister(client)
                del data[client]
                if got.startswith(b"HTTP/1.1 101 "):
                    self.opened += 1
                    continue
                status = int(got.split(b" ", 2)[1]) if got.startswith(b"HTTP/1.1 ") else 0
                self.refused[status] = self.refused.get(status, 0) + 1
                client.close()
        sel.close()

    def stop(self) -> None:
        self._halt.set()
        self.join(5)
        for sock in self._socks:
            sock.close()


def scrape(port: int, names: tuple[str, ...], timeout: float = 2.0) -> dict[str, float] | None:
    """The named samples of /metrics; None if it does not answer 200 in time."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        body = resp.read().decode()
        if resp.status != 200:
            return None
    except OSError:
        return None
    finally:
        conn.close()
    samples = {}
    for line in body.splitlines():
        name, _, value = line.rpartition(" ")
        if name in names:
            samples[name] = float(value)
    return samples


def healthz(port: int, timeout: float = 2.0) -> float | None:
    """Seconds to a 200 from /healthz; None on a timeout, an error or another status."""
    start = time.monotonic()
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", "/healthz")
        resp = conn.getresponse()
        resp.read()
        return time.monotonic() - start if resp.status == 200 else None
    except OSError:
        return None
    finally:
        conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nofile", type=int, default=256, help="the daemon's RLIMIT_NOFILE (default 256)")
    parser.add_argument("--clients", type=int, default=400, help="WebSocket clients to open (default 400)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured at the limit (default 10)")
    parser.add_argument("--ops", action="store_true", help="health on an [ops] listen port, not the WebSocket port")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < args.clients + 64:  # the clients' own sockets
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.clients + 256), hard))

    with tempfile.TemporaryDirectory(prefix="selectws-emfile-") as workdir:
        daemon = Daemon(args.nofile, args.ops, workdir)
        try:
            result = measure(daemon, args)
        finally:
            if daemon.proc.poll() is None:
                daemon.proc.kill()
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>20}: {value}")
    return 0


def measure(daemon: Daemon, args: argparse.Namespace) -> dict[str, Any]:
    health_port = daemon.ops_port if args.ops else daemon.port
    assert health_port is not None
    clients = Clients(daemon.port, args.clients)
    clients.start()
    clients.connected.wait(30)
    time.sleep(0.5)  # the burst is accepted (as far as it goes) before the window starts
    cpu0, lines0, accept0, t0 = daemon.cpu(), daemon.lines, daemon.accept_lines, time.monotonic()
    latencies: list[float] = []
    failures = 0
    while time.monotonic() - t0 < args.duration:
        probe = time.monotonic()
        latency = healthz(health_port)
        if latency is None:
            failures += 1
        else:
            latencies.append(latency)
        time.sleep(max(0.0, 0.5 - (time.monotonic() - probe)))
    elapsed = time.monotonic() - t0
    cpu1, lines1, accept1 = daemon.cpu(), daemon.lines, daemon.accept_lines
    metrics = scrape(health_port, ("selectws_accept_errors_total", "selectws_accept_paused",
                                   "selectws_accept_reserve_used_total", "selectws_sockets_open"))
    result: dict[str, Any] = {
        "python_path": os.environ.get("PYTHONPATH", ""),
        "nofile": args.nofile, "clients": args.clients, "ops_listener": args.ops,
        "window_s": round(elapsed, 2),
        "cpu_percent": round(100 * (cpu1 - cpu0) / elapsed, 1),
        "log_lines": lines1 - lines0,
        "accept_log_lines": accept1 - accept0,
        "healthz_ok": len(latencies), "healthz_failed": failures,
        "healthz_median_ms": round(1000 * statistics.median(latencies), 1) if latencies else None,
        "healthz_max_ms": round(1000 * max(latencies), 1) if latencies else None,
        "ws_open": clients.opened, "ws_refused": clients.refused, "ws_unanswered": clients.unanswered,
        "ws_connect_failed": clients.connect_failed,
        "metrics": metrics,
    }
    clients.stop()
    result["exit_status"] = daemon.stop()
    result["log_lines_total"] = daemon.lines
    result["accept_log_lines_total"] = daemon.accept_lines
    result["accept_events"] = daemon.accept_events
    return result


if __name__ == "__main__":
    sys.exit(main())
