"""``/echo`` over real sockets, with two independent client libraries, with and without permessage-deflate."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import websocket  # websocket-client
from websockets.exceptions import ConnectionClosedError
from wstools import connect

TIMEOUT = 10.0
MIB = 1 << 20


def _mib_of_non_ascii_text() -> str:
    """Text whose UTF-8 encoding is exactly 1 MiB, mixing 1- to 4-byte characters."""
    chunk = "aé€😀ß中\U0001f600z"  # 1+2+3+4+2+3+4+1 = 20 bytes
    text = chunk * (MIB // 20)
    text += "x" * (MIB - len(text.encode()))
    assert len(text.encode()) == MIB
    return text


class WebsocketsClient:
    """The ``websockets`` library's sync client."""

    def __init__(self, url: str, compression: str | None) -> None:
        self.ws = connect(url, compression=compression, max_size=None)
        extensions = self.ws.response.headers.get("Sec-WebSocket-Extensions") or ""
        # The parametrisation is only meaningful if the server really negotiated what we asked for.
        assert ("permessage-deflate" in extensions) == (compression == "deflate"), extensions

    def send(self, message: str | bytes) -> None:
        self.ws.send(message)

    def send_fragments(self, parts: list[str] | list[bytes]) -> None:
        self.ws.send(iter(parts))  # websockets sends an iterable as one fragmented message

    def recv(self) -> str | bytes:
        return self.ws.recv(timeout=TIMEOUT)

    def close(self) -> None:
        self.ws.close()


class WebsocketClientLib:
    """The ``websocket-client`` library (no compression support)."""

    def __init__(self, url: str) -> None:
        self.ws = websocket.create_connection(url, timeout=TIMEOUT)
        assert self.ws.getheaders().get("sec-websocket-extensions") is None

    def send(self, message: str | bytes) -> None:
        if isinstance(message, str):
            self.ws.send(message)
        else:
            self.ws.send_binary(message)

    def send_fragments(self, parts: list[str] | list[bytes]) -> None:
        opcode = websocket.ABNF.OPCODE_TEXT if isinstance(parts[0], str) else websocket.ABNF.OPCODE_BINARY
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            frame_opcode = opcode if i == 0 else websocket.ABNF.OPCODE_CONT
            data = part.encode() if isinstance(part, str) else part
            self.ws.send_frame(websocket.ABNF.create_frame(data, frame_opcode, fin=int(last)))

    def recv(self) -> str | bytes:
        opcode, data = self.ws.recv_data()
        if opcode == websocket.ABNF.OPCODE_TEXT:
            return bytes(data).decode("utf-8")
        assert opcode == websocket.ABNF.OPCODE_BINARY, opcode
        return bytes(data)

    def close(self) -> None:
        self.ws.close()


CLIENTS = ["websockets-deflate", "websockets-plain", "websocket-client"]


@pytest.fixture(params=CLIENTS)
def client(request: pytest.FixtureRequest, daemon) -> Iterator[WebsocketsClient | WebsocketClientLib]:
    url = daemon.url("/echo")
    c: WebsocketsClient | WebsocketClientLib
    if request.param == "websockets-deflate":
        c = WebsocketsClient(url, "deflate")
    elif request.param == "websockets-plain":
        c = WebsocketsClient(url, None)
    else:
        c = WebsocketClientLib(url)
    yield c
    c.close()


def _roundtrip(client: WebsocketsClient | WebsocketClientLib, message: str | bytes) -> None:
    client.send(message)
    got = client.recv()
    assert type(got) is type(message), "the echo must keep the opcode (text stays text, binary stays binary)"
    assert got == message


@pytest.mark.parametrize(
    "message",
    ["hello", b"\x00\x01\x02\xfe\xff", "", b"", "héllo wörld € 😀", "x" * 125, "y" * 126, b"z" * 65535, b"w" * 65536],
    ids=["text", "binary", "empty-text", "empty-binary", "non-ascii", "len125", "len126", "len65535", "len65536"],
)
def test_roundtrip(client, message):
    _roundtrip(client, message)


def test_one_mib_binary(client):
    # Random bytes do not compress: with deflate the client's frame is a little over 1 MiB on the wire, which
    # must still pass because the limit applies to the inflated size.
    _roundtrip(client, os.urandom(MIB))


def test_one_mib_compressible_binary(client):
    _roundtrip(client, bytes(range(256)) * (MIB // 256))


def test_one_mib_non_ascii_text(client):
    _roundtrip(client, _mib_of_non_ascii_text())


@pytest.mark.parametrize(
    "parts",
    [["frag", "ment", "ed ✓"], [b"\x00" * 10, b"\x01" * 70000, b"\x02"], ["", "only the middle", ""], ["é"]],
    ids=["text", "binary", "empty-fragments", "single"],
)
def test_fragmented_message_from_client(client, parts):
    client.send_fragments(parts)
    whole = "".join(parts) if isinstance(parts[0], str) else b"".join(parts)
    got = client.recv()
    assert type(got) is type(whole)
    assert got == whole
    _roundtrip(client, "still in sync")


def test_fragment_boundary_inside_a_utf8_character(daemon):
    """A 4-byte character split across three fragments is valid UTF-8 once reassembled."""
    ws = websocket.create_connection(daemon.url("/echo"), timeout=TIMEOUT)
    try:
        raw = "a😀b".encode()
        ABNF = websocket.ABNF
        ws.send_frame(ABNF.create_frame(raw[:2], ABNF.OPCODE_TEXT, fin=0))
        ws.send_frame(ABNF.create_frame(raw[2:4], ABNF.OPCODE_CONT, fin=0))
        ws.send_frame(ABNF.create_frame(raw[4:], ABNF.OPCODE_CONT, fin=1))
        assert ws.recv() == "a😀b"
    finally:
        ws.close()


def test_many_pipelined_messages_stay_in_order(client):
    messages: list[str | bytes] = []
    for i in range(1000):
        messages.append(f"message {i} " + "é" * (i % 50) if i % 3 else f"{i}".encode() * (i % 700))
    for m in messages:
        client.send(m)
    for i, m in enumerate(messages):
        got = client.recv()
        assert got == m, f"message {i} out of order or altered"


def test_interleaved_clients_do_not_mix(daemon):
    """Several connections at once: each gets only its own echoes."""
    clients = [WebsocketsClient(daemon.url("/echo"), "deflate" if i % 2 else None) for i in range(5)]
    try:
        for round_ in range(20):
            for i, c in enumerate(clients):
                c.send(f"client {i} round {round_}")
        for round_ in range(20):
            for i, c in enumerate(clients):
                assert c.recv() == f"client {i} round {round_}"
    finally:
        for c in clients:
            c.close()


@pytest.mark.parametrize("compression", ["deflate", None], ids=["deflate", "plain"])
def test_message_over_the_limit_closes_1009(daemon, compression):
    """The default max_message_size is 1 MiB: one byte more is refused with 1009 (message too big)."""
    with connect(daemon.url("/echo"), compression=compression, max_size=None) as ws:
        ws.send(b"\x00" * (MIB + 1))
        with pytest.raises(ConnectionClosedError) as info:
            ws.recv(timeout=TIMEOUT)
        assert info.value.rcvd is not None
        assert info.value.rcvd.code == 1009
    # The server carries on.
    with connect(daemon.url("/echo")) as ws:
        ws.send("after")
        assert ws.recv(timeout=TIMEOUT) == "after"


def test_fragmented_message_over_the_limit_closes_1009(daemon):
    with connect(daemon.url("/echo"), compression=None, max_size=None) as ws:
        ws.send(iter([b"\x00" * (MIB // 2), b"\x00" * (MIB // 2), b"\x00"]))
        with pytest.raises(ConnectionClosedError) as info:
            ws.recv(timeout=TIMEOUT)
        assert info.value.rcvd is not None
        assert info.value.rcvd.code == 1009
