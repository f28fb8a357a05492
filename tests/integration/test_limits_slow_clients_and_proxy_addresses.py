"""Production hardening against the running daemon: slowloris, per-address and pending-handshake limits, the
origin allow-list, required subprotocols, a peer reset mid-frame, a subscriber that never reads during a large
broadcast, thousands of idle connections, and client addresses from trusted reverse proxies."""

from __future__ import annotations

import resource
import socket
import struct
import threading
import time

import pytest
import websockets.exceptions
from wstools import OP_BINARY, RawWS, connect, encode_frame, read_head, read_until_eof, upgrade_request, ws_key

KIB = 1024
MIB = 1024 * 1024


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * KIB
    raise AssertionError("no VmRSS")


def echo_ok(daemon, text: str = "still here", **kwargs) -> float:
    """Connect, echo one message, close; returns the seconds it took."""
    start = time.monotonic()
    with connect(daemon.url("/echo"), **kwargs) as ws:
        ws.send(text)
        assert ws.recv(timeout=5) == text
    return time.monotonic() - start


def refused_status(url: str, **kwargs) -> int:
    with pytest.raises(websockets.exceptions.InvalidStatus) as info:
        connect(url, **kwargs).close()
    return info.value.response.status_code


# ---------------------------------------------------------------------------------------------------------------
# slowloris


def test_slowloris_dribblers_are_cut_and_others_served(start_daemon) -> None:
    daemon = start_daemon("""
        [timeouts]
        handshake = 1
    """, extra_args=("--log-level", "debug"))  # a 408 is logged at debug (selectws/server/refusals.py)
    request = upgrade_request("/echo", key=ws_key())
    socks = []
    for _ in range(200):
        s = socket.create_connection((daemon.host, daemon.port), timeout=5)
        s.setblocking(False)
        socks.append(s)
    start = time.monotonic()
    closed_at: dict[int, float] = {}
    stop = threading.Event()

    def dribble() -> None:
        pos = 0
        while not stop.is_set() and len(closed_at) < len(socks) and time.monotonic() - start < 5:
            for i, s in enumerate(socks):
                if i in closed_at:
                    continue
                try:
                    data = s.recv(4096)
                except BlockingIOError:
                    try:
                        s.send(request[pos : pos + 1])
                    except OSError:
                        closed_at[i] = time.monotonic() - start
                    continue
                except OSError:
                    data = b""
                if not data or b"408" in data:
                    closed_at[i] = time.monotonic() - start
            pos = min(pos + 1, len(request) - 20)  # never complete the request
            time.sleep(0.1)

    thread = threading.Thread(target=dribble, daemon=True)
    thread.start()
    try:
        time.sleep(0.3)
        took = echo_ok(daemon)
        assert took < 0.5, f"a normal client took {took:.3f}s to connect and echo during the slowloris"
        thread.join(6)
    finally:
        stop.set()
        for s in socks:
            s.close()
    assert len(closed_at) == 200, f"only {len(closed_at)} of 200 dribblers were cut off"
    latest = max(closed_at.values())
    assert min(closed_at.values()) >= 0.9 and latest < 2.5, (min(closed_at.values()), latest)
    deadline = time.monotonic() + 3
    while len(daemon.logs(event="handshake refused", status=408)) < 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(daemon.logs(event="handshake refused", status=408)) == 200


# ---------------------------------------------------------------------------------------------------------------
# limits


def test_max_connections_per_ip(start_daemon) -> None:
    daemon = start_daemon("""
        [limits]
        max_connections_per_ip = 3
    """)
    conns = [connect(daemon.url("/echo")) for _ in range(3)]
    try:
        assert refused_status(daemon.url("/echo")) == 503
        daemon.wait_for(event="handshake refused", status=503, peer="127.0.0.1")
        conns.pop().close()
        conns.append(connect(daemon.url("/echo")))  # the slot was given back
        assert refused_status(daemon.url("/echo")) == 503
    finally:
        for ws in conns:
            ws.close()
    # every slot comes back: three again
    conns = [connect(daemon.url("/echo")) for _ in range(3)]
    for ws in conns:
        ws.close()


def test_max_pending_handshakes(start_daemon) -> None:
    daemon = start_daemon("""
        [limits]
        max_pending_handshakes = 5
        [timeouts]
        handshake = 3
    """)
    pending = [socket.create_connection((daemon.host, daemon.port), timeout=5) for _ in range(5)]
    time.sleep(0.3)  # accepted: five sockets in the handshake phase
    extra = [socket.create_connection((daemon.host, daemon.port), timeout=5) for _ in range(5)]
    try:
        for s in extra:
            data, eof = read_until_eof(s, 3.0)
            assert eof, "a connection over max_pending_handshakes was not closed"
            assert data == b"" or data.startswith(b"HTTP/1.1 503 "), data[:100]
        event = "too many pending handshakes; refusing new connections"
        first = daemon.wait_for(event=event)
        assert first["limit"] == 5 and first["pending"] == 5
        warnings = daemon.logs(event=event)
        assert len(warnings) == 1, warnings  # once per burst, not per connection
    finally:
        for s in pending + extra:
            s.close()
    time.sleep(0.3)
    echo_ok(daemon)


# ---------------------------------------------------------------------------------------------------------------
# per-route options


ROUTES_TOML = """
    [[routes]]
    path = "/echo"
    plugin = "echo"

    [[routes]]
    path = "/o"
    plugin = "echo"
    origins = ["https://good.example", "http://localhost:8080"]

    [[routes]]
    path = "/sp"
    plugin = "plugins_for_tests:ProtoPlugin"
    subprotocol_required = true

    [[routes]]
    path = "/sp-off"
    plugin = "plugins_for_tests:StrictProtoPlugin"
    subprotocol_required = false
"""


def test_origin_allow_list(start_daemon) -> None:
    daemon = start_daemon(ROUTES_TOML)
    for origin in ("https://good.example", "HTTPS://Good.Example", "http://localhost:8080"):
        with connect(daemon.url("/o"), origin=origin) as ws:
            ws.send("hi")
            assert ws.recv(timeout=5) == "hi"
    assert refused_status(daemon.url("/o"), origin="https://evil.example") == 403
    assert refused_status(daemon.url("/o"), origin="https://good.example:444") == 403
    assert refused_status(daemon.url("/o")) == 403  # no Origin at all
    daemon.wait_for(event="handshake refused", status=403, path="/o")
    with connect(daemon.url("/echo"), origin="https://evil.example"):  # routes without a list: any origin
        pass


def test_subprotocol_required_per_route(start_daemon) -> None:
    daemon = start_daemon(ROUTES_TOML)
    assert refused_status(daemon.url("/sp")) == 400
    assert refused_status(daemon.url("/sp"), subprotocols=["other"]) == 400
    with connect(daemon.url("/sp"), subprotocols=["chat.v1"]) as ws:
        assert ws.subprotocol == "chat.v1"
    with connect(daemon.url("/sp-off")) as ws:  # the route overrides the plugin's subprotocol_required = True
        assert ws.subprotocol is None


# ---------------------------------------------------------------------------------------------------------------
# peers that misbehave


def test_reset_mid_frame(start_daemon) -> None:
    daemon = start_daemon()
    raw = RawWS(daemon.port, "/echo")
    local_port = raw.sock.getsockname()[1]
    daemon.wait_for(event="open", port=local_port)
    frame = encode_frame(OP_BINARY, b"x" * 1000, mask=b"abcd")
    raw.send_raw(frame[:300])  # a partial frame
    raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.close()  # RST
    record = daemon.wait_for(lambda r: r.get("event") == "close" and r.get("code") == 1006, timeout=5)
    assert record["path"] == "/echo"
    for _ in range(3):
        echo_ok(daemon)


def test_never_reading_subscriber_during_large_broadcast(start_daemon) -> None:
    high, limit = 256 * KIB, 1 * MIB
    daemon = start_daemon(f"""
        [limits]
        write_buffer_high = {high}
        write_buffer_limit = {limit}
    """)
    n_readers, n_messages, size, window = 20, 300, 64 * KIB, 4
    readers = [connect(daemon.url("/broadcast/x"), max_size=None) for _ in range(n_readers)]
    counts = [0] * n_readers
    errors: list[BaseException] = []

    def read(i: int) -> None:
        try:
            while counts[i] < n_messages:
                message = readers[i].recv(timeout=20)
                assert len(message) == size and message[:4] == counts[i].to_bytes(4, "big")
                counts[i] += 1
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    sleeper = RawWS(daemon.port, "/broadcast/x", rcvbuf=4096)  # never reads a byte
    sleeper_port = sleeper.sock.getsockname()[1]
    publisher = connect(daemon.url("/broadcast/x"))
    sleeper_conn = daemon.wait_for(event="open", port=sleeper_port)["conn"]
    time.sleep(0.2)
    baseline = rss_bytes(daemon.proc.pid)
    peak = baseline
    threads = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(n_readers)]
    for t in threads:
        t.start()
    body = b"p" * (size - 4)
    start = time.monotonic()
    try:
        for i in range(n_messages):
            # the readers keep up (at most `window` messages in flight each): what piles up is the sleeper's
            deadline = time.monotonic() + 20
            while min(counts) < i - window and not errors:
                assert time.monotonic() < deadline, f"readers stalled at {min(counts)} of {i}"
                time.sleep(0.001)
            publisher.send(i.to_bytes(4, "big") + body)
            if i % 10 == 0:
                peak = max(peak, rss_bytes(daemon.proc.pid))
        for t in threads:
            t.join(20)
        elapsed = time.monotonic() - start
        peak = max(peak, rss_bytes(daemon.proc.pid))
    finally:
        for ws in [*readers, publisher]:
            ws.close()
        sleeper.close()
    # What the daemon may hold for this: the sleeper's queue (<= limit, never more), the readers' queues (a
    # window each), one 256 KiB read buffer worth of frames in flight, and allocator slack.
    bound = limit + n_readers * window * size + 256 * KIB + 4 * MIB
    growth = peak - baseline
    print(f"\nbroadcast {n_messages} x {size // KIB} KiB to {n_readers} readers + 1 sleeper in {elapsed:.2f}s: "
          f"RSS {baseline / MIB:.1f} MiB -> peak {peak / MIB:.1f} MiB (+{growth / MIB:.2f} MiB, bound "
          f"{bound / MIB:.2f} MiB); total broadcast {n_messages * size / MIB:.1f} MiB")
    assert not errors, errors[:3]
    assert counts == [n_messages] * n_readers
    dropped = daemon.wait_for(event="dropping a slow consumer", timeout=2)
    assert dropped["conn"] == sleeper_conn and dropped["buffered"] > limit and dropped["path"] == "/broadcast/x"
    daemon.wait_for(event="close", conn=sleeper_conn, code=1013, timeout=2)
    assert len(daemon.logs(event="dropping a slow consumer")) == 1  # the readers were never in danger
    assert growth < bound, f"RSS grew {growth / MIB:.1f} MiB, more than {bound / MIB:.1f} MiB"


def test_slow_consumer_reset_with_1008(start_daemon) -> None:
    daemon = start_daemon("""
        [limits]
        write_buffer_high = 65536
        write_buffer_limit = 262144
        slow_consumer_action = "reset"
        slow_consumer_close_code = 1008
    """)
    sleeper = RawWS(daemon.port, "/broadcast/y", rcvbuf=4096)
    conn = daemon.wait_for(event="open", port=sleeper.sock.getsockname()[1])["conn"]
    with connect(daemon.url("/broadcast/y")) as publisher:
        for _ in range(200):  # 12.5 MiB: far more than the kernel's buffers and the limit together
            publisher.send(b"z" * 65536)
            if daemon.logs(event="close", conn=conn):
                break
        record = daemon.wait_for(event="dropping a slow consumer", conn=conn)
        assert record["action"] == "reset" and record["code"] == 1008
        assert record["buffered"] > 262144
        daemon.wait_for(event="close", conn=conn, code=1008)
    with pytest.raises(OSError):  # reset: no close frame, no FIN
        while sleeper.sock.recv(65536):
            pass
    sleeper.close()


def test_idle_connections_are_cheap(start_daemon) -> None:
    n = 2000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n + 200:
        if hard < n + 200:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is too low for {n} connections")
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    daemon = start_daemon()
    echo_ok(daemon)  # warm up (imports, first allocations)
    time.sleep(0.2)
    before = rss_bytes(daemon.proc.pid)
    socks = []
    try:
        for _ in range(n):
            s = socket.create_connection((daemon.host, daemon.port), timeout=5)
            s.sendall(upgrade_request("/echo", key=ws_key()))
            socks.append(s)
        for s in socks:
            assert read_head(s, 5).status == 101
        time.sleep(0.3)
        after = rss_bytes(daemon.proc.pid)
        took = echo_ok(daemon)
        per_conn = (after - before) / n
        print(f"\n{n} idle connections: RSS +{(after - before) / MIB:.2f} MiB, {per_conn / KIB:.2f} KiB each; "
              f"echo beside them in {took * 1000:.1f} ms")
        assert took < 0.5
        assert per_conn < 4 * KIB
    finally:
        for s in socks:
            s.close()


# ---------------------------------------------------------------------------------------------------------------
# reverse proxy


def _upgrade_from(daemon, source: str, headers: list[tuple[str, str]]) -> tuple[socket.socket, int]:
    """An upgrade from local address ``source``; returns the socket and the status."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(5)
    s.bind((source, 0))
    s.connect((daemon.host, daemon.port))
    s.sendall(upgrade_request("/echo", key=ws_key(), extra=headers))
    return s, read_head(s, 5).status


def test_forwarded_headers_only_from_trusted_proxies(start_daemon) -> None:
    daemon = start_daemon("""
        [server]
        trusted_proxies = ["127.0.0.2", "10.0.0.0/8"]
        [limits]
        max_connections_per_ip = 2
    """)
    held = []
    try:
        # untrusted peer: the header is ignored, the TCP peer is the client
        s, status = _upgrade_from(daemon, "127.0.0.1", [("X-Forwarded-For", "203.0.113.1")])
        held.append(s)
        assert status == 101
        record = daemon.wait_for(event="open", port=s.getsockname()[1])
        assert record["peer"] == "127.0.0.1"
        assert not daemon.logs(event="open", peer="203.0.113.1")

        # trusted proxy: the rightmost address that is not a trusted proxy
        s, status = _upgrade_from(daemon, "127.0.0.2", [("X-Forwarded-For", "198.51.100.7, 203.0.113.2, 10.1.2.3")])
        held.append(s)
        assert status == 101
        daemon.wait_for(event="open", peer="203.0.113.2")

        # RFC 7239 wins over X-Forwarded-For
        s, status = _upgrade_from(daemon, "127.0.0.2", [("Forwarded", 'for="[2001:db8::1]:4711";proto=http'),
                                                        ("X-Forwarded-For", "203.0.113.99")])
        held.append(s)
        assert status == 101
        record = daemon.wait_for(event="open", peer="2001:db8::1")
        assert record["port"] == 4711

        # per-address limit on the forwarded address
        s, status = _upgrade_from(daemon, "127.0.0.2", [("X-Forwarded-For", "203.0.113.2")])
        held.append(s)
        assert status == 101
        s, status = _upgrade_from(daemon, "127.0.0.2", [("X-Forwarded-For", "203.0.113.2")])
        held.append(s)
        assert status == 503
        daemon.wait_for(event="handshake refused", status=503, peer="203.0.113.2")
        s, status = _upgrade_from(daemon, "127.0.0.2", [("X-Forwarded-For", "203.0.113.3")])
        held.append(s)
        assert status == 101
    finally:
        for s in held:
            s.close()
