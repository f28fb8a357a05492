"""What an idle WebSocket connection costs the server (issue 17: at most 1.0 KiB of RSS each at 19,000).

An in-process server, clients on real sockets, each connection opened on /echo and echoed once. Pinned: what an
idle connection does not hold (no Timer of its own, no second output list, none of the seldom-used fields, one
string per client address, one copy of a request head that differs only in its key), that what it shares still
reads back exactly (headers, query), and a bound on the Python heap each connection takes (tracemalloc, the
allocations made with selectws code on the stack: the server's, not the test clients').
"""

from __future__ import annotations

import _socket
import os
import socket
import tracemalloc
from typing import Any

import pytest
from harness import InProcessServer, _read_into, in_process_server

import selectws
from selectws.protocol.handshake import build_client_request, make_key
from selectws.server.connection import ServerConnection
from selectws.transport.loop import Timer

#: Bytes of Python heap per idle connection, measured as below (the registries' tables included): about 1,000 when
#: this was written, 1,600 before the slimming of issue 17. The idle benchmark point (19,000 connections) measured
#: 0.93 KiB of RSS each then, against 1.67 before.
HEAP_PER_CONNECTION_MAX = 1100


def _masked_text(payload: bytes) -> bytes:
    mask = b"\x01\x02\x03\x04"
    return bytes((0x81, 0x80 | len(payload))) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def _open_echoed(harness: InProcessServer, target: str, key: str | None = None) -> socket.socket:
    """A client upgraded on ``target`` (with ``key``) whose one message was echoed."""
    sock = socket.create_connection(("127.0.0.1", harness.port))
    sock.setblocking(False)
    sock.sendall(build_client_request("test", target, key or make_key()))
    head = bytearray()
    harness.run_until(lambda: _read_into(sock, head) and b"\r\n\r\n" in head)
    assert head.startswith(b"HTTP/1.1 101"), bytes(head)
    rest = head[head.index(b"\r\n\r\n") + 4 :]
    sock.sendall(_masked_text(b"hello"))
    harness.run_until(lambda: _read_into(sock, rest) and len(rest) >= 7)
    assert bytes(rest[:7]) == b"\x81\x05hello"
    return sock


def _open_many_echoed(harness: InProcessServer, count: int) -> list[socket.socket]:
    """``count`` clients opened and echoed together, as a load generator does (the server accepts and answers them
    in batches): the idle benchmark's conditions, in process."""
    socks = [socket.create_connection(("127.0.0.1", harness.port)) for _ in range(count)]
    for sock in socks:
        sock.setblocking(False)
        sock.sendall(build_client_request("test", "/echo", make_key()))
    bufs = [bytearray() for _ in socks]
    harness.run_until(lambda: all(_read_into(s, b) and b"\r\n\r\n" in b for s, b in zip(socks, bufs, strict=True)))
    rests = [b[b.index(b"\r\n\r\n") + 4 :] for b in bufs]
    assert all(b.startswith(b"HTTP/1.1 101") for b in bufs)
    for sock in socks:
        sock.sendall(_masked_text(b"hello"))
    harness.run_until(lambda: all(_read_into(s, r) and len(r) >= 7 for s, r in zip(socks, rests, strict=True)))
    return socks


def test_an_idle_connection_holds_nothing_it_does_not_need() -> None:
    with in_process_server() as harness:
        server = harness.server
        keys = [make_key() for _ in range(12)]
        socks = [_open_echoed(harness, "/echo?room=blue&x=1", key) for key in keys]
        try:
            harness.step()
            conns: list[ServerConnection] = sorted(server.connections.values(), key=lambda c: c.id)
            assert len(conns) == len(keys)
            for conn in conns:
                ws = conn.ws
                assert conn._extra is None  # no router of its own, no token, no linger, no ping waiting
                assert conn._wq is None and conn._wsize == 0
                # No output list while nothing waits to be sent (nor any other list).
                assert ws._out is None and not ws.has_output
                lists = [n for cls in type(ws).__mro__ for n in getattr(cls, "__slots__", ())
                         if isinstance(getattr(ws, n, None), list)]
                assert lists == []
                assert ws._aux is None  # no fragment, no close frame, no skipped message
                assert ws._hs is None  # the handshake's state is gone
                assert type(conn.sock) is _socket.socket  # not a socket.socket (half its size)
                assert conn.armed and conn.registered
                assert conn.route is not None and conn.path is conn.route.path  # the route's string
            # Its timer is the connection itself: no Timer in the heap calls a connection.
            assert not any(type(t) is Timer and isinstance(t.callback, ServerConnection) for t in server.loop._timers)
            assert server.loop.timer_count >= len(conns)
            # One string for the address of all its connections.
            assert len({id(conn.host) for conn in conns}) == 1 and conns[0].host == "127.0.0.1"
            assert conns[0].remote == ("127.0.0.1", socks[0].getsockname()[1])
            # Heads that differ only in the key: the rest is kept once; each reads back exactly.
            sessions = [conn.session for conn in conns]
            assert all(session is not None for session in sessions)
            assert len({id(session._head) for session in sessions if session is not None}) <= 2
            for session, key in zip(sessions, keys, strict=True):
                assert session is not None
                assert session.headers.get("Sec-WebSocket-Key") == key
                assert session.headers.get("Host") == "test"
                assert session.query == {"room": "blue", "x": "1"}
            assert server.open_count == len(keys) == len(server.sessions)
            assert server.per_ip == {"127.0.0.1": len(keys)}
        finally:
            for sock in socks:
                sock.close()
        harness.run_until(lambda: not server.connections)
        assert server.open_count == 0 and server.per_ip == {} and server._ip_names == {}


def test_a_keepalive_ping_leaves_nothing_behind_once_answered() -> None:
    with in_process_server({"timeouts": {"ping_interval": 0.05, "ping_timeout": 2.0}}) as harness:
        sock = _open_echoed(harness, "/echo")
        try:
            (conn,) = harness.server.connections.values()
            got = bytearray()
            harness.run_until(lambda: _read_into(sock, got) and len(got) >= 2 and got[0] == 0x89)
            assert conn._awaiting_pong and conn._extra is not None  # the ping waits for its pong
            payload = bytes(got[2 : 2 + (got[1] & 0x7F)])
            mask = b"\x00\x00\x00\x00"
            sock.sendall(bytes((0x8A, 0x80 | len(payload))) + mask + payload)
            harness.run_until(lambda: not conn._awaiting_pong)
            assert conn._extra is None  # answered: the connection holds nothing more than before the ping
        finally:
            sock.close()


@pytest.mark.skipif(tracemalloc.is_tracing(), reason="tracemalloc already in use")
def test_the_python_heap_per_idle_connection_is_bounded() -> None:
    package = os.path.dirname(selectws.__file__)
    count = 200
    with in_process_server() as harness:
        # A first cycle of as many: caches, lazy imports, free lists, the registries' tables at their size.
        for sock in _open_many_echoed(harness, count):
            sock.close()
        harness.run_until(lambda: not harness.server.connections)
        tracemalloc.start(40)
        try:
            before = tracemalloc.take_snapshot()
            socks = _open_many_echoed(harness, count)
            harness.step()
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        try:
            # Made with the server on the stack; not the log lines on their way out (buffered until flushed).
            ours = [
                tracemalloc.Filter(True, os.path.join(package, "*"), all_frames=True),
                tracemalloc.Filter(False, "*/structlog/*"),
                tracemalloc.Filter(False, os.path.join(package, "transport", "logs.py")),
            ]
            stats: list[Any] = after.filter_traces(ours).compare_to(before.filter_traces(ours), "filename")
            per_connection = sum(stat.size_diff for stat in stats) / count
            assert per_connection <= HEAP_PER_CONNECTION_MAX, (per_connection, stats[:10])
        finally:
            for sock in socks:
                sock.close()
