"""Scale-out with a real Redis: daemons (and workers) sharing groups through ``[broker] url``.

Each test starts its own ``redis-server --port <free> --save '' --appendonly no`` on 127.0.0.1 and kills it
afterwards. Without the binary the tests skip locally (saying why) and fail under ``CI=true``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest
from wstools import connect, http_exchange

hiredis = pytest.importorskip("hiredis", reason="the Redis broker needs hiredis: pip install 'selectws[redis]'")

from selectws.brokers.redis import RedisBroker, encode_command, encode_payload  # noqa: E402
from selectws.config import BrokerConfig  # noqa: E402
from selectws.transport.loop import EventLoop  # noqa: E402

TIMEOUT = 10.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Redis:
    """One redis-server process on a fixed port (so it can be killed and started again on the same port)."""

    def __init__(self, binary: str, *extra: str) -> None:
        self.binary = binary
        self.port = _free_port()
        self.extra = extra
        self.password = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             *self.extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                reply = self.command("PING")
                if reply == b"PONG" or "NOAUTH" in str(reply):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError("redis-server did not start")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # SIGKILL ends a stopped process too
            self.proc.wait(5)

    def stop(self) -> None:
        """SIGSTOP: Redis hangs. Its kernel still completes TCP handshakes and buffers what clients send."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def cont(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    def command(self, *args: str) -> Any:
        """One command on a fresh connection, the reply parsed by hiredis."""
        commands = [("AUTH", self.password), args] if self.password else [args]
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
            out = []
            for command in commands:
                out.append(b"*%d\r\n" % len(command))
                for arg in command:
                    raw = arg.encode()
                    out += [b"$%d\r\n" % len(raw), raw, b"\r\n"]
            sock.sendall(b"".join(out))
            reader = hiredis.Reader()
            for _ in commands:
                while (reply := reader.gets()) is False:
                    data = sock.recv(65536)
                    if not data:
                        raise OSError("redis closed the connection")
                    reader.feed(data)
            return reply

    def wait_subscribers(self, channel: str, n: int, timeout: float = TIMEOUT) -> None:
        """Until ``n`` connections subscribe to ``channel`` (a SUBSCRIBE is asynchronous to the client's open)."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.command("PUBSUB", "NUMSUB", channel)[1]
            if got >= n:
                return
            assert time.monotonic() < deadline, f"{channel}: {got} subscribers, wanted {n}"
            time.sleep(0.02)


def _need(binary: str, install: str) -> str:
    path = shutil.which(binary)
    if path is None:
        reason = f"{binary} not installed ({install})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason + "; required under CI=true", pytrace=False)
        pytest.skip(reason)
    return path


@pytest.fixture
def redis() -> Iterator[Redis]:
    server = Redis(_need("redis-server", "apt-get install -y redis-server"))
    server.start()
    yield server
    server.kill()


def broker_toml(redis: Redis, extra: str = "") -> str:
    return f"""
    [broker]
    url = "{redis.url}"
    reconnect_min = 0.05
    reconnect_max = 0.5
    {extra}
    """


def metrics(daemon: Any) -> dict[str, float]:
    reply = http_exchange(daemon.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    out = {}
    for line in reply.body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _message(i: int) -> str | bytes:
    return f"#{i} héllo" + "t" * (i * 37 % 300) if i % 2 else i.to_bytes(4, "big") + bytes([i % 256]) * (i * 997 % 5000)


def _next_is(marker_from: Any, *clients: Any) -> None:
    """A marker sent now is the next thing each of ``clients`` receives: nothing else was queued for them."""
    marker = f"marker {time.monotonic()}"
    marker_from.send(marker)
    for ws in clients:
        assert ws.recv(timeout=TIMEOUT) == marker


def test_broadcast_spans_two_daemons_in_order_not_to_sender(start_daemon, redis):
    a = start_daemon(broker_toml(redis))
    b = start_daemon(broker_toml(redis))
    with ExitStack() as stack:
        sender = stack.enter_context(connect(a.url("/broadcast/x"), max_size=None))
        a_peer = stack.enter_context(connect(a.url("/broadcast/x"), max_size=None))
        b_peers = [stack.enter_context(connect(b.url("/broadcast/x"), max_size=None)) for _ in range(2)]
        other = stack.enter_context(connect(b.url("/broadcast/y")))
        redis.wait_subscribers("selectws:broadcast:x", 2)
        sent = [_message(i) for i in range(60)]
        for m in sent:
            sender.send(m)
        for ws in (a_peer, *b_peers):
            for i, expected in enumerate(sent):
                got = ws.recv(timeout=TIMEOUT)
                assert type(got) is type(expected) and got == expected, f"message {i} altered or out of order"
        # B's members can publish too, and nothing reached the sender or another channel
        _next_is(b_peers[0], sender, a_peer, b_peers[1])
        _next_is(a_peer, sender, *b_peers)
        other_peer = stack.enter_context(connect(a.url("/broadcast/y")))
        redis.wait_subscribers("selectws:broadcast:y", 2)
        _next_is(other_peer, other)
    ma = metrics(a)
    assert ma['selectws_broker_up{broker="redis"}'] == 1
    assert ma["selectws_broker_dropped_total"] == 0
    assert ma["selectws_broker_published_total"] >= 61
    assert metrics(b)["selectws_broker_received_total"] >= 61


def test_chat_room_spans_two_daemons(start_daemon, redis):
    a = start_daemon(broker_toml(redis))
    b = start_daemon(broker_toml(redis))
    with connect(a.url("/chat")) as alice, connect(b.url("/chat")) as bob:
        alice.send(json.dumps({"type": "login", "name": "alice", "room": "r"}))
        assert json.loads(alice.recv(timeout=TIMEOUT))["type"] == "welcome"
        redis.wait_subscribers("selectws:chat:r", 1)
        bob.send(json.dumps({"type": "login", "name": "bob", "room": "r"}))
        welcome = json.loads(bob.recv(timeout=TIMEOUT))
        # The members list is this daemon's own: alice is on A (documented: welcome is local-only).
        assert welcome == {"type": "welcome", "name": "bob", "room": "r", "members": ["bob"]}
        assert json.loads(alice.recv(timeout=TIMEOUT)) == {"type": "joined", "name": "bob"}
        redis.wait_subscribers("selectws:chat:r", 2)
        bob.send(json.dumps({"type": "say", "text": "hi from B"}))
        said = {"type": "said", "from": "bob", "text": "hi from B"}
        assert json.loads(bob.recv(timeout=TIMEOUT)) == said
        assert json.loads(alice.recv(timeout=TIMEOUT)) == said
        alice.send(json.dumps({"type": "say", "text": "hi from A"}))
        said = {"type": "said", "from": "alice", "text": "hi from A"}
        assert json.loads(alice.recv(timeout=TIMEOUT)) == said
        assert json.loads(bob.recv(timeout=TIMEOUT)) == said
        bob.close()
        assert json.loads(alice.recv(timeout=TIMEOUT)) == {"type": "left", "name": "bob"}


def test_redis_outage_local_delivery_continues_then_resubscribes(start_daemon, redis):
    a = start_daemon(broker_toml(redis))
    b = start_daemon(broker_toml(redis))
    with ExitStack() as stack:
        a1 = stack.enter_context(connect(a.url("/broadcast/x")))
        a2 = stack.enter_context(connect(a.url("/broadcast/x")))
        b1 = stack.enter_context(connect(b.url("/broadcast/x")))
        redis.wait_subscribers("selectws:broadcast:x", 2)
        a1.send("before")
        assert a2.recv(timeout=TIMEOUT) == "before" and b1.recv(timeout=TIMEOUT) == "before"

        redis.kill()
        for d in (a, b):
            wait_until(lambda d=d: metrics(d)['selectws_broker_up{broker="redis"}'] == 0, "broker down")
        health = http_exchange(a.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert health.status == 200 and b"down" in health.body  # degraded, still serving
        for i in range(3):
            a1.send(f"during {i}")  # local delivery goes on, remote is dropped and counted
        for i in range(3):
            assert a2.recv(timeout=TIMEOUT) == f"during {i}"
        assert metrics(a)["selectws_broker_dropped_total"] >= 3
        assert a.wait_for(event="broker connection lost")

        redis.start()  # the same port
        redis.wait_subscribers("selectws:broadcast:x", 2)  # both re-subscribed the group still in use
        for d in (a, b):
            wait_until(lambda d=d: metrics(d)['selectws_broker_up{broker="redis"}'] == 1, "broker up")
            assert metrics(d)["selectws_broker_reconnects_total"] >= 1
        a1.send("after")
        assert a2.recv(timeout=TIMEOUT) == "after"
        assert b1.recv(timeout=TIMEOUT) == "after"  # and not one of the dropped ones
        b1.send("back")
        assert a1.recv(timeout=TIMEOUT) == "back" and a2.recv(timeout=TIMEOUT) == "back"


UP = 'selectws_broker_up{broker="redis"}'


def _get(daemon: Any, path: str) -> Any:
    return http_exchange(daemon.port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())


def _broker_warnings(daemon: Any) -> list[dict[str, Any]]:
    return daemon.logs(lambda r: r.get("level") == "warning" and r.get("broker") == "redis")


def test_hung_redis_is_marked_down_then_comes_back(start_daemon, redis):
    """Issue 12, defect 2: Redis stopped (SIGSTOP) for 10 s kept selectws_broker_up at 1 and /healthz at "up", logged
    nothing, and on SIGCONT delivered everything at once, 10 s late. Now: silent past [broker] health_timeout (3 s
    by default) is down -- metric 0, /readyz 503, /healthz says down, one warning -- local delivery goes on, and
    the broker is up again once Redis answers."""
    toml = broker_toml(redis, "connect_timeout = 1.0")  # retries during the stop fail fast: none may warn again
    a = start_daemon(toml)
    b = start_daemon(toml)
    with ExitStack() as stack:
        a1 = stack.enter_context(connect(a.url("/broadcast/x")))
        a2 = stack.enter_context(connect(a.url("/broadcast/x")))
        b1 = stack.enter_context(connect(b.url("/broadcast/x")))
        redis.wait_subscribers("selectws:broadcast:x", 2)
        for d in (a, b):
            wait_until(lambda d=d: metrics(d)[UP] == 1, "broker up")
        a1.send("before")
        assert a2.recv(timeout=TIMEOUT) == "before" and b1.recv(timeout=TIMEOUT) == "before"

        redis.stop()
        stack.callback(redis.cont)
        a1.send("hung")  # local delivery does not wait for Redis, before the hang is noticed ...
        assert a2.recv(timeout=TIMEOUT) == "hung"
        for d in (a, b):
            wait_until(lambda d=d: metrics(d)[UP] == 0, "broker marked down while Redis is stopped", timeout=8)
        ready = _get(a, "/readyz")
        assert ready.status == 503 and b"broker down" in ready.body and ready.header("X-Broker") == "down"
        health = _get(a, "/healthz")  # liveness: still serving, the broker line says why it is degraded
        assert health.status == 200 and b"down (Redis did not answer)" in health.body
        assert health.header("X-Broker") == "down"
        for i in range(3):
            a1.send(f"during {i}")  # ... nor after it
        for i in range(3):
            assert a2.recv(timeout=TIMEOUT) == f"during {i}"
        assert metrics(a)["selectws_broker_dropped_total"] >= 4  # "hung" (never confirmed) and the three
        # Reconnection attempts go on (TCP connects, PING unanswered): each is an info line, not another warning.
        for d in (a, b):
            wait_until(lambda d=d: len(d.logs(event="broker unavailable")) >= 2, "retries while Redis is stopped")
            warnings = _broker_warnings(d)
            assert [w["event"] for w in warnings] == ["broker unresponsive"], warnings
            assert warnings[0]["error"] == "Redis did not answer" and warnings[0]["timeout"] == 3.0
            assert not d.logs(event="broker connected", reconnects=1)  # not "up" on a bare TCP connect

        redis.cont()
        for d in (a, b):
            wait_until(lambda d=d: metrics(d)[UP] == 1, "broker up after SIGCONT")
            assert _get(d, "/readyz").status == 200
            assert metrics(d)["selectws_broker_reconnects_total"] >= 1
        redis.wait_subscribers("selectws:broadcast:x", 2)
        a1.send("after")
        assert a2.recv(timeout=TIMEOUT) == "after"
        got = b1.recv(timeout=TIMEOUT)
        if got == "hung":  # it reached Redis's socket before Redis stopped: Redis may still deliver it (documented)
            got = b1.recv(timeout=TIMEOUT)
        assert got == "after"  # and none of the "during" ones: they were never sent to Redis
        b1.send("back")
        assert a1.recv(timeout=TIMEOUT) == "back" and a2.recv(timeout=TIMEOUT) == "back"
    assert len(_broker_warnings(a)) == 1


def test_stopped_redis_completing_the_tcp_handshake_is_not_up(start_daemon, redis):
    """A stopped Redis still accepts TCP connections (its kernel completes the handshake): the broker is up only
    once Redis answered, and the failed attempts are one warning, then info."""
    redis.stop()
    try:
        with socket.create_connection(("127.0.0.1", redis.port), timeout=2):
            pass  # the premise: connect() succeeds although nothing will answer
        d = start_daemon(broker_toml(redis, "connect_timeout = 0.5"))
        d.wait_for(lambda r: r.get("event") in ("broker connected", "broker unavailable"), timeout=8)
        assert not d.logs(event="broker connected"), "reported up though Redis never answered"
        assert metrics(d)[UP] == 0
        assert _get(d, "/readyz").status == 503
        health = _get(d, "/healthz")
        assert health.status == 200 and b"down (Redis did not answer)" in health.body
        wait_until(lambda: len(d.logs(event="broker unavailable")) >= 3, "three attempts")
        assert [w["event"] for w in _broker_warnings(d)] == ["broker unavailable"]
    finally:
        redis.cont()
    wait_until(lambda: metrics(d)[UP] == 1, "broker up once Redis answers")
    assert _get(d, "/readyz").status == 200


def _client_dbs(redis: Redis) -> list[int]:
    """The db of every client connected to Redis but the one asking (CLIENT LIST: one line per client)."""
    listing = redis.command("CLIENT", "LIST").decode()
    return sorted(int(field.split("=", 1)[1]) for line in listing.splitlines() if "cmd=client" not in line
                  for field in line.split() if field.startswith("db="))


def test_the_url_database_is_selected(start_daemon, redis):
    """redis://host:port/3 selects db 3 on both connections (pub/sub channels are global, so groups still meet
    instances on other dbs); a database Redis refuses keeps the broker down, saying why."""
    ours = start_daemon(broker_toml(redis).replace(redis.url, redis.url.removesuffix("/0") + "/3"))
    other = start_daemon(broker_toml(redis))  # db 0
    for d in (ours, other):
        wait_until(lambda d=d: metrics(d)['selectws_broker_up{broker="redis"}'] == 1, "broker up")
    wait_until(lambda: _client_dbs(redis) == [0, 0, 3, 3], "two connections per daemon, on db 0 and db 3")
    with connect(ours.url("/broadcast/db")) as a, connect(other.url("/broadcast/db")) as b:
        redis.wait_subscribers("selectws:broadcast:db", 2)
        a.send("across databases")
        assert b.recv(timeout=TIMEOUT) == "across databases"

    refused = start_daemon(broker_toml(redis).replace(redis.url, redis.url.removesuffix("/0") + "/99"))
    refused.wait_for(lambda r: "SELECT 99 refused" in str(r.get("error")))
    assert not refused.logs(event="broker connected")
    m = metrics(refused)
    assert m['selectws_broker_up{broker="redis"}'] == 0
    assert m["selectws_broker_errors_total"] >= 1


def test_workers_share_the_port_and_groups(start_daemon, redis):
    d = start_daemon(broker_toml(redis), extra_args=("--workers", "2"), allow_errors=True)
    ready = d.wait_for(event="workers ready", timeout=15)
    pids = ready["pids"]
    assert len(set(pids)) == 2
    with ExitStack() as stack:
        clients = [stack.enter_context(connect(d.url("/broadcast/w"))) for _ in range(24)]
        wait_until(lambda: len(d.logs(event="open")) >= 24, "24 opens logged")
        used = {r["pid"] for r in d.logs(event="open")}
        assert used <= set(pids)
        assert len(used) == 2, "all connections went to one worker"
        redis.wait_subscribers("selectws:broadcast:w", 2)
        clients[0].send("to everyone")
        for ws in clients[1:]:
            assert ws.recv(timeout=TIMEOUT) == "to everyone"

    # a killed worker is restarted (and serves)
    victim = pids[0]
    os.kill(victim, signal.SIGKILL)
    d.wait_for(event="worker died; restarting", worker_pid=victim)
    started = d.wait_for(lambda r: r.get("worker_pid") not in pids, event="worker started")
    d.wait_for(event="listening", pid=started["worker_pid"])
    with connect(d.url("/echo")) as ws:
        ws.send("still here")
        assert ws.recv(timeout=TIMEOUT) == "still here"

    # SIGHUP to the parent reaches every worker (each reloads the file)
    d.signal(signal.SIGHUP)
    wait_until(lambda: len({r["pid"] for r in d.logs(event="configuration reloaded")}) == 2, "both workers reloaded")

    # SIGTERM to the parent stops everything, exit 0
    assert d.terminate() == 0
    d.wait_for(event="all workers exited", failed=0)
    for pid in (pids[1], started["worker_pid"]):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_workers_exit_when_the_supervisor_is_killed(start_daemon, redis):
    d = start_daemon(broker_toml(redis), extra_args=("--workers", "2"))
    pids = d.wait_for(event="workers ready", timeout=15)["pids"]
    d.signal(signal.SIGKILL)
    d.wait()

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # an exited child of a dead parent is reaped by init; a zombie still answers kill(0)
        try:
            with open(f"/proc/{pid}/stat") as fh:
                return fh.read().split(")")[-1].split()[0] == "Z"
        except FileNotFoundError:
            return True

    wait_until(lambda: all(gone(p) for p in pids), "workers to exit after their supervisor died")


def test_workers_without_broker_is_a_config_error(cli):
    result = cli("serve", "--port", "0", "--workers", "2")
    assert result.returncode == 2
    assert re.search(r"configuration error.*server\.workers.*broker", result.stderr), result.stderr


def test_rediss_with_password(start_daemon, tmp_path, monkeypatch):
    """rediss:// (TLS, verified against SSL_CERT_FILE) with AUTH; a wrong password keeps the broker down, saying why."""
    openssl = _need("openssl", "apt-get install -y openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    server = Redis(_need("redis-server", "apt-get install -y redis-server"))
    tls_port = server.port
    server.port = _free_port()  # plain port: for the test's own commands (PUBSUB NUMSUB)
    server.extra = ("--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                    "--tls-auth-clients", "no", "--requirepass", "s3cret")
    server.password = "s3cret"
    server.start()
    try:
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        toml = f"""
        [broker]
        url = "rediss://localhost:{tls_port}/0"
        password = "s3cret"
        """
        a = start_daemon(toml)
        b = start_daemon(toml)
        wrong = start_daemon(toml.replace("s3cret", "nope"))
        with connect(a.url("/broadcast/t")) as sender, connect(b.url("/broadcast/t")) as receiver:
            for d in (a, b):
                wait_until(lambda d=d: metrics(d)['selectws_broker_up{broker="redis"}'] == 1, "broker up over TLS")
            server.wait_subscribers("selectws:broadcast:t", 2)
            sender.send("over TLS")
            assert receiver.recv(timeout=TIMEOUT) == "over TLS"
        wrong.wait_for(lambda r: "AUTH refused" in str(r.get("error")))
        assert not wrong.logs(event="broker connected")
        health = http_exchange(wrong.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert health.status == 200 and b"down" in health.body and health.header("X-Broker") == "down"
    finally:
        server.kill()


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def _records(path: Any) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def test_workers_notify_systemd_from_the_parent_only(redis, tmp_path):
    """READY=1 once, from the supervisor, after every worker listens; workers do not inherit NOTIFY_SOCKET;
    STOPPING=1 on SIGTERM, then exit 0. The listening socket comes from socket activation when
    systemd-socket-activate is installed (the workers share the inherited descriptor)."""
    notify_dir = tmp_path / "n"
    notify_dir.mkdir()
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_dir / "notify.sock"))
    notify.settimeout(15)
    config = tmp_path / "selectws.toml"
    config.write_text(broker_toml(redis).replace("\n    ", "\n"))
    log = tmp_path / "stderr.log"
    serve = [sys.executable, "-m", "selectws", "serve", "--log-format", "json", "--workers", "2",
             "--config", str(config)]
    activate = shutil.which("systemd-socket-activate")
    port = _free_port()
    env = _clean_env(NOTIFY_SOCKET=str(notify_dir / "notify.sock"))
    if activate:
        args = [activate, "-l", f"127.0.0.1:{port}", "--fdname=ws",
                "-E", f"PYTHONPATH={os.pathsep.join(sys.path)}", "-E", "PYTHONUNBUFFERED=1",
                "-E", f"NOTIFY_SOCKET={env['NOTIFY_SOCKET']}", *serve]
    else:
        args = [*serve, "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") as err:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env)
    try:
        # socket activation starts the daemon on the first connection
        ws = None
        deadline = time.monotonic() + 15
        while ws is None:
            try:
                ws = connect(f"ws://127.0.0.1:{port}/echo")
            except OSError:
                assert time.monotonic() < deadline, "daemon not reachable"
                time.sleep(0.1)
        messages = []
        while not any("READY=1" in m for m in messages):
            messages.append(notify.recv(4096).decode())
        ready = next(m for m in messages if "READY=1" in m)
        assert "2 workers serving" in ready
        with ws:
            ws.send("hi")
            assert ws.recv(timeout=TIMEOUT) == "hi"
        # (a worker flushes its "listening" line just after telling the supervisor it is ready)
        wait_until(lambda: sum(r.get("event") == "listening" for r in _records(log)) == 2, "2 listening lines")
        records = _records(log)
        listening = [r for r in records if r.get("event") == "listening"]
        assert len(listening) == 2 and {r["pid"] for r in listening} == {r["worker_pid"] for r in records
                                                                          if r.get("event") == "worker started"}
        if activate:
            assert all(r["inherited"] for r in listening)
        notify.settimeout(0.5)
        try:
            while True:  # no second READY=1 from a worker
                messages.append(notify.recv(4096).decode())
        except TimeoutError:
            pass
        assert sum("READY=1" in m for m in messages) == 1, messages
        notify.settimeout(10)
        proc.send_signal(signal.SIGTERM)
        while not any("STOPPING=1" in m for m in messages):
            messages.append(notify.recv(4096).decode())
        assert proc.wait(15) == 0
        assert not [r for r in _records(log) if r.get("level") == "error"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        notify.close()


# ---------------------------------------------------------------------------------------------------------------
# The broker in this process, stepped by the test against a real Redis: its replies, pushes and refusals arrive
# the way they do in production, with nothing of the broker poked from outside.


class _Log:
    def __init__(self) -> None:
        self.records: list[tuple[str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **kw: self.records.append((event, kw))


class InProcessBroker:
    """A :class:`RedisBroker` on its own :class:`EventLoop`; what it delivers locally is recorded."""

    def __init__(self, url: str, password: str = "", max_buffer: int = 16 << 20) -> None:
        self.loop = EventLoop()
        self.log = _Log()
        self.delivered: list[tuple[str, str | bytes, frozenset[int]]] = []
        config = BrokerConfig(url=url, password=password, channel_prefix="p:", reconnect_min=0.05,
                              reconnect_max=0.2, max_buffer=max_buffer)
        self.broker = RedisBroker(self.loop, self._deliver, config, self.log)

    def _deliver(self, group: str, message: str | bytes, exclude: frozenset[int]) -> int:
        self.delivered.append((group, message, exclude))
        return 1

    def run_until(self, condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            self.loop.run_once(0.01)

    def close(self) -> None:
        self.broker.close()
        self.loop.close()


@pytest.fixture
def in_process() -> Iterator[Callable[..., InProcessBroker]]:
    made: list[InProcessBroker] = []

    def make(url: str, password: str = "", **kw: Any) -> InProcessBroker:
        made.append(InProcessBroker(url, password, **kw))
        return made[-1]

    yield make
    for b in made:
        b.close()


def _publish_raw(redis: Redis, channel: bytes, payload: bytes) -> None:
    """PUBLISH from outside any broker (another instance, or garbage), on a connection of its own."""
    with socket.create_connection(("127.0.0.1", redis.port), timeout=2) as sock:
        if redis.password:
            sock.sendall(encode_command("AUTH", redis.password))
        sock.sendall(encode_command("PUBLISH", channel, payload))
        reader = hiredis.Reader()
        replies: list[Any] = []
        while len(replies) < (2 if redis.password else 1):
            data = sock.recv(65536)
            assert data, "redis closed the connection"
            reader.feed(data)
            while (reply := reader.gets()) is not False:
                replies.append(reply)
        assert not any(isinstance(r, hiredis.ReplyError) for r in replies), replies


def _numsub(redis: Redis, channel: str) -> int:
    return int(redis.command("PUBSUB", "NUMSUB", channel)[1])


def test_broker_delivers_other_instances_messages_and_skips_its_own(redis, in_process):
    b = in_process(redis.url)
    b.broker.subscribe("g/1")
    b.broker.start()
    b.run_until(lambda: b.broker.up and _numsub(redis, "p:g/1") == 1, "broker up and subscribed")
    other = b"\x09" * 8
    _publish_raw(redis, b"p:g/1", encode_payload(b.broker.instance, "mine", frozenset({4})))
    _publish_raw(redis, b"p:g/1", encode_payload(other, "from B", frozenset({4})))
    _publish_raw(redis, b"p:g/1", b"\x07 not a payload")
    _publish_raw(redis, b"p:g/1", encode_payload(other, b"\x00bin"))
    b.run_until(lambda: len(b.delivered) >= 2, "two messages delivered")
    # remote exclude ids are connection ids of the other instance: never applied here
    assert b.delivered == [("g/1", "from B", frozenset()), ("g/1", b"\x00bin", frozenset())]
    stats = b.broker.stats()
    assert (stats.received, stats.errors) == (2, 1)  # the garbage is counted as an error, and skipped
    assert [e for e, _ in b.log.records].count("broker message ignored") == 1


def test_broker_counts_a_publish_redis_refuses_as_dropped(redis, in_process):
    redis.command("ACL", "SETUSER", "default", "resetchannels", "&p:allowed")  # PUBLISH elsewhere: -NOPERM
    b = in_process(redis.url)
    b.broker.start()
    b.run_until(lambda: b.broker.up, "broker up")
    assert b.broker.publish("allowed", "ok", frozenset()) == 1
    assert b.broker.publish("denied", "no", frozenset()) == 1  # local delivery happens whatever Redis says
    b.run_until(lambda: b.broker.stats().errors == 1, "the error reply")
    stats = b.broker.stats()
    assert (stats.published, stats.dropped, stats.errors, stats.up) == (2, 1, 1, True)
    [(_, fields)] = [r for r in b.log.records if r[0] == "broker error reply"]
    assert fields["command"] == "publish" and "NOPERM" in fields["error"]


def test_broker_buffer_bound_drops_a_publish_that_does_not_fit(redis, in_process):
    b = in_process(redis.url, max_buffer=4096)
    b.broker.start()
    b.run_until(lambda: b.broker.up, "broker up")
    b.broker.publish("g", b"x" * 3000, frozenset())  # buffered until the end of this loop iteration
    b.broker.publish("g", b"y" * 3000, frozenset())  # does not fit beside it: dropped, still delivered locally
    assert len(b.delivered) == 2
    stats = b.broker.stats()
    assert (stats.published, stats.dropped) == (1, 1)


def test_broker_authenticates_and_selects_the_database_before_subscribing(in_process):
    redis = Redis(_need("redis-server", "apt-get install -y redis-server"), "--requirepass", "pw")
    redis.password = "pw"
    redis.start()
    try:
        url = f"redis://127.0.0.1:{redis.port}/5"
        b = in_process(url, "pw")
        b.broker.subscribe("g")  # remembered while down; SUBSCRIBE goes after AUTH and SELECT
        b.broker.start()
        b.run_until(lambda: b.broker.up and _numsub(redis, "p:g") == 1, "broker up and subscribed")
        b.run_until(lambda: _client_dbs(redis) == [5, 5], "both connections on db 5")
        _publish_raw(redis, b"p:g", encode_payload(b"\x09" * 8, "hello"))
        b.run_until(lambda: b.delivered == [("g", "hello", frozenset())], "the message")
        assert b.broker.stats().errors == 0

        refused = in_process(url, "wrong")
        refused.broker.start()
        refused.run_until(lambda: "AUTH refused" in refused.broker.last_error, "AUTH refused")
        assert not refused.broker.up
        assert refused.broker.stats().errors >= 1
    finally:
        redis.kill()


def test_broker_stays_down_when_redis_refuses_the_database(redis, in_process):
    b = in_process(redis.url.removesuffix("/0") + "/99")
    b.broker.start()
    b.run_until(lambda: "SELECT 99 refused" in b.broker.last_error, "SELECT refused")
    b.run_until(lambda: b.broker.stats().reconnects == 0 and b.broker.stats().errors >= 2, "a retry refused too")
    stats = b.broker.stats()
    assert not stats.up and stats.status is not None and "SELECT 99 refused" in stats.status
    assert b.broker.publish("g", "hi", frozenset()) == 1 and b.broker.stats().dropped == 1
