"""The sans-I/O half of the lingering close (issue 12, defect 5), and its two configuration keys.

With ``max_discard`` set, a message whose frame header takes it past the limit still fails the connection at once
(``Closed(1009)``, CLOSED), but the 1009 close frame is held (``holding_close``) while the rest of the message is
skipped, frame by frame, without keeping a payload byte; it is queued when the message ends, when skipping more
would pass ``max_discard``, when the peer sends anything but a continuation, ping or pong, or when the driver calls
``release_close()`` (its time limit). ``max_discard = 0`` keeps the old behaviour: the close frame at once.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from selectws.config import ConfigError, parse_config
from selectws.protocol.connection import SERVER, Connection, State
from selectws.protocol.events import Closed, Message

MASK = bytes(4)  # masking with zeros leaves the payload as it is
TEXT, BINARY, CONT, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA
LIMIT = 100


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, length: int | None = None) -> bytes:
    """A masked client frame."""
    n = len(payload) if length is None else length
    first = (0x80 if fin else 0) | opcode
    if n < 126:
        head = bytes((first, 0x80 | n))
    elif n < 65536:
        head = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, n)
    return head + MASK + payload


def close_frame_1009(out: bytes) -> bool:
    return out[:1] == b"\x88" and out[2:4] == (1009).to_bytes(2, "big")


def server(max_discard: int = 10_000) -> Connection:
    conn = Connection(SERVER, max_message_size=LIMIT)
    conn.max_discard = max_discard
    return conn


def feed(conn: Connection, data: bytes, step: int) -> list[tuple[int, bytes]]:
    """Feed ``data`` in pieces of ``step``; the output seen after each piece, with the offset it came at."""
    outputs = []
    for at in range(0, len(data), step):
        conn.receive_data(data[at : at + step])
        if conn.has_output:
            outputs.append((min(at + step, len(data)), conn.data_to_send()))
        assert conn._skip is None or len(conn._skip.head) <= 13  # never a payload byte kept
    return outputs


# ================================================================================== one oversized frame
@pytest.mark.parametrize("step", [1, 3, 14, 100, 4096])
def test_close_frame_is_held_until_the_oversized_frame_ends(step: int) -> None:
    conn = server()
    data = frame(BINARY, b"x" * 500)
    events = conn.receive_data(data[:20])
    [closed] = events
    assert isinstance(closed, Closed) and closed.code == 1009 and closed.error
    assert conn.state is State.CLOSED and conn.close_transport  # the driver knows at once
    assert conn.holding_close and not conn.has_output  # the peer does not, yet
    [(at, out)] = feed(conn, data[20:], step)
    assert at == len(data) - 20  # with the frame's very last byte
    assert close_frame_1009(out)
    assert not conn.holding_close


def test_what_follows_the_message_is_not_skipped() -> None:
    """The peer's close frame after the message: our close frame goes, input after it is ignored as before."""
    conn = server()
    data = frame(BINARY, b"x" * 300) + frame(CLOSE, (1000).to_bytes(2, "big"))
    conn.receive_data(data[:10])
    assert conn.holding_close
    assert conn.receive_data(data[10:]) == []
    assert close_frame_1009(conn.data_to_send())
    assert conn.receive_data(b"anything") == [] and not conn.has_output


# ================================================================================== a fragmented message
@pytest.mark.parametrize("step", [1, 7, 50, 1000])
def test_close_frame_waits_for_the_last_fragment_pings_and_pongs_included(step: int) -> None:
    conn = server()
    message = (
        frame(BINARY, b"a" * 60, fin=False)
        + frame(CONT, b"b" * 60, fin=False)  # the limit is crossed here
        + frame(PING, b"ping")
        + frame(CONT, b"c" * 200, fin=False)
        + frame(PONG)
        + frame(CONT, b"d" * 50, fin=True)
    )
    outputs = feed(conn, message, step)
    assert [close_frame_1009(out) for _, out in outputs] == [True]
    assert outputs[0][0] == len(message)


def test_a_frame_that_cannot_belong_to_the_message_releases_the_close_frame() -> None:
    conn = server()
    conn.receive_data(frame(BINARY, b"a" * 60, fin=False) + frame(CONT, b"b" * 60, fin=False)[:30])
    assert conn.holding_close
    conn.receive_data(frame(CONT, b"b" * 60, fin=False)[30:] + frame(TEXT, b"a new message"))
    assert close_frame_1009(conn.data_to_send())


# ================================================================================== bounds
def test_a_frame_announcing_more_than_max_discard_is_refused_at_once() -> None:
    conn = server(max_discard=1000)
    conn.receive_data(frame(BINARY, length=1001)[:14])
    assert not conn.holding_close
    assert close_frame_1009(conn.data_to_send())


def test_skipping_stops_where_the_next_frame_would_pass_max_discard() -> None:
    conn = server(max_discard=1000)
    conn.receive_data(frame(BINARY, b"a" * 60, fin=False) + frame(CONT, b"b" * 500, fin=False))
    assert conn.holding_close
    conn.receive_data(frame(CONT, length=600, fin=True)[:14])  # 500 + 600 > 1000
    assert not conn.holding_close
    assert close_frame_1009(conn.data_to_send())


def test_max_discard_zero_sends_the_close_frame_at_once() -> None:
    conn = server(max_discard=0)
    conn.receive_data(frame(BINARY, length=500)[:14])
    assert not conn.holding_close
    assert close_frame_1009(conn.data_to_send())


def test_release_close_is_the_drivers_time_limit() -> None:
    conn = server()
    conn.receive_data(frame(BINARY, length=5000)[:20])
    assert conn.holding_close
    conn.release_close()
    assert close_frame_1009(conn.data_to_send())
    assert not conn.holding_close
    conn.release_close()  # once
    assert not conn.has_output


def test_abort_drops_the_held_frame() -> None:
    conn = server()
    conn.receive_data(frame(BINARY, length=5000)[:20])
    conn.abort("connection closed")
    assert not conn.holding_close and not conn.has_output


# ================================================================================== the held path of the driver
def test_messages_before_the_oversized_header_are_answered_first() -> None:
    """Valid messages in the same read come out first (events_held), then the failure, then the held frame."""
    conn = server()
    data = frame(TEXT, b"hello") + frame(BINARY, b"x" * 400)
    events = conn.receive_data(data[:30])
    assert events == [Message("hello")] and conn.events_held
    conn.send_text("hello")  # the driver's answer
    [closed] = conn.receive_data(b"")
    assert isinstance(closed, Closed) and closed.code == 1009
    assert conn.holding_close
    answer = conn.data_to_send()
    assert answer == b"\x81\x05hello"  # the answer, not our close frame yet
    conn.receive_data(data[30:])
    assert close_frame_1009(conn.data_to_send())


def test_a_close_started_by_the_driver_meanwhile_is_not_held() -> None:
    conn = server()
    conn.receive_data(frame(TEXT, b"hello") + frame(BINARY, b"x" * 400)[:20])
    assert conn.close(1001, "going away")  # while the failure is held back: our close frame is already queued
    conn.receive_data(b"")
    assert not conn.holding_close and conn.state is State.CLOSED


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 300), min_size=1, max_size=6),
    cuts=st.lists(st.integers(1, 400), min_size=1, max_size=30),
)
def test_any_split_releases_the_close_frame_exactly_at_the_end_of_the_message(
    sizes: list[int], cuts: list[int]
) -> None:
    sizes = [LIMIT + 1, *sizes]  # the first fragment alone is over the limit
    message = b"".join(
        frame(BINARY if i == 0 else CONT, b"z" * n, fin=i == len(sizes) - 1) for i, n in enumerate(sizes)
    )
    conn = server()
    at = 0
    released_at = None
    for cut in [*cuts, len(message)]:
        piece = message[at : at + cut]
        at += len(piece)
        conn.receive_data(piece)
        if conn.has_output and released_at is None:
            released_at = at
            assert close_frame_1009(conn.data_to_send())
        if at == len(message):
            break
    assert released_at == len(message)


# ================================================================================== configuration
def test_defaults() -> None:
    cfg = parse_config({})
    assert cfg.limits.linger_max_bytes == 8 << 20
    assert cfg.timeouts.linger == 2.0


@pytest.mark.parametrize(
    "data,key",
    [
        ({"limits": {"linger_max_bytes": -1}}, "limits.linger_max_bytes"),
        ({"limits": {"linger_max_bytes": "8 MiB"}}, "limits.linger_max_bytes"),
        ({"timeouts": {"linger": 0}}, "timeouts.linger"),
        ({"timeouts": {"linger": -1.5}}, "timeouts.linger"),
    ],
)
def test_invalid_values_are_refused(data: dict[str, dict[str, object]], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert info.value.key == key


def test_zero_bytes_is_allowed() -> None:
    assert parse_config({"limits": {"linger_max_bytes": 0}}).limits.linger_max_bytes == 0
