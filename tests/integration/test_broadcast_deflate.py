"""Compressed broadcast over real sockets (RFC 7692).

Two raw clients negotiate permessage-deflate with ``server_no_context_takeover`` (the server's default), a third
does not negotiate it at all. A broadcast must reach the two compressing clients as identical compressed frames
(RSV1 set) that inflate to the message, and the third as a plain frame. That the compression happens once for
all of them is checked in-process by tests/unit/test_broadcast_compress_once.py.
"""

from __future__ import annotations

import zlib

from wstools import OP_TEXT, RawWS

DEFLATE = [("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits")]


def _inflate(payload: bytes) -> bytes:
    return zlib.decompressobj(-15).decompress(payload + b"\x00\x00\xff\xff")


def test_broadcast_compressed_once_for_all_recipients(daemon):
    message = "compress me once, " * 40
    with (
        RawWS(daemon.port, "/broadcast/dfl", extra_headers=DEFLATE) as a,
        RawWS(daemon.port, "/broadcast/dfl", extra_headers=DEFLATE) as b,
        RawWS(daemon.port, "/broadcast/dfl") as plain,
        RawWS(daemon.port, "/broadcast/dfl") as sender,
    ):
        for ws in (a, b):
            agreed = [v for k, v in ws.headers if k.lower() == "sec-websocket-extensions"]
            assert agreed and "server_no_context_takeover" in agreed[0]
        # Make sure all four joined before the broadcast: a marker from the sender reaches everybody.
        sender.send_text("marker")
        for ws in (a, b, plain):
            frame = ws.recv_frame()
            assert frame.opcode == OP_TEXT
        sender.send_text(message)
        fa, fb, fp = a.recv_frame(), b.recv_frame(), plain.recv_frame()
        assert fa.rsv == 4 and fb.rsv == 4, "frames to compressing clients must have RSV1 set"
        assert fa.payload == fb.payload, "one compressed frame for every shareable recipient"
        assert len(fa.payload) < len(message) // 4
        assert _inflate(fa.payload).decode() == message
        assert fp.rsv == 0 and fp.payload.decode() == message
