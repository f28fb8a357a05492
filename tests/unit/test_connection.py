"""The sans-I/O connection state machine, driven with bytes alone and checked byte by byte.

Classes follow RFC 6455: masking (section 5.1), base framing (5.2), fragmentation (5.4), control frames (5.5),
UTF-8 of text messages (5.6 and 8.1), the closing handshake (7.1), close codes (7.4), then the limits, streaming
(arbitrary splits of the input, reused receive buffers) and the client role talking to the server role.

Frames are built here with a small independent encoder (``frame``) rather than the module under test, and every
mask is deterministic.
"""

from __future__ import annotations

import itertools
import random
import struct
from collections.abc import Callable, Iterator, Sequence

import pytest

from selectws.protocol.connection import CLIENT, SERVER, Connection, State
from selectws.protocol.deflate import DeflateParams, PerMessageDeflate
from selectws.protocol.events import Closed, Event, Message, Ping, Pong

MASK = b"\x37\xfa\x21\x3d"  # RFC 6455 section 5.7
MASKS = [b"\x01\x02\x03\x04", b"\xa0\xb1\xc2\xd3", b"\x00\x00\x00\x00", b"\xff\xfe\xfd\xfc"]

TEXT, BINARY, CONT, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA
RSV1, RSV2, RSV3 = 0x40, 0x20, 0x10


def xor(payload: bytes, mask: bytes) -> bytes:
    """Masking by the RFC's definition, independent of ``mask_payload``."""
    if not payload:
        return b""
    key = (mask * (len(payload) // 4 + 1))[: len(payload)]
    return bytes(a ^ b for a, b in zip(payload, key, strict=True))


def header(first: int, length: int, masked: bool) -> bytes:
    bit = 0x80 if masked else 0
    if length < 126:
        return bytes((first, bit | length))
    if length < 65536:
        return struct.pack("!BBH", first, bit | 126, length)
    return struct.pack("!BBQ", first, bit | 127, length)


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0, mask: bytes | None = MASK) -> bytes:
    """One frame; masked (as a client sends it) unless ``mask`` is None (as a server sends it)."""
    first = (0x80 if fin else 0) | rsv | opcode
    if mask is None:
        return header(first, len(payload), False) + payload
    return header(first, len(payload), True) + mask + xor(payload, mask)


def sframe(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0) -> bytes:
    """A frame as a server sends it: unmasked."""
    return frame(opcode, payload, fin=fin, rsv=rsv, mask=None)


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


def cycling(masks: Sequence[bytes]) -> Callable[[], bytes]:
    it: Iterator[bytes] = itertools.cycle(masks)
    return lambda: next(it)


def server(**kwargs: object) -> Connection:
    return Connection(SERVER, **kwargs)  # type: ignore[arg-type]


def client(masks: Sequence[bytes] = (MASK,), **kwargs: object) -> Connection:
    return Connection(CLIENT, mask_source=cycling(masks), **kwargs)  # type: ignore[arg-type]


def unmask_frames(data: bytes) -> list[tuple[int, bytes, bytes | None]]:
    """Split ``data`` into (first byte, payload, mask or None) triples, checking every length field."""
    out: list[tuple[int, bytes, bytes | None]] = []
    pos = 0
    while pos < len(data):
        b0, b1 = data[pos], data[pos + 1]
        n = b1 & 0x7F
        pos += 2
        if n == 126:
            n = struct.unpack_from("!H", data, pos)[0]
            pos += 2
        elif n == 127:
            n = struct.unpack_from("!Q", data, pos)[0]
            pos += 8
        mask = None
        if b1 & 0x80:
            mask = data[pos : pos + 4]
            pos += 4
        payload = data[pos : pos + n]
        assert len(payload) == n
        pos += n
        out.append((b0, xor(payload, mask) if mask else payload, mask))
    return out


def receive_all(conn: Connection, data: bytes) -> list[Event]:
    """``receive_data`` as a driver calls it: then ``receive_data(b"")`` while events are held back."""
    events = conn.receive_data(data)
    while conn.events_held:
        events += conn.receive_data(b"")
    return events


def assert_failed(conn: Connection, events: list[Event], code: int, *, frame_sent: bool = True) -> Closed:
    """The connection was failed (section 7.1.7) with ``code``: last event, state, and the close frame on the wire."""
    assert events, "no events"
    closed = events[-1]
    assert isinstance(closed, Closed), events
    assert closed.code == code, closed
    assert closed.by_peer is False
    assert closed.error is not None
    assert closed.error == closed.reason
    # When good frames came before the violation in the same batch, the failure is completed by data_to_send()
    # (so that answers to those frames go out first); take the output before looking at the state.
    out = conn.data_to_send()
    assert conn.state is State.CLOSED
    assert conn.close_transport is True
    if frame_sent:
        expected_payload = struct.pack("!H", code) + closed.reason.encode()[:123]
        if conn.role is SERVER:
            assert out == b"\x88" + bytes((len(expected_payload),)) + expected_payload
        else:
            frames = unmask_frames(out)
            assert len(frames) == 1
            assert frames[0][0] == 0x88
            assert frames[0][1] == expected_payload
            assert frames[0][2] is not None
        assert conn.close_code == code
    else:
        assert out == b""
    # Nothing more is ever parsed.
    assert conn.receive_data(frame(TEXT, b"late")) == []
    assert conn.receive_data(sframe(TEXT, b"late")) == []
    assert conn.data_to_send() == b""
    return closed


class FakeExtension:
    """A stand-in for permessage-deflate: "compression" reverses the bytes, so its use is visible."""

    def __init__(self, threshold: int = 0) -> None:
        self.threshold = threshold
        self.decompressed: list[tuple[bytes, int]] = []
        self.compressed: list[bytes] = []

    def decompress(self, payload: bytes, max_size: int) -> bytes:
        self.decompressed.append((payload, max_size))
        return payload[::-1]

    def compress(self, payload: bytes) -> bytes:
        self.compressed.append(payload)
        return payload[::-1]

    def should_compress(self, size: int) -> bool:
        return size >= self.threshold


# ====================================================================== section 5.1


class TestSection5_1Masking:
    def test_server_accepts_masked_frame_rfc_example(self) -> None:
        conn = server()
        data = bytes([0x81, 0x85, 0x37, 0xFA, 0x21, 0x3D, 0x7F, 0x9F, 0x4D, 0x51, 0x58])
        assert conn.receive_data(data) == [Message("Hello")]
        assert conn.data_to_send() == b""
        assert conn.state is State.OPEN

    @pytest.mark.parametrize(
        "data",
        [sframe(TEXT, b"Hello"), sframe(BINARY, b"\x00"), sframe(PING, b"p"), sframe(CLOSE, close_payload(1000))],
    )
    def test_server_refuses_unmasked(self, data: bytes) -> None:
        conn = server()
        events = conn.receive_data(data)
        assert len(events) == 1
        assert_failed(conn, events, 1002)

    def test_unmasked_ping_gets_no_pong(self) -> None:
        conn = server()
        conn.receive_data(sframe(PING, b"abc"))
        assert conn.data_to_send() == b"\x88\x1e\x03\xeaunmasked frame from a client"

    def test_unmasked_frame_after_good_ones(self) -> None:
        conn = server()
        events = receive_all(conn, frame(TEXT, b"ok") + sframe(TEXT, b"bad"))
        assert events[0] == Message("ok")
        assert len(events) == 2
        assert_failed(conn, events, 1002)

    @pytest.mark.parametrize("data", [frame(TEXT, b"Hello"), frame(PING, b""), frame(CLOSE, close_payload(1000))])
    def test_client_refuses_masked(self, data: bytes) -> None:
        conn = client([b"\x11\x22\x33\x44"])
        events = conn.receive_data(data)
        assert len(events) == 1
        assert_failed(conn, events, 1002)

    def test_client_close_frame_on_failure_is_masked_with_injected_mask(self) -> None:
        conn = client([b"\x11\x22\x33\x44"])
        events = conn.receive_data(frame(TEXT, b"x"))
        reason = events[0].reason.encode()  # type: ignore[union-attr]
        payload = b"\x03\xea" + reason
        assert conn.data_to_send() == b"\x88" + bytes((0x80 | len(payload),)) + b"\x11\x22\x33\x44" + xor(
            payload, b"\x11\x22\x33\x44"
        )

    def test_client_masks_rfc_example(self) -> None:
        conn = client([MASK])
        assert conn.send_text("Hello") is True
        assert conn.data_to_send() == bytes([0x81, 0x85, 0x37, 0xFA, 0x21, 0x3D, 0x7F, 0x9F, 0x4D, 0x51, 0x58])

    def test_client_masks_every_frame_with_successive_masks(self) -> None:
        conn = client(MASKS)
        assert conn.send_text("héllo")
        assert conn.send_binary(b"\x00\x01\x02\x03\x04")
        assert conn.send_ping(b"pi")
        assert conn.send_pong(b"po")
        assert conn.send_fragment(TEXT, b"frag", False)
        assert conn.send_fragment(CONT, b"", True)
        assert conn.close(1000, "bye")
        expected = (
            frame(TEXT, "héllo".encode(), mask=MASKS[0])
            + frame(BINARY, b"\x00\x01\x02\x03\x04", mask=MASKS[1])
            + frame(PING, b"pi", mask=MASKS[2])
            + frame(PONG, b"po", mask=MASKS[3])
            + frame(TEXT, b"frag", fin=False, mask=MASKS[0])
            + frame(CONT, b"", mask=MASKS[1])
            + frame(CLOSE, b"\x03\xe8bye", mask=MASKS[2])
        )
        assert conn.data_to_send() == expected

    def test_client_pong_reply_is_masked(self) -> None:
        conn = client([b"\x0a\x0b\x0c\x0d"])
        assert conn.receive_data(sframe(PING, b"hey")) == [Ping(b"hey")]
        assert conn.data_to_send() == frame(PONG, b"hey", mask=b"\x0a\x0b\x0c\x0d")

    @pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536])
    def test_client_length_forms_masked(self, size: int) -> None:
        conn = client([b"\x5a\xa5\x0f\xf0"])
        payload = bytes(i % 251 for i in range(size))
        conn.send_binary(payload)
        assert conn.data_to_send() == frame(BINARY, payload, mask=b"\x5a\xa5\x0f\xf0")

    def test_client_default_mask_source_is_random_and_valid(self) -> None:
        conn = Connection(CLIENT)
        for _ in range(3):
            conn.send_text("same")
        frames = unmask_frames(conn.data_to_send())
        assert [f[1] for f in frames] == [b"same"] * 3
        assert all(f[2] is not None and len(f[2]) == 4 for f in frames)

    def test_server_sends_unmasked(self) -> None:
        conn = server()
        conn.send_text("Hello")
        conn.send_binary(b"\x01\x02")
        conn.send_ping(b"")
        assert conn.data_to_send() == b"\x81\x05Hello\x82\x02\x01\x02\x89\x00"


# ====================================================================== section 5.2


class TestSection5_2BaseFraming:
    @pytest.mark.parametrize("rsv", [RSV1, RSV2, RSV3, RSV1 | RSV2, RSV2 | RSV3, RSV1 | RSV2 | RSV3])
    @pytest.mark.parametrize("opcode", [TEXT, BINARY, PING, PONG, CLOSE])
    def test_rsv_without_extension(self, rsv: int, opcode: int) -> None:
        conn = server()
        payload = close_payload(1000) if opcode == CLOSE else b"x"
        events = conn.receive_data(frame(opcode, payload, rsv=rsv))
        assert len(events) == 1
        assert_failed(conn, events, 1002)

    def test_rsv1_on_continuation_without_extension(self) -> None:
        conn = server()
        assert conn.receive_data(frame(TEXT, b"a", fin=False)) == []
        assert_failed(conn, conn.receive_data(frame(CONT, b"b", rsv=RSV1)), 1002)

    def test_rsv1_with_extension_whole_message(self) -> None:
        ext = FakeExtension()
        conn = server(extension=ext, max_message_size=1000)
        assert conn.receive_data(frame(TEXT, b"olleh", rsv=RSV1)) == [Message("hello")]
        assert conn.receive_data(frame(BINARY, b"\x01\x02", rsv=RSV1)) == [Message(b"\x02\x01")]
        assert ext.decompressed == [(b"olleh", 1000), (b"\x01\x02", 1000)]
        assert conn.state is State.OPEN

    def test_uncompressed_message_with_extension_skips_decompress(self) -> None:
        ext = FakeExtension()
        conn = server(extension=ext)
        assert conn.receive_data(frame(TEXT, b"plain")) == [Message("plain")]
        assert conn.receive_data(frame(TEXT, b"pl", fin=False) + frame(CONT, b"ain")) == [Message("plain")]
        assert ext.decompressed == []

    def test_rsv1_with_extension_fragmented(self) -> None:
        ext = FakeExtension()
        conn = server(extension=ext)
        assert conn.receive_data(frame(TEXT, b"dl", fin=False, rsv=RSV1)) == []
        assert conn.receive_data(frame(PING, b"p")) == [Ping(b"p")]
        assert conn.receive_data(frame(CONT, b"ro", fin=False)) == []
        assert conn.receive_data(frame(CONT, b"w")) == [Message("world")]
        assert ext.decompressed == [(b"dlrow", 1 << 20)]

    def test_compressed_text_invalid_utf8_after_decompression(self) -> None:
        conn = server(extension=FakeExtension())
        events = conn.receive_data(frame(TEXT, b"\xffa", rsv=RSV1))
        assert_failed(conn, events, 1007)

    @pytest.mark.parametrize("rsv", [RSV2, RSV3, RSV1 | RSV2, RSV1 | RSV3])
    def test_other_rsv_bits_with_extension(self, rsv: int) -> None:
        ext = FakeExtension()
        conn = server(extension=ext)
        assert_failed(conn, conn.receive_data(frame(TEXT, b"x", rsv=rsv)), 1002)
        assert ext.decompressed == []

    def test_rsv1_on_continuation_with_extension(self) -> None:
        conn = server(extension=FakeExtension())
        assert conn.receive_data(frame(TEXT, b"a", fin=False, rsv=RSV1)) == []
        assert_failed(conn, conn.receive_data(frame(CONT, b"b", rsv=RSV1)), 1002)

    @pytest.mark.parametrize("opcode", [PING, PONG, CLOSE])
    def test_rsv1_on_control_with_extension(self, opcode: int) -> None:
        conn = server(extension=FakeExtension())
        payload = close_payload(1000) if opcode == CLOSE else b""
        assert_failed(conn, conn.receive_data(frame(opcode, payload, rsv=RSV1)), 1002)

    def test_sending_with_extension(self) -> None:
        ext = FakeExtension(threshold=4)
        conn = server(extension=ext)
        conn.send_text("abcd")
        conn.send_text("abc")
        conn.send_binary(b"\x01\x02\x03\x04\x05")
        conn.send_fragment(TEXT, b"never", True)
        assert conn.data_to_send() == b"\xc1\x04dcba" + b"\x81\x03abc" + b"\xc2\x05\x05\x04\x03\x02\x01\x81\x05never"
        assert ext.compressed == [b"abcd", b"\x01\x02\x03\x04\x05"]

    @pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])
    @pytest.mark.parametrize("fin", [True, False])
    def test_reserved_opcodes(self, opcode: int, fin: bool) -> None:
        conn = server()
        events = conn.receive_data(frame(opcode, b"", fin=fin))
        assert len(events) == 1
        assert_failed(conn, events, 1002)

    @pytest.mark.parametrize("opcode", [3, 0xB])
    def test_reserved_opcode_during_fragmented_message(self, opcode: int) -> None:
        conn = server()
        assert conn.receive_data(frame(TEXT, b"a", fin=False)) == []
        assert_failed(conn, conn.receive_data(frame(opcode, b"")), 1002)

    def test_reserved_opcode_client_role(self) -> None:
        conn = client()
        assert_failed(conn, conn.receive_data(sframe(0xB, b"")), 1002)

    def test_64_bit_length_with_high_bit_server(self) -> None:
        conn = server(max_message_size=2**64)
        events = conn.receive_data(b"\x82\xff" + struct.pack("!Q", 2**63))
        assert len(events) == 1
        assert_failed(conn, events, 1002)

    def test_64_bit_length_with_high_bit_client(self) -> None:
        conn = client(max_message_size=2**64)
        events = conn.receive_data(b"\x82\x7f\xff\xff\xff\xff\xff\xff\xff\xff")
        assert_failed(conn, events, 1002)

    def test_64_bit_length_incomplete_waits(self) -> None:
        conn = server()
        assert conn.receive_data(b"\x82\xff\x80\x00\x00") == []
        assert conn.state is State.OPEN
        assert_failed(conn, conn.receive_data(b"\x00\x00\x00\x00\x00"), 1002)

    @pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
    def test_length_boundaries(self, size: int) -> None:
        payload = bytes(i % 253 for i in range(size))
        conn = server()
        assert conn.receive_data(frame(BINARY, payload, mask=b"\x9a\x1b\x00\xe7")) == [Message(payload)]
        conn = client()
        assert conn.receive_data(sframe(BINARY, payload)) == [Message(payload)]

    def test_text_and_binary_types(self) -> None:
        conn = server()
        events = conn.receive_data(frame(TEXT, b"") + frame(BINARY, b"") + frame(TEXT, b"1") + frame(BINARY, b"1"))
        assert events == [Message(""), Message(b""), Message("1"), Message(b"1")]
        assert [type(e.data) for e in events] == [str, bytes, str, bytes]  # type: ignore[union-attr]

    def test_header_split_byte_by_byte(self) -> None:
        data = frame(BINARY, b"z" * 300)
        conn = server()
        for i in range(len(data) - 1):
            assert conn.receive_data(data[i : i + 1]) == []
        assert conn.receive_data(data[-1:]) == [Message(b"z" * 300)]

    def test_server_frame_lengths_and_pending_output(self) -> None:
        conn = server()
        total = 0
        for size in (0, 125, 126, 65535, 65536):
            conn.send_binary(b"\x07" * size)
            total += len(header(0x82, size, False)) + size
            assert conn.pending_output == total
        out = conn.data_to_send()
        assert len(out) == total
        assert conn.pending_output == 0
        assert [(b0, len(p)) for b0, p, _ in unmask_frames(out)] == [(0x82, s) for s in (0, 125, 126, 65535, 65536)]
        assert out[:2] == b"\x82\x00"
        assert out[2:4] == b"\x82\x7d"
        assert out[4 + 125 : 4 + 125 + 4] == b"\x82\x7e\x00\x7e"

    def test_data_to_send_empty(self) -> None:
        conn = server()
        assert conn.data_to_send() == b""
        conn.send_text("a")
        assert conn.data_to_send() == b"\x81\x01a"
        assert conn.data_to_send() == b""

    def test_send_frame_bytes(self) -> None:
        conn = server()
        assert conn.send_frame_bytes(b"\x81\x02hi") is True
        assert conn.pending_output == 4
        assert conn.data_to_send() == b"\x81\x02hi"
        assert client().send_frame_bytes(b"\x81\x02hi") is False


# ====================================================================== section 5.4


def fragments(opcode: int, payload: bytes, cuts: Sequence[int], mask: bytes | None = MASK) -> list[bytes]:
    """``payload`` as a fragmented message cut at the offsets ``cuts``."""
    bounds = [0, *cuts, len(payload)]
    pieces = [payload[a:b] for a, b in itertools.pairwise(bounds)]
    out = []
    for i, piece in enumerate(pieces):
        out.append(frame(opcode if i == 0 else CONT, piece, fin=i == len(pieces) - 1, mask=mask))
    return out


class TestSection5_4Fragmentation:
    @pytest.mark.parametrize("n", range(2, 9))
    def test_text_in_n_pieces(self, n: int) -> None:
        text = "fragmented text message, élan € 😀"
        raw = text.encode()
        cuts = [len(raw) * i // n for i in range(1, n)]
        conn = server()
        frames = fragments(TEXT, raw, cuts)
        assert len(frames) == n
        for f in frames[:-1]:
            assert conn.receive_data(f) == []
        assert conn.receive_data(frames[-1]) == [Message(text)]
        assert conn.data_to_send() == b""

    @pytest.mark.parametrize("n", [2, 3, 10, 100])
    def test_binary_in_n_pieces(self, n: int) -> None:
        payload = bytes(range(200))
        cuts = [len(payload) * i // n for i in range(1, n)]
        conn = server()
        assert conn.receive_data(b"".join(fragments(BINARY, payload, cuts))) == [Message(payload)]

    def test_client_role_fragments(self) -> None:
        conn = client()
        data = b"".join(fragments(TEXT, b"abcdef", [2, 4], mask=None))
        assert conn.receive_data(data) == [Message("abcdef")]

    def test_ping_interleaved(self) -> None:
        conn = server()
        data = (
            frame(TEXT, b"Hel", fin=False)
            + frame(PING, b"p1")
            + frame(CONT, b"l", fin=False)
            + frame(PING, b"")
            + frame(PONG, b"q")
            + frame(CONT, b"o")
        )
        assert conn.receive_data(data) == [Ping(b"p1"), Ping(b""), Pong(b"q"), Message("Hello")]
        assert conn.data_to_send() == b"\x8a\x02p1\x8a\x00"

    def test_close_interleaved(self) -> None:
        conn = server()
        data = frame(BINARY, b"ab", fin=False) + frame(CLOSE, close_payload(1001)) + frame(CONT, b"cd")
        assert conn.receive_data(data) == [Closed(1001, "", by_peer=True)]
        assert conn.data_to_send() == b"\x88\x02\x03\xe9"

    @pytest.mark.parametrize("opcode", [TEXT, BINARY])
    def test_continuation_without_start(self, opcode: int) -> None:
        conn = server()
        assert_failed(conn, conn.receive_data(frame(CONT, b"x")), 1002)
        conn = server()
        assert_failed(conn, conn.receive_data(frame(CONT, b"x", fin=False)), 1002)

    def test_continuation_after_finished_message(self) -> None:
        conn = server()
        events = receive_all(conn, frame(TEXT, b"a", fin=False) + frame(CONT, b"b") + frame(CONT, b"c"))
        assert events[0] == Message("ab")
        assert len(events) == 2
        assert_failed(conn, events, 1002)

    @pytest.mark.parametrize(("first", "second"), [(TEXT, TEXT), (TEXT, BINARY), (BINARY, TEXT), (BINARY, BINARY)])
    @pytest.mark.parametrize("fin", [True, False])
    def test_new_data_frame_during_fragmented_message(self, first: int, second: int, fin: bool) -> None:
        conn = server()
        assert conn.receive_data(frame(first, b"a", fin=False)) == []
        assert_failed(conn, conn.receive_data(frame(second, b"b", fin=fin)), 1002)

    def test_empty_fragments(self) -> None:
        conn = server()
        data = frame(TEXT, b"", fin=False) + frame(CONT, b"", fin=False) + frame(CONT, b"abc", fin=False)
        data += frame(CONT, b"")
        assert conn.receive_data(data) == [Message("abc")]
        assert conn.receive_data(frame(BINARY, b"", fin=False) + frame(CONT, b"")) == [Message(b"")]
        assert conn.receive_data(frame(TEXT, b"", fin=False) + frame(CONT, b"")) == [Message("")]

    def test_sequential_fragmented_messages(self) -> None:
        conn = server()
        data = b"".join(fragments(TEXT, b"first", [1])) + b"".join(fragments(BINARY, b"second", [3, 4]))
        assert conn.receive_data(data) == [Message("first"), Message(b"second")]

    def test_whole_message_after_fragmented_one(self) -> None:
        conn = server()
        data = b"".join(fragments(TEXT, b"ab", [1])) + frame(TEXT, b"c") + frame(BINARY, b"d")
        assert conn.receive_data(data) == [Message("ab"), Message("c"), Message(b"d")]

    def test_send_fragment(self) -> None:
        conn = server()
        assert conn.send_fragment(TEXT, b"Hel", False)
        assert conn.send_fragment(CONT, b"lo", True)
        assert conn.data_to_send() == bytes([0x01, 0x03, 0x48, 0x65, 0x6C, 0x80, 0x02, 0x6C, 0x6F])


# ====================================================================== section 5.5


class TestSection5_5Control:
    @pytest.mark.parametrize("opcode", [PING, PONG, CLOSE])
    @pytest.mark.parametrize("size", [126, 127, 65536])
    def test_control_over_125(self, opcode: int, size: int) -> None:
        conn = server()
        data = frame(opcode, b"\x03\xe8" + b"r" * (size - 2))
        head = data[: 2 + (2 if size < 65536 else 8)]
        # The header alone is enough to refuse it.
        events = conn.receive_data(head)
        assert len(events) == 1
        assert_failed(conn, events, 1002)

    @pytest.mark.parametrize("opcode", [PING, PONG])
    def test_control_of_125(self, opcode: int) -> None:
        conn = server()
        payload = bytes(range(125))
        events = conn.receive_data(frame(opcode, payload))
        assert events == [Ping(payload) if opcode == PING else Pong(payload)]
        assert conn.data_to_send() == (b"\x8a\x7d" + payload if opcode == PING else b"")

    @pytest.mark.parametrize("opcode", [PING, PONG, CLOSE])
    def test_fragmented_control(self, opcode: int) -> None:
        conn = server()
        payload = close_payload(1000) if opcode == CLOSE else b"x"
        assert_failed(conn, conn.receive_data(frame(opcode, payload, fin=False)), 1002)

    def test_fragmented_ping_inside_fragmented_message(self) -> None:
        conn = server()
        assert conn.receive_data(frame(TEXT, b"a", fin=False)) == []
        assert_failed(conn, conn.receive_data(frame(PING, b"x", fin=False)), 1002)

    @pytest.mark.parametrize("payload", [b"", b"Hello", b"\x00\xff\x80", bytes(range(125))])
    def test_ping_answered_with_identical_pong(self, payload: bytes) -> None:
        conn = server()
        assert conn.receive_data(frame(PING, payload)) == [Ping(payload)]
        assert conn.data_to_send() == b"\x8a" + bytes((len(payload),)) + payload
        assert conn.state is State.OPEN

    def test_rfc_ping_hello(self) -> None:
        conn = server()
        assert conn.receive_data(frame(PING, b"Hello")) == [Ping(b"Hello")]
        assert conn.data_to_send() == bytes([0x8A, 0x05, 0x48, 0x65, 0x6C, 0x6C, 0x6F])

    def test_several_pings_answered_in_order(self) -> None:
        conn = server()
        events = conn.receive_data(frame(PING, b"1") + frame(TEXT, b"t") + frame(PING, b"22"))
        assert events == [Ping(b"1"), Message("t"), Ping(b"22")]
        assert conn.data_to_send() == b"\x8a\x011\x8a\x0222"

    def test_unsolicited_pong(self) -> None:
        conn = server()
        assert conn.receive_data(frame(PONG, b"unasked")) == [Pong(b"unasked")]
        assert conn.data_to_send() == b""
        assert conn.state is State.OPEN

    def test_send_ping_and_pong(self) -> None:
        conn = server()
        assert conn.send_ping(b"k")
        assert conn.send_pong(b"")
        assert conn.send_ping(b"x" * 125)
        assert conn.data_to_send() == b"\x89\x01k\x8a\x00\x89\x7d" + b"x" * 125

    @pytest.mark.parametrize("method", ["send_ping", "send_pong"])
    def test_send_control_over_125_refused(self, method: str) -> None:
        conn = server()
        with pytest.raises(ValueError):
            getattr(conn, method)(b"x" * 126)
        assert conn.data_to_send() == b""


# ====================================================================== section 5.6 / 8.1

INVALID_UTF8 = [
    pytest.param(b"\xff", id="ff"),
    pytest.param(b"\xfe", id="fe"),
    pytest.param(b"\x80", id="lone-continuation"),
    pytest.param(b"\xc0\x80", id="overlong-2-nul"),
    pytest.param(b"\xc1\xbf", id="overlong-2"),
    pytest.param(b"\xe0\x80\x80", id="overlong-3"),
    pytest.param(b"\xe0\x9f\xbf", id="overlong-3-max"),
    pytest.param(b"\xf0\x80\x80\x80", id="overlong-4"),
    pytest.param(b"\xf0\x8f\xbf\xbf", id="overlong-4-max"),
    pytest.param(b"\xed\xa0\x80", id="surrogate-d800"),
    pytest.param(b"\xed\xbf\xbf", id="surrogate-dfff"),
    pytest.param(b"\xed\xa0\x80\xed\xb0\x80", id="surrogate-pair"),
    pytest.param(b"\xf4\x90\x80\x80", id="above-10ffff"),
    pytest.param(b"\xf5\x80\x80\x80", id="f5"),
    pytest.param(b"\xf8\x88\x80\x80\x80", id="5-byte"),
    pytest.param(b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited", id="autobahn-6.3"),
    pytest.param(b"ab\xe2\x82", id="truncated-end"),
    pytest.param(b"\xe2\x82x", id="truncated-middle"),
]


class TestSection5_6Utf8:
    def test_valid_multibyte_single_frame(self) -> None:
        text = "κόσμε ¢ € 𐍈 😀 \U0010ffff \ud7ff \ue000"
        conn = server()
        assert conn.receive_data(frame(TEXT, text.encode())) == [Message(text)]

    @pytest.mark.parametrize("text", ["a😀b", "😀", "€é😀𐍈"])
    def test_split_at_every_byte_offset(self, text: str) -> None:
        raw = text.encode()
        for cut in range(len(raw) + 1):
            conn = server()
            first, last = fragments(TEXT, raw, [cut])
            assert conn.receive_data(first) == [], cut
            assert conn.receive_data(last) == [Message(text)], cut

    @pytest.mark.parametrize("text", ["😀", "x€😀y"])
    def test_every_byte_its_own_fragment(self, text: str) -> None:
        raw = text.encode()
        frames = fragments(TEXT, raw, list(range(1, len(raw))))
        conn = server()
        for f in frames[:-1]:
            assert conn.receive_data(f) == []
        assert conn.receive_data(frames[-1]) == [Message(text)]

    def test_two_cuts_inside_one_character(self) -> None:
        raw = "😀".encode()
        for a, b in itertools.combinations(range(1, 4), 2):
            conn = server()
            assert conn.receive_data(b"".join(fragments(TEXT, raw, [a, b]))) == [Message("😀")]

    @pytest.mark.parametrize("bad", INVALID_UTF8)
    def test_invalid_single_frame(self, bad: bytes) -> None:
        conn = server()
        events = conn.receive_data(frame(TEXT, bad))
        assert len(events) == 1
        assert_failed(conn, events, 1007)

    @pytest.mark.parametrize("bad", INVALID_UTF8)
    def test_invalid_in_fragmented_message(self, bad: bytes) -> None:
        conn = server()
        data = frame(TEXT, b"ok ", fin=False) + frame(CONT, bad, fin=False) + frame(CONT, b" end")
        assert_failed(conn, conn.receive_data(data), 1007)

    def test_invalid_client_role(self) -> None:
        conn = client()
        assert_failed(conn, conn.receive_data(sframe(TEXT, b"\xed\xa0\x80")), 1007)

    @pytest.mark.parametrize(
        "first",
        [
            b"hello\xff",
            b"\xc0\x80",
            b"\xe0\x80",  # overlong, refused at its second byte
            b"\xf4\x90",  # above U+10FFFF, refused at its second byte
            b"\xed\xa0\x80",
            b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xf4\x90\x80\x80",  # Autobahn 6.4.1
            b"\x80more",
        ],
    )
    def test_fail_fast_on_first_fragment(self, first: bytes) -> None:
        conn = server()
        events = conn.receive_data(frame(TEXT, first, fin=False))
        assert len(events) == 1
        assert_failed(conn, events, 1007)

    def test_fail_fast_on_middle_fragment(self) -> None:
        conn = server()
        assert conn.receive_data(frame(TEXT, b"good", fin=False)) == []
        assert conn.receive_data(frame(CONT, b" \xe2\x82", fin=False)) == []  # a valid prefix so far
        assert_failed(conn, conn.receive_data(frame(CONT, b"x", fin=False)), 1007)

    def test_fail_fast_first_fragment_in_two_receives(self) -> None:
        # The invalid first fragment arrives split across reads; it fails as soon as it is complete.
        conn = server()
        f = frame(TEXT, b"abc\xff", fin=False)
        assert conn.receive_data(f[:-1]) == []
        assert_failed(conn, conn.receive_data(f[-1:]), 1007)

    @pytest.mark.parametrize("fin", [True, False])
    def test_fail_fast_inside_incomplete_frame(self, fin: bool) -> None:
        # Section 8.1: fail as soon as invalid UTF-8 is seen, even before the frame carrying it is complete.
        f = frame(TEXT, b"abc\xff" + b"x" * 1000, fin=fin)
        conn = server()
        assert conn.receive_data(f[: 4 + 4 + 3]) == []  # header, mask, "abc": valid so far
        events = conn.receive_data(f[11:12])
        assert len(events) == 1
        assert_failed(conn, events, 1007)

    def test_fail_fast_inside_incomplete_continuation(self) -> None:
        conn = server()
        assert conn.receive_data(frame(TEXT, b"ok\xf0\x9f", fin=False)) == []
        f = frame(CONT, b"\x98\x80" + b"y" * 300 + b"\xed\xa0\x80" + b"z" * 300)
        assert conn.receive_data(f[: 4 + 4 + 302]) == []  # completes the emoji, then plain ASCII
        assert_failed(conn, conn.receive_data(f[4 + 4 + 302 : 4 + 4 + 305]), 1007)

    def test_fail_fast_continuation_breaks_pending_character(self) -> None:
        conn = server()
        assert conn.receive_data(frame(TEXT, b"\xf0\x9f", fin=False)) == []
        f = frame(CONT, b"A" * 200)
        assert_failed(conn, conn.receive_data(f[:9]), 1007)

    @pytest.mark.parametrize("text", ["😀" * 40 + "é" * 40 + "€" * 40, "a" + "😀" * 50])
    def test_incomplete_frames_fed_byte_by_byte_do_not_fail(self, text: str) -> None:
        raw = text.encode()
        for data in (frame(TEXT, raw, mask=b"\x13\x57\x9b\xdf"), b"".join(fragments(TEXT, raw, [1, 7, 130]))):
            conn = server()
            events: list[Event] = []
            for i in range(len(data)):
                events += conn.receive_data(data[i : i + 1])
            assert events == [Message(text)]

    def test_compressed_text_not_checked_before_decompression(self) -> None:
        conn = server(extension=FakeExtension())
        payload = ("héllo wörld " * 20).encode()[::-1]  # not UTF-8 as it stands
        f = frame(TEXT, payload, rsv=RSV1)
        assert conn.receive_data(f[:-1]) == []
        assert conn.receive_data(f[-1:]) == [Message("héllo wörld " * 20)]

    def test_binary_not_checked_inside_incomplete_frame(self) -> None:
        conn = server()
        f = frame(BINARY, b"\xff" * 300)
        assert conn.receive_data(f[:100]) == []
        assert conn.receive_data(f[100:]) == [Message(b"\xff" * 300)]

    @pytest.mark.parametrize("tail", [b"\xe2\x82", b"\xf0\x9f\x98", b"\xc3", b"\xf0"])
    def test_truncated_at_final_fragment(self, tail: bytes) -> None:
        conn = server()
        assert conn.receive_data(frame(TEXT, b"ab", fin=False)) == []
        assert conn.receive_data(frame(CONT, tail, fin=False)) == []
        assert_failed(conn, conn.receive_data(frame(CONT, b"")), 1007)

    def test_truncated_sequence_split_over_fragments(self) -> None:
        conn = server()
        assert conn.receive_data(frame(TEXT, b"\xf0\x9f", fin=False)) == []
        assert_failed(conn, conn.receive_data(frame(CONT, b"\x98")), 1007)

    def test_binary_is_not_utf8_checked(self) -> None:
        conn = server()
        data = frame(BINARY, b"\xff\xed\xa0\x80") + b"".join(fragments(BINARY, b"\xf4\x90\x80\x80", [1]))
        assert conn.receive_data(data) == [Message(b"\xff\xed\xa0\x80"), Message(b"\xf4\x90\x80\x80")]

    def test_ping_payload_is_not_utf8_checked(self) -> None:
        conn = server()
        assert conn.receive_data(frame(PING, b"\xff")) == [Ping(b"\xff")]

    def test_send_text_encodes_utf8(self) -> None:
        conn = server()
        conn.send_text("é😀")
        assert conn.data_to_send() == b"\x81\x06\xc3\xa9\xf0\x9f\x98\x80"
        conn.send_message("a")
        conn.send_message(b"a")
        conn.send_message(bytearray(b"b"))
        assert conn.data_to_send() == b"\x81\x01a\x82\x01a\x82\x01b"


# ====================================================================== section 7.1


class TestSection7_1Closing:
    @pytest.mark.parametrize(
        ("code", "reason"), [(1000, b""), (1000, b"bye"), (1001, "é".encode()), (1011, b""), (4000, b"custom")]
    )
    def test_peer_initiated_close(self, code: int, reason: bytes) -> None:
        conn = server()
        events = conn.receive_data(frame(CLOSE, close_payload(code, reason)))
        assert events == [Closed(code, reason.decode(), by_peer=True)]
        assert conn.data_to_send() == b"\x88\x02" + struct.pack("!H", code)  # echoes the code, not the reason
        assert conn.state is State.CLOSED
        assert conn.close_transport is True
        assert conn.close_code == code

    def test_peer_close_with_empty_payload(self) -> None:
        conn = server()
        assert conn.receive_data(frame(CLOSE, b"")) == [Closed(1005, "", by_peer=True)]
        assert conn.data_to_send() == b"\x88\x00"
        assert conn.state is State.CLOSED
        assert conn.close_transport is True

    def test_peer_close_client_role(self) -> None:
        conn = client([b"\x01\x01\x01\x01"])
        assert conn.receive_data(sframe(CLOSE, close_payload(1001, b"away"))) == [Closed(1001, "away", by_peer=True)]
        assert conn.data_to_send() == frame(CLOSE, b"\x03\xe9", mask=b"\x01\x01\x01\x01")
        assert conn.close_transport is True

    def test_server_initiated_close(self) -> None:
        conn = server()
        assert conn.close(1001, "bye") is True
        assert conn.data_to_send() == b"\x88\x05\x03\xe9bye"
        assert conn.state is State.CLOSING
        assert conn.close_transport is False
        assert conn.close_code == 1001
        events = conn.receive_data(frame(CLOSE, close_payload(1001)))
        assert events == [Closed(1001, "bye", by_peer=False)]
        assert conn.state is State.CLOSED
        assert conn.close_transport is True
        assert conn.data_to_send() == b""  # no second close frame

    def test_server_close_default_code(self) -> None:
        conn = server()
        assert conn.close()
        assert conn.data_to_send() == b"\x88\x02\x03\xe8"

    def test_server_close_peer_answers_with_other_code(self) -> None:
        conn = server()
        conn.close(1000)
        conn.data_to_send()
        # Our code is reported: we started the handshake.
        assert conn.receive_data(frame(CLOSE, b"")) == [Closed(1000, "", by_peer=False)]

    @pytest.mark.parametrize("code", [999, 1004, 1006, 1015, 2000, 5000])
    def test_close_refuses_a_code_that_may_not_be_sent(self, code: int) -> None:
        conn = server()
        with pytest.raises(ValueError):
            conn.close(code)
        assert conn.state is State.OPEN
        assert conn.data_to_send() == b""

    def test_close_with_1005_sends_empty_close(self) -> None:
        conn = server()
        assert conn.close(1005)
        assert conn.data_to_send() == b"\x88\x00"
        assert conn.state is State.CLOSING

    def test_close_reason_truncated_on_wire(self) -> None:
        conn = server()
        conn.close(1000, "é" * 100)
        assert conn.data_to_send() == b"\x88\x7c\x03\xe8" + ("é" * 61).encode()

    def test_data_still_received_while_closing(self) -> None:
        conn = server()
        conn.close()
        conn.data_to_send()
        data = frame(TEXT, b"late") + frame(PING, b"p") + frame(CLOSE, close_payload(1000))
        assert conn.receive_data(data) == [Message("late"), Ping(b"p"), Closed(1000, "", by_peer=False)]
        assert conn.data_to_send() == b""  # nothing, not even a pong, follows our close frame

    def test_invalid_close_while_closing_fails_without_second_close(self) -> None:
        conn = server()
        conn.close()
        conn.data_to_send()
        events = conn.receive_data(frame(CLOSE, close_payload(999)))
        assert_failed(conn, events, 1002, frame_sent=False)
        assert conn.close_code == 1000

    def test_protocol_error_while_closing(self) -> None:
        conn = server()
        conn.close(1001)
        conn.data_to_send()
        assert_failed(conn, conn.receive_data(sframe(TEXT, b"x")), 1002, frame_sent=False)

    @pytest.mark.parametrize("state", ["closing", "closed"])
    def test_sending_after_close(self, state: str) -> None:
        conn = server()
        conn.close()
        if state == "closed":
            conn.receive_data(frame(CLOSE, b""))
        conn.data_to_send()
        assert conn.send_text("x") is False
        assert conn.send_binary(b"x") is False
        assert conn.send_message("x") is False
        assert conn.send_fragment(TEXT, b"x", True) is False
        assert conn.send_frame_bytes(b"\x81\x01x") is False
        assert conn.send_ping(b"") is False
        assert conn.send_pong(b"") is False
        assert conn.close() is False
        assert conn.data_to_send() == b""
        assert conn.pending_output == 0

    def test_sending_after_peer_close(self) -> None:
        conn = server()
        conn.receive_data(frame(CLOSE, close_payload(1000)))
        conn.data_to_send()
        assert conn.send_text("x") is False
        assert conn.data_to_send() == b""

    def test_receive_eof_without_close(self) -> None:
        conn = server()
        events = conn.receive_eof()
        assert len(events) == 1
        closed = events[0]
        assert isinstance(closed, Closed)
        assert closed.code == 1006
        assert closed.by_peer is True
        assert conn.state is State.CLOSED
        assert conn.close_transport is True
        assert conn.data_to_send() == b""  # 1006 is never sent
        assert conn.receive_eof() == []
        assert conn.receive_data(frame(TEXT, b"x")) == []

    def test_receive_eof_mid_message(self) -> None:
        conn = server()
        assert conn.receive_data(frame(TEXT, b"part", fin=False) + frame(CONT, b"x")[:3]) == []
        events = conn.receive_eof()
        assert [(type(e), e.code) for e in events] == [(Closed, 1006)]  # type: ignore[union-attr]

    def test_receive_eof_while_closing(self) -> None:
        conn = server()
        conn.close()
        events = conn.receive_eof()
        assert len(events) == 1
        assert isinstance(events[0], Closed)
        assert events[0].code == 1006

    def test_receive_eof_after_close_handshake(self) -> None:
        conn = server()
        conn.receive_data(frame(CLOSE, b""))
        assert conn.receive_eof() == []

    def test_failing_sets_close_transport_immediately(self) -> None:
        conn = server()
        events = conn.receive_data(frame(CONT, b"x"))
        assert conn.close_transport is True
        assert conn.state is State.CLOSED
        assert_failed(conn, events, 1002)

    def test_failure_after_good_frames_is_held_until_they_are_answered(self) -> None:
        # The frames before the violation are answered first: their echo precedes the close frame on the wire.
        conn = server()
        events = conn.receive_data(frame(TEXT, b"echo me") + frame(PING, b"p") + frame(CONT, b"bad"))
        assert events == [Message("echo me"), Ping(b"p")]
        assert conn.events_held is True
        assert conn.state is State.OPEN  # nothing has failed yet as far as the driver can see
        assert conn.data_to_send() == b"\x8a\x01p"  # the pong; data_to_send changes no state
        assert conn.state is State.OPEN
        assert conn.send_text("echo me") is True
        [closed] = conn.receive_data(b"")
        assert conn.events_held is False
        assert isinstance(closed, Closed)
        assert (closed.code, closed.by_peer, closed.error) == (1002, False, closed.reason)
        assert conn.state is State.CLOSED  # the transition happened in the call that returned Closed
        assert conn.receive_data(frame(TEXT, b"more")) == []
        assert conn.receive_eof() == []
        reason = closed.reason.encode()
        assert conn.data_to_send() == (
            b"\x81\x07echo me" + b"\x88" + bytes((2 + len(reason),)) + b"\x03\xea" + reason
        )
        assert conn.state is State.CLOSED
        assert conn.close_transport is True
        assert conn.close_code == 1002
        assert conn.send_text("too late") is False
        assert conn.data_to_send() == b""
        assert conn.fail(1011, "x") is None

    def test_fail_method(self) -> None:
        conn = server()
        closed = conn.fail(1011, "oops")
        assert closed == Closed(1011, "oops", by_peer=False)  # the caller's decision: no protocol error
        assert conn.data_to_send() == b"\x88\x06\x03\xf3oops"
        assert conn.close_transport is True
        assert conn.state is State.CLOSED
        assert conn.fail(1011, "again") is None
        assert conn.data_to_send() == b""

    def test_abort_closes_at_once_and_drops_pending_output(self) -> None:
        conn = server()
        assert conn.send_text("never sent") is True
        closed = conn.abort("send failed: broken pipe")
        assert closed == Closed(1006, "send failed: broken pipe", by_peer=False)
        assert conn.state is State.CLOSED and conn.close_transport is True
        assert conn.data_to_send() == b""
        assert conn.abort("again") is None
        assert conn.receive_eof() == []

    def test_closed_connection_lets_go_of_its_inflater(self) -> None:
        conn = server(extension=PerMessageDeflate(DeflateParams(False, False, 15, 15), is_server=True))
        assert conn.extension is not None
        conn.receive_data(frame(CLOSE, close_payload(1000)))
        assert conn.state is State.CLOSED
        assert conn.extension is None  # the zlib contexts go with it, not when the driver forgets the connection

    def test_fail_while_closing_sends_no_second_close(self) -> None:
        conn = server()
        conn.close(1000)
        conn.data_to_send()
        closed = conn.fail(1001, "close timeout")
        assert closed is not None
        assert closed.code == 1001
        assert conn.data_to_send() == b""
        assert conn.close_transport is True

    def test_no_events_after_close_frame(self) -> None:
        conn = server()
        data = (
            frame(TEXT, b"before")
            + frame(CLOSE, close_payload(1000, b"done"))
            + frame(TEXT, b"after")
            + frame(PING, b"p")
            + sframe(TEXT, b"garbage")
            + b"\xff\xff"
        )
        assert conn.receive_data(data) == [Message("before")]
        assert conn.events_held and conn.state is State.OPEN
        assert conn.receive_data(b"") == [Closed(1000, "done", by_peer=True)]
        assert conn.state is State.CLOSED
        assert conn.data_to_send() == b"\x88\x02\x03\xe8"  # no pong, no error close
        assert conn.receive_data(frame(TEXT, b"later")) == []
        assert conn.receive_eof() == []

    def test_close_frame_split_across_reads(self) -> None:
        conn = server()
        f = frame(CLOSE, close_payload(1000, b"split"))
        for i in range(len(f) - 1):
            assert conn.receive_data(f[i : i + 1]) == []
        assert conn.receive_data(f[-1:] + frame(TEXT, b"after")) == [Closed(1000, "split", by_peer=True)]

    def test_close_one_byte_payload(self) -> None:
        conn = server()
        assert_failed(conn, conn.receive_data(frame(CLOSE, b"\x03")), 1002)

    @pytest.mark.parametrize("reason", [b"\xff", b"\xed\xa0\x80", b"ok\xe2\x82"])
    def test_close_invalid_utf8_reason(self, reason: bytes) -> None:
        conn = server()
        assert_failed(conn, conn.receive_data(frame(CLOSE, close_payload(1000, reason))), 1007)


# ====================================================================== section 7.4


class TestSection7_4CloseCodes:
    @pytest.mark.parametrize(
        "code", [0, 1, 500, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 6000, 65535]
    )
    def test_invalid_code_received(self, code: int) -> None:
        conn = server()
        events = conn.receive_data(frame(CLOSE, close_payload(code, b"why")))
        assert len(events) == 1
        assert_failed(conn, events, 1002)

    @pytest.mark.parametrize(
        "code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000, 4999]
    )
    def test_valid_code_received_and_echoed(self, code: int) -> None:
        conn = server()
        assert conn.receive_data(frame(CLOSE, close_payload(code))) == [Closed(code, "", by_peer=True)]
        assert conn.data_to_send() == b"\x88\x02" + struct.pack("!H", code)

    def test_invalid_code_client_role(self) -> None:
        conn = client()
        assert_failed(conn, conn.receive_data(sframe(CLOSE, close_payload(1006))), 1002)


# ====================================================================== limits


class TestLimits:
    def test_huge_header_without_payload(self) -> None:
        conn = server()
        events = conn.receive_data(b"\x82\xff" + struct.pack("!Q", 2**40))
        assert len(events) == 1
        assert_failed(conn, events, 1009)

    def test_huge_header_client_role(self) -> None:
        conn = client()
        assert_failed(conn, conn.receive_data(b"\x81\x7f" + struct.pack("!Q", 2**63 - 1)), 1009)

    def test_huge_16_bit_header(self) -> None:
        conn = server(max_message_size=1000)
        assert_failed(conn, conn.receive_data(b"\x82\xfe\x03\xe9"), 1009)

    @pytest.mark.parametrize("opcode", [TEXT, BINARY])
    def test_exactly_at_limit(self, opcode: int) -> None:
        conn = server(max_message_size=100)
        payload = b"m" * 100
        expected = Message(payload.decode() if opcode == TEXT else payload)
        assert conn.receive_data(frame(opcode, payload)) == [expected]
        assert conn.receive_data(b"".join(fragments(opcode, payload, [30, 60, 99]))) == [expected]

    def test_one_over_limit_header_only(self) -> None:
        conn = server(max_message_size=100)
        f = frame(BINARY, b"m" * 101)
        assert_failed(conn, conn.receive_data(f[:2]), 1009)

    def test_fragmented_message_crossing_limit(self) -> None:
        conn = server(max_message_size=100)
        assert conn.receive_data(frame(TEXT, b"a" * 40, fin=False)) == []
        assert conn.receive_data(frame(CONT, b"b" * 40, fin=False)) == []
        third = frame(CONT, b"c" * 21)
        # Refused from the header of the frame that crosses the limit (80 + 21 > 100).
        assert_failed(conn, conn.receive_data(third[:2]), 1009)

    def test_fragment_size_resets_between_messages(self) -> None:
        conn = server(max_message_size=100)
        for _ in range(3):
            assert conn.receive_data(b"".join(fragments(BINARY, b"z" * 80, [40]))) == [Message(b"z" * 80)]

    def test_max_frame_size_separately(self) -> None:
        conn = server(max_message_size=1000, max_frame_size=100)
        data = frame(BINARY, b"a" * 100, fin=False) + frame(CONT, b"b" * 100, fin=False) + frame(CONT, b"c" * 100)
        assert conn.receive_data(data) == [Message(b"a" * 100 + b"b" * 100 + b"c" * 100)]
        assert conn.receive_data(frame(TEXT, b"x" * 100)) == [Message("x" * 100)]
        assert_failed(conn, conn.receive_data(frame(TEXT, b"x" * 101)[:4]), 1009)

    def test_max_frame_size_on_continuation(self) -> None:
        conn = server(max_message_size=1000, max_frame_size=100)
        assert conn.receive_data(frame(BINARY, b"a" * 10, fin=False)) == []
        assert_failed(conn, conn.receive_data(frame(CONT, b"b" * 101)), 1009)

    def test_max_frame_size_defaults_to_message_size(self) -> None:
        conn = server(max_message_size=50)
        assert conn.max_frame_size == 50
        assert_failed(conn, conn.receive_data(frame(BINARY, b"x" * 51)), 1009)

    def test_control_frames_not_counted(self) -> None:
        conn = server(max_message_size=10)
        data = frame(TEXT, b"a" * 5, fin=False) + frame(PING, b"p" * 100) + frame(CONT, b"b" * 5)
        assert conn.receive_data(data) == [Ping(b"p" * 100), Message("a" * 5 + "b" * 5)]

    def test_default_limit_is_one_mebibyte(self) -> None:
        conn = server()
        assert conn.max_message_size == 1 << 20
        assert_failed(conn, conn.receive_data(b"\x82\xff" + struct.pack("!Q", (1 << 20) + 1)), 1009)


# ====================================================================== streaming


def make_stream(count: int, seed: int = 7) -> bytes:
    """``count`` client frames of every kind (whole, fragmented with interleaved control frames, all lengths)."""
    rng = random.Random(seed)
    words = ["a", "é", "€", "😀", "hello", " "]
    out = bytearray()
    n = 0
    while n < count:
        kind = rng.randrange(7)
        mask = bytes(rng.randrange(256) for _ in range(4))
        if kind == 0:
            text = "".join(rng.choices(words, k=rng.randrange(0, 60)))
            out += frame(TEXT, text.encode(), mask=mask)
            n += 1
        elif kind == 1:
            size = rng.choice([0, 1, 50, 125, 126, 127, 300, 1000])
            out += frame(BINARY, rng.randbytes(size), mask=mask)
            n += 1
        elif kind == 2:
            out += frame(PING, rng.randbytes(rng.randrange(0, 126)), mask=mask)
            n += 1
        elif kind == 3:
            out += frame(PONG, rng.randbytes(rng.randrange(0, 10)), mask=mask)
            n += 1
        else:
            opcode = TEXT if kind in (4, 5) else BINARY
            raw = "".join(rng.choices(words, k=rng.randrange(1, 40))).encode()
            cuts = sorted(rng.sample(range(len(raw) + 1), k=min(len(raw) + 1, rng.randrange(1, 5))))
            for f in fragments(opcode, raw, cuts, mask=mask):
                out += f
                n += 1
                if rng.random() < 0.3:
                    out += frame(PING, b"i", mask=mask)
                    n += 1
    return bytes(out)


class TestStreaming:
    STREAM = make_stream(1000)

    def reference(self) -> tuple[list[Event], bytes]:
        conn = server()
        events = conn.receive_data(self.STREAM)
        assert conn.state is State.OPEN
        return events, conn.data_to_send()

    def test_stream_is_parsed(self) -> None:
        events, out = self.reference()
        assert len(events) > 500
        assert not any(isinstance(e, Closed) for e in events)
        pongs = unmask_frames(out)
        pings = [e.payload for e in events if isinstance(e, Ping)]
        assert [(b0, p) for b0, p, _ in pongs] == [(0x8A, p) for p in pings]

    @pytest.mark.parametrize("split", range(1, 18))
    def test_every_split_size(self, split: int) -> None:
        expected_events, expected_out = self.reference()
        conn = server()
        events: list[Event] = []
        data = self.STREAM
        for i in range(0, len(data), split):
            events += conn.receive_data(data[i : i + split])
        assert events == expected_events
        assert conn.data_to_send() == expected_out

    def test_random_splits_with_reused_buffer(self) -> None:
        expected_events, _ = self.reference()
        rng = random.Random(3)
        recv = bytearray(4096)
        view = memoryview(recv)
        conn = server()
        events: list[Event] = []
        data = self.STREAM
        pos = 0
        while pos < len(data):
            n = min(rng.randrange(1, 4096), len(data) - pos)
            recv[:n] = data[pos : pos + n]
            events += conn.receive_data(view[:n])
            recv[:] = b"\xaa" * len(recv)  # the driver reuses its receive buffer
            pos += n
        assert events == expected_events

    def test_one_mebibyte_masked_frame_in_64k_chunks(self) -> None:
        payload = random.Random(5).randbytes(1 << 20)
        data = frame(BINARY, payload, mask=b"\x5c\x01\xe3\x9f")
        conn = server()
        events: list[Event] = []
        chunk = 64 * 1024
        for i in range(0, len(data), chunk):
            got = conn.receive_data(data[i : i + chunk])
            if i + chunk < len(data):
                assert got == []
            events += got
        assert len(events) == 1
        assert isinstance(events[0], Message)
        assert events[0].data == payload

    @pytest.mark.parametrize("role", [SERVER, CLIENT])
    def test_memoryview_of_overwritten_buffer(self, role: object) -> None:
        masked = role is SERVER
        mk = (
            (lambda op, p, fin=True: frame(op, p, fin=fin))
            if masked
            else (lambda op, p, fin=True: sframe(op, p, fin=fin))
        )
        data = (
            mk(TEXT, b"first message")
            + mk(BINARY, b"\x00\x01" * 100, False)
            + mk(PING, b"ping!")
            + mk(CONT, b"\x02\x03" * 100)
            + mk(TEXT, "😀 split".encode(), False)
            + mk(CONT, b" end")
        )
        expected = [
            Message("first message"),
            Ping(b"ping!"),
            Message(b"\x00\x01" * 100 + b"\x02\x03" * 100),
            Message("😀 split end"),
        ]
        for cut in (1, 3, 7, 16, 17, 60, 150, 211, 250):
            recv = bytearray(512)
            view = memoryview(recv)
            conn = server() if masked else client()
            events: list[Event] = []
            for i in range(0, len(data), cut):
                piece = data[i : i + cut]
                recv[: len(piece)] = piece
                events += conn.receive_data(view[: len(piece)])
                recv[:] = b"\xff" * len(recv)
            assert events == expected, cut
            # Kept payloads are not views on the buffer either.
            for e in events:
                if isinstance(e, Message):
                    assert type(e.data) in (str, bytes)

    @pytest.mark.parametrize("role", [SERVER, CLIENT])
    def test_sent_buffer_mutated_before_data_to_send(self, role: object) -> None:
        # What was sent is what goes out, even if the caller reuses its buffer before the driver writes.
        conn = server() if role is SERVER else client([b"\x00\x00\x00\x00"])
        buf = bytearray(b"first")
        conn.send_binary(buf)
        buf[:] = b"XXXXX"
        conn.send_binary(memoryview(buf))
        buf[:] = b"YYYYY"
        conn.send_message(buf)
        buf[:] = b"ZZZZZ"
        frames = unmask_frames(conn.data_to_send())
        assert [(b0, p) for b0, p, _ in frames] == [(0x82, b"first"), (0x82, b"XXXXX"), (0x82, b"YYYYY")]

    def test_bytearray_input_mutated_after_call(self) -> None:
        conn = server()
        f = frame(BINARY, b"keep me")
        buf = bytearray(f[:5])
        assert conn.receive_data(buf) == []
        buf[:] = b"\x00" * 5
        assert conn.receive_data(bytearray(f[5:])) == [Message(b"keep me")]


# ====================================================================== client role


def pump(src: Connection, dst: Connection) -> list[Event]:
    return dst.receive_data(src.data_to_send())


class TestClientRole:
    def test_conversation(self) -> None:
        c = client(MASKS)
        s = server()
        assert c.send_text("hello")
        assert c.send_binary(b"\x00\xff")
        assert c.send_ping(b"are you there")
        assert pump(c, s) == [Message("hello"), Message(b"\x00\xff"), Ping(b"are you there")]
        assert s.send_text("welcome")
        assert s.send_binary(bytes(70000))
        # The server's pong to the ping is queued first.
        assert pump(s, c) == [Pong(b"are you there"), Message("welcome"), Message(bytes(70000))]
        assert c.send_fragment(TEXT, "😀".encode()[:2], False)
        assert c.send_fragment(CONT, "😀".encode()[2:], True)
        assert pump(c, s) == [Message("😀")]
        assert s.send_ping(b"srv")
        assert pump(s, c) == [Ping(b"srv")]
        assert pump(c, s) == [Pong(b"srv")]

    def test_client_initiated_close_handshake(self) -> None:
        c = client(MASKS)
        s = server()
        assert c.close(1000, "done")
        assert c.state is State.CLOSING
        assert pump(c, s) == [Closed(1000, "done", by_peer=True)]
        assert s.state is State.CLOSED
        assert s.close_transport is True
        assert pump(s, c) == [Closed(1000, "done", by_peer=False)]
        assert c.state is State.CLOSED
        assert c.close_transport is True
        assert c.data_to_send() == b""
        assert s.data_to_send() == b""

    def test_server_initiated_close_handshake(self) -> None:
        c = client(MASKS)
        s = server()
        assert s.close(4001, "kick")
        assert pump(s, c) == [Closed(4001, "kick", by_peer=True)]
        assert pump(c, s) == [Closed(4001, "kick", by_peer=False)]
        assert (c.state, s.state) == (State.CLOSED, State.CLOSED)

    def test_simultaneous_close(self) -> None:
        c = client(MASKS)
        s = server()
        c.close(1000, "c")
        s.close(1001, "s")
        assert pump(c, s) == [Closed(1001, "s", by_peer=False)]
        assert pump(s, c) == [Closed(1000, "c", by_peer=False)]
        assert (c.data_to_send(), s.data_to_send()) == (b"", b"")

    def test_server_failure_reaches_client(self) -> None:
        c = client(MASKS)
        s = server()
        s.receive_data(b"\x81\x01x")  # unmasked: the server fails the connection with 1002
        events = pump(s, c)
        assert len(events) == 1
        closed = events[0]
        assert isinstance(closed, Closed)
        assert (closed.code, closed.by_peer) == (1002, True)
        assert closed.reason == "unmasked frame from a client"
        assert c.state is State.CLOSED
