"""Per-connection rate limits against the running daemon (issue 14): a client that sends 1,000 messages at once to
a route with ``max_messages_per_second = 10, burst = 20`` sees about ``burst`` of them echoed, then either a 1008
"rate limit exceeded" close or (``rate_limit_action = "drop"``) nothing for the rest, counted in
``selectws_rate_limited_total{route}``, and is served again once the bucket refills. Other connections, and
routes without a limit, are not affected. Clients: the ``websockets`` library and raw sockets (wstools)."""

from __future__ import annotations

import http.client
import re
import time

import pytest
import websockets.exceptions
from wstools import RawWS, connect, encode_frame

FLOOD = 1000
CONFIG = """
[[routes]]
path = "/echo"
plugin = "echo"
max_messages_per_second = 10
burst = 20

[[routes]]
path = "/drop"
plugin = "echo"
max_messages_per_second = 10
burst = 20
rate_limit_action = "drop"

[[routes]]
path = "/free"
plugin = "echo"
"""


def metrics(port: int) -> dict[str, float]:
    """/metrics samples by their full name with labels, e.g. ``selectws_rate_limited_total{route="/drop"}``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        assert response.status == 200
        text = response.read().decode()
    finally:
        conn.close()
    samples = {}
    for line in text.splitlines():
        match = re.fullmatch(r"(\w+(?:\{[^}]*\})?) (\S+)", line)
        if match and not line.startswith("#"):
            samples[match.group(1)] = float(match.group(2))
    return samples


def flood(ws, n: int = FLOOD) -> int:
    """Send ``n`` messages "0".."n-1" as fast as the client can; returns how many went before the server closed."""
    for i in range(n):
        try:
            ws.send(str(i))
        except websockets.exceptions.ConnectionClosed:
            return i
    return n


def echoes_until_quiet(ws, quiet: float = 0.5, limit: float = 5.0) -> list[str]:
    """Every message received until none came for ``quiet`` seconds (or ``limit`` passed)."""
    got: list[str] = []
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            got.append(ws.recv(timeout=quiet))
        except TimeoutError:
            break
    return got


def test_close_action_echoes_about_burst_then_closes_1008(start_daemon) -> None:
    daemon = start_daemon(CONFIG)
    with connect(daemon.url("/echo")) as bystander, connect(daemon.url("/free")) as free:
        ws = connect(daemon.url("/echo"))
        flood(ws)
        got: list[str] = []
        with pytest.raises(websockets.exceptions.ConnectionClosed) as info:
            for _ in range(FLOOD + 1):
                got.append(ws.recv(timeout=5))
        assert info.value.rcvd is not None
        assert (info.value.rcvd.code, info.value.rcvd.reason) == (1008, "rate limit exceeded")
        # About burst: the first 20 at once, plus what 10/s refilled while the 1,000 arrived (well under a second).
        assert 20 <= len(got) <= 25, len(got)
        assert got == [str(i) for i in range(len(got))]
        # The connection next to it on the same route has its own bucket, and /free has none.
        for i in range(20):
            bystander.send(f"b{i}")
        assert [bystander.recv(timeout=5) for _ in range(20)] == [f"b{i}" for i in range(20)]
        for i in range(FLOOD):
            free.send(f"f{i}")
        assert [free.recv(timeout=5) for _ in range(FLOOD)] == [f"f{i}" for i in range(FLOOD)]
    record = daemon.wait_for(event="rate limit exceeded", timeout=5)
    assert (record["path"], record["action"], record["rate"], record["burst"]) == ("/echo", "close", 10.0, 20)
    assert len(daemon.logs(event="rate limit exceeded")) == 1
    samples = metrics(daemon.port)
    assert samples['selectws_rate_limited_total{route="/echo"}'] == 1
    assert samples['selectws_rate_limit_closes_total{route="/echo"}'] == 1
    assert samples['selectws_connections_closed_total{code="1008"}'] == 1
    assert samples['selectws_rate_limited_total{route="/drop"}'] == 0
    assert 'selectws_rate_limited_total{route="/free"}' not in samples


def test_close_action_raw_client_gets_the_close_frame_after_the_echoes(start_daemon) -> None:
    daemon = start_daemon(CONFIG)
    with RawWS(daemon.port, "/echo") as raw:
        raw.send_raw(b"".join(encode_frame(0x1, str(i).encode()) for i in range(FLOOD)))
        got = []
        while True:
            frame = raw.recv_frame(timeout=5)
            if frame.opcode == 0x8:
                break
            assert frame.opcode == 0x1
            got.append(frame.payload.decode())
        assert (frame.close_code, frame.close_reason) == (1008, b"rate limit exceeded")
        assert 20 <= len(got) <= 25 and got == [str(i) for i in range(len(got))]
        assert raw.wait_eof(timeout=5)  # then TCP is closed: a flooding client is not waited for


def test_drop_action_drops_counts_and_serves_again_after_refill(start_daemon) -> None:
    daemon = start_daemon(CONFIG)
    with connect(daemon.url("/drop")) as ws, connect(daemon.url("/drop")) as other:
        assert flood(ws) == FLOOD
        got = echoes_until_quiet(ws)
        assert 20 <= len(got) <= 30, len(got)
        assert got[:20] == [str(i) for i in range(20)]
        assert sorted(got, key=int) == got  # in order; later ones are those the refill let through
        dropped = FLOOD - len(got)
        assert metrics(daemon.port)['selectws_rate_limited_total{route="/drop"}'] == dropped
        # Still open, and served again once the bucket has a token (10/s: 0.1 s each; wait a bounded while).
        deadline = time.monotonic() + 5
        served = None
        while served is None and time.monotonic() < deadline:
            time.sleep(0.2)
            ws.send("again")
            try:
                served = ws.recv(timeout=0.5)
            except TimeoutError:
                dropped += 1
        assert served == "again"
        # The other connection on the route never went over its own bucket.
        for i in range(20):
            other.send(f"o{i}")
        assert [other.recv(timeout=5) for _ in range(20)] == [f"o{i}" for i in range(20)]
    samples = metrics(daemon.port)
    assert samples['selectws_rate_limited_total{route="/drop"}'] == dropped
    assert samples['selectws_rate_limit_closes_total{route="/echo"}'] == 0
    assert 'selectws_connections_closed_total{code="1008"}' not in samples
    records = daemon.logs(event="rate limit exceeded")
    assert len(records) == 1, records  # one line for the connection, not one per dropped message
    assert (records[0]["path"], records[0]["action"]) == ("/drop", "drop")


def test_limits_table_sets_the_default_for_every_route(start_daemon) -> None:
    daemon = start_daemon("""
        [limits]
        max_messages_per_second = 10
        burst = 5
        rate_limit_action = "drop"

        [[routes]]
        path = "/echo"
        plugin = "echo"

        [[routes]]
        path = "/free"
        plugin = "echo"
        max_messages_per_second = 0
    """)
    with connect(daemon.url("/echo")) as ws:
        flood(ws, 100)
        got = echoes_until_quiet(ws)
        assert 5 <= len(got) <= 10 and got[:5] == ["0", "1", "2", "3", "4"]
    with connect(daemon.url("/free")) as ws:
        flood(ws, 100)
        assert [ws.recv(timeout=5) for _ in range(100)] == [str(i) for i in range(100)]
    samples = metrics(daemon.port)
    assert samples['selectws_rate_limited_total{route="/echo"}'] == 100 - len(got)
    assert 'selectws_rate_limited_total{route="/free"}' not in samples


@pytest.mark.parametrize(("route_keys", "expected"), [
    ("max_messages_per_second = -1\nburst = 5", "routes[0].max_messages_per_second: must be >= 0, got -1"),
    ("max_messages_per_second = 10\nburst = 20\nrate_limit_action = \"kick\"",
     "routes[0].rate_limit_action: must be one of 'close', 'drop', got 'kick'"),
    ("max_messages_per_second = 10", "routes[0].burst: must be >= 1 when max_messages_per_second is set"),
])
def test_config_errors_name_the_key(cli, write_config, route_keys: str, expected: str) -> None:
    path = write_config(f'[[routes]]\npath = "/echo"\nplugin = "echo"\n{route_keys}\n')
    result = cli("check-config", str(path))
    assert result.returncode != 0
    assert expected in result.stderr + result.stdout, result.stderr + result.stdout
