"""Micro-benchmarks of the sans-I/O core (no sockets), with pytest-benchmark.

The normal test run executes each once with timing disabled (``--benchmark-disable`` in pyproject), so they stay
correct; measure with::

    pytest tests/benchmarks --benchmark-enable --benchmark-only

Each benchmark also asserts its result, so a fast wrong answer cannot pass.
"""

from __future__ import annotations

from typing import Any

import pytest

from selectws.protocol.connection import SERVER, Connection
from selectws.protocol.events import Message
from selectws.protocol.frames import encode_frame, mask_payload
from selectws.protocol.handshake import build_accept_response, check_upgrade_request
from selectws.protocol.http11 import parse_request

MASK = b"\x37\xfa\x21\x3d"
SMALL = b"x" * 64
BATCH = 64  # frames per receive_data call, like one recv of a pipelined client


def _batch(payload: bytes, opcode: int = 2, count: int = BATCH) -> bytes:
    return encode_frame(opcode, payload, mask=MASK) * count


def test_parse_small_binary_frames(benchmark: Any) -> None:
    """64 masked 64-byte binary frames per call: the pipelined echo hot path."""
    conn = Connection(SERVER)
    data = _batch(SMALL)
    events = benchmark(conn.receive_data, data)
    assert len(events) == BATCH and events[0] == Message(SMALL)
    benchmark.extra_info["frames_per_call"] = BATCH


def test_parse_small_text_frames(benchmark: Any) -> None:
    """The same with text: UTF-8 validation included."""
    conn = Connection(SERVER)
    data = _batch(SMALL, opcode=1)
    events = benchmark(conn.receive_data, data)
    assert len(events) == BATCH and events[-1] == Message(SMALL.decode())


def test_parse_large_frame_in_chunks(benchmark: Any) -> None:
    """A 1 MiB masked frame arriving in 64 KiB reads (no quadratic buffering)."""
    payload = bytes(range(256)) * 4096
    frame = encode_frame(2, payload, mask=MASK)
    chunks = [frame[i : i + 65536] for i in range(0, len(frame), 65536)]

    def run() -> list[Any]:
        conn = Connection(SERVER, max_message_size=2 << 20)
        out: list[Any] = []
        for chunk in chunks:
            out += conn.receive_data(chunk)
        return out

    events = benchmark(run)
    assert events == [Message(payload)]


@pytest.mark.parametrize("size", [64, 65536, 1 << 20])
def test_unmask(benchmark: Any, size: int) -> None:
    payload = bytes(range(256)) * (size // 256)
    masked = benchmark(mask_payload, payload, MASK)
    assert mask_payload(masked, MASK) == payload
    benchmark.extra_info["bytes"] = size


def test_handshake_parse_and_answer(benchmark: Any) -> None:
    request = (
        b"GET /echo HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        b"User-Agent: bench\r\nOrigin: http://127.0.0.1\r\n\r\n"
    )

    def run() -> bytes:
        parsed = parse_request(request)
        assert parsed is not None
        key = check_upgrade_request(parsed[0])
        return build_accept_response(key)

    response = benchmark(run)
    assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in response


def test_broadcast_encode_once(benchmark: Any) -> None:
    """Encoding one broadcast frame and queueing the same bytes on 1000 connections."""
    conns = [Connection(SERVER) for _ in range(1000)]

    def run() -> int:
        frame = encode_frame(1, b'{"type":"said","from":"alice","text":"hello everybody"}')
        for conn in conns:
            conn.send_frame_bytes(frame)
        return sum(len(conn.data_to_send()) for conn in conns)

    total = benchmark(run)
    assert total == 1000 * (2 + 55)


def test_echo_round_trip_in_core(benchmark: Any) -> None:
    """Parse a batch and queue the echo of every message: the whole per-message cost of the core."""
    conn = Connection(SERVER)
    data = _batch(SMALL)

    def run() -> bytes:
        for event in conn.receive_data(data):
            conn.send_binary(event.data)  # type: ignore[union-attr]
        return conn.data_to_send()

    out = benchmark(run)
    assert out == encode_frame(2, SMALL) * BATCH
