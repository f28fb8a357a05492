"""The lingering close (issue 12, defect 5): a client that is still sending when we close sees a clean close.

A message over ``max_message_size`` is refused as soon as a frame header shows it, while the client may still have
megabytes of it to send. The daemon then skips the rest of that message, frame by frame and without buffering it,
and holds its 1009 close frame until the message has ended (at most ``[limits] linger_max_bytes`` skipped, within
``[timeouts] linger``, or 0.5 s without input); after the close frame its FIN, then it reads and discards until
the client's FIN, again within ``linger`` and ``linger_max_bytes``. Without the hold, aiohttp waiting inside
``asyncio.wait_for`` saw 1006 instead of 1009 in most tries (its own close frame could not be written behind the
rest of the message once our FIN had arrived), and Chromium called the close unclean (see
tests/browser/test_failure_close_browser.py). Without the byte bound, a client that kept sending after our FIN
was read for the whole linger.
"""

from __future__ import annotations

import asyncio
import os
import select
import time

import pytest
import websocket  # websocket-client
from websockets.exceptions import ConnectionClosed
from wstools import OP_BINARY, OP_CONT, OP_PING, OP_TEXT, RawWS, connect, encode_frame

MIB = 1 << 20
MESSAGE = 5 * MIB  # five times the default max_message_size
TRIES = 12


def oversized() -> bytes:
    return os.urandom(MESSAGE)  # random: incompressible, even where permessage-deflate is negotiated


def readable(raw: RawWS, timeout: float) -> bool:
    """Whether the server sent anything (or closed) within ``timeout``."""
    return bool(raw.buf) or bool(select.select([raw.sock], [], [], timeout)[0])


# ================================================================================== clients see a clean 1009
def test_aiohttp_waiting_in_wait_for_sees_1009(daemon):
    aiohttp = pytest.importorskip("aiohttp")

    async def one_try() -> object:
        async with aiohttp.ClientSession() as session, session.ws_connect(daemon.url("/echo"), max_msg_size=0) as ws:
            await ws.send_bytes(oversized())
            msg = await asyncio.wait_for(ws.receive(), 10)
            return msg.type, ws.close_code

    seen = [asyncio.run(one_try()) for _ in range(TRIES)]
    assert seen == [(aiohttp.WSMsgType.CLOSE, 1009)] * TRIES, seen


def test_websockets_client_sees_1009(daemon):
    codes = []
    for _ in range(TRIES):
        with connect(daemon.url("/echo"), max_size=None) as ws:
            try:
                ws.send(oversized())
                ws.recv(timeout=10)
            except ConnectionClosed:
                pass
            codes.append(ws.protocol.close_rcvd.code if ws.protocol.close_rcvd else None)
    assert codes == [1009] * TRIES


def test_websocket_client_sees_1009(daemon):
    codes = []
    for _ in range(TRIES):
        ws = websocket.create_connection(daemon.url("/echo"), timeout=10)
        try:
            ws.send_binary(oversized())
            opcode, payload = ws.recv_data(control_frame=True)
            codes.append((opcode, int.from_bytes(payload[:2], "big")))
        finally:
            ws.close()
    assert codes == [(websocket.ABNF.OPCODE_CLOSE, 1009)] * TRIES


# ================================================================================== the held close frame
def test_close_frame_waits_for_the_end_of_an_oversized_frame(daemon):
    frame = encode_frame(OP_BINARY, os.urandom(2 * MIB))
    with RawWS(daemon.port, "/echo") as raw:
        raw.send_raw(frame[: MIB])
        assert not readable(raw, 0.2), "the close frame must wait: we are still sending the message"
        raw.send_raw(frame[MIB:])
        close = raw.expect_close(timeout=2.0)
        assert close.close_code == 1009, close
        assert raw.wait_eof(2.0)
    daemon.wait_for(event="protocol error", code=1009)


def test_close_frame_waits_for_the_last_fragment(daemon):
    """Fragments (as browsers send a large message), a ping among them: the close frame follows the last one."""
    chunk = 256 * 1024
    with RawWS(daemon.port, "/echo") as raw:
        raw.send_raw(encode_frame(OP_TEXT, b"x" * chunk, fin=False))
        for i in range(1, 8):  # 2 MiB in all: the limit is crossed at the fifth fragment
            raw.send_raw(encode_frame(OP_CONT, b"x" * chunk, fin=False))
            if i == 6:
                raw.send_raw(encode_frame(OP_PING, b"still here"))
        assert not readable(raw, 0.2), "the close frame must wait for the last fragment"
        raw.send_raw(encode_frame(OP_CONT, b"end", fin=True))
        close = raw.expect_close(timeout=2.0)
        assert close.close_code == 1009, close
        assert raw.wait_eof(2.0)


def test_held_close_frame_goes_after_a_pause_without_input(daemon):
    """A header alone, then silence: the close frame goes after 0.5 s without input, not at once, not later."""
    with RawWS(daemon.port, "/echo") as raw:
        start = time.monotonic()
        raw.send_raw(encode_frame(OP_BINARY, b"", length=2 * MIB))
        close = raw.expect_close(timeout=3.0)
        waited = time.monotonic() - start
        assert close.close_code == 1009
        assert 0.4 <= waited < 1.5, waited
        assert raw.wait_eof(2.0)


def test_held_close_frame_goes_after_linger_while_the_message_trickles(start_daemon):
    daemon = start_daemon("[timeouts]\nlinger = 1.0\n")
    with RawWS(daemon.port, "/echo") as raw:
        frame = encode_frame(OP_BINARY, os.urandom(2 * MIB))
        start = time.monotonic()
        raw.send_raw(frame[: MIB + 4096])  # over the limit; then 1 KiB every 0.1 s, never half a second apart
        at = MIB + 4096
        while not readable(raw, 0.1):
            assert time.monotonic() - start < 3.0, "the close frame never came"
            raw.send_raw(frame[at : at + 1024])
            at += 1024
        waited = time.monotonic() - start
        assert 0.8 <= waited < 2.0, waited
        assert raw.expect_close(timeout=1.0).close_code == 1009


def test_frame_announcing_more_than_linger_max_bytes_is_refused_at_once(start_daemon):
    daemon = start_daemon("[limits]\nlinger_max_bytes = 1048576\n")
    with RawWS(daemon.port, "/echo") as raw:
        frame = encode_frame(OP_BINARY, os.urandom(3 * MIB))
        start = time.monotonic()
        raw.send_raw(frame[: 64 * 1024])
        close = raw.expect_close(timeout=2.0)
        assert close.close_code == 1009
        assert time.monotonic() - start < 0.4


# ================================================================================== after our FIN: bounded
def flood_until_reset(raw: RawWS, deadline: float) -> tuple[int, float]:
    """Send until the server resets the connection; (bytes the kernel took, seconds it took)."""
    chunk = os.urandom(64 * 1024)
    raw.sock.settimeout(0.5)
    sent = 0
    start = time.monotonic()
    while time.monotonic() - start < deadline:
        try:
            sent += raw.sock.send(chunk)
        except TimeoutError:
            continue
        except OSError:  # ECONNRESET or EPIPE: the server closed with our bytes unread
            return sent, time.monotonic() - start
    return sent, time.monotonic() - start


def test_input_after_our_fin_is_bounded_in_bytes(daemon):
    """The default linger_max_bytes (8 MiB): past it the daemon stops reading and closes, long before the 2 s
    linger is over."""
    with RawWS(daemon.port, "/echo") as raw:
        raw.send_raw(encode_frame(OP_TEXT, b"unmasked", mask=False))  # 1002: close frame and FIN at once
        assert raw.expect_close(timeout=2.0).close_code == 1002
        assert raw.wait_eof(2.0)
        sent, took = flood_until_reset(raw, deadline=5.0)
    assert took < 1.0, f"still reading after {took:.2f} s ({sent} bytes): no byte bound"
    assert sent >= 8 * MIB, sent


def test_configured_linger_max_bytes_after_our_fin(start_daemon):
    daemon = start_daemon("[limits]\nlinger_max_bytes = 65536\n[timeouts]\nlinger = 30.0\n")
    with RawWS(daemon.port, "/echo") as raw:
        raw.send_raw(encode_frame(OP_TEXT, b"unmasked", mask=False))
        assert raw.expect_close(timeout=2.0).close_code == 1002
        assert raw.wait_eof(2.0)
        sent, took = flood_until_reset(raw, deadline=5.0)
    assert took < 2.0, f"still reading after {took:.2f} s ({sent} bytes)"
    assert sent >= 65536

