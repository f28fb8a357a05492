"""The C frame scanner (``_speedups.scan_messages``, the fast path of a server's ``receive_data``) against the
pure-Python parser.

Two server-role protocol objects get the same byte stream, cut into the same random pieces: one parses with the C
scanner, the other with it switched off (the module's ``_scan_messages`` set to None, which is what
``SELECTWS_NO_SPEEDUPS=1`` or a missing extension gives). Every event, every byte the protocol answers with, its
state and ``input_pending`` must be the same after every call. The streams mix what the scanner takes (whole
masked text and binary frames, 7- and 16-bit lengths) with everything it must leave to the general parser: control
frames, fragments, compressed or RSV frames, 64-bit lengths, unmasked frames, frames over the limits, invalid UTF-8,
frames cut anywhere, and frames after a close. The frame budget (``max_frames``) is exercised as a driver does:
``receive_data(b"")`` while ``input_pending``.

Under CI (``CI`` set) a missing extension fails the C tests instead of skipping them.
"""

from __future__ import annotations

import os
import random
from typing import Any

import pytest

from selectws.protocol import connection as connection_module
from selectws.protocol.connection import SERVER, Connection
from selectws.protocol.events import Closed, Message, Ping, Pong
from selectws.protocol.frames import encode_frame

C_SCAN = connection_module._scan_messages  # taken once: the tests switch the module's own copy on and off
needs_c = pytest.mark.skipif(
    C_SCAN is None and not os.environ.get("CI"),
    reason="the C extension is not built (pip install -e . builds it)",
)


def _c_scanner() -> Any:
    scan = C_SCAN
    if scan is None:
        pytest.fail("the C extension selectws.protocol._speedups is not built (CI must build it)")
    return scan


def _mask(rng: random.Random) -> bytes:
    return bytes(rng.randrange(256) for _ in range(4))


def _frame(rng: random.Random, max_size: int) -> bytes:
    """One frame, mostly of the kind the scanner takes, sometimes of every other kind."""
    kind = rng.random()
    mask = _mask(rng)
    if kind < 0.55:  # whole binary or text, sizes around the 7/16-bit length boundaries
        size = rng.choice([0, 1, 5, 64, 125, 126, 127, 200, 1000, 65535, rng.randrange(0, 3000)])
        if rng.random() < 0.5:
            return encode_frame(0x2, rng.randbytes(size), mask=mask)
        text = "".join(rng.choice("aé€😀z ") for _ in range(size // 3 + 1))
        return encode_frame(0x1, text.encode(), mask=mask)
    if kind < 0.62:  # ping / pong
        return encode_frame(rng.choice([0x9, 0xA]), rng.randbytes(rng.randrange(0, 126)), mask=mask)
    if kind < 0.70:  # a fragmented message: first, continuation, last
        return (encode_frame(0x1, b"ab", fin=False, mask=mask) + encode_frame(0x0, "cé".encode(), fin=False, mask=mask)
                + encode_frame(0x0, b"d", mask=mask))
    if kind < 0.72:  # invalid UTF-8 in a text frame
        return encode_frame(0x1, b"ok\xff\xfe", mask=mask)
    if kind < 0.74:  # invalid UTF-8 early in a long text frame (found while it still arrives: fail fast)
        return encode_frame(0x1, b"a" * rng.randrange(0, 40) + b"\xc3\x28" + b"b" * 3000, mask=mask)
    if kind < 0.77:  # RSV1 without an extension
        return encode_frame(0x2, b"xyz", rsv1=True, mask=mask)
    if kind < 0.80:  # unmasked, from a client
        return encode_frame(0x2, b"plain")
    if kind < 0.83:  # a 64-bit length for a small payload (legal, and left to the general parser)
        payload = rng.randbytes(rng.randrange(0, 300))
        header = bytes([0x82, 0x80 | 127]) + len(payload).to_bytes(8, "big")
        return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    if kind < 0.86:  # over the limits
        return encode_frame(0x2, rng.randbytes(max_size + rng.randrange(1, 50)), mask=mask)
    if kind < 0.89:  # a reserved opcode
        return encode_frame(0x3, b"", mask=mask)
    if kind < 0.92:  # a close frame (the rest of the stream goes to a closing connection)
        return encode_frame(0x8, (1000).to_bytes(2, "big") + b"bye", mask=mask)
    return encode_frame(0x2, rng.randbytes(rng.randrange(40_000, 70_000)), mask=mask)  # a large one, streamed


def _describe(events: list[Any]) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    for e in events:
        if isinstance(e, Message):
            out.append(("message", type(e.data).__name__, e.data))
        elif isinstance(e, (Ping, Pong)):
            out.append((type(e).__name__, e.payload))
        elif isinstance(e, Closed):
            out.append(("closed", e.code, e.reason, e.error))
        else:
            out.append((type(e).__name__, repr(e)))
    return out


def _feed(conn: Connection, chunk: bytes, mode: str, buffer: bytearray) -> list[list[tuple[Any, ...]]]:
    """What a driver does with one read: parse, release what was held, drain what the budget left; the events of
    each call apart (so that a budget overrun or a late failure shows).

    ``mode`` is how the read is handed over: ``bytes``; ``view``, a memoryview of a bytearray; or ``buffer``, the
    driver's reusable receive ``buffer`` (a view of all of it) and the count the read put at its start, with stale
    bytes after that, and the whole buffer overwritten afterwards, as the next read would."""
    size = -1
    data: bytes | memoryview
    if mode == "buffer":
        buffer[: len(chunk)] = chunk
        stale = len(buffer) - len(chunk)  # what an earlier, longer read left: the start of frames, never input
        buffer[len(chunk) :] = b"\x82\x85" * (stale // 2) + b"\x81" * (stale % 2)
        data, size = memoryview(buffer), len(chunk)
    else:
        data = memoryview(bytearray(chunk)) if mode == "view" else chunk
    seen = [_describe(conn.receive_data(data, size))]
    rounds = 0
    while (conn.events_held or conn.input_pending) and rounds < 10_000:
        seen.append(_describe(conn.receive_data(b"")))
        rounds += 1
    if mode == "buffer":
        buffer[:] = b"\xff" * len(buffer)  # nothing the protocol kept may be a view of it
    return seen


def _state(conn: Connection) -> tuple[Any, ...]:
    return conn.state, conn.input_pending, conn.close_code, conn.close_transport, conn.data_to_send()


def _compare(seed: int, monkeypatch: pytest.MonkeyPatch) -> int:
    rng = random.Random(seed)
    max_size = rng.choice([200, 5000, 1 << 20])
    max_frames = rng.choice([1, 2, 3, 16, 1 << 30])
    stream = b"".join(_frame(rng, max_size) for _ in range(rng.randrange(1, 40)))
    count = min(len(stream) - 1, rng.randrange(0, 30))
    cuts = sorted(rng.sample(range(1, len(stream)), count)) if count > 0 else []
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    mode = rng.choice(["bytes", "view", "buffer"])
    scan = _c_scanner()
    fast_buffer = bytearray(max(map(len, pieces)) + rng.randrange(0, 200))
    slow_buffer = bytearray(len(fast_buffer))

    fast = Connection(SERVER, max_message_size=max_size, max_frames=max_frames)
    slow = Connection(SERVER, max_message_size=max_size, max_frames=max_frames)
    for piece in pieces:
        monkeypatch.setattr(connection_module, "_scan_messages", scan)
        got = _feed(fast, piece, mode, fast_buffer)
        got_state = _state(fast)
        monkeypatch.setattr(connection_module, "_scan_messages", None)
        want = _feed(slow, piece, mode, slow_buffer)
        want_state = _state(slow)
        assert got == want, f"seed {seed}: events differ"
        assert got_state == want_state, f"seed {seed}: state or output differs"
    return len(pieces)


@needs_c
@pytest.mark.parametrize("block", range(8))
def test_the_c_scanner_and_the_python_parser_agree_on_random_streams(
    block: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    for seed in range(block * 60, block * 60 + 60):
        _compare(seed, monkeypatch)


@needs_c
def test_the_scanner_takes_whole_small_messages_and_stops_before_anything_else() -> None:
    scan = _c_scanner()
    mask = b"\x01\x02\x03\x04"
    good = encode_frame(0x2, b"hello", mask=mask) + encode_frame(0x1, "héllo".encode(), mask=mask)
    ping = encode_frame(0x9, b"p", mask=mask)
    events: list[Any] = []
    left = scan(good + ping + good, 1 << 20, 1 << 20, 100, events)
    assert left == len(ping + good)  # stopped at the ping: the general parser answers it
    assert [type(e.data) for e in events] == [bytes, str] and [e.data for e in events] == [b"hello", "héllo"]
    events = []
    assert scan(good, 1 << 20, 1 << 20, 1, events) == len(good) // 2 + 1  # the budget: one frame
    events = []
    assert scan(encode_frame(0x1, b"\xff", mask=mask), 1 << 20, 1 << 20, 9, events) == 7 and not events  # not UTF-8
    events = []
    assert scan(encode_frame(0x2, b"x" * 10, mask=mask), 9, 1 << 20, 9, events) == 16 and not events  # over a limit
    assert scan(encode_frame(0x2, b"x" * 10, mask=mask), 1 << 20, 9, 9, events) == 16 and not events
    assert scan(encode_frame(0x2, b"x" * 10, mask=mask)[:-1], 1 << 20, 1 << 20, 9, events) == 15 and not events
    assert scan(encode_frame(0x2, b"unmasked"), 1 << 20, 1 << 20, 9, events) == 10 and not events
    # A limit past any buffer size is no limit.
    assert scan(good, 1 << 70, 1 << 70, 9, events) == 0 and len(events) == 2


@needs_c
def test_the_scanner_reads_only_the_first_size_bytes_when_given_a_size() -> None:
    scan = _c_scanner()
    mask = b"\x01\x02\x03\x04"
    one = encode_frame(0x2, b"hello", mask=mask)
    two = encode_frame(0x1, b"world", mask=mask)
    buffer = bytearray(one + two + one)  # the last frame is stale: past the size
    events: list[Any] = []
    assert scan(memoryview(buffer), 1 << 20, 1 << 20, 100, events, len(one + two)) == 0
    assert [e.data for e in events] == [b"hello", "world"]
    events = []
    assert scan(buffer, 1 << 20, 1 << 20, 100, events, len(one) + 3) == 3 and [e.data for e in events] == [b"hello"]
    events = []
    assert scan(buffer, 1 << 20, 1 << 20, 100, events, 0) == 0 and not events
    events = []
    assert scan(buffer, 1 << 20, 1 << 20, 100, events, -1) == 0 and len(events) == 3  # -1: all of it
    events = []
    assert scan(buffer, 1 << 20, 1 << 20, 100, events, 10**6) == 0 and len(events) == 3  # past the end: all of it


@pytest.mark.parametrize("scanner", [pytest.param("c", marks=needs_c), "python"])
def test_receive_data_with_a_size_parses_only_that_much_of_a_reused_buffer(
    scanner: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A driver hands over its receive buffer and the count its read returned. The bytes past the count (an
    earlier, longer read) are not input, whatever they are; what is kept past the call is copied."""
    if scanner == "c":
        monkeypatch.setattr(connection_module, "_scan_messages", _c_scanner())
    else:
        monkeypatch.setattr(connection_module, "_scan_messages", None)
    mask = b"\x0a\x0b\x0c\x0d"
    first = encode_frame(0x2, b"one", mask=mask)
    second = encode_frame(0x1, b"two", mask=mask)
    ping = encode_frame(0x9, b"p", mask=mask)
    buffer = bytearray(256)
    conn = Connection(SERVER)
    read = first + second[:4]  # a whole frame and the start of the next one
    buffer[: len(read)] = read
    buffer[len(read) : len(read) + len(ping)] = ping  # stale bytes: not input
    assert [e.data for e in conn.receive_data(memoryview(buffer), len(read))] == [b"one"]
    buffer[:] = b"\xff" * len(buffer)  # the next read overwrites it: the start of "two" was copied
    rest = second[4:] + ping
    buffer[: len(rest)] = rest
    events = conn.receive_data(memoryview(buffer), len(rest))
    assert [type(e) for e in events] == [Message, Ping] and events[0].data == "two"
    assert conn.data_to_send() == encode_frame(0xA, b"p")  # the pong


def test_the_server_protocol_uses_the_scanner_when_the_extension_is_active() -> None:
    from selectws.protocol import frames

    assert (connection_module._scan_messages is not None) == frames.SPEEDUPS_ACTIVE
