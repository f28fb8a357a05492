"""Client-role regressions found by running Autobahn's fuzzing server against the core.

See tests/conformance/autobahn_client.sh.
"""

from __future__ import annotations

from selectws.protocol.connection import CLIENT, Connection, State
from selectws.protocol.errors import CloseCode
from selectws.protocol.events import Closed, Message
from selectws.protocol.frames import encode_header

# Autobahn 6.4.3 / 6.4.4: "κόσμε" + an invalid 4-byte sequence (f4 90 80 80 is above U+10FFFF) + "edited".
_PART1 = bytes.fromhex("cebae1bdb9cf83cebcceb5")
_PART2 = bytes.fromhex("f4908080")
_PART3 = bytes.fromhex("656469746564")


def _client() -> Connection:
    return Connection(CLIENT, mask_source=lambda: b"\x00\x00\x00\x00")


def test_invalid_utf8_in_an_incomplete_unmasked_text_frame_fails_fast() -> None:
    # 6.4.3: one text frame from the server arriving in three chops; the second chop is already invalid.
    conn = _client()
    payload = _PART1 + _PART2 + _PART3
    assert conn.receive_data(encode_header(0x81, len(payload)) + _PART1) == []
    events = conn.receive_data(_PART2)
    why = "invalid UTF-8 in a text message"
    assert events == [Closed(CloseCode.INVALID_DATA, why, error=why)]
    assert conn.state is State.CLOSED and conn.close_transport
    frame = conn.data_to_send()
    assert frame[0] == 0x88 and frame[1] & 0x80  # a masked close frame
    assert frame[6:8] == CloseCode.INVALID_DATA.to_bytes(2, "big")


def test_invalid_byte_after_a_truncated_sequence_fails_at_that_byte() -> None:
    # 6.4.4: the frame stops right after f4 90; the invalid continuation is known without the rest.
    conn = _client()
    payload = _PART1 + _PART2 + _PART3
    assert conn.receive_data(encode_header(0x81, len(payload)) + _PART1 + b"\xf4") == []
    events = conn.receive_data(b"\x90")
    assert len(events) == 1 and isinstance(events[0], Closed) and events[0].code == CloseCode.INVALID_DATA


def test_incomplete_unmasked_continuation_frame_is_checked_too() -> None:
    conn = _client()
    assert conn.receive_data(bytes((0x01, len(_PART1))) + _PART1) == []  # first fragment, complete and valid
    payload = _PART2 + _PART3
    assert conn.receive_data(bytes((0x80, len(payload))) + _PART2[:1]) == []  # f4: may still start U+10xxxx
    events = conn.receive_data(_PART2[1:2])  # f4 90 is above U+10FFFF
    assert len(events) == 1 and isinstance(events[0], Closed) and events[0].code == CloseCode.INVALID_DATA


def test_valid_text_split_inside_characters_is_delivered_whole() -> None:
    text = "κόσμε-€-😀" * 20
    raw = text.encode("utf-8")
    wire = encode_header(0x81, len(raw)) + raw
    conn = _client()
    events = []
    for i in range(0, len(wire), 3):  # every chop boundary, including inside multi-byte characters
        events += conn.receive_data(wire[i : i + 3])
    assert events == [Message(text)]
    # The piecemeal check was reset: a second message on the same connection is checked from its own start.
    events = conn.receive_data(encode_header(0x81, 2) + b"ok")
    assert events == [Message("ok")]
    assert conn.state is State.OPEN
