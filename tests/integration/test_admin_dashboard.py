"""The admin dashboard's door (``[ops] admin = true``, selectws/server/admin.py), against the real daemon.

Only on the operator listener, only with the server API key: ``/admin`` answers 401 (a login form) without a
session, ``POST /admin/login`` with the right key sets an HttpOnly SameSite=Strict cookie, the feed's WebSocket
upgrade is refused without that cookie (401) or from another origin (403), and the WebSocket port knows nothing of
any of it (404). The feed's own connection is not counted as a client. The browser side (the page under load,
the screenshot) is tests/browser/test_admin_dashboard_browser.py.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from wstools import connect, expected_accept, http_exchange, read_head, upgrade_request, ws_key

from selectws.config import ConfigError, parse_config

KEY = "admin-test-key-7f3a9c0e5b"
TIMEOUT = 10.0


def _config(admin: bool = True) -> str:
    return f"""
    [ops]
    listen = "127.0.0.1:0"
    admin = {"true" if admin else "false"}

    [api]
    key_file = "api.key"
    """


def _start(start_daemon: Any, admin: bool = True) -> tuple[Any, int]:
    (start_daemon.tmp / "api.key").write_text(KEY + "\n")
    d = start_daemon(_config(admin))
    ops = int(d.wait_for(event="listening")["ops_addresses"][0].rpartition(":")[2])
    return d, ops


def _request(port: int, method: str, path: str, headers: list[tuple[str, str]] = (), body: bytes = b"") -> Any:
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers]
    if method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return http_exchange(port, ("\r\n".join(lines) + "\r\n\r\n").encode() + body)


def _login(port: int, key: str) -> Any:
    return _request(port, "POST", "/admin/login", [("Content-Type", "application/x-www-form-urlencoded"),
                                                   ("Origin", f"http://127.0.0.1:{port}")], f"key={key}".encode())


def _cookie(port: int) -> str:
    reply = _login(port, KEY)
    assert reply.status == 303, reply
    return reply.header("Set-Cookie").split(";")[0]


def _upgrade(port: int, path: str, headers: list[tuple[str, str]]) -> Any:
    key = ws_key()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(upgrade_request(path, f"127.0.0.1:{port}", key=key, extra=headers))
        reply = read_head(sock)
    if reply.status == 101:
        assert reply.header("Sec-WebSocket-Accept") == expected_accept(key)
    return reply


def test_the_page_and_the_login_need_the_api_key(start_daemon: Any) -> None:
    d, ops = _start(start_daemon)
    page = _request(ops, "GET", "/admin")
    assert page.status == 401, page
    assert b'<form method="post" action="/admin/login">' in page.body and b"/admin/ws" not in page.body
    assert page.header("WWW-Authenticate") and page.header("Cache-Control") == "no-store"
    assert "frame-ancestors 'none'" in page.header("Content-Security-Policy")

    assert _login(ops, "wrong").status == 401
    assert _login(ops, "").status == 401
    assert _request(ops, "GET", "/admin/login").status == 405
    cross = _request(ops, "POST", "/admin/login", [("Origin", "http://evil.example")], f"key={KEY}".encode())
    assert cross.status == 403

    ok = _login(ops, KEY)
    assert ok.status == 303 and ok.header("Location") == "/admin"
    cookie = ok.header("Set-Cookie")
    attributes = [a.strip().lower() for a in cookie.split(";")]
    assert attributes[0].startswith("selectws_admin=v1.")
    assert {"httponly", "samesite=strict", "path=/admin", "max-age=43200"} <= set(attributes), cookie
    session = cookie.split(";")[0]

    page = _request(ops, "GET", "/admin", [("Cookie", session)])
    assert page.status == 200 and b'<script src="/admin/admin.js"' in page.body
    # A token of the right shape that this key did not sign, or an expired one, is no session.
    forged = session[: -4] + ("0000" if not session.endswith("0000") else "1111")
    assert _request(ops, "GET", "/admin", [("Cookie", forged)]).status == 401
    expired = "selectws_admin=v1.1000000000.00112233445566ff." + "0" * 64
    assert _request(ops, "GET", "/admin", [("Cookie", expired)]).status == 401
    # The script and the style hold no data: anyone may load them (the login page uses the style).
    assert _request(ops, "GET", "/admin/admin.js").status == 200
    assert _request(ops, "GET", "/admin/admin.css").status == 200
    assert d.logs(event="admin login refused", reason="wrong key")
    assert d.logs(event="admin login")


def test_the_feed_refuses_the_upgrade_without_the_session_and_streams_with_it(start_daemon: Any) -> None:
    d, ops = _start(start_daemon)
    origin = ("Origin", f"http://127.0.0.1:{ops}")
    assert _upgrade(ops, "/admin/ws", [origin]).status == 401
    assert _upgrade(ops, "/admin/ws", [origin, ("Cookie", "selectws_admin=v1.9999999999.00.00")]).status == 401
    session = _cookie(ops)
    assert _upgrade(ops, "/admin/ws", [("Origin", "http://evil.example"), ("Cookie", session)]).status == 403
    assert _upgrade(ops, "/admin/ws", [origin, ("Cookie", session)]).status == 101

    with connect(d.url("/echo")) as client, \
            connect(f"ws://127.0.0.1:{ops}/admin/ws", additional_headers={"Cookie": session},
                    origin=f"http://127.0.0.1:{ops}") as feed:
        first = json.loads(feed.recv(timeout=TIMEOUT))
        assert first["routes"]["/echo"] == 1 and "/admin/ws" not in first["routes"]
        assert first["totals"]["connections"] == 1 and first["workers"] == []
        sent_before = first["totals"]["messages_out"]
        started = time.monotonic()
        snapshots = [json.loads(feed.recv(timeout=TIMEOUT)) for _ in range(3)]
        elapsed = time.monotonic() - started
        assert 1.5 < elapsed < 4.5, elapsed  # one a second
        assert all(s["t"] > first["t"] for s in snapshots)
        # The feed's own messages are not client traffic: messages_out did not move with them.
        assert snapshots[-1]["totals"]["messages_out"] == sent_before
        client.send("hello")
        assert client.recv(timeout=TIMEOUT) == "hello"
        moved = json.loads(feed.recv(timeout=TIMEOUT))
        assert moved["totals"]["messages_in"] == first["totals"]["messages_in"] + 1
        assert moved["totals"]["in_rate"] > 0
        metrics = _request(ops, "GET", "/metrics").body.decode()
        assert 'selectws_connections_open{route="/echo"} 1' in metrics and "/admin/ws" not in metrics
    assert d.wait_for(event="admin left", timeout=TIMEOUT)


def test_a_new_key_on_reload_ends_the_sessions_and_their_feeds(start_daemon: Any) -> None:
    d, ops = _start(start_daemon)
    old = _cookie(ops)
    with connect(f"ws://127.0.0.1:{ops}/admin/ws", additional_headers={"Cookie": old}) as feed:
        json.loads(feed.recv(timeout=TIMEOUT))
        (start_daemon.tmp / "api.key").write_text("a-brand-new-key-91c2\n")
        d.signal(signal.SIGHUP)
        d.wait_for(event="configuration reloaded")
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                feed.recv(timeout=TIMEOUT)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    assert _request(ops, "GET", "/admin", [("Cookie", old)]).status == 401
    assert _login(ops, KEY).status == 401
    new = _request(ops, "POST", "/admin/login", [("Origin", f"http://127.0.0.1:{ops}")], b"key=a-brand-new-key-91c2")
    assert new.status == 303
    assert _request(ops, "GET", "/admin", [("Cookie", new.header("Set-Cookie").split(";")[0])]).status == 200


def test_nothing_of_it_is_on_the_websocket_port(start_daemon: Any) -> None:
    d, ops = _start(start_daemon)
    session = _cookie(ops)
    assert _request(d.port, "GET", "/admin", [("Cookie", session)]).status == 404
    assert _request(d.port, "GET", "/admin/admin.js").status == 404
    login = _request(d.port, "POST", "/admin/login", [], f"key={KEY}".encode())
    assert login.status == 405 and login.header("Set-Cookie") is None  # what the port says to any POST
    origin = ("Origin", f"http://127.0.0.1:{d.port}")
    assert _upgrade(d.port, "/admin/ws", [origin, ("Cookie", session)]).status == 404


def test_off_unless_enabled(start_daemon: Any) -> None:
    _, ops = _start(start_daemon, admin=False)
    assert _request(ops, "GET", "/admin").status == 404
    assert _upgrade(ops, "/admin/ws", []).status == 404
    assert _request(ops, "GET", "/metrics").status == 200


@pytest.mark.parametrize(("data", "message"), [
    ({"ops": {"admin": True}, "api": {"key_env": "K"}}, "set ops.listen"),
    ({"ops": {"admin": True, "listen": "127.0.0.1:9100"}}, "api.key_file or api.key_env"),
])
def test_the_configuration_requires_the_ops_listener_and_the_key(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert info.value.key == "ops.admin" and message in str(info.value)
