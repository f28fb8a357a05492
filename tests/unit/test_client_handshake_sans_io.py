"""The client role of the opening handshake (RFC 6455 section 4.1), driven with bytes alone.

``connect`` gives a request value, ``send_request`` queues it, and ``receive_data`` judges the server's answer:
OPEN after a valid 101, CLOSED with ``handshake_error`` otherwise. The server's bytes are written by hand here.
"""

from __future__ import annotations

import base64
import zlib

import pytest

from selectws.protocol.connection import State
from selectws.protocol.deflate import DeflateSettings
from selectws.protocol.events import Closed, HandshakeFailed, Message, Ping, Pong
from selectws.protocol.frames import encode_frame
from selectws.protocol.handshake import ClientProtocol
from selectws.protocol.http11 import Request, Response

RFC_KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 section 1.3 / 4.2.2
RFC_ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
TAIL = b"\x00\x00\xff\xff"


class Masks:
    """A deterministic mask source that remembers what it handed out."""

    def __init__(self) -> None:
        self.given: list[bytes] = []

    def __call__(self) -> bytes:
        n = len(self.given) + 1
        mask = bytes((n, 0x10 + n, 0x20 + n, 0x30 + n))
        self.given.append(mask)
        return mask


def response(
    status: int = 101,
    reason: str = "Switching Protocols",
    *,
    accept: str | None = RFC_ACCEPT,
    upgrade: bool = True,
    extra: list[tuple[str, str]] | None = None,
) -> bytes:
    fields: list[tuple[str, str]] = []
    if upgrade:
        fields += [("Upgrade", "websocket"), ("Connection", "Upgrade")]
    if accept is not None:
        fields.append(("Sec-WebSocket-Accept", accept))
    fields += extra or []
    head = f"HTTP/1.1 {status} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields) + "\r\n"
    return head.encode("latin-1")


def started(**connect_kwargs: object) -> ClientProtocol:
    """A client whose request is queued (and taken): it waits for the server's answer."""
    client = ClientProtocol(key=RFC_KEY, mask_source=Masks())
    client.send_request(client.connect("server.example.com", "/chat", **connect_kwargs))  # type: ignore[arg-type]
    client.data_to_send()
    return client


def read_masked_frames(data: bytes) -> list[tuple[int, bytes, bytes]]:
    """(first byte, mask, unmasked payload) of each frame; asserts every frame is masked and complete."""
    frames = []
    pos = 0
    while pos < len(data):
        b0, b1 = data[pos], data[pos + 1]
        assert b1 & 0x80, "a client must mask every frame"
        n, i = b1 & 0x7F, pos + 2
        if n == 126:
            n, i = int.from_bytes(data[i : i + 2], "big"), i + 2
        elif n == 127:
            n, i = int.from_bytes(data[i : i + 8], "big"), i + 8
        mask, i = data[i : i + 4], i + 4
        assert i + n <= len(data), "truncated frame"
        payload = bytes(b ^ mask[k & 3] for k, b in enumerate(data[i : i + n]))
        frames.append((b0, mask, payload))
        pos = i + n
    return frames


# ---------------------------------------------------------------------------------------------- the request


def test_connect_returns_the_request_value() -> None:
    client = ClientProtocol(key=RFC_KEY)
    request = client.connect(
        "server.example.com:8080",
        "/chat?room=1",
        subprotocols=["chat.v2", "chat.v1"],
        deflate=DeflateSettings(),
        origin="https://app.example.com",
        headers=[("Authorization", "Bearer t")],
    )
    assert isinstance(request, Request)
    assert (request.method, request.target, request.version) == ("GET", "/chat?room=1", (1, 1))
    assert request.path == "/chat"
    h = request.headers
    assert h.get("Host") == "server.example.com:8080"
    assert h.tokens("Upgrade") == ["websocket"]
    assert h.tokens("Connection") == ["upgrade"]
    assert h.get("Sec-WebSocket-Key") == RFC_KEY
    assert h.get("Sec-WebSocket-Version") == "13"
    assert h.get("Sec-WebSocket-Protocol") == "chat.v2, chat.v1"
    assert (h.get("Sec-WebSocket-Extensions") or "").startswith("permessage-deflate")
    assert h.get("Origin") == "https://app.example.com"
    assert h.get("Authorization") == "Bearer t"
    assert client.state is State.CONNECTING
    assert not client.has_output  # connect() is a value, nothing is queued


def test_connect_without_options_has_no_optional_fields() -> None:
    request = ClientProtocol().connect("h", "/")
    for name in ("Sec-WebSocket-Protocol", "Sec-WebSocket-Extensions", "Origin"):
        assert name not in request.headers


def test_each_client_gets_a_fresh_16_byte_key() -> None:
    keys = {ClientProtocol().connect("h", "/").headers.get("Sec-WebSocket-Key") for _ in range(5)}
    assert len(keys) == 5
    for key in keys:
        assert key is not None and len(base64.b64decode(key, validate=True)) == 16


def test_send_request_queues_the_serialized_request() -> None:
    client = ClientProtocol(key=RFC_KEY)
    request = client.connect("server.example.com", "/chat", subprotocols=["chat"])
    client.send_request(request)
    assert client.has_output
    assert client.data_to_send() == (
        b"GET /chat HTTP/1.1\r\n"
        b"Host: server.example.com\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Protocol: chat\r\n"
        b"\r\n"
    )
    assert client.state is State.CONNECTING


def test_request_value_changed_before_sending_is_what_goes_on_the_wire() -> None:
    client = ClientProtocol(key=RFC_KEY)
    request = client.connect("h", "/chat")
    request.headers.add("Cookie", "a=b")
    client.send_request(request)
    assert b"\r\nCookie: a=b\r\n" in client.data_to_send()


def test_send_request_after_the_handshake_raises() -> None:
    client = started()
    client.receive_data(response())
    assert client.state is State.OPEN
    with pytest.raises(RuntimeError):
        client.send_request(client.connect("h", "/"))


def test_sending_is_refused_before_the_101() -> None:
    client = started()
    assert client.send_text("early") is False
    assert client.send_ping() is False
    assert client.close() is False
    assert not client.has_output


# ---------------------------------------------------------------------------------------------- the answer


def test_101_with_the_right_accept_key_opens() -> None:
    client = started()
    events = client.receive_data(response())
    assert len(events) == 1 and isinstance(events[0], Response)
    assert events[0].status == 101
    assert events[0].headers.get("Sec-WebSocket-Accept") == RFC_ACCEPT
    assert client.response is events[0]
    assert client.state is State.OPEN
    assert client.handshake_error is None
    assert not client.close_transport
    assert client.subprotocol is None
    assert client.extension is None


def test_101_split_byte_by_byte() -> None:
    client = started()
    data = response()
    for i in range(len(data) - 1):
        assert client.receive_data(data[i : i + 1]) == [], i
        assert client.state is State.CONNECTING
    [event] = client.receive_data(data[-1:])
    assert isinstance(event, Response)
    assert client.state is State.OPEN


def test_wrong_accept_key_closes_with_handshake_error() -> None:
    client = started()
    events = client.receive_data(response(accept="AAAAAAAAAAAAAAAAAAAAAAAAAAA="))
    assert [type(e) for e in events] == [Response]
    assert client.state is State.CLOSED and client.close_transport
    assert client.handshake_error is not None
    assert "Sec-WebSocket-Accept" in client.handshake_error.reason


def test_missing_accept_key_closes_with_handshake_error() -> None:
    client = started()
    client.receive_data(response(accept=None))
    assert client.state is State.CLOSED
    assert client.handshake_error is not None


def test_101_without_upgrade_headers_closes_with_handshake_error() -> None:
    client = started()
    client.receive_data(response(upgrade=False))
    assert client.state is State.CLOSED
    assert client.handshake_error is not None


def test_non_101_closes_and_the_response_body_holds_what_followed_the_head() -> None:
    client = started()
    body = b"403 origin not allowed\n"
    data = response(403, "Forbidden", accept=None, upgrade=False,
                    extra=[("Content-Length", str(len(body))), ("Connection", "close")]) + body
    events = client.receive_data(data)
    assert len(events) == 1 and isinstance(events[0], Response)
    assert (events[0].status, events[0].reason) == (403, "Forbidden")
    assert events[0].body == body
    assert client.state is State.CLOSED and client.close_transport
    assert client.handshake_error is not None
    assert client.handshake_error.status == 403
    assert client.receive_data(b"more") == []


def test_subprotocol_chosen_by_the_server_is_recorded() -> None:
    client = started(subprotocols=["chat.v2", "chat.v1"])
    client.receive_data(response(extra=[("Sec-WebSocket-Protocol", "chat.v1")]))
    assert client.state is State.OPEN
    assert client.subprotocol == "chat.v1"


def test_subprotocol_not_offered_closes_with_handshake_error() -> None:
    client = started(subprotocols=["chat.v1"])
    client.receive_data(response(extra=[("Sec-WebSocket-Protocol", "chat.v9")]))
    assert client.state is State.CLOSED and client.close_transport
    assert client.handshake_error is not None
    assert "chat.v9" in client.handshake_error.reason


def test_subprotocol_when_none_was_offered_closes_with_handshake_error() -> None:
    client = started()
    client.receive_data(response(extra=[("Sec-WebSocket-Protocol", "chat")]))
    assert client.state is State.CLOSED
    assert client.handshake_error is not None


def test_extension_when_none_was_offered_closes_with_handshake_error() -> None:
    client = started()
    client.receive_data(response(extra=[("Sec-WebSocket-Extensions", "permessage-deflate")]))
    assert client.state is State.CLOSED and client.close_transport
    assert client.handshake_error is not None
    assert client.extension is None


def test_other_extension_than_the_one_offered_closes_with_handshake_error() -> None:
    client = started(deflate=DeflateSettings())
    client.receive_data(response(extra=[("Sec-WebSocket-Extensions", "x-webkit-deflate-frame")]))
    assert client.state is State.CLOSED
    assert client.handshake_error is not None


def test_deflate_response_contradicting_the_offer_closes_with_handshake_error() -> None:
    client = started(deflate=DeflateSettings(server_no_context_takeover=True))
    client.receive_data(response(extra=[("Sec-WebSocket-Extensions", "permessage-deflate")]))
    assert client.state is State.CLOSED
    assert client.handshake_error is not None


def test_deflate_declined_by_the_server_opens_uncompressed() -> None:
    client = started(deflate=DeflateSettings())
    client.receive_data(response())
    assert client.state is State.OPEN
    assert client.extension is None


def test_deflate_accepted_by_the_server_compresses_both_ways() -> None:
    client = started(deflate=DeflateSettings())
    client.receive_data(response(extra=[("Sec-WebSocket-Extensions", "permessage-deflate")]))
    assert client.state is State.OPEN
    assert client.extension is not None
    text = "squeeze " * 64
    client.send_text(text)
    [(b0, _, payload)] = read_masked_frames(client.data_to_send())
    assert b0 == 0xC1
    assert zlib.decompressobj(-15).decompress(payload + TAIL) == text.encode()
    c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
    compressed = (c.compress(text.encode()) + c.flush(zlib.Z_SYNC_FLUSH))[:-4]
    assert client.receive_data(encode_frame(0x1, compressed, rsv1=True)) == [Message(text)]


def test_malformed_response_head_gives_handshake_failed_and_closes() -> None:
    client = started()
    events = client.receive_data(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
    assert len(events) == 1 and isinstance(events[0], HandshakeFailed)
    assert client.state is State.CLOSED and client.close_transport
    assert client.handshake_error is not None
    assert client.response is None


def test_receive_eof_while_connecting_closes_without_events() -> None:
    client = started()
    client.receive_data(response()[:10])
    assert client.receive_eof() == []
    assert client.state is State.CLOSED and client.close_transport


# ---------------------------------------------------------------------------------------------- frames with the 101


def test_frames_in_the_same_read_as_the_101_are_returned_as_events() -> None:
    client = started()
    frames = encode_frame(0x1, b"welcome") + encode_frame(0x2, b"\x01\x02") + encode_frame(0x9, b"hb")
    events = client.receive_data(response() + frames)
    assert isinstance(events[0], Response)
    assert events[1:] == [Message("welcome"), Message(b"\x01\x02"), Ping(b"hb")]
    assert client.state is State.OPEN
    [(b0, _, payload)] = read_masked_frames(client.data_to_send())
    assert (b0, payload) == (0x8A, b"hb")


def test_partial_frame_after_the_101_completes_on_the_next_read() -> None:
    client = started()
    frame = encode_frame(0x1, b"x" * 300)
    events = client.receive_data(response() + frame[:5])
    assert [type(e) for e in events] == [Response]
    assert client.receive_data(frame[5:]) == [Message("x" * 300)]


def test_message_and_close_with_the_101_hold_the_close_back() -> None:
    client = started()
    events = client.receive_data(response() + encode_frame(0x1, b"last") + encode_frame(0x8, b"\x03\xe9bye"))
    assert [type(e) for e in events] == [Response, Message]
    assert client.events_held
    assert client.receive_data(b"") == [Closed(1001, "bye", by_peer=True)]
    assert client.state is State.CLOSED


def test_masked_frame_with_the_101_fails_the_connection() -> None:
    client = started()
    events = client.receive_data(response() + encode_frame(0x1, b"x", mask=b"abcd"))
    assert isinstance(events[0], Response)
    assert isinstance(events[1], Closed) and events[1].code == 1002 and events[1].error
    assert client.state is State.CLOSED and client.close_transport


def test_frames_after_a_refusal_are_not_parsed() -> None:
    client = started()
    events = client.receive_data(response(accept="bad") + encode_frame(0x1, b"x"))
    assert [type(e) for e in events] == [Response]
    assert client.state is State.CLOSED


# ---------------------------------------------------------------------------------------------- masking


def test_masks_come_from_the_mask_source() -> None:
    masks = Masks()
    client = ClientProtocol(key=RFC_KEY, mask_source=masks)
    client.send_request(client.connect("h", "/"))
    client.data_to_send()
    client.receive_data(response())
    client.send_text("one")
    client.send_binary(b"two")
    client.send_ping(b"three")
    client.close(1000, "four")
    frames = read_masked_frames(client.data_to_send())
    assert [mask for _, mask, _ in frames] == masks.given
    assert len(set(masks.given)) == 4
    assert [(b0, payload) for b0, _, payload in frames] == [
        (0x81, b"one"), (0x82, b"two"), (0x89, b"three"), (0x88, b"\x03\xe8four"),
    ]


def test_automatic_pong_and_close_reply_are_masked_with_the_mask_source() -> None:
    masks = Masks()
    client = ClientProtocol(key=RFC_KEY, mask_source=masks)
    client.send_request(client.connect("h", "/"))
    client.data_to_send()
    client.receive_data(response() + encode_frame(0x9, b"p"))
    client.receive_data(encode_frame(0x8, b"\x03\xe8"))
    frames = read_masked_frames(client.data_to_send())
    assert [(b0, payload) for b0, _, payload in frames] == [(0x8A, b"p"), (0x88, b"\x03\xe8")]
    assert [mask for _, mask, _ in frames] == masks.given


def test_pong_event_from_the_server() -> None:
    client = started()
    events = client.receive_data(response() + encode_frame(0xA, b"ka"))
    assert events[1:] == [Pong(b"ka")]


def test_connect_parses_the_query_of_the_target() -> None:
    request = ClientProtocol().connect("h", "/x?a=1&b=2")
    assert (request.path, request.query_string, request.query) == ("/x", "a=1&b=2", {"a": "1", "b": "2"})


def test_send_request_twice_raises() -> None:
    proto = ClientProtocol()
    request = proto.connect("h", "/x")
    proto.send_request(request)
    with pytest.raises(RuntimeError):
        proto.send_request(request)
