"""Both roles back to back through a fake wire, after h11's ``ConnectionPair``.

:class:`ProtocolPair` joins a :class:`ClientProtocol` and a :class:`ServerProtocol`: what one side's
``data_to_send()`` gives is fed to the other's ``receive_data()``, with the one driver rule applied on both
sides (write whatever is queued; when ``events_held``, handle the events then call ``receive_data(b"")``; once
everything is written and ``close_transport`` is set, close the transport, which the peer sees as EOF). Each
side's events and writes are recorded, and a handler per side plays the application (an echo, say).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Literal

import pytest

from selectws.protocol.connection import Connection, State
from selectws.protocol.deflate import DeflateSettings
from selectws.protocol.events import Closed, Event, Message, Ping, Pong
from selectws.protocol.frames import encode_frame
from selectws.protocol.handshake import ClientProtocol, ServerProtocol, choose_subprotocol
from selectws.protocol.http11 import Request, Response

Side = Literal["client", "server"]
SIDES: tuple[Side, Side] = ("client", "server")
Handler = Callable[[Connection, Event], None]
MIB = 1 << 20


class Masks:
    """A deterministic mask source that remembers what it handed out."""

    def __init__(self) -> None:
        self.given: list[bytes] = []

    def __call__(self) -> bytes:
        n = len(self.given)
        mask = (0x9E3779B1 * (n + 1) & 0xFFFFFFFF).to_bytes(4, "big")
        self.given.append(mask)
        return mask


def echo(conn: Connection, event: Event) -> None:
    """The application most tests want: answer every message with itself."""
    if isinstance(event, Message):
        conn.send_message(event.data)


class ProtocolPair:
    """A client and a server joined by a fake wire; see the module docstring."""

    def __init__(
        self,
        *,
        client: ClientProtocol | None = None,
        server: ServerProtocol | None = None,
        client_handler: Handler | None = None,
        server_handler: Handler | None = None,
    ) -> None:
        self.masks = Masks()
        self.client = client if client is not None else ClientProtocol(mask_source=self.masks)
        self.server = server if server is not None else ServerProtocol()
        self.handlers: dict[Side, Handler | None] = {"client": client_handler, "server": server_handler}
        self.events: dict[Side, list[Event]] = {"client": [], "server": []}
        self.writes: dict[Side, list[bytes]] = {"client": [], "server": []}  # each data_to_send(), in order
        self.held: dict[Side, int] = {"client": 0, "server": 0}  # how often receive_data held events back
        self.transport_closed: dict[Side, bool] = {"client": False, "server": False}
        self.eof: dict[Side, bool] = {"client": False, "server": False}  # whether the side saw its peer's EOF

    # ------------------------------------------------------------------ plumbing

    def proto(self, side: Side) -> Connection:
        return self.client if side == "client" else self.server

    @staticmethod
    def other(side: Side) -> Side:
        return "server" if side == "client" else "client"

    def _handle(self, side: Side, events: list[Event]) -> None:
        handler = self.handlers[side]
        for event in events:
            self.events[side].append(event)
            if handler is not None:
                handler(self.proto(side), event)

    def receive(self, side: Side, data: bytes) -> None:
        """``data`` arrives at ``side``: parse it, handling held events as the driver rule says."""
        if self.transport_closed[side]:
            return  # that side closed its socket: nothing reaches it any more
        proto = self.proto(side)
        self._handle(side, proto.receive_data(data))
        while proto.events_held:
            self.held[side] += 1
            self._handle(side, proto.receive_data(b""))

    def write(self, side: Side) -> bytes:
        """One write by ``side``: its queued output goes on the wire and reaches the peer at once."""
        data = self.proto(side).data_to_send()
        self.writes[side].append(data)
        self.receive(self.other(side), data)
        return data

    def inject(self, side: Side, data: bytes) -> None:
        """Hand-made bytes written by ``side`` (frames its protocol object would never produce)."""
        self.writes[side].append(data)
        self.receive(self.other(side), data)

    def close_transport(self, side: Side) -> None:
        """``side`` closes its socket; the peer reads EOF (unless it closed its own first)."""
        self.transport_closed[side] = True
        peer = self.other(side)
        if not self.transport_closed[peer]:
            self.eof[peer] = True
            self._handle(peer, self.proto(peer).receive_eof())

    def pump(self) -> None:
        """The driver rule on both sides until nothing moves."""
        for _ in range(1000):
            moved = False
            for side in SIDES:
                if self.transport_closed[side]:
                    continue
                proto = self.proto(side)
                if proto.has_output:
                    self.write(side)
                    moved = True
                elif proto.close_transport:
                    self.close_transport(side)
                    moved = True
            if not moved:
                return
        raise AssertionError("the pair never settled")

    def take(self, side: Side) -> list[Event]:
        """The events ``side`` received since the last ``take``."""
        events, self.events[side] = self.events[side], []
        return events

    def wire(self, side: Side) -> bytes:
        return b"".join(self.writes[side])

    # ------------------------------------------------------------------ the opening handshake

    def handshake(
        self,
        *,
        target: str = "/chat",
        subprotocols: Sequence[str] = (),
        supported: Sequence[str] = (),
        client_deflate: DeflateSettings | None = None,
        server_deflate: DeflateSettings | None = None,
    ) -> tuple[Request, Response]:
        """Run the opening handshake; returns what the server received and what the client received."""
        request = self.client.connect("example.com", target, subprotocols=subprotocols, deflate=client_deflate)
        self.client.send_request(request)
        self.write("client")
        [received] = self.take("server")
        assert isinstance(received, Request), received
        answer = self.server.accept(
            received, subprotocol=choose_subprotocol(received, supported), deflate=server_deflate
        )
        self.server.send_response(answer)
        self.write("server")
        events = self.take("client")
        assert events and isinstance(events[0], Response), events
        self.events["client"] = events[1:]
        # The wire so far is the handshake: later assertions look at frames only.
        self.writes = {"client": [], "server": []}
        return received, events[0]


def read_frames(data: bytes) -> list[tuple[int, bytes | None, bytes]]:
    """(first byte, mask or None, unmasked payload) of each frame in ``data``; asserts none is truncated."""
    frames: list[tuple[int, bytes | None, bytes]] = []
    pos = 0
    while pos < len(data):
        b0, b1 = data[pos], data[pos + 1]
        n, i = b1 & 0x7F, pos + 2
        if n == 126:
            n, i = int.from_bytes(data[i : i + 2], "big"), i + 2
        elif n == 127:
            n, i = int.from_bytes(data[i : i + 8], "big"), i + 8
        mask = None
        if b1 & 0x80:
            mask, i = data[i : i + 4], i + 4
        assert i + n <= len(data), "truncated frame"
        payload = data[i : i + n]
        if mask is not None and n:
            key = (mask * (n // 4 + 1))[:n]
            payload = (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")
        frames.append((b0, mask, payload))
        pos = i + n
    return frames


def opcodes(data: bytes) -> list[int]:
    return [b0 & 0x0F for b0, _, _ in read_frames(data)]


def opened(**handshake: object) -> ProtocolPair:
    pair = ProtocolPair()
    pair.handshake(**handshake)  # type: ignore[arg-type]
    return pair


def assert_both_closed(pair: ProtocolPair) -> None:
    for side in SIDES:
        proto = pair.proto(side)
        assert proto.state is State.CLOSED, side
        assert proto.close_transport, side
        assert not proto.has_output, side
        assert pair.transport_closed[side], side


# ================================================================================================= handshake


def test_handshake_opens_both_sides() -> None:
    pair = ProtocolPair()
    request, response = pair.handshake(target="/chat/room?x=1")
    assert request.path == "/chat/room" and request.query == {"x": "1"}
    assert response.status == 101
    assert pair.client.state is State.OPEN and pair.server.state is State.OPEN
    assert pair.client.handshake_error is None
    assert not pair.client.close_transport and not pair.server.close_transport
    assert pair.client.extension is None and pair.server.extension is None
    assert pair.take("client") == [] and pair.take("server") == []


@pytest.mark.parametrize(
    ("offered", "supported", "chosen"),
    [
        (["chat.v2", "chat.v1"], ["chat.v1", "chat.v2"], "chat.v2"),  # the client's order wins
        (["chat.v1"], ["chat.v1", "chat.v2"], "chat.v1"),
        (["mqtt"], ["chat.v1"], None),  # nothing in common: no subprotocol, still open
        ([], ["chat.v1"], None),
        (["chat.v1"], [], None),
    ],
)
def test_handshake_with_subprotocols(offered: list[str], supported: list[str], chosen: str | None) -> None:
    pair = ProtocolPair()
    _, response = pair.handshake(subprotocols=offered, supported=supported)
    assert response.headers.get("Sec-WebSocket-Protocol") == chosen
    assert pair.client.subprotocol == chosen
    assert pair.client.state is State.OPEN and pair.server.state is State.OPEN


@pytest.mark.parametrize(
    ("client_deflate", "server_deflate", "compressed"),
    [
        (DeflateSettings(), DeflateSettings(), True),
        (DeflateSettings(), None, False),
        (None, DeflateSettings(), False),
        (None, None, False),
    ],
    ids=["both", "client-only", "server-only", "neither"],
)
def test_handshake_with_and_without_deflate(
    client_deflate: DeflateSettings | None, server_deflate: DeflateSettings | None, compressed: bool
) -> None:
    pair = ProtocolPair(server_handler=echo)
    _, response = pair.handshake(client_deflate=client_deflate, server_deflate=server_deflate)
    assert ("Sec-WebSocket-Extensions" in response.headers) is compressed
    assert (pair.client.extension is not None) is compressed
    assert (pair.server.extension is not None) is compressed
    text = "compressible " * 40
    pair.client.send_text(text)
    pair.pump()
    rsv1 = 0x40 if compressed else 0
    assert [b0 & 0x40 for b0, _, _ in read_frames(pair.wire("client"))] == [rsv1]
    assert [b0 & 0x40 for b0, _, _ in read_frames(pair.wire("server"))] == [rsv1]
    assert pair.take("server") == [Message(text)]
    assert pair.take("client") == [Message(text)]


@pytest.mark.parametrize(
    ("client_deflate", "server_deflate"),
    [
        (DeflateSettings(client_max_window_bits=10, server_max_window_bits=12), DeflateSettings()),
        (DeflateSettings(client_no_context_takeover=True), DeflateSettings(server_no_context_takeover=True)),
        (DeflateSettings(server_no_context_takeover=True), DeflateSettings(client_max_window_bits=9)),
    ],
)
def test_deflate_parameters_agree_on_both_sides(
    client_deflate: DeflateSettings, server_deflate: DeflateSettings
) -> None:
    pair = ProtocolPair(server_handler=echo)
    pair.handshake(client_deflate=client_deflate, server_deflate=server_deflate)
    assert pair.client.extension is not None and pair.server.extension is not None
    assert pair.client.extension.params == pair.server.extension.params  # type: ignore[attr-defined]
    texts = [f"message {i} " + "lorem ipsum dolor " * 30 for i in range(4)]
    for text in texts:
        pair.client.send_text(text)
    pair.pump()
    assert pair.take("server") == [Message(t) for t in texts]
    assert pair.take("client") == [Message(t) for t in texts]


def test_context_takeover_makes_a_repeated_message_smaller() -> None:
    pair = ProtocolPair()
    pair.handshake(client_deflate=DeflateSettings(), server_deflate=DeflateSettings())
    rng = random.Random(1)
    text = "".join(rng.choice("abcdefghij ") for _ in range(2000))
    pair.client.send_text(text)
    pair.pump()
    pair.client.send_text(text)
    pair.pump()
    first, second = (len(payload) for _, _, payload in read_frames(pair.wire("client")))
    assert second < first // 4
    assert pair.take("server") == [Message(text), Message(text)]


def test_client_frames_are_masked_with_the_mask_source_and_server_frames_are_not() -> None:
    pair = opened()
    pair.handlers["server"] = echo
    pair.client.send_text("a")
    pair.client.send_ping(b"b")
    pair.pump()
    client_frames = read_frames(pair.wire("client"))
    assert [mask for _, mask, _ in client_frames] == pair.masks.given
    assert len(pair.masks.given) == 2
    assert all(mask is None for _, mask, _ in read_frames(pair.wire("server")))


# ================================================================================================= messages

SIZES = [0, 125, 126, 65535, 65536, MIB]


def text_of(size: int) -> str:
    return ("0123456789abcdef" * (size // 16 + 1))[:size]


def binary_of(size: int) -> bytes:
    return random.Random(size).randbytes(size)  # incompressible: with deflate, the wire is larger than the data


@pytest.mark.parametrize("deflate", [False, True], ids=["plain", "deflate"])
@pytest.mark.parametrize("kind", ["text", "binary"])
@pytest.mark.parametrize("size", SIZES)
def test_client_to_server_message(size: int, kind: str, deflate: bool) -> None:
    settings = DeflateSettings() if deflate else None
    pair = opened(client_deflate=settings, server_deflate=settings)
    data: str | bytes = text_of(size) if kind == "text" else binary_of(size)
    assert pair.client.send_message(data)
    pair.pump()
    assert pair.take("server") == [Message(data)]
    [(b0, mask, payload)] = read_frames(pair.wire("client"))
    assert mask is not None
    assert b0 & 0x0F == (1 if kind == "text" else 2)
    if not deflate:
        header = 2 if size < 126 else 4 if size < 65536 else 10
        assert len(pair.wire("client")) == header + 4 + size
        assert len(payload) == size


@pytest.mark.parametrize("deflate", [False, True], ids=["plain", "deflate"])
@pytest.mark.parametrize("kind", ["text", "binary"])
@pytest.mark.parametrize("size", SIZES)
def test_server_to_client_message(size: int, kind: str, deflate: bool) -> None:
    settings = DeflateSettings() if deflate else None
    pair = opened(client_deflate=settings, server_deflate=settings)
    data: str | bytes = text_of(size) if kind == "text" else binary_of(size)
    assert pair.server.send_message(data)
    pair.pump()
    assert pair.take("client") == [Message(data)]
    [(b0, mask, _)] = read_frames(pair.wire("server"))
    assert mask is None
    assert b0 & 0x0F == (1 if kind == "text" else 2)
    if not deflate:
        header = 2 if size < 126 else 4 if size < 65536 else 10
        assert len(pair.wire("server")) == header + size


def test_echo_round_trip_of_many_messages_in_order() -> None:
    pair = ProtocolPair(server_handler=echo)
    pair.handshake()
    sent: list[str | bytes] = [f"m{i}" if i % 2 else bytes([i]) * i for i in range(50)]
    for data in sent:
        pair.client.send_message(data)
    pair.pump()
    assert pair.take("server") == [Message(d) for d in sent]
    assert pair.take("client") == [Message(d) for d in sent]


def test_message_over_the_receivers_limit_fails_both_sides_with_1009() -> None:
    pair = ProtocolPair(server=ServerProtocol(max_message_size=1000))
    pair.handshake()
    pair.client.send_binary(bytes(1001))
    pair.pump()
    [closed] = pair.take("server")
    assert isinstance(closed, Closed) and closed.code == 1009 and closed.error
    [seen] = pair.take("client")
    assert isinstance(seen, Closed) and seen.code == 1009 and seen.by_peer
    assert_both_closed(pair)


# ================================================================================================= fragments

WORD = "héllo wörld ✓"


@pytest.mark.parametrize("cut", range(1, len(WORD.encode()) - 1))
def test_fragmented_text_split_anywhere_client_to_server(cut: int) -> None:
    pair = opened()
    raw = WORD.encode()
    pair.client.send_fragment(0x1, raw[:cut], fin=False)
    pair.client.send_fragment(0x0, raw[cut : cut + 1], fin=False)
    pair.client.send_fragment(0x0, raw[cut + 1 :], fin=True)
    pair.pump()
    assert pair.take("server") == [Message(WORD)]
    assert opcodes(pair.wire("client")) == [0x1, 0x0, 0x0]


def test_fragmented_text_server_to_client() -> None:
    pair = opened()
    raw = WORD.encode()
    for i in range(len(raw)):
        pair.server.send_fragment(0x0 if i else 0x1, raw[i : i + 1], fin=i == len(raw) - 1)
    pair.pump()
    assert pair.take("client") == [Message(WORD)]
    assert len(read_frames(pair.wire("server"))) == len(raw)


@pytest.mark.parametrize("sender", ["client", "server"])
def test_fragmented_binary_with_a_ping_in_the_middle(sender: Side) -> None:
    pair = opened()
    proto = pair.proto(sender)
    receiver = pair.other(sender)
    proto.send_fragment(0x2, b"\x00\x01", fin=False)
    proto.send_ping(b"mid")
    proto.send_fragment(0x0, b"", fin=False)
    proto.send_fragment(0x0, b"\x02", fin=True)
    pair.pump()
    assert pair.take(receiver) == [Ping(b"mid"), Message(b"\x00\x01\x02")]
    assert pair.take(sender) == [Pong(b"mid")]


def test_fragmented_message_is_not_compressed_but_arrives_with_deflate_on() -> None:
    pair = opened(client_deflate=DeflateSettings(), server_deflate=DeflateSettings())
    pair.client.send_fragment(0x1, b"ab", fin=False)
    pair.client.send_fragment(0x0, b"cd", fin=True)
    pair.pump()
    assert [b0 & 0x40 for b0, _, _ in read_frames(pair.wire("client"))] == [0, 0]
    assert pair.take("server") == [Message("abcd")]


def test_invalid_utf8_split_over_fragments_fails_with_1007() -> None:
    pair = opened()
    pair.client.send_fragment(0x1, b"ok \xe2\x82", fin=False)
    pair.client.send_fragment(0x0, b"\x41", fin=True)  # not a continuation byte
    pair.pump()
    [closed] = pair.take("server")
    assert isinstance(closed, Closed) and closed.code == 1007 and closed.error
    assert_both_closed(pair)


# ================================================================================================= ping / pong


@pytest.mark.parametrize("sender", ["client", "server"])
def test_ping_is_answered_with_a_pong_of_the_same_payload(sender: Side) -> None:
    pair = opened()
    pair.proto(sender).send_ping(b"are you there")
    pair.pump()
    assert pair.take(pair.other(sender)) == [Ping(b"are you there")]
    assert pair.take(sender) == [Pong(b"are you there")]
    assert opcodes(pair.wire(sender)) == [0x9]
    assert opcodes(pair.wire(pair.other(sender))) == [0xA]


@pytest.mark.parametrize("sender", ["client", "server"])
def test_unsolicited_pong_is_not_answered(sender: Side) -> None:
    pair = opened()
    pair.proto(sender).send_pong(b"beat")
    pair.pump()
    assert pair.take(pair.other(sender)) == [Pong(b"beat")]
    assert pair.wire(pair.other(sender)) == b""


def test_ping_of_125_bytes_and_empty_ping() -> None:
    pair = opened()
    pair.client.send_ping(bytes(range(125)))
    pair.client.send_ping()
    pair.pump()
    assert pair.take("server") == [Ping(bytes(range(125))), Ping(b"")]
    assert pair.take("client") == [Pong(bytes(range(125))), Pong(b"")]


# ================================================================================================= closing


@pytest.mark.parametrize("code", [1000, 1001, 3000, 4999])
@pytest.mark.parametrize("initiator", ["client", "server"])
def test_close_started_by_either_side(initiator: Side, code: int) -> None:
    pair = opened()
    responder = pair.other(initiator)
    assert pair.proto(initiator).close(code, "bye")
    assert pair.proto(initiator).state is State.CLOSING
    pair.pump()
    assert pair.take(initiator) == [Closed(code, "bye", by_peer=False)]
    assert pair.take(responder) == [Closed(code, "bye", by_peer=True)]
    assert opcodes(pair.wire(initiator)) == [0x8]
    [(_, _, reply)] = read_frames(pair.wire(responder))
    assert reply[:2] == code.to_bytes(2, "big")  # the responder echoes the code
    assert_both_closed(pair)


def test_close_without_a_status_code_is_answered_without_one() -> None:
    pair = opened()
    pair.client.close(1005)
    pair.pump()
    assert [payload for _, _, payload in read_frames(pair.wire("client"))] == [b""]
    assert [payload for _, _, payload in read_frames(pair.wire("server"))] == [b""]
    [seen] = pair.take("server")
    assert isinstance(seen, Closed) and seen.code == 1005 and seen.by_peer
    assert_both_closed(pair)


def test_simultaneous_close() -> None:
    pair = opened()
    pair.client.close(1000, "client done")
    pair.server.close(1001, "server going away")
    pair.pump()
    # Each side sees the other's close frame as the answer to its own: its own code, not by the peer.
    assert pair.take("client") == [Closed(1000, "client done", by_peer=False)]
    assert pair.take("server") == [Closed(1001, "server going away", by_peer=False)]
    assert opcodes(pair.wire("client")) == [0x8]
    assert opcodes(pair.wire("server")) == [0x8]
    assert_both_closed(pair)


def test_messages_still_arrive_while_the_receiver_is_closing() -> None:
    pair = opened()
    pair.server.close(1001, "restart")
    pair.client.send_text("in flight")  # written before the client read the server's close
    pair.pump()
    assert pair.take("server") == [Message("in flight"), Closed(1001, "restart", by_peer=False)]
    assert pair.take("client") == [Closed(1001, "restart", by_peer=True)]
    assert_both_closed(pair)


def test_nothing_can_be_sent_after_close() -> None:
    pair = opened()
    pair.client.close()
    assert pair.client.send_text("x") is False
    assert pair.client.send_ping() is False
    assert pair.client.close() is False
    pair.pump()
    assert pair.server.send_text("x") is False
    assert pair.take("server") == [Closed(1000, "", by_peer=True)]


# ================================================================================================= failures


def test_invalid_utf8_from_the_client_fails_the_server_and_the_client_sees_1007() -> None:
    pair = opened()
    pair.inject("client", encode_frame(0x1, b"bad \xff\xfe", mask=b"\x01\x02\x03\x04"))
    [failed] = pair.take("server")
    assert isinstance(failed, Closed)
    assert failed.code == 1007 and failed.error and not failed.by_peer
    assert pair.server.state is State.CLOSED and pair.server.close_transport
    pair.pump()
    [seen] = pair.take("client")
    assert isinstance(seen, Closed)
    assert seen.code == 1007 and seen.by_peer and seen.error is None
    assert seen.reason == failed.reason  # the server's close frame told why
    assert opcodes(pair.wire("server")) == [0x8]
    assert_both_closed(pair)


def test_masked_frame_from_the_server_fails_the_client_with_1002() -> None:
    pair = opened()
    pair.inject("server", encode_frame(0x2, b"x", mask=b"abcd"))
    [failed] = pair.take("client")
    assert isinstance(failed, Closed) and failed.code == 1002 and failed.error
    pair.pump()
    [seen] = pair.take("server")
    assert isinstance(seen, Closed) and seen.code == 1002 and seen.by_peer
    assert_both_closed(pair)


def test_server_fail_sends_the_code_and_the_client_sees_it() -> None:
    pair = opened()
    closed = pair.server.fail(1011, "internal error")
    assert closed == Closed(1011, "internal error", by_peer=False, error=None)
    pair.pump()
    assert pair.take("client") == [Closed(1011, "internal error", by_peer=True)]
    assert_both_closed(pair)


def test_failure_after_a_valid_message_is_held_until_the_echo_is_queued() -> None:
    pair = ProtocolPair(server_handler=echo)
    pair.handshake()
    mask = b"\x0a\x0b\x0c\x0d"
    pair.inject("client", encode_frame(0x1, b"fine", mask=mask) + encode_frame(0x1, b"\xc0", mask=mask))
    events = pair.take("server")
    assert events[0] == Message("fine")
    assert isinstance(events[1], Closed) and events[1].code == 1007
    assert pair.held["server"] == 1
    pair.pump()
    frames = read_frames(pair.wire("server"))
    assert [(b0, payload[:2]) for b0, _, payload in frames] == [(0x81, b"fi"), (0x88, b"\x03\xef")]
    assert pair.take("client") == [Message("fine"), Closed(1007, events[1].reason, by_peer=True)]


# ================================================================================================= abort / eof


@pytest.mark.parametrize("side", ["client", "server"])
def test_abort_drops_queued_output_and_the_peer_sees_1006(side: Side) -> None:
    pair = opened()
    proto = pair.proto(side)
    proto.send_text("never sent")
    closed = proto.abort("I/O error")
    assert closed == Closed(1006, "I/O error", by_peer=False)
    assert proto.state is State.CLOSED and proto.close_transport and not proto.has_output
    pair.pump()
    assert pair.wire(side) == b""
    [seen] = pair.take(pair.other(side))
    assert isinstance(seen, Closed) and seen.code == 1006 and seen.by_peer
    assert_both_closed(pair)


def test_abort_with_a_code_of_the_callers_choice() -> None:
    pair = opened()
    assert pair.server.abort("slow consumer", 1008) == Closed(1008, "slow consumer", by_peer=False)


def test_abort_while_closing_ends_the_wait_for_the_close_frame() -> None:
    pair = opened()
    pair.client.close()
    pair.client.data_to_send()  # the close frame is lost on the way
    closed = pair.client.abort("close timeout")
    assert closed is not None and closed.code == 1006
    assert pair.client.state is State.CLOSED


def test_abort_after_the_end_returns_none() -> None:
    pair = opened()
    pair.client.close()
    pair.pump()
    assert pair.client.abort("late") is None
    assert pair.server.abort("late") is None


def test_receive_eof_while_connecting() -> None:
    pair = ProtocolPair()
    pair.client.send_request(pair.client.connect("example.com", "/chat"))
    pair.write("client")
    [request] = pair.take("server")
    assert isinstance(request, Request)
    pair.close_transport("client")  # the client gives up before the answer
    assert pair.take("server") == []  # no WebSocket connection was ever open: no Closed event
    assert pair.server.state is State.CLOSED and pair.server.close_transport
    with pytest.raises(RuntimeError):
        pair.server.send_response(pair.server.accept(request))


def test_receive_eof_while_connecting_on_the_client() -> None:
    pair = ProtocolPair()
    pair.client.send_request(pair.client.connect("example.com", "/chat"))
    pair.write("client")
    pair.take("server")
    pair.server.abort("handshake timeout")
    pair.pump()
    assert pair.eof["client"]
    assert pair.take("client") == []
    assert pair.client.state is State.CLOSED and pair.client.close_transport
    assert pair.transport_closed["client"]


@pytest.mark.parametrize("side", ["client", "server"])
def test_receive_eof_while_open_is_1006_on_both_sides(side: Side) -> None:
    pair = opened()
    pair._handle(side, pair.proto(side).receive_eof())  # the socket read returned b""
    [closed] = pair.take(side)
    assert isinstance(closed, Closed) and closed.code == 1006 and closed.by_peer
    pair.pump()  # that side closes its socket; the other reads EOF too
    [seen] = pair.take(pair.other(side))
    assert isinstance(seen, Closed) and seen.code == 1006
    assert_both_closed(pair)


def test_receive_eof_while_closing_is_1006() -> None:
    pair = opened()
    pair.client.close()
    pair.client.data_to_send()
    assert pair.client.receive_eof() == [Closed(1006, "connection closed without a close frame", by_peer=True)]
    assert pair.client.state is State.CLOSED


def test_receive_eof_after_the_close_handshake_adds_nothing() -> None:
    pair = opened()
    pair.server.close()
    pair.pump()
    assert pair.eof["client"]  # the server closed its socket once the client's reply was in
    assert pair.take("client") == [Closed(1000, "", by_peer=True)]
    assert pair.client.receive_eof() == []


# ================================================================================================= held events


def test_replies_to_messages_go_out_before_the_close_frame() -> None:
    pair = ProtocolPair(server_handler=echo)
    pair.handshake()
    pair.client.send_text("one")
    pair.client.send_binary(b"two")
    pair.client.close(1000, "done")
    pair.write("client")  # the three frames in one write, hence one read on the server
    assert len(pair.writes["client"]) == 1
    assert pair.held["server"] == 1
    assert pair.take("server") == [Message("one"), Message(b"two"), Closed(1000, "done", by_peer=True)]
    frames = read_frames(pair.server.data_to_send())
    assert [(b0, payload) for b0, _, payload in frames] == [(0x81, b"one"), (0x82, b"two"), (0x88, b"\x03\xe8")]


def test_replies_before_the_close_frame_reach_the_closing_client() -> None:
    pair = ProtocolPair(server_handler=echo)
    pair.handshake()
    pair.client.send_text("one")
    pair.client.close(1000, "done")
    pair.pump()
    assert pair.take("client") == [Message("one"), Closed(1000, "done", by_peer=False)]
    assert_both_closed(pair)


def test_held_events_on_the_client_after_the_101() -> None:
    # The server answers the upgrade, says goodbye and closes in one write: the client still sees the message
    # before the close, and its close reply comes after whatever it sent in answer to the message.
    def reply(conn: Connection, event: Event) -> None:
        if isinstance(event, Message):
            conn.send_text("ack " + str(event.data))

    pair = ProtocolPair(client_handler=reply)
    request = pair.client.connect("example.com", "/chat")
    pair.client.send_request(request)
    pair.write("client")
    [received] = pair.take("server")
    assert isinstance(received, Request)
    pair.server.send_response(pair.server.accept(received))
    pair.server.send_text("bye now")
    pair.server.close(1001, "shutdown")
    pair.write("server")
    assert pair.held["client"] == 1
    events = pair.take("client")
    assert [type(e) for e in events] == [Response, Message, Closed]
    client_frames = read_frames(pair.client.data_to_send())
    assert [(b0, payload) for b0, _, payload in client_frames] == [(0x81, b"ack bye now"), (0x88, b"\x03\xe9")]
