"""The daemon as a service: /healthz, /metrics, sd_notify, socket activation and SIGHUP reload, end to end.

Every test runs the real ``python -m selectws serve`` in a subprocess. Daemons with a plain environment come from
the ``start_daemon`` fixture of ``conftest.py``; the sd_notify and socket-activation tests need their own
environment (``NOTIFY_SOCKET``, ``LISTEN_FDS``, ...), which that fixture strips on purpose, so they use the small
:class:`_Proc` below.

How the 503 of /healthz is observed: on SIGTERM the WebSocket listeners close at once (new clients are refused
by the kernel, not answered with 503), so the test serves the operator endpoints on their own listener
(``[ops] listen = "127.0.0.1:0"``; its address is the ``ops_addresses`` field of the ``listening`` log line),
which stays open until the process exits, and keeps the drain going with a raw WebSocket client that never
answers the server's close frame. Closing that client ends the drain.

``prometheus-client`` (an optional test dependency, in the ``test`` extra) parses /metrics; without it those
tests are skipped.
"""

from __future__ import annotations

import base64
import http.client
import itertools
import json
import os
import re
import secrets
import shutil
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
from websockets.sync.client import connect

HOST = "127.0.0.1"
_SYSTEMD_VARS = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")

OPS_CONFIG = """
[timeouts]
close = 5.0
shutdown_grace = 5.0

[ops]
listen = "127.0.0.1:0"
"""


# ---------------------------------------------------------------------------------------------- HTTP helpers
def fetch(port: int, path: str, method: str = "GET", host: str = HOST) -> tuple[int, dict[str, str], bytes]:
    """One request; (status, headers with lower-case names, body)."""
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    finally:
        conn.close()


def scrape(port: int, path: str = "/metrics") -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics, check it is exposition format 0.0.4 that prometheus_client parses; samples by (name, labels)."""
    parser = pytest.importorskip("prometheus_client.parser")
    status, headers, body = fetch(port, path)
    assert status == 200, body
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    text = body.decode("utf-8")
    for family in parser.text_string_to_metric_families(text):
        assert family.name.startswith("selectws_"), family.name
        assert family.documentation, f"{family.name} has no HELP"
        assert family.type in ("counter", "gauge"), (family.name, family.type)
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    # Every counter sample ends in _total (prometheus_client strips the suffix from the family name only).
    for line in text.splitlines():
        if line.startswith("# TYPE ") and line.endswith(" counter"):
            assert line.split()[2].endswith("_total"), line
    return samples


def metric(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_until(check: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------- raw WebSocket
def raw_upgrade(port: int, path: str = "/echo", *, send_only: bool = False) -> socket.socket:
    """A WebSocket opened by hand (it never answers anything the server sends); ``send_only`` skips reading the 101."""
    sock = socket.create_connection((HOST, port), timeout=5)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    if not send_only:
        read_101(sock)
    return sock


def read_101(sock: socket.socket) -> bytes:
    """Read the handshake answer; returns whatever came after its head."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"connection closed during the handshake: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 "), head
    return rest


def masked_text(text: str) -> bytes:
    payload = text.encode()
    assert len(payload) < 126
    mask = os.urandom(4)
    return bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def read_text(sock: socket.socket, already: bytes = b"") -> str:
    data = already
    while len(data) < 2 or len(data) < 2 + (data[1] & 0x7F):
        chunk = sock.recv(4096)
        assert chunk, "connection closed before a frame arrived"
        data += chunk
    assert data[0] == 0x81 and data[1] < 126, data
    return data[2 : 2 + data[1]].decode()


# ---------------------------------------------------------------------------------------------- own processes
def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SYSTEMD_VARS}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class _Proc:
    """A daemon started with a custom environment; its stderr JSON log lines collected in the background."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path, pass_fds: tuple[int, ...] = ()) -> None:
        self.records: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=cwd,
            pass_fds=pass_fds,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").strip()
            try:
                record = json.loads(line)
            except ValueError:
                record = {"event": None, "raw": line}
            with self._cond:
                self.records.append(record if isinstance(record, dict) else {"event": None, "raw": line})
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, event: str, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for record in self.records:
                    if record.get("event") == event:
                        return record
                left = deadline - time.monotonic()
                if left <= 0 or not self._reader.is_alive():
                    raise AssertionError(f"no {event!r} log line; log: {self.records[-20:]}")
                self._cond.wait(min(left, 0.1))

    def errors(self) -> list[dict[str, Any]]:
        with self._cond:
            # Non-JSON lines are systemd-socket-activate's own chatter, unless they are a traceback.
            return [r for r in self.records
                    if r.get("level") in ("error", "critical") or "Traceback" in r.get("raw", "")]

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then :meth:`wait`."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float = 10.0) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(5)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Callable[..., _Proc]]:
    started: list[_Proc] = []

    def start(args: list[str], env: dict[str, str], pass_fds: tuple[int, ...] = ()) -> _Proc:
        proc = _Proc(args, env, tmp_path, pass_fds)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()


def serve_args(*extra: str) -> list[str]:
    return [sys.executable, "-m", "selectws", "serve", "--log-format", "json", *extra]


# ============================================================================================== /healthz, /metrics
def test_healthz_200_then_503_while_draining(start_daemon: Any) -> None:
    daemon = start_daemon(OPS_CONFIG)
    listening = daemon.wait_for(event="listening")
    ops_host, _, ops_port_text = listening["ops_addresses"][0].rpartition(":")
    ops_port = int(ops_port_text)
    assert ops_host == HOST and ops_port != daemon.port
    assert listening["ops_paths"] == ["/healthz", "/metrics", "/readyz"]

    status, headers, body = fetch(ops_port, "/healthz")
    assert (status, body) == (200, b"ok\n")
    assert headers["cache-control"] == "no-store"
    # With [ops] listen, the operator endpoints are not on the WebSocket port.
    assert fetch(daemon.port, "/healthz")[0] == 404
    assert fetch(daemon.port, "/metrics")[0] == 404
    assert fetch(ops_port, "/echo")[0] == 404  # and the operator port serves nothing else

    # A client that never answers the close frame keeps the server draining.
    ws = raw_upgrade(daemon.port)
    try:
        daemon.signal(signal.SIGTERM)
        daemon.wait_for(event="stop signal: draining")
        status, headers, body = wait_until(
            lambda: (reply := fetch(ops_port, "/healthz"))[0] == 503 and reply, what="/healthz to say 503"
        )
        assert body == b"draining\n"
        assert headers["retry-after"] == "5"
        samples = scrape(ops_port)
        assert metric(samples, "selectws_draining") == 1
        assert metric(samples, "selectws_connections_open", route="/echo") == 1
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((HOST, daemon.port), timeout=2).close()  # the WebSocket listener is gone
        assert daemon.proc.poll() is None
    finally:
        ws.close()
    assert daemon.wait() == 0  # the last client gone, the drain is over
    daemon.wait_for(event="stopped")


def test_metrics_counters_move(start_daemon: Any) -> None:
    daemon = start_daemon()
    port = daemon.port
    before = scrape(port)
    for path in ("/echo", "/broadcast/{channel}", "/chat"):
        assert metric(before, "selectws_connections_open", route=path) == 0
    assert metric(before, "selectws_process_start_time_seconds") <= time.time()
    assert metric(before, "selectws_uptime_seconds") >= 0
    assert metric(before, "selectws_build_info", version=__import__("selectws").__version__) == 1

    with connect(f"ws://{HOST}:{port}/echo") as ws:
        for i in range(3):
            ws.send(f"hello {i}")
            assert ws.recv(timeout=5) == f"hello {i}"
        during = scrape(port)
        assert metric(during, "selectws_connections_open", route="/echo") == 1
        assert metric(during, "selectws_connections_open", route="/chat") == 0
        for name in ("selectws_messages_received_total", "selectws_messages_sent_total"):
            assert metric(during, name) - metric(before, name) == 3, name
        assert metric(during, "selectws_received_bytes_total") > metric(before, "selectws_received_bytes_total")
        assert metric(during, "selectws_sent_bytes_total") > metric(before, "selectws_sent_bytes_total")
        assert metric(during, "selectws_write_buffer_bytes") == 0
        assert metric(during, "selectws_connections_accepted_total") >= 3  # two scrapes and the WebSocket
        assert metric(during, "selectws_loop_iterations_total") > metric(before, "selectws_loop_iterations_total")
        assert metric(during, "selectws_loop_lag_max_seconds") > 0
        assert metric(during, "selectws_timers") >= 1  # at least the server's periodic status tick
    daemon.wait_for(event="close", code=1000)

    after = scrape(port)
    assert metric(after, "selectws_connections_open", route="/echo") == 0
    assert metric(after, "selectws_connections_closed_total", code="1000") == 1
    assert metric(after, "selectws_received_bytes_total") >= metric(during, "selectws_received_bytes_total")


def test_head_works_and_post_is_405(start_daemon: Any) -> None:
    daemon = start_daemon(extra_args=("--log-level", "debug"))
    for path in ("/healthz", "/metrics"):
        status, headers, body = fetch(daemon.port, path, "HEAD")
        assert status == 200
        assert body == b""
        assert int(headers["content-length"]) > 0
        status, headers, _ = fetch(daemon.port, path, "POST")
        assert status == 405
        assert headers["allow"] == "GET, HEAD"
    samples = scrape(daemon.port)
    assert metric(samples, "selectws_http_rejected_total", status="405") == 2
    # 405 is logged as a refused handshake at debug (scanners' noise: selectws/server/refusals.py), not an error.
    assert daemon.wait_for(event="handshake refused", status=405)["level"] == "debug"


def test_endpoints_can_be_switched_off_and_moved(start_daemon: Any) -> None:
    daemon = start_daemon(
        """
        [ops]
        healthz = false
        metrics_path = "/internal/stats"
        """
    )
    assert fetch(daemon.port, "/healthz")[0] == 404
    assert fetch(daemon.port, "/metrics")[0] == 404
    assert metric(scrape(daemon.port, "/internal/stats"), "selectws_draining") == 0


# ============================================================================================== sd_notify
class NotifySocket:
    """Stands in for systemd's notification socket: collects datagrams with their arrival times."""

    def __init__(self, abstract: bool) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._dir: str | None = None
        if abstract:
            name = f"selectws-test-{secrets.token_hex(6)}"
            self.sock.bind("\0" + name)
            self.env_value = "@" + name
        else:
            self._dir = tempfile.mkdtemp(prefix="sdn", dir="/tmp")  # sun_path is at most 107 bytes
            path = os.path.join(self._dir, "notify.sock")
            self.sock.bind(path)
            self.env_value = path
        self.messages: list[tuple[float, dict[str, str]]] = []

    def receive_until(self, predicate: Callable[[dict[str, str]], bool], timeout: float = 5.0) -> dict[str, str]:
        """Collect messages until one satisfies ``predicate``; returns it."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching sd_notify message; got {[m for _, m in self.messages[-10:]]}")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
            self.messages.append((time.monotonic(), fields))
            if predicate(fields):
                return fields

    def since(self, start: int) -> list[dict[str, str]]:
        return [m for _, m in self.messages[start:]]

    def close(self) -> None:
        self.sock.close()
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)


@pytest.mark.parametrize("abstract", [False, True], ids=["path+config", "abstract-no-config"])
def test_sd_notify(procs: Callable[..., _Proc], tmp_path: Path, abstract: bool) -> None:
    """The path variant runs with --config (a real reload); the abstract one without (nothing to reload, but
    RELOADING=1/READY=1 are still paired, as Type=notify-reload expects)."""
    notify = NotifySocket(abstract)
    config = tmp_path / "selectws.toml"
    config.write_text("[timeouts]\nshutdown_grace = 3.0\n")
    try:
        daemon = procs(
            serve_args("--host", HOST, "--port", "0", *(() if abstract else ("--config", str(config)))),
            clean_env(NOTIFY_SOCKET=notify.env_value, WATCHDOG_USEC="400000"),
        )
        ready = notify.receive_until(lambda m: "READY" in m)
        assert ready["READY"] == "1"
        assert notify.messages[0][1] is ready, "READY=1 must be the first notification"
        match = re.fullmatch(r"listening on 127\.0\.0\.1:(\d+); 0 connections open, 0 accepted", ready["STATUS"])
        assert match, ready
        port = int(match.group(1))
        socket.create_connection((HOST, port), timeout=2).close()  # READY=1 came after the port was listening

        # WATCHDOG=1 every WATCHDOG_USEC/2 = 0.2 s.
        start = len(notify.messages)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 0.9:
            notify.receive_until(lambda m: "WATCHDOG" in m, timeout=1.0)
        pings = [t for t, m in notify.messages[start:] if m.get("WATCHDOG") == "1"]
        assert len(pings) >= 4
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert 0.12 < sum(gaps) / len(gaps) < 0.3, gaps

        # STATUS= follows the number of connections (sent with the next watchdog ping when it changed).
        with connect(f"ws://{HOST}:{port}/echo") as ws:
            ws.send("hi")
            assert ws.recv(timeout=5) == "hi"
            status = notify.receive_until(lambda m: "STATUS" in m and "1 connection open" in m["STATUS"])
            assert re.fullmatch(r"1 connection open, \d+ accepted", status["STATUS"]), status

            # SIGHUP: RELOADING=1 with MONOTONIC_USEC, then READY=1; the connection survives.
            start = len(notify.messages)
            daemon.proc.send_signal(signal.SIGHUP)
            reloaded = notify.receive_until(lambda m: "READY" in m)
            batch = notify.since(start)
            reloading = next(m for m in batch if "RELOADING" in m)
            assert reloading["RELOADING"] == "1"
            assert batch.index(reloading) < batch.index(reloaded)
            now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            assert 0 < now_usec - int(reloading["MONOTONIC_USEC"]) < 5_000_000
            if abstract:
                assert reloaded["STATUS"].startswith("nothing to reload (no --config); 1 connection open")
            else:
                assert reloaded["STATUS"].startswith("configuration reloaded; 1 connection open")
                daemon.wait_for("configuration reloaded")
            ws.send("still here")
            assert ws.recv(timeout=5) == "still here"

            # SIGTERM: STOPPING=1 at once (the client is still connected).
            daemon.proc.send_signal(signal.SIGTERM)
            stopping = notify.receive_until(lambda m: "STOPPING" in m)
            assert stopping == {"STOPPING": "1", "STATUS": stopping["STATUS"]}
            assert stopping["STATUS"].startswith("draining: 1 connection open")
        assert daemon.wait() == 0
        assert not daemon.errors(), daemon.errors()
    finally:
        notify.close()


# ============================================================================================== socket activation
def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="systemd-socket-activate not installed")
def test_socket_activation(procs: Callable[..., _Proc]) -> None:
    port = free_port()
    # systemd-socket-activate gives the child only LISTEN_* and what -E names, not our environment.
    daemon = procs(
        ["systemd-socket-activate", "-l", f"{HOST}:{port}", "--fdname=ws",
         "-E", f"PYTHONPATH={os.pathsep.join(sys.path[1:])}", "-E", "PYTHONUNBUFFERED=1",
         *serve_args()],
        clean_env(),
    )
    # It execs the daemon on the first connection (queued in the backlog meanwhile), so connect first.
    ws = wait_until(lambda: _try_connect(f"ws://{HOST}:{port}/echo"), timeout=10, what="the activated daemon")
    with ws:
        ws.send("activated")
        assert ws.recv(timeout=5) == "activated"
    listening = daemon.wait_for("listening")
    assert listening["inherited"] is True
    assert listening["addresses"] == [f"{HOST}:{port}"]
    assert listening["pid"] == daemon.proc.pid  # systemd-socket-activate exec'd into the daemon
    assert daemon.stop() == 0
    assert not daemon.errors(), daemon.errors()


def _try_connect(url: str) -> Any:
    try:
        return connect(url, open_timeout=10)
    except ConnectionRefusedError:
        return None


# What a .socket unit does, without systemd: this test process owns the listening socket for good and starts
# daemons on it as fd 3, with LISTEN_PID set to the daemon's own pid.
_ACTIVATE = textwrap.dedent(
    """
    import os, sys
    fd = int(sys.argv[1])
    if fd != 3:
        os.dup2(fd, 3)
        os.close(fd)
    os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="ws")
    os.execv(sys.executable, [sys.executable, "-m", "selectws", "serve", "--log-format", "json"])
    """
)


def test_no_connection_refused_across_a_restart(procs: Callable[..., _Proc]) -> None:
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    fd = listener.fileno()
    os.set_inheritable(fd, True)
    try:
        first = procs([sys.executable, "-c", _ACTIVATE, str(fd)], clean_env(), pass_fds=(fd,))
        assert first.wait_for("listening")["inherited"] is True
        with connect(f"ws://{HOST}:{port}/echo") as ws:
            ws.send("one")
            assert ws.recv(timeout=5) == "one"
        assert first.stop() == 0

        # No daemon now: the kernel still completes the TCP handshake and queues the request in the backlog.
        waiting = raw_upgrade(port, send_only=True)
        try:
            second = procs([sys.executable, "-c", _ACTIVATE, str(fd)], clean_env(), pass_fds=(fd,))
            rest = read_101(waiting)
            waiting.sendall(masked_text("two"))
            assert read_text(waiting, rest) == "two"
        finally:
            waiting.close()
        assert second.stop() == 0
        assert not first.errors() and not second.errors(), (first.errors(), second.errors())
    finally:
        listener.close()


# ============================================================================================== SIGHUP reload
def test_reload_adds_a_route_and_keeps_connections(start_daemon: Any) -> None:
    daemon = start_daemon(
        """
        [[routes]]
        path = "/echo"
        plugin = "echo"
        """,
        allow_errors=True,  # the invalid reload below logs an error on purpose
    )
    assert daemon.config is not None
    url = f"ws://{HOST}:{daemon.port}"
    with connect(f"{url}/echo") as old:
        old.send("before")
        assert old.recv(timeout=5) == "before"
        assert fetch(daemon.port, "/echo2")[0] == 404

        daemon.config.write_text(textwrap.dedent(
            """
            [[routes]]
            path = "/echo"
            plugin = "echo"

            [[routes]]
            path = "/echo2"
            plugin = "echo"
            """
        ))
        daemon.signal(signal.SIGHUP)
        reloaded = daemon.wait_for(event="configuration reloaded")
        assert "/echo2 -> echo" in reloaded["routes"]
        with connect(f"{url}/echo2") as new:
            new.send("new route")
            assert new.recv(timeout=5) == "new route"
        old.send("after")
        assert old.recv(timeout=5) == "after"
        samples = scrape(daemon.port)
        assert metric(samples, "selectws_connections_open", route="/echo") == 1
        assert ("selectws_connections_open", (("route", "/echo2"),)) in samples

        # An invalid file: the error names the key, and the running configuration stays.
        daemon.config.write_text("[limits]\nmax_message_size = -1\n")
        daemon.signal(signal.SIGHUP)
        failed = daemon.wait_for(event="reload failed; keeping the running configuration")
        assert failed["level"] == "error"
        assert failed["key"] == "limits.max_message_size"
        assert "limits.max_message_size" in failed["error"]
        with connect(f"{url}/echo2") as new:
            new.send("still")
            assert new.recv(timeout=5) == "still"
        old.send("alive")
        assert old.recv(timeout=5) == "alive"
    assert daemon.errors() == [failed]
