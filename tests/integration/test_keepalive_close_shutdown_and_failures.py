"""A connection's life and the daemon's: ping/pong, keepalive, closing handshakes both ways, graceful shutdown,
plugin failures, protocol violations from raw sockets, configuration errors and the command line."""

from __future__ import annotations

import signal
import socket
import sys
import time
from contextlib import ExitStack

import pytest
import websocket  # websocket-client
from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK
from wstools import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    RawWS,
    close_payload,
    connect,
    encode_frame,
)

import selectws

TIMEOUT = 10.0

# ================================================================================================= ping / pong


def test_ping_gets_a_pong_websockets(daemon):
    with connect(daemon.url("/echo")) as ws:
        for payload in (b"", b"hello", b"\xff" * 125):
            assert ws.ping(payload).wait(TIMEOUT), f"no pong for {payload!r}"
        ws.send("after pings")
        assert ws.recv(timeout=TIMEOUT) == "after pings"


def test_ping_gets_a_pong_websocket_client(daemon):
    ws = websocket.create_connection(daemon.url("/echo"), timeout=TIMEOUT)
    try:
        ws.ping("are you there")
        opcode, frame = ws.recv_data_frame(control_frame=True)
        assert opcode == websocket.ABNF.OPCODE_PONG
        assert frame.data == b"are you there"
    finally:
        ws.close()


def test_ping_between_fragments_is_answered_at_once(daemon):
    """Control frames may arrive in the middle of a fragmented message (RFC 6455 section 5.4)."""
    with RawWS(daemon.port, "/echo") as raw:
        raw.send_frame(OP_TEXT, b"frag-", fin=False)
        raw.send_frame(OP_PING, b"mid")
        pong = raw.recv_frame()
        assert (pong.opcode, pong.payload) == (OP_PONG, b"mid")
        raw.send_frame(OP_PONG, b"unsolicited pongs are ignored")
        raw.send_frame(OP_CONT, b"end")
        assert raw.recv_message() == (OP_TEXT, b"frag-end")


# ================================================================================================= keepalive
FAST_TIMERS = """
[timeouts]
ping_interval = 0.3
ping_timeout = 0.3
close = 0.5
"""


@pytest.fixture(scope="module")
def fast_daemon(module_start_daemon):
    return module_start_daemon(FAST_TIMERS)


def test_keepalive_drops_a_peer_that_never_answers_pings(fast_daemon):
    start = time.monotonic()
    with RawWS(fast_daemon.port, "/echo") as raw:
        ping = raw.recv_frame(timeout=2.0)
        assert ping.opcode == OP_PING, ping
        assert 0.2 <= time.monotonic() - start <= 1.2, "the ping is due after ping_interval = 0.3 s idle"
        # We never answer: ping_timeout = 0.3 s later the server gives up with 1011 and closes TCP.
        close = raw.expect_close(timeout=2.0)
        assert close.close_code == 1011, close
        assert raw.wait_eof(2.0), "the server must close TCP after failing the connection"
        assert time.monotonic() - start <= 2.0
    record = fast_daemon.wait_for(event="close", code=1011)
    assert record["path"] == "/echo"


def test_keepalive_keeps_a_well_behaved_client(fast_daemon):
    """websockets answers pings by itself: past many intervals the connection is still open and working."""
    with connect(fast_daemon.url("/echo")) as ws:
        time.sleep(1.5)  # five ping intervals
        ws.send("still open")
        assert ws.recv(timeout=TIMEOUT) == "still open"


def test_keepalive_answering_pings_by_hand_stays_open(fast_daemon):
    with RawWS(fast_daemon.port, "/echo") as raw:
        for _ in range(3):
            ping = raw.recv_frame(timeout=2.0)
            assert ping.opcode == OP_PING
            raw.send_frame(OP_PONG, ping.payload)
        raw.send_frame(OP_TEXT, b"alive")
        assert raw.recv_message() == (OP_TEXT, b"alive")


def test_any_traffic_counts_as_alive(fast_daemon):
    """A peer that answers pings with data instead of pongs is alive too (any input proves it)."""
    with RawWS(fast_daemon.port, "/echo") as raw:
        for i in range(3):
            ping = raw.recv_frame(timeout=2.0)
            assert ping.opcode == OP_PING, ping
            raw.send_frame(OP_TEXT, b"data, not a pong %d" % i)
            assert raw.recv_message(timeout=2.0) == (OP_TEXT, b"data, not a pong %d" % i)


def test_a_busy_connection_is_not_pinged(fast_daemon):
    with RawWS(fast_daemon.port, "/echo") as raw:
        deadline = time.monotonic() + 1.0
        n = 0
        while time.monotonic() < deadline:
            raw.send_frame(OP_TEXT, b"chatty %d" % n)
            frame = raw.recv_frame(timeout=2.0)
            assert (frame.opcode, frame.payload) == (OP_TEXT, b"chatty %d" % n), "no ping while traffic flows"
            n += 1
            time.sleep(0.1)


# ================================================================================================= closing handshake


def test_close_initiated_by_the_client(daemon):
    with connect(daemon.url("/echo")) as ws:
        ws.send("hello")
        assert ws.recv(timeout=TIMEOUT) == "hello"
        ws.close(1000, "client done")
        assert ws.close_code == 1000, "the server echoes the close code"
    record = daemon.wait_for(event="close", code=1000, reason="client done")
    assert record["by_peer"] is True


@pytest.mark.parametrize("code,reason", [(1000, "done"), (1001, "going"), (4321, "custom ✓"), (None, "")])
def test_close_initiated_by_the_client_raw(daemon, code, reason):
    with RawWS(daemon.port, "/echo") as raw:
        raw.send_close(code, reason)
        frame = raw.expect_close()
        assert frame.close_code == code, "the server answers with the same code (none for none)"
        if code is None:
            assert frame.payload == b""
        start = time.monotonic()
        assert raw.wait_eof(2.0), "after the closing handshake the server closes TCP"
        assert time.monotonic() - start < 1.0


def test_messages_just_before_the_clients_close_are_still_answered(daemon):
    """Messages, then a close frame, in one packet: the plugin sees the messages before the close, so their
    answers must go out before the server's close frame (after it nothing may be sent: they would be lost)."""
    with RawWS(daemon.port, "/echo") as raw:
        raw.send_raw(
            encode_frame(OP_TEXT, b"a") + encode_frame(OP_TEXT, b"b") + encode_frame(OP_CLOSE, close_payload(1000))
        )
        assert raw.recv_message() == (OP_TEXT, b"a")
        assert raw.recv_message() == (OP_TEXT, b"b")
        assert raw.expect_close().close_code == 1000
        assert raw.wait_eof(2.0)


def test_close_initiated_by_the_client_websocket_client(daemon):
    ws = websocket.create_connection(daemon.url("/echo"), timeout=TIMEOUT)
    ws.send("x")
    assert ws.recv() == "x"
    ws.send_close(4000, b"wsc bye")
    opcode, frame = ws.recv_data_frame(control_frame=True)
    assert opcode == websocket.ABNF.OPCODE_CLOSE
    assert int.from_bytes(frame.data[:2], "big") == 4000
    ws.shutdown()


def test_close_initiated_by_the_server(plugin_daemon):
    with connect(plugin_daemon.url("/bye")) as ws:
        ws.send("hi")
        assert ws.recv(timeout=TIMEOUT) == "hi"
        ws.send("bye")
        with pytest.raises(ConnectionClosedError) as info:
            ws.recv(timeout=TIMEOUT)
        assert info.value.rcvd is not None
        assert (info.value.rcvd.code, info.value.rcvd.reason) == (4000, "bye from the server")
    record = plugin_daemon.wait_for(event="close", path="/bye", code=4000)
    assert record["by_peer"] is False


def test_close_initiated_by_the_server_raw(plugin_daemon):
    with RawWS(plugin_daemon.port, "/bye") as raw:
        raw.send_text("bye")
        frame = raw.expect_close()
        assert (frame.close_code, frame.close_reason) == (4000, b"bye from the server")
        raw.send_text("ignored: the server is closing")
        raw.send_close(4000)
        start = time.monotonic()
        assert raw.wait_eof(2.0)
        assert time.monotonic() - start < 1.0, "the server closes TCP as soon as our close frame arrives"


def test_server_close_ignored_by_the_client_times_out(start_daemon):
    d = start_daemon(FAST_TIMERS + """
[[routes]]
path = "/bye"
plugin = "plugins_for_tests:ByePlugin"
""")
    with RawWS(d.port, "/bye") as raw:
        raw.send_text("bye")
        start = time.monotonic()
        assert raw.expect_close().close_code == 4000
        assert raw.wait_eof(3.0), "a peer that never answers our close frame is dropped"
        assert 0.3 <= time.monotonic() - start <= 2.0
    d.wait_for(event="close", path="/bye", code=1006)  # no closing handshake took place


# ================================================================================================= shutdown


def test_graceful_shutdown_closes_everyone_with_1001(start_daemon):
    d = start_daemon()
    with ExitStack() as stack:
        clients = [stack.enter_context(connect(d.url(p))) for p in ("/echo", "/broadcast/x", "/chat")]
        for ws in clients:
            assert ws.ping().wait(TIMEOUT)
        start = time.monotonic()
        d.signal(signal.SIGTERM)
        for ws in clients:
            with pytest.raises(ConnectionClosedOK) as info:
                ws.recv(timeout=TIMEOUT)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1001
        assert d.wait(TIMEOUT) == 0
        assert time.monotonic() - start < 3.0, "every client answered: no need to wait for the grace period"
    d.wait_for(event="stop signal: draining", connections=3)
    d.wait_for(event="stopped")
    with pytest.raises(OSError):
        socket.create_connection((d.host, d.port), timeout=2).close()


def test_sigint_also_drains(start_daemon):
    d = start_daemon()
    with connect(d.url("/echo")) as ws:
        d.signal(signal.SIGINT)
        with pytest.raises(ConnectionClosedOK) as info:
            ws.recv(timeout=TIMEOUT)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1001
    assert d.wait(TIMEOUT) == 0


def test_shutdown_flushes_what_was_queued_before_the_close(start_daemon):
    """Messages already queued for a slow reader when SIGTERM arrives are all delivered, then the 1001 close."""
    d = start_daemon()
    # 8 MiB: more than the kernel buffers hold (tcp_wmem max is typically 4 MiB), so part of it is in the
    # server's own write buffer when the signal comes.
    n, size = 512, 16 * 1024
    with ExitStack() as stack:
        slow = stack.enter_context(RawWS(d.port, "/broadcast/flush", rcvbuf=4096))  # reads nothing until SIGTERM
        watcher = stack.enter_context(connect(d.url("/broadcast/flush"), compression=None, max_size=None))
        sender = stack.enter_context(connect(d.url("/broadcast/flush"), compression=None))
        burst = [i.to_bytes(4, "big") + bytes([i % 251]) * size for i in range(n)]
        for m in burst:
            sender.send(m)
        for m in burst:  # the server has handled the whole burst: it is queued for `slow` too
            assert watcher.recv(timeout=TIMEOUT) == m
        d.signal(signal.SIGTERM)
        for i, m in enumerate(burst):
            assert slow.recv_message(timeout=TIMEOUT) == (OP_BINARY, m), f"message {i} lost or altered"
        close = slow.expect_close()
        assert close.close_code == 1001
        slow.send_close(1001)
        assert slow.wait_eof(5.0)
        for ws in (watcher, sender):
            with pytest.raises(ConnectionClosedOK):
                ws.recv(timeout=TIMEOUT)
    assert d.wait(TIMEOUT) == 0


def test_shutdown_grace_period_cuts_unresponsive_clients(start_daemon):
    d = start_daemon("""
    [timeouts]
    shutdown_grace = 1.0
    """)
    with RawWS(d.port, "/echo") as raw, socket.create_connection((d.host, d.port), timeout=TIMEOUT) as idle:
        start = time.monotonic()
        d.signal(signal.SIGTERM)
        assert raw.expect_close().close_code == 1001
        # A connection still in its handshake is closed at once (no WebSocket to close politely).
        idle.settimeout(2.0)
        assert idle.recv(1) == b""
        # While draining, the listener is closed: new clients are refused by the kernel.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((d.host, d.port), timeout=2).close()
        # We never answer the close frame: the daemon waits out its grace period, then cuts us and exits.
        assert d.wait(TIMEOUT) == 0
        elapsed = time.monotonic() - start
        assert 0.8 <= elapsed <= 3.0, f"exited {elapsed:.2f}s after SIGTERM with a 1 s grace period"
        assert raw.wait_eof(2.0)
    d.wait_for(event="shutdown grace period over; closing the remaining connections", remaining=1)


def test_second_signal_stops_at_once(start_daemon):
    d = start_daemon("""
    [timeouts]
    shutdown_grace = 30.0
    close = 30.0
    """)
    with RawWS(d.port, "/echo") as raw:
        d.signal(signal.SIGTERM)
        assert raw.expect_close().close_code == 1001
        d.wait_for(event="stop signal: draining")
        start = time.monotonic()
        d.signal(signal.SIGTERM)
        assert d.wait(TIMEOUT) == 0
        assert time.monotonic() - start < 2.0
        assert raw.wait_eof(2.0)
    d.wait_for(event="second stop signal: closing everything now")


# ================================================================================================= plugin failures


def test_plugin_raising_closes_only_that_client_with_1011(plugin_daemon):
    with connect(plugin_daemon.url("/echo")) as bystander, connect(plugin_daemon.url("/boom")) as neighbour, \
            connect(plugin_daemon.url("/boom")) as victim:
        victim.send("fine")
        assert victim.recv(timeout=TIMEOUT) == "fine"
        victim.send("boom")
        victim.send("after the boom")  # never delivered to the failed plugin, never echoed
        with pytest.raises(ConnectionClosedError) as info:
            victim.recv(timeout=TIMEOUT)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1011

        record = plugin_daemon.wait_for(lambda r: "on_message exploded" in r.get("exception", ""))
        assert record["level"] == "error"
        assert record["hook"] == "on_message"
        assert "Traceback" in record["exception"]

        for ws in (bystander, neighbour):
            ws.send("still working")
            assert ws.recv(timeout=TIMEOUT) == "still working"


def test_plugin_on_open_raising_closes_with_1011(plugin_daemon):
    with connect(plugin_daemon.url("/boom?fail=open")) as ws:
        with pytest.raises(ConnectionClosedError) as info:
            ws.recv(timeout=TIMEOUT)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1011
    plugin_daemon.wait_for(lambda r: "on_open exploded" in r.get("exception", ""))


def test_plugin_on_close_raising_is_logged_and_harmless(plugin_daemon):
    with connect(plugin_daemon.url("/boom?fail=close")) as ws:
        ws.send("x")
        assert ws.recv(timeout=TIMEOUT) == "x"
    plugin_daemon.wait_for(lambda r: "on_close exploded" in r.get("exception", ""))
    with connect(plugin_daemon.url("/boom")) as ws:
        ws.send("y")
        assert ws.recv(timeout=TIMEOUT) == "y"


# ================================================================================================= protocol errors
MIB = 1 << 20

VIOLATIONS = [
    ("unmasked-frame", encode_frame(OP_TEXT, b"hello", mask=False), 1002),
    ("invalid-utf8", encode_frame(OP_TEXT, b"caf\xc3("), 1007),
    ("utf8-surrogate", encode_frame(OP_TEXT, b"\xed\xa0\x80"), 1007),
    ("invalid-utf8-first-fragment", encode_frame(OP_TEXT, b"ok\xff", fin=False), 1007),
    ("truncated-utf8-at-end", encode_frame(OP_TEXT, b"a", fin=False) + encode_frame(OP_CONT, b"\xe2\x82"), 1007),
    ("2**40-byte-header", encode_frame(OP_BINARY, b"", length=2**40), 1009),
    ("frame-over-max-frame-size", encode_frame(OP_BINARY, b"", length=MIB + 1), 1009),
    ("reserved-opcode-3", encode_frame(0x3, b"x"), 1002),
    ("reserved-opcode-b", encode_frame(0xB, b"x"), 1002),
    ("rsv1-without-extension", encode_frame(OP_TEXT, b"x", rsv=4), 1002),
    ("rsv2", encode_frame(OP_BINARY, b"x", rsv=2), 1002),
    ("fragmented-ping", encode_frame(OP_PING, b"x", fin=False), 1002),
    ("ping-over-125", encode_frame(OP_PING, b"p" * 126), 1002),
    ("continuation-without-start", encode_frame(OP_CONT, b"x"), 1002),
    ("new-message-inside-fragmented", encode_frame(OP_TEXT, b"a", fin=False) + encode_frame(OP_TEXT, b"b"), 1002),
    ("close-1-byte-payload", encode_frame(OP_CLOSE, b"\x03"), 1002),
    ("close-code-1005", encode_frame(OP_CLOSE, close_payload(1005)), 1002),
    ("close-code-999", encode_frame(OP_CLOSE, close_payload(999)), 1002),
    ("close-code-2000", encode_frame(OP_CLOSE, close_payload(2000)), 1002),
    ("close-reason-invalid-utf8", encode_frame(OP_CLOSE, close_payload(1000, b"\xff\xfe")), 1007),
]


@pytest.mark.parametrize("data,code", [v[1:] for v in VIOLATIONS], ids=[v[0] for v in VIOLATIONS])
def test_protocol_violation_fails_the_connection(daemon, data, code):
    """The server sends a close frame with the RFC's code and closes TCP at once, without waiting for ours."""
    with RawWS(daemon.port, "/echo") as raw:
        start = time.monotonic()
        raw.send_raw(data)
        frame = raw.expect_close(timeout=2.0)
        assert frame.close_code == code, (frame.close_code, frame.close_reason)
        frame.close_reason.decode("utf-8")  # a valid reason
        assert raw.wait_eof(2.0), "TCP must be closed right after the close frame"
        assert time.monotonic() - start < 1.5
    if code != 1000:
        daemon.wait_for(event="protocol error", code=code)


def test_valid_messages_before_a_violation_are_still_answered(daemon):
    with RawWS(daemon.port, "/echo") as raw:
        raw.send_raw(encode_frame(OP_TEXT, b"first") + encode_frame(OP_TEXT, b"second")
                     + encode_frame(OP_TEXT, b"bad", mask=False))
        assert raw.recv_message() == (OP_TEXT, b"first")
        assert raw.recv_message() == (OP_TEXT, b"second")
        assert raw.expect_close().close_code == 1002
        assert raw.wait_eof(2.0)


def test_eof_without_close_frame_is_1006_in_the_log(daemon):
    raw = RawWS(daemon.port, "/broadcast/abrupt")
    raw.send_text("x")
    raw.close()
    record = daemon.wait_for(event="close", path="/broadcast/abrupt")
    assert record["code"] == 1006


# ================================================================================================= SIGHUP reload


def test_sighup_reloads_routes_and_keeps_connections(start_daemon, write_config):
    path = write_config("""
    [[routes]]
    path = "/echo"
    plugin = "echo"
    """)
    d = start_daemon(path, allow_errors=True)
    with connect(d.url("/echo")) as ws:
        path.write_text('[[routes]]\npath = "/echo2"\nplugin = "echo"\n')
        d.signal(signal.SIGHUP)
        d.wait_for(event="configuration reloaded")
        with connect(d.url("/echo2")) as ws2:
            ws2.send("new route")
            assert ws2.recv(timeout=TIMEOUT) == "new route"
        ws.send("old connection")
        assert ws.recv(timeout=TIMEOUT) == "old connection"

        path.write_text("[server]\nprot = 1\n")
        d.signal(signal.SIGHUP)
        failed = d.wait_for(event="reload failed; keeping the running configuration")
        assert "server.prot" in failed["error"]
        with connect(d.url("/echo2")) as ws2:
            ws2.send("still serving")
            assert ws2.recv(timeout=TIMEOUT) == "still serving"


# ================================================================================================= configuration & CLI


def _no_listening(proc) -> None:
    assert '"listening"' not in proc.stderr and "listening on" not in proc.stderr


@pytest.mark.parametrize(
    "toml,key",
    [
        ("[server]\nprot = 8000\n", "server.prot"),
        ("[limits]\nmax_mesage_size = 10\n", "limits.max_mesage_size"),
        ("[timeouts]\nhandshake = 0\n", "timeouts.handshake"),
        ("[server]\nbacklog = \"lots\"\n", "server.backlog"),
        ('[[routes]]\npath = "/x"\nplugin = "no_such_plugin_anywhere"\n', "routes[0].plugin"),
        ("this is not toml", "bad.toml:1:6: invalid TOML: "),  # FILE:LINE:COLUMN: (issue 16)
    ],
    ids=["unknown-key", "typo-key", "zero-timeout", "wrong-type", "unknown-plugin", "not-toml"],
)
def test_serve_with_a_bad_config_exits_2_naming_the_key(cli, write_config, toml, key):
    bad = write_config(toml, name="bad.toml")
    proc = cli("serve", "--port", "0", "--log-format", "json", "--config", str(bad))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"one line expected, got: {proc.stderr!r}"
    assert key in lines[0]
    assert "bad.toml" in lines[0]
    assert proc.stdout == ""
    _no_listening(proc)


def test_unknown_key_error_suggests_the_right_one(cli, write_config):
    bad = write_config("[server]\nprot = 8000\n")
    proc = cli("serve", "--port", "0", "--config", str(bad))
    assert proc.returncode == 2
    assert "did you mean 'server.port'" in proc.stderr


def test_serve_with_a_missing_config_file_exits_2(cli, tmp_path):
    proc = cli("serve", "--port", "0", "--config", str(tmp_path / "nope.toml"))
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    _no_listening(proc)


def test_bad_command_line_value_exits_2(cli):
    proc = cli("serve", "--port", "70000")
    assert proc.returncode == 2
    assert "server.port" in proc.stderr
    _no_listening(proc)


def test_port_in_use_exits_1(cli):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = cli("serve", "--host", "127.0.0.1", "--port", str(port), "--log-format", "json")
    assert proc.returncode == 1, proc.stderr
    assert "cannot listen" in proc.stderr


def test_check_config(cli, write_config):
    good = write_config("""
    [server]
    port = 9123
    [timeouts]
    handshake = 2.5
    [[routes]]
    path = "/boom"
    plugin = "plugins_for_tests:BoomPlugin"
    """)
    proc = cli("check-config", str(good))
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout and "9123" in proc.stdout and "/boom" in proc.stdout

    bad = write_config("[logging]\nlevel = \"loud\"\n")
    proc = cli("check-config", str(bad))
    assert proc.returncode == 2
    assert "logging.level" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_reference_config_is_valid(cli):
    from pathlib import Path

    reference = Path(__file__).resolve().parents[2] / "config" / "selectws.toml"
    proc = cli("check-config", str(reference))
    assert proc.returncode == 0, proc.stderr


def test_version(cli):
    import shutil
    import subprocess
    from pathlib import Path

    proc = cli("--version")
    assert proc.returncode == 0
    from selectws.protocol.frames import SPEEDUPS  # "C" or "off, pure Python (...)": the active masking

    assert proc.stdout.strip() == f"selectws, version {selectws.__version__} (speedups: {SPEEDUPS})"

    script = Path(sys.executable).with_name("selectws")
    exe = str(script) if script.exists() else shutil.which("selectws")
    assert exe, "the selectws console script is not installed"
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    assert out.stdout == proc.stdout
