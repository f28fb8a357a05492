"""Server-level check that a broadcast is compressed once, not once per recipient (RFC 7692, no context takeover).

In-process: a real :class:`Server` (never started) with real :class:`Client` objects on socketpairs; the test
plays the peers' side of each socketpair by hand.
"""

from __future__ import annotations

import selectors
import socket
import zlib
from collections.abc import Iterator

import pytest

import selectws.server.server as server_module
from selectws.config import Config
from selectws.protocol.handshake import build_client_request, make_key
from selectws.server.server import Server


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server(Config())
    yield srv
    srv.close()


def _join(srv: Server, offer: str | None) -> socket.socket:
    """Accept one peer on /broadcast/z and complete its upgrade; returns the peer's end."""
    ours, theirs = socket.socketpair()
    srv.accept_client(ours, ("127.0.0.1", 40000 + len(srv.clients)))
    client = srv.clients[max(srv.clients)]
    theirs.sendall(build_client_request("test", "/broadcast/z", make_key(), extensions=offer))
    client.handle_event(selectors.EVENT_READ)
    srv._flush_dirty()
    theirs.settimeout(2)
    head = theirs.recv(4096)
    assert head.startswith(b"HTTP/1.1 101"), head
    assert (b"permessage-deflate" in head) == (offer is not None)
    return theirs


def _frame(peer: socket.socket) -> tuple[int, bytes]:
    data = peer.recv(65536)
    length = data[1] & 0x7F
    start = 2 if length < 126 else 4
    return data[0], data[start:]


def test_one_compression_for_every_shareable_recipient(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = server_module.compress_shared

    def counting(payload: bytes, window_bits: int, memory_level: int) -> bytes:
        calls.append(window_bits)
        return real(payload, window_bits, memory_level)

    monkeypatch.setattr(server_module, "compress_shared", counting)
    peers = [_join(server, "permessage-deflate") for _ in range(3)]
    plain = _join(server, None)
    message = "the same bytes for everybody " * 20
    delivered = server.broadcast("broadcast:z", message)
    server._flush_dirty()
    assert delivered == 4
    assert len(calls) == 1, "compressed once, not once per recipient"
    frames = [_frame(p) for p in peers]
    assert all(first == 0xC1 for first, _ in frames)  # FIN + RSV1 + text
    assert len({payload for _, payload in frames}) == 1
    inflated = zlib.decompressobj(-15).decompress(frames[0][1] + b"\x00\x00\xff\xff")
    assert inflated.decode() == message
    assert _frame(plain) == (0x81, message.encode())


def test_recipients_with_their_own_context_are_counted_once() -> None:
    """With server context takeover each recipient compresses its own frame; messages_out still counts one each."""
    from dataclasses import replace

    config = Config()
    config = replace(config, compression=replace(config.compression, server_no_context_takeover=False))
    srv = Server(config)
    try:
        peers = [_join(srv, "permessage-deflate") for _ in range(2)]
        assert srv.broadcast("broadcast:z", "counted once per recipient " * 10) == 2
        srv._flush_dirty()
        assert srv.messages_out == 2
        assert all(_frame(p)[0] == 0xC1 for p in peers)
    finally:
        srv.close()
