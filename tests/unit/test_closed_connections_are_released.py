"""A closed connection is freed at once: nothing (timer, session, selector, registry) keeps it alive.

In-process through the harness, with the cyclic garbage collector switched off, so that only reference
counting can free a connection: whatever is still alive after the churn is held by a real reference.
"""

from __future__ import annotations

import gc
import socket
import struct

from harness import in_process_server

from selectws.protocol.deflate import PerMessageDeflate
from selectws.protocol.handshake import ServerProtocol
from selectws.server.connection import PluginSession, ServerConnection


def _alive(kind: type) -> int:
    return sum(1 for obj in gc.get_objects() if type(obj) is kind)


def _masked_text(payload: bytes) -> bytes:
    mask = b"\x01\x02\x03\x04"
    return bytes((0x81, 0x80 | len(payload))) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def _masked_close() -> bytes:
    mask = b"\x00\x00\x00\x00"
    return b"\x88\x82" + mask + struct.pack("!H", 1000)


def test_churned_connections_leave_no_objects_alive() -> None:
    gc.collect()
    gc.disable()
    try:
        with in_process_server() as harness:
            before = {kind: _alive(kind) for kind in (ServerConnection, ServerProtocol, PerMessageDeflate)}
            timers_before = harness.stats().timers  # the server's own (status tick)
            for i in range(40):
                deflate = "permessage-deflate; client_max_window_bits" if i % 2 else None
                sock = harness.connect("/echo", deflate)
                sock.sendall(_masked_text(b"hello"))
                harness.recv(sock, 7)  # the echo (compressed or not, it is short)
                sock.sendall(_masked_close())
                harness.run_until(lambda: harness.stats().connections_open == 0)
                sock.shutdown(socket.SHUT_WR)
                sock.close()
            harness.run_until(lambda: harness.stats().sockets_open == 0)
            harness.step()
            assert harness.stats().timers == timers_before, "every connection's timer is gone"
            after = {kind: _alive(kind) for kind in before}
            assert after == before, f"connection objects still alive after the churn: {after} (before: {before})"
            assert _alive(PluginSession) == 0
    finally:
        gc.enable()
