"""Issue 12, defects 3 and 4, at the server layer: one connection's flood of tiny frames is parsed a bounded
number of frames per loop iteration (the others are served in between), a broadcast frame is queued, not copied,
on every recipient that cannot take it now, and a million-fragment message costs no list of a million pieces."""

from __future__ import annotations

import os
import socket
import time
import tracemalloc

import pytest
from harness import in_process_server

from selectws.protocol.connection import SERVER, Connection
from selectws.protocol.events import Message
from selectws.protocol.handshake import build_client_request, make_key
from selectws.server.connection import FRAMES_PER_TURN
from selectws.transport.loop import BATCH

MASK = b"\x11\x22\x33\x44"


def masked(first: int, payload: bytes) -> bytes:
    assert len(payload) < 126
    return bytes((first, 0x80 | len(payload))) + MASK + bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))


def drain(sock: socket.socket) -> bytes:
    out = bytearray()
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return bytes(out)
        if not chunk:
            return bytes(out)
        out += chunk


def sleeper(h, path: str) -> socket.socket:
    """A subscriber with a 4 KiB receive window that never reads after the handshake."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", h.port))
    sock.sendall(build_client_request("test", path, make_key()))
    sock.setblocking(False)
    head = bytearray()
    h.run_until(lambda: head.extend(drain(sock)) or b"\r\n\r\n" in head)
    assert head.startswith(b"HTTP/1.1 101")
    return sock


def test_receive_data_stops_at_max_frames_and_resumes_in_order() -> None:
    ws = Connection(SERVER, max_frames=100)
    data = b"".join(masked(0x82, i.to_bytes(2, "big")) for i in range(1000))
    events = ws.receive_data(data)
    assert len(events) == 100 and ws.input_pending
    got = [e.data for e in events]
    turns = 1
    while ws.input_pending:
        events = ws.receive_data(b"")
        assert len(events) <= 100
        got += [e.data for e in events]
        turns += 1
    assert turns == 10
    assert got == [i.to_bytes(2, "big") for i in range(1000)]


def test_a_flood_of_tiny_messages_is_served_a_turn_at_a_time() -> None:
    with in_process_server({"routes": [{"path": "/echo", "plugin": "echo"}]}) as h:
        flooder = h.connect("/echo")
        probe = h.connect("/echo")
        n = 20_000
        flooder.setblocking(True)
        flooder.sendall(masked(0x82, b"x") * n)  # 140 kB: one or two reads for the server
        flooder.setblocking(False)
        probe.sendall(masked(0x81, b"probe"))
        h.server.loop.run_once(0.5)
        # One iteration: the probe is answered, and the flooder got at most one turn's worth of echoes.
        first_turn = drain(flooder)
        assert drain(probe) == b"\x81\x05probe"
        assert 0 < len(first_turn) <= FRAMES_PER_TURN * 3
        echoed = bytearray(first_turn)
        h.run_until(lambda: echoed.extend(drain(flooder)) or len(echoed) >= n * 3)
        assert bytes(echoed) == b"\x82\x01x" * n  # every message, in order, none twice


def test_replies_leave_after_every_batch_of_reads_not_only_at_the_end_of_the_iteration() -> None:
    """2 * BATCH + 5 connections each send one message, all read in one iteration: the echoes of the first
    2 * BATCH are on their sockets before the iteration's end (after_batch), the last 5 leave at the end."""
    with in_process_server({"routes": [{"path": "/echo", "plugin": "echo"}]}) as h:
        clients = [h.connect("/echo") for _ in range(2 * BATCH + 5)]
        h.step(3)
        for i, sock in enumerate(clients):
            sock.sendall(masked(0x82, i.to_bytes(2, "big")))
        time.sleep(0.05)  # every message is in: one epoll_wait reports them all

        def answered() -> int:
            count = 0
            for sock in clients:
                try:
                    count += bool(sock.recv(16, socket.MSG_PEEK))
                except BlockingIOError:
                    pass
            return count

        seen_before_the_end: list[int] = []
        h.server.loop.end_of_iteration.insert(0, lambda: seen_before_the_end.append(answered()))
        h.server.loop.run_once(0.5)
        assert seen_before_the_end == [2 * BATCH]
        assert answered() == len(clients)
        assert [drain(sock) for sock in clients] == [b"\x82\x02" + i.to_bytes(2, "big") for i in range(len(clients))]


def test_a_ping_flood_is_answered_a_turn_at_a_time() -> None:
    with in_process_server({"routes": [{"path": "/echo", "plugin": "echo"}]}) as h:
        flooder = h.connect("/echo")
        probe = h.connect("/echo")
        n = 5_000
        flooder.setblocking(True)
        flooder.sendall(masked(0x89, b"ping") * n)
        flooder.setblocking(False)
        probe.sendall(masked(0x82, b"p"))
        h.server.loop.run_once(0.5)
        assert 0 < len(drain(flooder)) <= FRAMES_PER_TURN * 6
        assert drain(probe) == b"\x82\x01p"
        pongs = bytearray()
        h.run_until(lambda: pongs.extend(drain(flooder)) or len(pongs) >= (n - FRAMES_PER_TURN) * 6)


def test_a_broadcast_frame_is_shared_by_the_subscribers_that_do_not_read() -> None:
    """Ten subscribers that never read, 3 MiB broadcast: the daemon holds the 3 MiB about once, not ten times."""
    settings = {
        "routes": [{"path": "/broadcast/{channel}", "plugin": "broadcast"}],
        "limits": {"write_buffer_limit": 64 << 20, "max_buffered_total": 1 << 30},  # nobody is dropped here
    }
    with in_process_server(settings) as h:
        sleepers = [sleeper(h, "/broadcast/news") for _ in range(10)]
        publisher = h.connect("/broadcast/news")
        publisher.setblocking(True)
        size, n = 16 * 1024, 400
        body = os.urandom(size - 4)
        h.step(5)
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for i in range(n):
                payload = i.to_bytes(4, "big") + body
                header = bytes((0x82, 0x80 | 127)) + len(payload).to_bytes(8, "big") if len(payload) > 65535 else (
                    bytes((0x82, 0x80 | 126)) + len(payload).to_bytes(2, "big")
                )
                publisher.sendall(header + bytes(4) + payload)  # a zero mask: the payload goes as it is
                h.step(1)
            h.step(20)
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        stats = h.stats()
        published = n * size
        # Each of the ten is owed nearly all of it (the kernel took a little), so a copy per subscriber would be
        # ten times `published`; shared, the frames are held once (plus the publisher's own echo path: none).
        assert stats.write_buffer_bytes > 5 * published, stats.write_buffer_bytes
        assert held < 2 * published, f"held {held} bytes for {published} published"
        for sock in sleepers:
            sock.close()


@pytest.mark.slow
def test_a_million_one_byte_fragments_do_not_cost_a_list_of_a_million() -> None:
    n = 100_000
    read = 16 * 1024
    ws = Connection(SERVER, max_message_size=1 << 20, max_frames=FRAMES_PER_TURN)  # as the server drives it
    one = masked(0x00, b"a")
    data = masked(0x02, b"a") + one * (n - 2) + masked(0x80, b"a")
    tracemalloc.start()
    try:
        events = []
        for i in range(0, len(data), read):
            events += ws.receive_data(data[i : i + read])
            while ws.input_pending:
                events += ws.receive_data(b"")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(events) == 1 and isinstance(events[0], Message) and events[0].data == b"a" * n
    # The fragments' bytes (n), the finished message (n), a few reads of input and one turn's parse state (a
    # tuple and a mask key per frame): a list of n pieces alone would add 8 bytes a fragment (8 n, and more
    # while it grows).
    assert peak < 2 * n + 3 * read + FRAMES_PER_TURN * 256, peak


def test_a_slow_consumer_dropped_behind_a_long_queue_gets_a_well_formed_stream() -> None:
    """The close frame of a dropped slow consumer may only follow the whole queue: never a piece in the middle
    (the queue holds headers and payloads as separate pieces, and the first may be a partly sent payload)."""
    limit = 1 << 20
    settings = {
        "routes": [{"path": "/echo", "plugin": "echo"}],
        "limits": {"write_buffer_high": limit, "write_buffer_limit": limit},  # reads never pause: the cap trips
    }
    size = 3000  # each echo: a small header piece and a 3000-byte payload piece
    with in_process_server(settings) as h:
        client = sleeper(h, "/echo")
        message = bytes((0x82, 0x80 | 126)) + size.to_bytes(2, "big") + bytes(4) + bytes(range(256)) * 11 + bytes(184)
        assert len(message) == 8 + size
        for _ in range(3000):  # up to 9 MB of echoes for a client that reads nothing: the kernel takes a few MB,
            # then the queue passes the 1 MiB cap
            if h.stats().slow_consumers_dropped:
                break
            client.setblocking(True)
            client.sendall(message)
            client.setblocking(False)
            h.step(1)
        h.run_until(lambda: h.stats().slow_consumers_dropped == 1)
        h.step(5)
        data = bytearray()
        client.setblocking(True)
        client.settimeout(2.0)
        while True:
            try:
                chunk = client.recv(1 << 20)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            data += chunk
    # Parse: whole echo frames, then at most one close frame (1013), then nothing; a cut-off tail is allowed
    # (the socket may have been reset), a frame that is not an echo or a close in the middle of the stream is not.
    pos, closes = 0, 0
    while len(data) - pos >= 4:
        b0, b1 = data[pos], data[pos + 1]
        if b0 == 0x88:
            n = b1 & 0x7F
            assert data[pos + 2 : pos + 4] == (1013).to_bytes(2, "big"), bytes(data[pos : pos + 8])
            closes += 1
            pos += 2 + n
            assert pos >= len(data) or len(data) - pos == 0, "bytes after the close frame"
            break
        assert b0 == 0x82 and b1 == 126 and int.from_bytes(data[pos + 2 : pos + 4], "big") == size, (
            f"not a frame boundary at {pos}: {bytes(data[pos : pos + 8])!r}"
        )
        if len(data) - pos < 4 + size:
            break  # cut off by the reset
        assert data[pos + 4 : pos + 4 + size] == message[8:], f"payload of the frame at {pos} altered"
        pos += 4 + size
    assert closes <= 1
