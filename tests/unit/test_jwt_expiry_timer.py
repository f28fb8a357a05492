"""Token expiry costs no timer of its own: an authenticated connection's one timer (the handshake deadline, then
the keepalive) is never armed past ``exp`` + leeway and closes it with 3000 when it fires there. A real
:class:`Server` in process, stepped by the test, with raw client sockets."""

from __future__ import annotations

import struct
import time

import pytest

pytest.importorskip("jwt")

from harness import InProcessServer

from selectws.config import parse_config
from selectws.plugins.registry import find_plugin
from selectws.server.auth import JwtVerifier
from selectws.server.server import Server

SECRET = "timer-test-secret-0123456789abcdefghijklmnopqrstuvwxyz"


class JwtHarness(InProcessServer):
    def __init__(self) -> None:
        config = parse_config({"auth": {"jwt_secret_env": "UNUSED"},
                               "routes": [{"path": "/echo", "plugin": "echo", "auth": "jwt"}]},
                              None, {"server.host": "127.0.0.1", "server.port": 0})
        self.server = Server(config, plugins=find_plugin, jwt=lambda c: JwtVerifier(secret=SECRET))
        self.server.start()
        self.port = self.server.listeners[0].address[1]


def token(**claims: object) -> str:
    import jwt

    return jwt.encode({"sub": "42", **claims}, SECRET, algorithm="HS256")


def test_expiry_uses_the_connections_own_timer_and_closes_with_3000() -> None:
    harness = JwtHarness()
    try:
        loop = harness.server.loop
        base = loop.timer_count
        socks = [harness.connect(f"/echo?token={token()}") for _ in range(3)]  # no exp
        socks += [harness.connect(f"/echo?token={token(exp=int(time.time()) + 60)}") for _ in range(3)]
        assert loop.timer_count == base + 6  # one timer per connection, exp or not
        expiring = harness.connect(f"/echo?token={token(exp=int(time.time()) + 1)}")
        assert loop.timer_count == base + 7
        started = time.monotonic()
        frame = harness.recv(expiring, 4)
        waited = time.monotonic() - started
        assert frame[0] == 0x88, frame  # a close frame ...
        length = frame[1] & 0x7F
        body = frame[2:] if len(frame) >= 2 + length else harness.recv(expiring, 2 + length)[2:]
        assert struct.unpack("!H", body[:2])[0] == 3000 and body[2:2 + length - 2] == b"token expired"
        assert waited < 2.5
        assert harness.server.per_user == {"42": 7}
        for sock in [*socks, expiring]:
            sock.close()
        harness.run_until(lambda: not harness.server.sessions)
        assert harness.server.per_user == {} and "user:42" not in harness.server.groups
    finally:
        harness.close()


def test_a_token_without_exp_never_expires() -> None:
    harness = JwtHarness()
    try:
        sock = harness.connect(f"/echo?token={token()}")
        conn = next(iter(harness.server.sessions.values()))
        assert conn._expires == float("inf")
        sock.close()
    finally:
        harness.close()
