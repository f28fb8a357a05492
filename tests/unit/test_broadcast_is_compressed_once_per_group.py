"""A broadcast is compressed once for every recipient without context takeover (RFC 7692), not once each.

In-process: a real server on an ephemeral port, stepped by the harness (tests/harness.py), with raw client
sockets; what is checked is what the clients receive and what ``Server.stats()`` reports. The one spy counts
calls of the shared compressor, which is the behaviour under test.
"""

from __future__ import annotations

import socket
import zlib

import pytest
from harness import InProcessServer, in_process_server

import selectws.protocol.broadcast as broadcast_module


def _frame(harness: InProcessServer, peer: socket.socket) -> tuple[int, bytes]:
    head = harness.recv(peer, 2)
    length = head[1] & 0x7F
    start = 2 if length < 126 else 4
    if length == 126:
        head = head if len(head) >= 4 else head + harness.recv(peer, 4 - len(head))
        length = int.from_bytes(head[2:4], "big")
    data = head if len(head) >= start + length else head + harness.recv(peer, start + length - len(head))
    return data[0], data[start : start + length]


def test_one_compression_for_every_shareable_recipient(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = broadcast_module.compress_shared

    def counting(payload: bytes, window_bits: int, memory_level: int) -> bytes:
        calls.append(window_bits)
        return real(payload, window_bits, memory_level)

    monkeypatch.setattr(broadcast_module, "compress_shared", counting)
    with in_process_server() as harness:
        peers = [harness.connect("/broadcast/z", "permessage-deflate") for _ in range(3)]
        assert b"permessage-deflate" in harness.last_head
        plain = harness.connect("/broadcast/z")
        message = "the same bytes for everybody " * 20
        assert harness.server.broadcast("broadcast:z", message) == 4
        frames = [_frame(harness, p) for p in peers]
        assert len(calls) == 1, "compressed once, not once per recipient"
        assert all(first == 0xC1 for first, _ in frames)  # FIN + RSV1 + text
        assert len({payload for _, payload in frames}) == 1
        inflated = zlib.decompressobj(-15).decompress(frames[0][1] + b"\x00\x00\xff\xff")
        assert inflated.decode() == message
        assert _frame(harness, plain) == (0x81, message.encode())
        assert harness.stats().messages_out == 4


def test_recipients_with_their_own_context_are_counted_once() -> None:
    """With server context takeover each recipient compresses its own frame; messages_out still counts one each."""
    with in_process_server({"compression": {"server_no_context_takeover": False}}) as harness:
        peers = [harness.connect("/broadcast/z", "permessage-deflate") for _ in range(2)]
        assert harness.server.broadcast("broadcast:z", "counted once per recipient " * 10) == 2
        assert all(_frame(harness, p)[0] == 0xC1 for p in peers)
        assert harness.stats().messages_out == 2
