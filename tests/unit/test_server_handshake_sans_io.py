"""The server role of the opening handshake (RFC 6455 section 4.2), driven with bytes alone.

A :class:`ServerProtocol` gets request bytes through ``receive_data`` and answers with response values from
``accept`` / ``reject`` that ``send_response`` queues; nothing here touches a socket. The wire is checked with a
small independent reader (:func:`split_response`, :func:`read_frames`) rather than with the parsers under test.
"""

from __future__ import annotations

import zlib

import pytest

from selectws.protocol.connection import State
from selectws.protocol.deflate import DeflateSettings
from selectws.protocol.events import Closed, Event, HandshakeFailed, Message, Ping
from selectws.protocol.frames import encode_frame
from selectws.protocol.handshake import ServerProtocol
from selectws.protocol.http11 import HttpLimits, Request, Response

RFC_KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 section 1.3 / 4.2.2
RFC_ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
MASK = b"\x37\xfa\x21\x3d"

BASE = [
    ("Host", "server.example.com"),
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Key", RFC_KEY),
    ("Sec-WebSocket-Version", "13"),
]


def upgrade(
    target: str = "/chat",
    *,
    method: str = "GET",
    version: str = "HTTP/1.1",
    drop: tuple[str, ...] = (),
    replace: dict[str, str] | None = None,
    extra: list[tuple[str, str]] | None = None,
) -> bytes:
    """An upgrade request head: BASE with ``drop``ped and ``replace``d fields, plus ``extra`` ones."""
    replace = replace or {}
    fields = [(k, replace.get(k, v)) for k, v in BASE if k not in drop]
    fields += extra or []
    head = f"{method} {target} {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields) + "\r\n"
    return head.encode("latin-1")


def client_frame(opcode: int, payload: bytes, *, fin: bool = True, rsv1: bool = False) -> bytes:
    return encode_frame(opcode, payload, fin=fin, rsv1=rsv1, mask=MASK)


def split_response(data: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
    """Status, reason, header fields and what follows the head, read without the module's own parser."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    assert sep, f"no complete response head in {data!r}"
    lines = head.decode("latin-1").split("\r\n")
    version, status, reason = lines[0].split(" ", 2)
    assert version == "HTTP/1.1"
    fields = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields.append((name, value.strip()))
    return int(status), reason, fields, rest


def field_values(fields: list[tuple[str, str]], name: str) -> list[str]:
    return [v for k, v in fields if k.lower() == name.lower()]


def read_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(first byte, payload) of each complete unmasked frame in ``data``; asserts nothing is left over."""
    frames = []
    pos = 0
    while pos < len(data):
        b0, b1 = data[pos], data[pos + 1]
        assert not b1 & 0x80, "a server must not mask its frames"
        n, i = b1 & 0x7F, pos + 2
        if n == 126:
            n, i = int.from_bytes(data[i : i + 2], "big"), i + 2
        elif n == 127:
            n, i = int.from_bytes(data[i : i + 8], "big"), i + 8
        assert i + n <= len(data), "truncated frame"
        frames.append((b0, data[i : i + n]))
        pos = i + n
    return frames


def received_request(server: ServerProtocol, data: bytes | bytearray | memoryview) -> Request:
    events = server.receive_data(data)
    assert len(events) == 1 and isinstance(events[0], Request), events
    return events[0]


def handshake_failed(events: list[Event]) -> HandshakeFailed:
    assert len(events) == 1 and isinstance(events[0], HandshakeFailed), events
    return events[0]


def state_of(server: ServerProtocol) -> State:
    """The state, read through a call (so that a type checker does not pin it after an earlier assert)."""
    return server.state


def open_server(data: bytes | None = None, **accept_kwargs: object) -> tuple[ServerProtocol, bytes]:
    """A server past a 101 (what it wrote is returned); ``data`` defaults to a valid request."""
    server = ServerProtocol()
    request = received_request(server, upgrade() if data is None else data)
    response = server.accept(request, **accept_kwargs)  # type: ignore[arg-type]
    assert response.status == 101
    server.send_response(response)
    return server, server.data_to_send()


def refused(data: bytes) -> tuple[ServerProtocol, Response]:
    """Feed ``data`` (a complete head) and return the response ``accept`` gives for it."""
    server = ServerProtocol()
    return server, server.accept(received_request(server, data))


# ---------------------------------------------------------------------------------------------- the valid upgrade


def test_receive_data_turns_a_valid_upgrade_into_a_request_event() -> None:
    server = ServerProtocol()
    request = received_request(server, upgrade("/chat/room%201?user=ann&x=1&user=bob"))
    assert request.method == "GET"
    assert request.target == "/chat/room%201?user=ann&x=1&user=bob"
    assert request.path == "/chat/room 1"
    assert request.query == {"user": "ann", "x": "1"}
    assert request.version == (1, 1)
    assert request.headers.get("sec-websocket-key") == RFC_KEY
    assert request.headers.get("HOST") == "server.example.com"


def test_accept_answers_101_with_the_rfc_accept_key_on_the_wire() -> None:
    _, wire = open_server()
    status, reason, fields, rest = split_response(wire)
    assert (status, reason) == (101, "Switching Protocols")
    assert field_values(fields, "Sec-WebSocket-Accept") == [RFC_ACCEPT]
    assert [v.lower() for v in field_values(fields, "Upgrade")] == ["websocket"]
    assert [v.lower() for v in field_values(fields, "Connection")] == ["upgrade"]
    assert rest == b""


def test_accept_returns_a_value_and_sends_nothing_by_itself() -> None:
    server = ServerProtocol()
    response = server.accept(received_request(server, upgrade()))
    assert response.status == 101
    assert response.headers.get("Sec-WebSocket-Accept") == RFC_ACCEPT
    assert not server.has_output
    assert server.state is State.CONNECTING


def test_101_response_has_no_body_and_no_connection_close() -> None:
    server = ServerProtocol()
    response = server.accept(received_request(server, upgrade()))
    assert response.body == b""
    assert "close" not in response.headers.tokens("Connection")
    assert "Content-Length" not in response.headers


def test_state_is_connecting_until_the_101_is_queued_then_open() -> None:
    server = ServerProtocol()
    assert server.state is State.CONNECTING
    assert server.receive_data(upgrade()[:20]) == []
    assert server.state is State.CONNECTING
    request = received_request(server, upgrade()[20:])
    assert server.state is State.CONNECTING
    response = server.accept(request)
    assert server.state is State.CONNECTING
    server.send_response(response)
    assert state_of(server) is State.OPEN
    assert server.has_output
    assert not server.close_transport
    server.data_to_send()
    assert state_of(server) is State.OPEN


def test_sending_is_refused_before_the_101() -> None:
    server = ServerProtocol()
    received_request(server, upgrade())
    assert server.send_text("early") is False
    assert server.send_binary(b"early") is False
    assert server.send_ping() is False
    assert server.close() is False
    assert not server.has_output


def test_first_message_after_the_101_follows_the_response_on_the_wire() -> None:
    server, _ = open_server()
    assert server.send_text("hello")
    assert read_frames(server.data_to_send()) == [(0x81, b"hello")]


def test_response_value_changed_before_sending_is_what_goes_on_the_wire() -> None:
    server = ServerProtocol()
    response = server.accept(received_request(server, upgrade()), headers=[("X-From-Accept", "1")])
    response.headers.add("Set-Cookie", "session=abc")
    server.send_response(response)
    status, _, fields, _ = split_response(server.data_to_send())
    assert status == 101
    assert field_values(fields, "X-From-Accept") == ["1"]
    assert field_values(fields, "Set-Cookie") == ["session=abc"]
    assert field_values(fields, "Sec-WebSocket-Accept") == [RFC_ACCEPT]


def test_response_serialize_matches_what_send_response_writes() -> None:
    server = ServerProtocol()
    response = server.accept(received_request(server, upgrade()))
    expected = response.serialize()
    server.send_response(response)
    assert server.data_to_send() == expected


def test_data_to_send_never_changes_the_state() -> None:
    server = ServerProtocol()
    received_request(server, upgrade())
    server.send_response(server.reject(403, "no"))
    assert server.state is State.CLOSED and server.close_transport
    server.data_to_send()
    assert server.state is State.CLOSED and server.close_transport
    assert server.data_to_send() == b""


def test_receive_eof_while_connecting_closes_without_events() -> None:
    server = ServerProtocol()
    server.receive_data(upgrade()[:10])
    assert server.receive_eof() == []
    assert server.state is State.CLOSED
    assert server.close_transport
    assert server.receive_data(upgrade()[10:]) == []


def test_abort_while_connecting_returns_no_event_and_closes() -> None:
    server = ServerProtocol()
    received_request(server, upgrade() + client_frame(0x1, b"early"))
    assert server.abort("gone") is None
    assert server.state is State.CLOSED and server.close_transport
    assert not server.has_output
    assert not server.events_held
    with pytest.raises(RuntimeError):
        server.send_response(server.reject(400, "too late"))


def test_abort_after_a_rejection_was_queued_leaves_nothing_to_send() -> None:
    # abort(): "the transport is gone ... CLOSED at once, with nothing more to send". A rejection already made
    # the connection CLOSED, but its bytes are still queued: after abort() the driver must not be told to write.
    server = ServerProtocol()
    received_request(server, upgrade())
    server.send_response(server.reject(400, "bad"))
    assert server.has_output
    assert server.abort("send failed") is None
    assert server.state is State.CLOSED and server.close_transport
    assert not server.has_output


# ---------------------------------------------------------------------------------------------- refusals


def test_reject_puts_status_body_and_connection_close_on_the_wire_and_closes() -> None:
    server = ServerProtocol()
    received_request(server, upgrade())
    response = server.reject(403, "origin not allowed", [("X-Why", "origin")])
    assert response.status == 403
    server.send_response(response)
    assert server.state is State.CLOSED
    assert server.close_transport
    status, reason, fields, body = split_response(server.data_to_send())
    assert (status, reason) == (403, "Forbidden")
    assert body == b"403 origin not allowed\n"
    assert field_values(fields, "Content-Length") == [str(len(body))]
    assert field_values(fields, "Connection") == ["close"]
    assert field_values(fields, "X-Why") == ["origin"]
    assert field_values(fields, "Content-Type")[0].startswith("text/plain")


def test_nothing_is_parsed_after_a_rejection_is_queued() -> None:
    server = ServerProtocol()
    received_request(server, upgrade())
    server.send_response(server.reject(503, "busy"))
    assert server.receive_data(client_frame(0x1, b"late")) == []
    assert server.receive_data(b"") == []
    assert not server.events_held


def test_plain_get_is_told_to_upgrade_with_426() -> None:
    plain = b"GET /chat HTTP/1.1\r\nHost: server.example.com\r\n\r\n"
    server, response = refused(plain)
    assert response.status == 426
    assert response.headers.get("Upgrade") == "websocket"
    server.send_response(response)
    assert server.state is State.CLOSED and server.close_transport
    status, _, fields, _ = split_response(server.data_to_send())
    assert status == 426
    assert "close" in [t.strip().lower() for v in field_values(fields, "Connection") for t in v.split(",")]


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(upgrade(replace={"Sec-WebSocket-Key": "not base64!"}), id="not-base64"),
        pytest.param(upgrade(replace={"Sec-WebSocket-Key": "c2hvcnQ="}), id="8-bytes"),
        pytest.param(upgrade(replace={"Sec-WebSocket-Key": "AAAAAAAAAAAAAAAAAAAAAAAA"}), id="18-bytes"),
        pytest.param(upgrade(drop=("Sec-WebSocket-Key",)), id="missing"),
        pytest.param(upgrade(extra=[("Sec-WebSocket-Key", RFC_KEY)]), id="twice"),
    ],
)
def test_bad_key_is_400(data: bytes) -> None:
    server, response = refused(data)
    assert response.status == 400
    assert "Sec-WebSocket-Accept" not in response.headers
    server.send_response(response)
    assert split_response(server.data_to_send())[0] == 400
    assert server.state is State.CLOSED


def test_post_is_405_with_allow_get() -> None:
    _, response = refused(upgrade(method="POST"))
    assert response.status == 405
    assert response.headers.get("Allow") == "GET"


@pytest.mark.parametrize(
    ("data", "status", "header"),
    [
        (upgrade(version="HTTP/1.0"), 400, None),
        (upgrade(replace={"Connection": "keep-alive"}), 400, None),
        (upgrade(drop=("Host",)), 400, None),
        (upgrade(replace={"Sec-WebSocket-Version": "8"}), 426, ("Sec-WebSocket-Version", "13")),
        (upgrade(drop=("Sec-WebSocket-Version",)), 426, ("Sec-WebSocket-Version", "13")),
    ],
    ids=["http-1.0", "no-connection-upgrade", "no-host", "version-8", "no-version"],
)
def test_other_invalid_upgrades(data: bytes, status: int, header: tuple[str, str] | None) -> None:
    _, response = refused(data)
    assert response.status == status
    if header is not None:
        assert response.headers.get(header[0]) == header[1]


def test_upgrade_tokens_are_case_insensitive_lists() -> None:
    _, response = refused(upgrade(replace={"Upgrade": "WebSocket", "Connection": "keep-alive, Upgrade"}))
    assert response.status == 101


def test_http_2_0_is_505_through_handshake_failed() -> None:
    server = ServerProtocol()
    failed = handshake_failed(server.receive_data(upgrade(version="HTTP/2.0")))
    assert failed.status == 505
    server.send_response(server.reject(failed.status, failed.reason, failed.headers))
    assert split_response(server.data_to_send())[0] == 505
    assert server.state is State.CLOSED and server.close_transport


@pytest.mark.parametrize(
    "data",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /chat HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET /chat HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
        b"GET chat HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /chat HTTP/x\r\nHost: a\r\n\r\n",
        b"GET /chat HTTP/1.1\r\nHost: a\x01b\r\n\r\n",
    ],
    ids=["request-line", "no-colon", "folding", "target", "version", "control-char"],
)
def test_malformed_head_gives_handshake_failed_then_reject(data: bytes) -> None:
    server = ServerProtocol()
    events = server.receive_data(data)
    assert len(events) == 1 and isinstance(events[0], HandshakeFailed)
    failed = events[0]
    assert failed.status == 400
    assert server.state is State.CONNECTING  # the server still owes an answer
    assert server.receive_data(b"more bytes\r\n\r\n") == []  # nothing more is parsed
    server.send_response(server.reject(failed.status, failed.reason, failed.headers))
    status, _, fields, body = split_response(server.data_to_send())
    assert status == 400
    assert body == f"400 {failed.reason}\n".encode()
    assert field_values(fields, "Connection") == ["close"]
    assert state_of(server) is State.CLOSED and server.close_transport


# ---------------------------------------------------------------------------------------------- limits


def test_request_line_over_the_limit_is_414_before_its_end_arrives() -> None:
    server = ServerProtocol(http_limits=HttpLimits(max_request_line=64))
    assert server.receive_data(b"GET /" + b"a" * 59) == []  # exactly 64 bytes, the CRLF may follow
    assert handshake_failed(server.receive_data(b"a")).status == 414


def test_request_line_at_the_limit_is_accepted() -> None:
    target = "/" + "a" * (64 - len("GET  HTTP/1.1") - 1)
    data = upgrade(target)
    assert data.index(b"\r\n") == 64
    server = ServerProtocol(http_limits=HttpLimits(max_request_line=64))
    assert received_request(server, data).target == target


def test_header_bytes_over_the_limit_are_431() -> None:
    server = ServerProtocol(http_limits=HttpLimits(max_header_bytes=512))
    data = upgrade(extra=[("X-Big", "x" * 600)])
    # The head cannot end within 512 + 4 bytes any more.
    assert handshake_failed(server.receive_data(data[:520])).status == 431


@pytest.mark.parametrize(("head_size", "refused_with"), [(512, None), (513, 431)])
def test_header_bytes_limit_boundary(head_size: int, refused_with: int | None) -> None:
    bare = len(upgrade(extra=[("X-Pad", "")])) - 4  # the head without its blank line
    data = upgrade(extra=[("X-Pad", "p" * (head_size - bare))])
    assert len(data) - 4 == head_size
    server = ServerProtocol(http_limits=HttpLimits(max_header_bytes=512))
    events = server.receive_data(data)
    if refused_with is None:
        assert [type(e) for e in events] == [Request]
    else:
        assert handshake_failed(events).status == refused_with


def test_too_many_header_fields_are_431() -> None:
    server = ServerProtocol(http_limits=HttpLimits(max_header_count=8))
    assert handshake_failed(server.receive_data(upgrade(extra=[(f"X-{i}", "1") for i in range(4)]))).status == 431


def test_too_many_header_fields_are_refused_before_the_head_ends() -> None:
    server = ServerProtocol(http_limits=HttpLimits(max_header_count=8))
    head = upgrade(extra=[(f"X-{i}", "1") for i in range(20)])
    no_blank_line = head[: head.rindex(b"\r\n\r\n")]
    assert handshake_failed(server.receive_data(no_blank_line)).status == 431


def test_header_count_at_the_limit_is_accepted() -> None:
    server = ServerProtocol(http_limits=HttpLimits(max_header_count=len(BASE) + 1))
    request = received_request(server, upgrade(extra=[("X-One", "1")]))
    assert len(request.headers) == len(BASE) + 1


# ---------------------------------------------------------------------------------------------- arrival patterns


def test_request_split_byte_by_byte() -> None:
    server = ServerProtocol()
    data = upgrade()
    for i in range(len(data) - 1):
        assert server.receive_data(data[i : i + 1]) == [], i
    request = received_request(server, data[-1:])
    assert request.headers.get("Sec-WebSocket-Key") == RFC_KEY
    server.send_response(server.accept(request))
    assert server.state is State.OPEN


def test_request_from_a_memoryview_of_a_reused_buffer() -> None:
    server = ServerProtocol()
    data = upgrade()
    buf = bytearray(data[:30])
    assert server.receive_data(memoryview(buf)) == []
    buf[:] = b"\x00" * 30  # the driver reuses its receive buffer
    request = received_request(server, memoryview(bytearray(data[30:])))
    assert request.headers.get("Sec-WebSocket-Key") == RFC_KEY


def test_frames_pipelined_after_the_request_are_held_until_the_101() -> None:
    server = ServerProtocol()
    events = server.receive_data(upgrade() + client_frame(0x1, b"hi") + client_frame(0x9, b"p"))
    assert len(events) == 1 and isinstance(events[0], Request)
    assert not server.events_held
    assert isinstance(events[0], Request)
    server.send_response(server.accept(events[0]))
    assert server.events_held
    assert server.state is State.OPEN
    assert server.receive_data(b"") == [Message("hi"), Ping(b"p")]
    assert not server.events_held
    status, _, _, frames = split_response(server.data_to_send())
    assert status == 101
    assert read_frames(frames) == [(0x8A, b"p")]  # the pong follows the 101


def test_pipelined_message_and_close_come_out_in_two_steps() -> None:
    server = ServerProtocol()
    events = server.receive_data(upgrade() + client_frame(0x1, b"hi") + client_frame(0x8, b"\x03\xe8bye"))
    assert isinstance(events[0], Request)
    server.send_response(server.accept(events[0]))
    server.data_to_send()
    assert server.receive_data(b"") == [Message("hi")]
    assert server.events_held  # the close waits until the message is handled
    assert server.send_text("echo: hi")
    assert server.receive_data(b"") == [Closed(1000, "bye", by_peer=True)]
    assert server.state is State.CLOSED and server.close_transport
    assert read_frames(server.data_to_send()) == [(0x81, b"echo: hi"), (0x88, b"\x03\xe8")]


def test_data_before_the_response_is_not_parsed_as_frames_until_the_101() -> None:
    server = ServerProtocol()
    request = received_request(server, upgrade())
    # A client that does not wait for the 101, in several reads; the second frame is split.
    text = client_frame(0x1, b"early")
    binary = client_frame(0x2, b"\x00\x01")
    assert server.receive_data(text) == []
    assert server.receive_data(binary[:3]) == []
    assert server.receive_data(b"") == []
    assert not server.events_held
    server.send_response(server.accept(request))
    assert server.events_held
    assert server.receive_data(binary[3:]) == [Message("early"), Message(b"\x00\x01")]
    assert not server.events_held


def test_split_request_with_frames_in_the_last_piece() -> None:
    server = ServerProtocol()
    data = upgrade() + client_frame(0x2, b"abc")
    cut = len(upgrade()) - 2  # the blank line is split from the rest
    assert server.receive_data(data[:cut]) == []
    request = received_request(server, data[cut:])
    server.send_response(server.accept(request))
    assert server.receive_data(b"") == [Message(b"abc")]


def test_unmasked_pipelined_frame_fails_the_connection_after_the_101() -> None:
    server = ServerProtocol()
    events = server.receive_data(upgrade() + encode_frame(0x1, b"unmasked"))
    assert isinstance(events[0], Request)
    server.send_response(server.accept(events[0]))
    server.data_to_send()
    [closed] = server.receive_data(b"")
    assert isinstance(closed, Closed) and closed.code == 1002 and closed.error
    assert server.state is State.CLOSED and server.close_transport
    assert read_frames(server.data_to_send())[0][0] == 0x88


# ---------------------------------------------------------------------------------------------- subprotocols


def test_subprotocol_is_echoed() -> None:
    data = upgrade(extra=[("Sec-WebSocket-Protocol", "chat.v2, chat.v1")])
    _, wire = open_server(data, subprotocol="chat.v1")
    _, _, fields, _ = split_response(wire)
    assert field_values(fields, "Sec-WebSocket-Protocol") == ["chat.v1"]


def test_no_subprotocol_header_without_a_choice() -> None:
    data = upgrade(extra=[("Sec-WebSocket-Protocol", "chat.v2")])
    _, wire = open_server(data)
    _, _, fields, _ = split_response(wire)
    assert field_values(fields, "Sec-WebSocket-Protocol") == []


# ---------------------------------------------------------------------------------------------- permessage-deflate

OFFER = ("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits")


def compress(payload: bytes) -> bytes:
    """What a client with a fresh 15-bit context sends: a sync-flushed raw deflate stream without its tail."""
    c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
    data = c.compress(payload) + c.flush(zlib.Z_SYNC_FLUSH)
    assert data.endswith(b"\x00\x00\xff\xff")
    return data[:-4]


def inflate(payload: bytes) -> bytes:
    return zlib.decompressobj(-15).decompress(payload + b"\x00\x00\xff\xff")


def test_deflate_is_negotiated_when_offered_and_configured() -> None:
    server, wire = open_server(upgrade(extra=[OFFER]), deflate=DeflateSettings())
    _, _, fields, _ = split_response(wire)
    [value] = field_values(fields, "Sec-WebSocket-Extensions")
    assert value.split(";")[0].strip() == "permessage-deflate"
    assert server.extension is not None


def test_deflate_settings_shape_the_agreed_parameters() -> None:
    settings = DeflateSettings(server_no_context_takeover=True, server_max_window_bits=10)
    server, wire = open_server(upgrade(extra=[OFFER]), deflate=settings)
    _, _, fields, _ = split_response(wire)
    [value] = field_values(fields, "Sec-WebSocket-Extensions")
    params = {p.strip() for p in value.split(";")}
    assert {"permessage-deflate", "server_no_context_takeover", "server_max_window_bits=10"} <= params
    agreed = server.extension.params  # type: ignore[union-attr]
    assert agreed.server_no_context_takeover and agreed.server_max_window_bits == 10


def test_compressed_message_round_trip_after_negotiation() -> None:
    server, _ = open_server(upgrade(extra=[OFFER]), deflate=DeflateSettings())
    text = "compress me " * 50
    events = server.receive_data(client_frame(0x1, compress(text.encode()), rsv1=True))
    assert events == [Message(text)]
    assert server.send_text(text)
    [(b0, payload)] = read_frames(server.data_to_send())
    assert b0 == 0xC1  # FIN + RSV1 + text
    assert len(payload) < len(text)
    assert inflate(payload) == text.encode()


def test_deflate_not_negotiated_without_settings_even_when_offered() -> None:
    server, wire = open_server(upgrade(extra=[OFFER]))
    _, _, fields, _ = split_response(wire)
    assert field_values(fields, "Sec-WebSocket-Extensions") == []
    assert server.extension is None
    # RSV1 is then a protocol error, and our messages go out uncompressed.
    server.send_text("plain")
    assert read_frames(server.data_to_send()) == [(0x81, b"plain")]
    [closed] = server.receive_data(client_frame(0x1, compress(b"x"), rsv1=True))
    assert isinstance(closed, Closed) and closed.code == 1002


def test_deflate_not_negotiated_when_not_offered() -> None:
    server, wire = open_server(upgrade(), deflate=DeflateSettings())
    _, _, fields, _ = split_response(wire)
    assert field_values(fields, "Sec-WebSocket-Extensions") == []
    assert server.extension is None


def test_only_unknown_extensions_offered_means_no_compression() -> None:
    server, wire = open_server(upgrade(extra=[("Sec-WebSocket-Extensions", "x-webkit-foo")]), deflate=DeflateSettings())
    _, _, fields, _ = split_response(wire)
    assert field_values(fields, "Sec-WebSocket-Extensions") == []
    assert server.extension is None


def test_malformed_extension_header_is_400_when_deflate_is_on() -> None:
    server = ServerProtocol()
    request = received_request(server, upgrade(extra=[("Sec-WebSocket-Extensions", "permessage-deflate; =")]))
    response = server.accept(request, deflate=DeflateSettings())
    assert response.status == 400
    server.send_response(response)
    assert server.state is State.CLOSED and server.extension is None


def test_deflate_agreed_by_accept_is_dropped_when_a_rejection_is_sent_instead() -> None:
    server = ServerProtocol()
    request = received_request(server, upgrade(extra=[OFFER]))
    assert server.accept(request, deflate=DeflateSettings()).status == 101
    server.send_response(server.reject(403, "changed my mind"))
    assert server.state is State.CLOSED
    assert server.extension is None


def test_the_last_accept_decides_whether_deflate_is_in_force() -> None:
    server = ServerProtocol()
    request = received_request(server, upgrade(extra=[OFFER]))
    assert "Sec-WebSocket-Extensions" in server.accept(request, deflate=DeflateSettings()).headers
    response = server.accept(request)  # the caller changed its mind: no compression after all
    assert "Sec-WebSocket-Extensions" not in response.headers
    server.send_response(response)
    assert server.extension is None
    server.send_text("plain " * 20)
    [(b0, _)] = read_frames(split_response(server.data_to_send())[3])
    assert b0 == 0x81  # no RSV1: the client was told there is no extension


# ---------------------------------------------------------------------------------------------- misuse


def test_send_response_twice_raises() -> None:
    server = ServerProtocol()
    response = server.accept(received_request(server, upgrade()))
    server.send_response(response)
    with pytest.raises(RuntimeError):
        server.send_response(response)
    assert server.state is State.OPEN


def test_send_response_after_a_rejection_raises() -> None:
    server = ServerProtocol()
    received_request(server, upgrade())
    server.send_response(server.reject(400, "no"))
    out = server.data_to_send()
    with pytest.raises(RuntimeError):
        server.send_response(server.reject(400, "again"))
    assert not server.has_output
    assert out.startswith(b"HTTP/1.1 400 ")


def test_accept_of_an_invalid_request_returns_the_refusal_value() -> None:
    server, response = refused(upgrade(drop=("Sec-WebSocket-Key",)))
    assert response.status == 400
    assert server.state is State.CONNECTING and not server.has_output
    server.send_response(response)
    assert state_of(server) is State.CLOSED and server.close_transport
