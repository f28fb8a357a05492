"""An in-process harness for the server layer: a real :class:`Server` on 127.0.0.1, stepped by the test.

Tests talk to it over real sockets and advance it with :meth:`InProcessServer.run_until`, which runs loop
iterations (``EventLoop.run_once``) until a condition holds. Nothing private of the server is touched: what a
test observes is what a client receives and what :meth:`Server.stats` reports.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from selectws.config import Config, parse_config
from selectws.plugins.registry import find_plugin
from selectws.protocol.handshake import build_client_request, make_key
from selectws.server.server import Server
from selectws.server.stats import ServerStats


class InProcessServer:
    def __init__(self, config: Config) -> None:
        self.server = Server(config, plugins=find_plugin)
        self.server.start()
        self.port = self.server.listeners[0].address[1]

    def run_until(self, condition: Callable[[], bool], timeout: float = 5.0) -> None:
        """Step the loop until ``condition()`` is true; AssertionError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError("condition not reached in time")
            self.server.loop.run_once(0.01)

    def step(self, n: int = 3) -> None:
        for _ in range(n):
            self.server.loop.run_once(0.01)

    def stats(self) -> ServerStats:
        return self.server.stats()

    def connect(self, path: str, extensions: str | None = None) -> socket.socket:
        """A raw client socket upgraded on ``path`` (the 101 head is consumed)."""
        sock = socket.create_connection(("127.0.0.1", self.port))
        sock.setblocking(False)
        sock.sendall(build_client_request("test", path, make_key(), extensions=extensions))
        head = bytearray()
        self.run_until(lambda: _read_into(sock, head) and b"\r\n\r\n" in head)
        assert head.startswith(b"HTTP/1.1 101"), bytes(head)
        self.last_head = bytes(head)
        return sock

    def recv(self, sock: socket.socket, n: int) -> bytes:
        """At least ``n`` bytes from ``sock`` (the server runs meanwhile)."""
        buf = bytearray()
        self.run_until(lambda: _read_into(sock, buf) and len(buf) >= n)
        return bytes(buf)

    def close(self) -> None:
        self.server.close()


def _read_into(sock: socket.socket, buf: bytearray) -> bool:
    try:
        data = sock.recv(65536)
    except BlockingIOError:
        return True
    buf += data
    return True


@contextmanager
def in_process_server(settings: Mapping[str, Any] | None = None) -> Iterator[InProcessServer]:
    """A started server on an ephemeral port, configured from ``settings`` (TOML-shaped data)."""
    config = parse_config(dict(settings or {}), None, {"server.host": "127.0.0.1", "server.port": 0})
    harness = InProcessServer(config)
    try:
        yield harness
    finally:
        harness.close()
