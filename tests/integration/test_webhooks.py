"""Webhooks (``[[hooks]]``) with the real daemon and a loopback HTTP receiver in the test.

The receiver is ``http.server`` in a thread of the test (the daemon itself has no thread: its client runs in its
loop). Covered: open/join/close arrive signed and batched; occupied/vacated for a group's first and last member; a
stopped or hanging receiver slows no WebSocket traffic, the drop counter rises, attempts back off and one line is
logged per failure episode; configuration errors name the key and nothing starts.
"""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import re
import socket
import statistics
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect

pytest.importorskip("h11")

SECRET = b"hook-secret-for-tests"


class Receiver:
    """A loopback webhook receiver: keeps every batch (headers, body, parsed events)."""

    def __init__(self) -> None:
        self.batches: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.cond:
                    receiver.batches.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                             "events": json.loads(body)["events"]})
                    receiver.cond.notify_all()
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def events(self) -> list[dict[str, Any]]:
        with self.cond:
            return [event for batch in self.batches for event in batch["events"]]

    def wait_for(self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate([e for b in self.batches for e in b["events"]]):
                left = deadline - time.monotonic()
                assert left > 0, f"receiver saw only {self.batches}"
                self.cond.wait(left)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def hook_config(tmp_path: Path, port: int, events: list[str], **extra: Any) -> str:
    (tmp_path / "hook.secret").write_bytes(SECRET + b"\n")  # the trailing newline is not part of the secret
    lines = [f"url = \"http://127.0.0.1:{port}/selectws/events?app=1\"", f"events = {json.dumps(events)}",
             'secret_file = "hook.secret"', *(f"{k} = {json.dumps(v)}" for k, v in extra.items())]
    return "[[hooks]]\n" + "\n".join(lines) + "\n"


def valid_signature(batch: dict[str, Any]) -> bool:
    expected = "sha256=" + hmac.new(SECRET, batch["body"], hashlib.sha256).hexdigest()
    return hmac.compare_digest(batch["headers"]["X-Selectws-Signature"], expected)


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    match = re.search(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_receiver_gets_open_join_and_close_signed_and_batched(start_daemon: Any, receiver: Receiver,
                                                               tmp_path: Path) -> None:
    daemon = start_daemon(hook_config(tmp_path, receiver.port, ["open", "close", "join", "leave"]))
    with connect(daemon.url("/broadcast/news")):
        receiver.wait_for(lambda events: {"open", "join"} <= {e["event"] for e in events})
    receiver.wait_for(lambda events: any(e["event"] == "close" for e in events))
    events = receiver.events()
    assert [e["event"] for e in events] == ["open", "join", "leave", "close"]
    assert len(receiver.batches) == 2  # open+join in one batch, leave+close in the next
    for batch in receiver.batches:
        assert valid_signature(batch)
        assert batch["path"] == "/selectws/events?app=1"
        assert batch["headers"]["Content-Type"] == "application/json"
    opened, joined, left, closed = events
    session = opened["session"]
    assert isinstance(session, str) and all(e["session"] == session for e in events)
    assert opened["path"] == "/broadcast/news" and opened["remote"] == "127.0.0.1"
    assert joined["group"] == left["group"] == "broadcast:news"
    assert closed["code"] == 1000
    assert all(abs(e["time"] - time.time()) < 60 for e in events)
    deadline = time.monotonic() + 5  # the receiver records a batch before it answers: the count follows
    while metric(daemon.port, "selectws_hook_events_sent_total") != 4:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    tampered = dict(receiver.batches[0], body=receiver.batches[0]["body"] + b" ")
    assert not valid_signature(tampered)


def test_occupied_and_vacated_for_the_first_and_last_member(start_daemon: Any, receiver: Receiver,
                                                            tmp_path: Path) -> None:
    daemon = start_daemon(hook_config(tmp_path, receiver.port, ["occupied", "vacated"], batch_interval=0.05))
    with connect(daemon.url("/broadcast/room")) as first:
        receiver.wait_for(lambda events: len(events) >= 1)
        with connect(daemon.url("/broadcast/room")) as second:
            second.send("x")
            assert first.recv(timeout=5) == "x"
        time.sleep(0.3)  # the second member left: not the last one
        assert [e["event"] for e in receiver.events()] == ["occupied"]
    receiver.wait_for(lambda events: len(events) >= 2)
    time.sleep(0.2)
    events = receiver.events()
    assert [(e["event"], e["group"]) for e in events] == [("occupied", "broadcast:room"), ("vacated", "broadcast:room")]


def echo_latencies(daemon: Any, seconds: float) -> list[float]:
    """Connect, echo and close over and over for ``seconds`` (two events each): the latency of each echo."""
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        i += 1
        with connect(daemon.url("/echo")) as ws:
            started = time.monotonic()
            ws.send(f"ping {i}")
            assert ws.recv(timeout=5) == f"ping {i}"
            latencies.append(time.monotonic() - started)
    return latencies


def test_stopped_receiver_drops_counts_and_backs_off(start_daemon: Any, tmp_path: Path) -> None:
    port = closed_port()
    daemon = start_daemon(hook_config(tmp_path, port, ["open", "close"], max_queue=5, backoff_min=0.2,
                                      backoff_max=1.0, batch_interval=0.05))
    started = time.monotonic()
    latencies = echo_latencies(daemon, 3.0)  # hundreds of events for a queue of 5
    window = time.monotonic() - started
    assert len(latencies) >= 30 and max(latencies) < 0.5 and statistics.median(latencies) < 0.05, latencies
    assert metric(daemon.port, "selectws_hook_events_dropped_total") >= 50
    requests = metric(daemon.port, "selectws_hook_requests_total")
    # 0.2, 0.4, 0.8, 1.0, 1.0 ... (x <= 1.25): a handful of attempts in ~3 s, not one per event or per iteration
    assert 2 <= requests <= 3 + window / 0.2 / 2, requests
    assert metric(daemon.port, "selectws_hook_failing") == 1
    warnings = daemon.logs(event="webhook delivery failing; retrying with backoff")
    assert len(warnings) == 1, warnings  # one line per failure episode
    assert "refused" in warnings[0]["error"]


def test_hanging_receiver_times_out_and_never_slows_websockets(start_daemon: Any, tmp_path: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept_and_hang() -> None:  # accepts, reads nothing, answers nothing
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept_and_hang, daemon=True)
    thread.start()
    try:
        daemon = start_daemon(hook_config(tmp_path, listener.getsockname()[1], ["open", "close"], timeout=0.3,
                                          max_queue=5, backoff_min=0.2, backoff_max=1.0, batch_interval=0.05))
        started = time.monotonic()
        latencies = echo_latencies(daemon, 3.0)
        window = time.monotonic() - started
        assert len(latencies) >= 30 and max(latencies) < 0.5 and statistics.median(latencies) < 0.05, latencies
        assert metric(daemon.port, "selectws_hook_events_dropped_total") >= 40
        assert metric(daemon.port, "selectws_hook_events_failed_total") >= 1  # a batch that left: not resent
        # each attempt: 0.3 s timeout, then 0.2, 0.4, 0.8, 1.0 ... of backoff
        assert 2 <= len(accepted) <= 1 + window / 0.5, len(accepted)
        warnings = daemon.logs(event="webhook delivery failing; retrying with backoff")
        assert len(warnings) == 1 and warnings[0]["error"] == "timed out waiting for the response"
    finally:
        stop.set()
        thread.join(5)
        for sock in accepted:
            sock.close()
        listener.close()


@pytest.mark.parametrize(
    ("hook", "secret", "key"),
    [
        ('url = "http://127.0.0.1:9/"\nevents = ["open"]\nsecret_file = "missing.secret"', None,
         "hooks[0].secret_file"),
        ('url = "http://127.0.0.1:9/"\nevents = ["open"]\nsecret_file = "empty.secret"', b"\n",
         "hooks[0].secret_file"),
        ('url = "ftp://127.0.0.1:9/"\nevents = ["open"]\nsecret_file = "hook.secret"', b"x", "hooks[0].url"),
        ('url = "http://127.0.0.1:9/"\nevents = ["open", "opened"]\nsecret_file = "hook.secret"', b"x",
         "hooks[0].events[1]"),
        ('url = "http://127.0.0.1:9/"\nevents = ["open"]\nsecret_env = "SELECTWS_TEST_UNSET_SECRET"', None,
         "hooks[0].secret_env"),
    ],
)
def test_configuration_errors_name_the_key_and_nothing_starts(cli: Any, tmp_path: Path, hook: str,
                                                              secret: bytes | None, key: str) -> None:
    if secret is not None:
        (tmp_path / ("empty.secret" if secret == b"\n" else "hook.secret")).write_bytes(secret)
    path = tmp_path / "hooks.toml"
    path.write_text(f"[[hooks]]\n{hook}\n")
    checked = cli("check-config", str(path))
    assert checked.returncode == 2
    [line] = checked.stderr.strip().splitlines()
    assert f"configuration error in {path}: {key}: " in line, line
    served = cli("serve", "--config", str(path), "--port", "0", "--log-format", "json", timeout=20)
    assert served.returncode == 2 and '"listening"' not in served.stderr
    assert key in served.stderr
