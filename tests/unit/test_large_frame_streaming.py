"""Large frames received in streaming mode (connection.py ``_Large``): unmasked read by read into a buffer sized
from the header, instead of a growing input buffer and a copy to unmask at the end.

The reference is the same stream received in one piece (every frame complete in one call, so no streaming);
splitting it anywhere, through a reused and overwritten receive buffer, must give the same events and the same
output. Each test runs with the C masking and with the pure-Python masking (the functions the connection calls are
swapped for the test), so both paths of the stream are covered in one process.
"""

from __future__ import annotations

import random
import struct
import zlib
from collections.abc import Iterator

import pytest

from selectws.protocol import connection as connection_module
from selectws.protocol import frames
from selectws.protocol.connection import CLIENT, SERVER, Connection, State
from selectws.protocol.deflate import DeflateParams, PerMessageDeflate
from selectws.protocol.events import Closed, Event, Message, Ping

TEXT, BINARY, CONT, CLOSE, PING = 0x1, 0x2, 0x0, 0x8, 0x9
BIG = connection_module._STREAM_MIN  # the smallest frame that is streamed when it is incomplete


def xor(payload: bytes, mask: bytes) -> bytes:
    key = (mask * (len(payload) // 4 + 1))[: len(payload)]
    return bytes(a ^ b for a, b in zip(payload, key, strict=True))


def frame(opcode: int, payload: bytes, *, fin: bool = True, rsv1: bool = False, mask: bytes | None = b"") -> bytes:
    """A masked frame (as a client sends it; a random mask unless given), or unmasked with ``mask=None``."""
    first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    n = len(payload)
    bit = 0 if mask is None else 0x80
    if n < 126:
        head = bytes((first, bit | n))
    elif n < 65536:
        head = struct.pack("!BBH", first, bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, bit | 127, n)
    if mask is None:
        return head + payload
    mask = mask or random.Random(n).randbytes(4)
    return head + mask + xor(payload, mask)


@pytest.fixture(params=["c", "python"], autouse=True)
def masking(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The masking the connection's streaming uses: the C BytesPayload and mask_into, or their Python twins."""
    if request.param == "c":
        try:
            from selectws.protocol import _speedups
        except ImportError:
            pytest.skip("the C extension is not built")
        monkeypatch.setattr(frames, "mask_into", _speedups.mask_into)
        monkeypatch.setattr(connection_module, "BytesPayload", _speedups.BytesPayload)
    else:
        monkeypatch.setattr(frames, "mask_into", frames._py_mask_into)
        monkeypatch.setattr(connection_module, "BytesPayload", frames.PayloadBuffer)
    return str(request.param)


def splits(data: bytes, rng: random.Random, sizes: list[int]) -> Iterator[int]:
    pos = 0
    while pos < len(data):
        n = min(rng.choice(sizes), len(data) - pos)
        yield n
        pos += n


def feed(conn: Connection, data: bytes, sizes: Iterator[int]) -> list[Event]:
    """Feed ``data`` in pieces through one reused receive buffer, overwritten after every call (as the server
    does), handling held events as a driver must."""
    recv = bytearray(max(len(data), 1))
    view = memoryview(recv)
    events: list[Event] = []
    pos = 0
    for size in sizes:
        n = min(size, len(data) - pos)
        if n <= 0:
            break
        recv[:n] = data[pos : pos + n]
        events += conn.receive_data(view[:n])
        while conn.events_held:
            events += conn.receive_data(b"")
        recv[:n] = b"\xee" * n
        pos += n
    assert pos == len(data)
    return events


def reference(data: bytes, role: object = SERVER) -> tuple[list[Event], bytes]:
    conn = Connection(role, max_message_size=1 << 22)  # type: ignore[arg-type]
    events = conn.receive_data(data)
    while conn.events_held:
        events += conn.receive_data(b"")
    return events, conn.data_to_send()


def mixed_stream(rng: random.Random, *, masked: bool = True) -> bytes:
    """Small and large messages, text with multi-byte characters, fragmented messages with large fragments, and
    pings between the fragments."""
    m: bytes | None = b"" if masked else None
    text = ("ascii, é, €, 😀 " * 9000).encode()[: BIG * 3 + 5]
    text = text.decode("utf-8", "ignore").encode()
    parts = [
        frame(BINARY, b"small", mask=m),
        frame(BINARY, rng.randbytes(BIG), mask=m),
        frame(TEXT, text, mask=m),
        frame(BINARY, rng.randbytes(300_001), mask=m),
        frame(PING, b"between", mask=m),
        frame(BINARY, rng.randbytes(BIG + 1), fin=False, mask=m),
        frame(PING, b"inside a message", mask=m),
        frame(CONT, rng.randbytes(100), fin=False, mask=m),
        frame(CONT, rng.randbytes(70_000), mask=m),
        frame(TEXT, text[:1001], fin=False, mask=m),  # ends inside a character, continued in a large frame
        frame(CONT, text[1001:], fin=False, mask=m),
        frame(CONT, "end ✓".encode(), mask=m),
        frame(TEXT, b"short", mask=m),
        frame(BINARY, rng.randbytes(BIG - 1), mask=m),
        frame(BINARY, b"", mask=m),
    ]
    return b"".join(parts)


class TestSplitsGiveTheSameEvents:
    @pytest.mark.parametrize("seed", range(6))
    def test_random_splits(self, seed: int) -> None:
        rng = random.Random(seed)
        data = mixed_stream(rng)
        expected_events, expected_out = reference(data)
        assert len([e for e in expected_events if isinstance(e, Message)]) == 9
        conn = Connection(SERVER, max_message_size=1 << 22)
        sizes = [1, 2, 3, 5, 13, 100, 4096, 65536, 262144, 300_000]
        events = feed(conn, data, splits(data, rng, sizes))
        assert events == expected_events
        assert conn.data_to_send() == expected_out
        assert conn.state is State.OPEN

    @pytest.mark.parametrize("cut", range(0, 17))
    def test_split_inside_header_and_mask(self, cut: int) -> None:
        # A 10-byte header and a 4-byte mask: every cut before the payload, then the payload in 3 pieces.
        payload = random.Random(cut).randbytes(100_003)
        data = frame(BINARY, payload) + frame(BINARY, b"after")
        conn = Connection(SERVER)
        sizes = iter([cut, 40_000, 40_000, len(data)])
        events = feed(conn, data, (n for n, _ in _positions(sizes, len(data))))
        assert events == [Message(payload), Message(b"after")]

    def test_one_byte_at_a_time_at_the_boundaries(self) -> None:
        payload = random.Random(1).randbytes(BIG + 7)
        data = frame(BINARY, payload) + frame(TEXT, b"next") + frame(BINARY, payload)
        conn = Connection(SERVER)
        n = len(frame(BINARY, payload))
        sizes = [1] * 20 + [n - 40] + [1] * 40 + [len(data)]
        events = feed(conn, data, (s for s, _ in _positions(iter(sizes), len(data))))
        assert events == [Message(payload), Message("next"), Message(payload)]

    def test_client_role_unmasked_frames(self) -> None:
        rng = random.Random(4)
        data = mixed_stream(rng, masked=False)
        expected_events, _ = reference(data, CLIENT)
        conn = Connection(CLIENT, max_message_size=1 << 22)
        events = feed(conn, data, splits(data, rng, [7, 1000, 65536, 200_000]))
        assert events == expected_events

    def test_the_message_is_bytes_and_the_input_is_not_kept(self) -> None:
        payload = random.Random(2).randbytes(1 << 20)
        data = frame(BINARY, payload)
        conn = Connection(SERVER)
        events = feed(conn, data, splits(data, random.Random(0), [262144]))
        assert events == [Message(payload)]
        assert type(events[0].data) is bytes  # type: ignore[union-attr]
        assert conn._large is None and not conn._buf


class TestFailFastAndClose:
    def test_invalid_utf8_fails_before_the_frame_is_complete(self) -> None:
        text = b"a" * 50_000 + b"\xff" + b"b" * 50_000
        data = frame(TEXT, text)
        conn = Connection(SERVER)
        assert conn.receive_data(data[:40_000]) == []
        events = conn.receive_data(data[40_000:60_000])  # holds the bad byte; 40 KB are still to come
        assert len(events) == 1 and isinstance(events[0], Closed) and events[0].code == 1007
        assert conn.state is State.CLOSED
        assert conn.receive_data(data[60_000:]) == []

    def test_invalid_utf8_in_a_large_continuation(self) -> None:
        conn = Connection(SERVER)
        assert conn.receive_data(frame(TEXT, "😀".encode()[:2], fin=False)) == []
        data = frame(CONT, "😀".encode()[2:] + b"x" * 60_000 + b"\xc0\xaf" + b"y" * 10_000)
        assert conn.receive_data(data[:30_000]) == []
        events = conn.receive_data(data[30_000:62_000])
        assert [type(e) for e in events] == [Closed] and events[0].code == 1007  # type: ignore[union-attr]

    def test_a_character_split_across_reads_is_valid(self) -> None:
        text = ("€" * 40_000).encode()
        data = frame(TEXT, text)
        conn = Connection(SERVER, max_message_size=1 << 20)
        events = feed(conn, data, iter([1000, 1001, 1] + [3] * 10 + [len(data)]))
        assert events == [Message("€" * 40_000)]

    def test_close_after_a_large_message_in_the_same_read_is_held(self) -> None:
        payload = random.Random(3).randbytes(200_000)
        data = frame(BINARY, payload) + frame(CLOSE, struct.pack("!H", 1000))
        conn = Connection(SERVER)
        assert conn.receive_data(data[:100_000]) == []
        events = conn.receive_data(data[100_000:])
        assert events == [Message(payload)]
        assert conn.events_held and conn.state is State.OPEN  # our close reply waits for the echo
        conn.send_binary(b"echo")
        closed = conn.receive_data(b"")
        assert [type(e) for e in closed] == [Closed] and conn.state is State.CLOSED
        assert conn.data_to_send() == b"\x82\x04echo" + b"\x88\x02\x03\xe8"

    def test_fail_and_abort_drop_the_frame(self) -> None:
        data = frame(BINARY, bytes(100_000))
        conn = Connection(SERVER)
        conn.receive_data(data[:50_000])
        assert conn._large is not None
        conn.fail(1001, "going away")
        assert conn._large is None
        assert conn.receive_data(data[50_000:]) == []

    def test_a_violation_after_a_large_message_in_the_same_read(self) -> None:
        payload = bytes(range(256)) * 200
        data = frame(BINARY, payload) + bytes((0x83, 0x80)) + b"mask"  # reserved opcode 3
        conn = Connection(SERVER)
        conn.receive_data(data[:10_000])
        events = conn.receive_data(data[10_000:])
        assert events == [Message(payload)]
        assert conn.events_held
        closed = conn.receive_data(b"")
        assert [type(e) for e in closed] == [Closed] and closed[0].code == 1002  # type: ignore[union-attr]

    def test_limits_are_still_judged_from_the_header(self) -> None:
        conn = Connection(SERVER, max_message_size=BIG * 2)
        events = conn.receive_data(frame(BINARY, bytes(BIG * 2 + 1))[:1000])
        assert [type(e) for e in events] == [Closed] and events[0].code == 1009  # type: ignore[union-attr]
        assert conn._large is None

    def test_fragments_over_the_message_limit(self) -> None:
        conn = Connection(SERVER, max_message_size=BIG * 3)
        assert conn.receive_data(frame(BINARY, bytes(BIG * 2), fin=False)[:5000]) == []
        conn.receive_data(frame(BINARY, bytes(BIG * 2), fin=False)[5000:])
        events = conn.receive_data(frame(CONT, bytes(BIG * 2))[:1000])
        assert [type(e) for e in events] == [Closed] and events[0].code == 1009  # type: ignore[union-attr]


class TestCompressed:
    def test_a_large_compressed_message_in_pieces(self) -> None:
        rng = random.Random(8)
        message = rng.randbytes(50_000) + bytes(100_000)  # compresses to more than _STREAM_MIN
        comp = zlib.compressobj(wbits=-15)
        body = comp.compress(message) + comp.flush(zlib.Z_SYNC_FLUSH)
        assert body.endswith(b"\x00\x00\xff\xff") and len(body) - 4 > BIG
        data = frame(BINARY, body[:-4], rsv1=True) + frame(PING, b"p")
        ext = PerMessageDeflate(DeflateParams(False, False, 15, 15), is_server=True)
        conn = Connection(SERVER, extension=ext)
        events = feed(conn, data, splits(data, rng, [3, 5000, 20_000]))
        assert events == [Message(message), Ping(b"p")]


def _positions(sizes: Iterator[int], total: int) -> Iterator[tuple[int, int]]:
    """(size, position) for the given sizes, cut at ``total``; zero sizes are skipped."""
    pos = 0
    for n in sizes:
        n = min(n, total - pos)
        if n <= 0:
            continue
        yield n, pos
        pos += n
        if pos >= total:
            return
    if pos < total:
        yield total - pos, pos
