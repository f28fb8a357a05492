"""The server API (``POST /api/<method>``, docs/api.md) against the real daemon, driven by curl, http.client and
``selectws publish``; WebSocket clients are python-websockets."""

from __future__ import annotations

import base64
import http.client
import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest
from conftest import run_cli, subprocess_env
from websockets.exceptions import ConnectionClosed
from wstools import connect, http_exchange

KEY = "k3y-for-tests_0123456789"
API_TOML = """
[api]
key_env = "SELECTWS_API_KEY"
"""


@pytest.fixture(autouse=True)
def api_key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Daemons started by these tests inherit the key through the environment (``[api] key_env``)."""
    monkeypatch.setenv("SELECTWS_API_KEY", KEY)


def api(port: int, method: str, body: Any = None, *, key: str | None = KEY, raw: bytes | None = None,
        http_method: str = "POST", headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    """One request with http.client: (status, lower-cased headers, parsed JSON body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    fields = dict(headers or {})
    if key is not None:
        fields["X-API-Key"] = key
    payload = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    try:
        conn.request(http_method, f"/api/{method}", body=payload, headers=fields)
        response = conn.getresponse()
        data = response.read()
    finally:
        conn.close()
    fields = {k.lower(): v for k, v in response.getheaders()}
    return response.status, fields, (
        json.loads(data) if data and fields.get("content-type") == "application/json" else data)


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("curl")
    if binary is None:
        pytest.skip("curl is not installed")
    return subprocess.run([binary, "-sS", "--max-time", "10", *args], capture_output=True, text=True, timeout=20,
                          env=subprocess_env())


def error_of(answer: Any) -> dict[str, str]:
    assert isinstance(answer, dict) and set(answer) == {"error"}, answer
    error = answer["error"]
    assert isinstance(error["code"], str) and isinstance(error["message"], str) and error["message"]
    return error


def members(port: int, group: str) -> list[dict[str, Any]]:
    status, _, answer = api(port, "presence", {"group": group})
    assert status == 200, answer
    return answer["result"]["members"]


def wait_members(port: int, group: str, n: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 5
    while True:
        found = members(port, group)
        if len(found) >= n:
            return found
        assert time.monotonic() < deadline, f"{group}: {len(found)} members, wanted {n}"
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------- publish
def test_curl_publish_reaches_a_websockets_client(start_daemon):
    daemon = start_daemon(API_TOML)
    listening = daemon.wait_for(event="listening")
    assert listening["api"] is True and len(listening["instance"]) == 12
    with connect(daemon.url("/broadcast/news")) as ws:
        wait_members(daemon.port, "broadcast:news", 1)
        done = curl("-H", f"X-API-Key: {KEY}", "-d", '{"group":"broadcast:news","data":"hi"}',
                    f"http://127.0.0.1:{daemon.port}/api/publish")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"result": {"delivered_local": 1}}
        assert ws.recv(timeout=5) == "hi"
        # the other header form, and a body over 1 KiB (curl sends Expect: 100-continue and waits for the 100)
        text = "é" * 3000
        started = time.monotonic()
        done = curl("-H", f"Authorization: apikey {KEY}", "--data-binary",
                    json.dumps({"group": "broadcast:news", "data": text}), f"http://127.0.0.1:{daemon.port}/api/publish")
        assert done.returncode == 0 and json.loads(done.stdout)["result"]["delivered_local"] == 1, done
        assert time.monotonic() - started < 0.9, "curl waited for a 100 Continue that never came"
        assert ws.recv(timeout=5) == text


def test_binary_publish_and_broadcast_to_several_groups(start_daemon):
    daemon = start_daemon(API_TOML)
    with ExitStack() as stack:
        a = stack.enter_context(connect(daemon.url("/broadcast/a")))
        b = stack.enter_context(connect(daemon.url("/broadcast/b")))
        b2 = stack.enter_context(connect(daemon.url("/broadcast/b")))
        other = stack.enter_context(connect(daemon.url("/broadcast/other")))
        wait_members(daemon.port, "broadcast:a", 1)
        wait_members(daemon.port, "broadcast:b", 2)
        wait_members(daemon.port, "broadcast:other", 1)
        blob = bytes(range(256)) * 3
        status, headers, answer = api(daemon.port, "publish", {"group": "broadcast:b",
                                                               "data_b64": base64.b64encode(blob).decode()})
        assert (status, answer) == (200, {"result": {"delivered_local": 2}})
        assert headers["content-type"] == "application/json"
        for ws in (b, b2):
            got = ws.recv(timeout=5)
            assert isinstance(got, bytes) and got == blob
        groups = ["broadcast:a", "broadcast:b", "broadcast:a", "broadcast:nobody"]
        status, _, answer = api(daemon.port, "broadcast", {"groups": groups, "data": "to a and b"})
        assert (status, answer) == (200, {"result": {"delivered_local": 3, "groups": 3}})  # each group once
        for ws in (a, b, b2):
            assert ws.recv(timeout=5) == "to a and b"
        status, _, answer = api(daemon.port, "publish", {"group": "broadcast:other", "data": "marker"})
        assert status == 200 and other.recv(timeout=5) == "marker"  # nothing else reached it first
        # a group nobody is in: delivered to nobody, not an error
        assert api(daemon.port, "publish", {"group": "broadcast:nobody", "data": "x"})[2] == {
            "result": {"delivered_local": 0}}


# ---------------------------------------------------------------------------------------------- errors
def test_keys_methods_sizes_and_bodies_get_their_answers(start_daemon):
    daemon = start_daemon(API_TOML + "[limits]\nmax_message_size = 4096\n")
    port = daemon.port
    good = {"group": "broadcast:x", "data": "hi"}

    # authentication: missing, wrong, wrong scheme; the right one in either header
    for key, headers in ((None, {}), ("wrong", {}), (None, {"Authorization": f"Bearer {KEY}"}),
                         (KEY[:-1], {}), (KEY + "x", {})):
        status, fields, answer = api(port, "publish", good, key=key, headers=headers)
        assert status == 401 and error_of(answer)["code"] == "unauthorized", (key, headers, answer)
        assert fields["www-authenticate"].startswith("apikey")
    assert api(port, "publish", good, key=None, headers={"Authorization": f"apikey {KEY}"})[0] == 200
    assert api(port, "publish", good, key=None, headers={"Authorization": f"ApiKey  {KEY} "})[0] == 200
    done = curl("-i", "-H", "X-API-Key: nope", "-d", json.dumps(good), f"http://127.0.0.1:{port}/api/publish")
    assert done.stdout.startswith("HTTP/1.1 401"), done.stdout

    # 405 with Allow, before anything else (even without a key)
    for method in ("GET", "PUT", "HEAD", "DELETE"):
        status, fields, _ = api(port, "publish", key=None, http_method=method)
        assert status == 405 and fields["allow"] == "POST", method

    # 404: an unknown method name, only once authenticated
    status, _, answer = api(port, "nope", {})
    assert status == 404 and error_of(answer)["code"] == "unknown_method"
    assert api(port, "nope", {}, key=None)[0] == 401

    # 413 from Content-Length alone, before a byte of the body is read
    reply = http_exchange(port, b"POST /api/publish HTTP/1.1\r\nHost: x\r\nX-API-Key: " + KEY.encode()
                          + b"\r\nContent-Length: 4097\r\n\r\n")
    assert reply.status == 413 and error_of(json.loads(reply.body))["code"] == "too_large"
    done = curl("-i", "-H", f"X-API-Key: {KEY}", "--data-binary", json.dumps({"group": "g", "data": "x" * 5000}),
                f"http://127.0.0.1:{port}/api/publish")
    assert done.stdout.startswith("HTTP/1.1 413"), done.stdout
    # exactly the limit is fine (as far as the size goes)
    body = json.dumps({"group": "g", "data": ""}).encode()
    body = body[:-2] + b"x" * (4096 - len(body)) + b'"}'
    assert len(body) == 4096 and api(port, "publish", raw=body)[0] == 200
    # chunked: 411
    reply = http_exchange(port, b"POST /api/info HTTP/1.1\r\nHost: x\r\nX-API-Key: " + KEY.encode()
                          + b"\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
    assert reply.status == 411
    reply = http_exchange(port, b"POST /api/info HTTP/1.1\r\nHost: x\r\nX-API-Key: " + KEY.encode()
                          + b"\r\nContent-Length: 1x\r\n\r\n")
    assert reply.status == 400

    # bad JSON
    for raw in (b"{", b"not json", b"\xff\xfe", b'["a list"]', b'"text"'):
        status, _, answer = api(port, "publish", raw=raw)
        assert status == 400 and error_of(answer)["code"] == "bad_json", raw
    # bad fields: the answer names the field
    cases = [
        ({"data": "x"}, "group"),
        ({"group": "", "data": "x"}, "group"),
        ({"group": 5, "data": "x"}, "group"),
        ({"group": "g"}, "data"),
        ({"group": "g", "data": 5}, "data"),
        ({"group": "g", "data": "x", "data_b64": "eA=="}, "data"),
        ({"group": "g", "data_b64": "not base64!"}, "data_b64"),
        ({"group": "g", "data": "\ud800"}, "data"),
        ({"group": "g", "data": "x", "colour": "red"}, "colour"),
    ]
    for params, field in cases:
        status, _, answer = api(port, "publish", params)
        error = error_of(answer)
        assert status == 400 and error["field"] == field and field in error["message"], (params, answer)
    for params, field in [({"groups": "g", "data": "x"}, "groups"), ({"groups": [], "data": "x"}, "groups"),
                          ({"groups": [f"g{i}" for i in range(101)], "data": "x"}, "groups"),
                          ({"groups": ["g", 3], "data": "x"}, "groups[1]")]:
        status, _, answer = api(port, "broadcast", params)
        assert status == 400 and error_of(answer)["field"] == field, (params, answer)
    for params, field in [({}, "session"), ({"session": "a.1", "group": "g"}, "session"),
                          ({"group": "g", "code": 1005}, "code"), ({"group": "g", "code": "1000"}, "code"),
                          ({"group": "g", "code": True}, "code"), ({"group": "g", "reason": "r" * 124}, "reason")]:
        status, _, answer = api(port, "disconnect", params)
        assert status == 400 and error_of(answer)["field"] == field, (params, answer)
    assert api(port, "presence", {})[2]["error"]["field"] == "group"

    # no route keeps history for this group: 404, saying so
    status, _, answer = api(port, "history", {"group": "g"})
    assert status == 404 and error_of(answer)["code"] == "no_history"
    # the daemon logged the refusals as warnings and kept serving
    assert daemon.logs(event="handshake refused", status=401)
    assert api(port, "info")[0] == 200


def test_api_is_off_without_a_key_and_on_the_ops_listener_only_when_set(start_daemon, monkeypatch, tmp_path):
    plain = start_daemon()
    assert plain.wait_for(event="listening")["api"] is False
    assert api(plain.port, "publish", {"group": "g", "data": "x"})[0] == 405  # the static files' answer to a POST
    key_file = tmp_path / "api.key"
    key_file.write_text(f"  {KEY}\n")
    monkeypatch.delenv("SELECTWS_API_KEY")
    ops = start_daemon(f"""
    [api]
    key_file = "{key_file.name}"
    [ops]
    listen = "127.0.0.1:0"
    """)
    ops_port = int(ops.wait_for(event="listening")["ops_addresses"][0].rpartition(":")[2])
    assert api(ops.port, "info")[0] == 405  # not on the WebSocket port (the static files refuse a POST)
    status, _, answer = api(ops_port, "info")
    assert status == 200 and answer["result"]["instance"] == ops.wait_for(event="listening")["instance"]


def test_reload_rereads_the_key_and_a_bad_key_keeps_the_running_one(start_daemon, tmp_path):
    key_file = tmp_path / "api.key"
    key_file.write_text("first-key\n")
    config = tmp_path / "api.toml"
    config.write_text('[api]\nkey_file = "api.key"\n')
    daemon = start_daemon(config, allow_errors=True)
    assert api(daemon.port, "info", key="first-key")[0] == 200
    key_file.write_text("second-key\n")
    daemon.signal(signal.SIGHUP)
    daemon.wait_for(event="configuration reloaded")
    assert api(daemon.port, "info", key="first-key")[0] == 401
    assert api(daemon.port, "info", key="second-key")[0] == 200
    key_file.write_text("")
    daemon.signal(signal.SIGHUP)
    failed = daemon.wait_for(event="reload failed; keeping the running configuration")
    assert failed["key"] == "api.key_file" and "empty" in failed["error"]
    assert api(daemon.port, "info", key="second-key")[0] == 200


# ---------------------------------------------------------------------------------------------- disconnect
def test_disconnect_by_session_and_by_group_with_the_given_code(start_daemon):
    daemon = start_daemon(API_TOML)
    port = daemon.port
    with ExitStack() as stack:
        one = stack.enter_context(connect(daemon.url("/broadcast/kick")))
        two = stack.enter_context(connect(daemon.url("/broadcast/kick")))
        three = stack.enter_context(connect(daemon.url("/broadcast/kick")))
        stay = stack.enter_context(connect(daemon.url("/broadcast/stay")))
        found = wait_members(port, "broadcast:kick", 3)
        wait_members(port, "broadcast:stay", 1)
        # who is who: each client's local port is in the member's remote address
        by_port = {int(m["remote"].rpartition(":")[2]): m["session"] for m in found}
        target = by_port[one.socket.getsockname()[1]]
        status, _, answer = api(port, "disconnect", {"session": target, "code": 4001, "reason": "kicked"})
        assert (status, answer) == (200, {"result": {"disconnected": 1, "scope": "local"}})
        with pytest.raises(ConnectionClosed) as closed:
            one.recv(timeout=5)
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4001, "kicked")
        # an id that is gone, or of another instance: nothing to do
        assert api(port, "disconnect", {"session": target})[2]["result"]["disconnected"] == 0
        assert api(port, "disconnect", {"session": "000000000000.1"})[2]["result"]["disconnected"] == 0
        wait_until_members(port, "broadcast:kick", 2)
        status, _, answer = api(port, "disconnect", {"group": "broadcast:kick", "code": 1008})
        assert (status, answer) == (200, {"result": {"disconnected": 2, "scope": "local"}})
        for ws in (two, three):
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=5)
            assert closed.value.rcvd.code == 1008
        stay.send("still here")  # the other group was not touched
        assert api(port, "publish", {"group": "broadcast:stay", "data": "yes"})[2]["result"]["delivered_local"] == 1
        assert stay.recv(timeout=5) == "yes"


def wait_until_members(port: int, group: str, n: int) -> None:
    deadline = time.monotonic() + 5
    while len(members(port, group)) != n:
        assert time.monotonic() < deadline, f"{group}: never {n} members"
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------- presence, info
def test_presence_and_info(start_daemon):
    daemon = start_daemon(API_TOML)
    port = daemon.port
    instance = daemon.wait_for(event="listening")["instance"]
    status, _, answer = api(port, "info", raw=b"")  # no body at all is an empty object
    assert status == 200
    info = answer["result"]
    assert info["instance"] == instance and info["connections"] == 0 and info["groups"] == 0
    assert info["uptime"] >= 0 and info["broker"] == {"kind": "memory", "up": True}
    with connect(daemon.url("/broadcast/p")) as a, connect(daemon.url("/broadcast/p")) as b, \
            connect(daemon.url("/echo")) as e:
        found = wait_members(port, "broadcast:p", 2)
        assert [m["path"] for m in found] == ["/broadcast/p", "/broadcast/p"]
        ports = sorted(int(m["remote"].rpartition(":")[2]) for m in found)
        assert ports == sorted([a.socket.getsockname()[1], b.socket.getsockname()[1]])
        ids = [m["session"] for m in found]
        assert len(set(ids)) == 2 and all(i.startswith(instance + ".") for i in ids)
        status, _, answer = api(port, "presence", {"group": "broadcast:p"})
        assert answer["result"]["count"] == 2 and answer["result"]["scope"] == "cluster"
        assert api(port, "presence", {"group": "broadcast:none"})[2]["result"]["members"] == []
        e.send("ping")
        assert e.recv(timeout=5) == "ping"
        info = api(port, "info", {})[2]["result"]
        assert info["connections"] == 3 and info["groups"] == 1
        assert info["messages_in"] >= 1 and info["messages_out"] >= 1


# ---------------------------------------------------------------------------------------------- the CLI
def test_cli_publishes_a_message_and_stdin_lines_and_fails_with_the_servers_message(start_daemon, tmp_path):
    daemon = start_daemon(API_TOML)
    url = f"http://127.0.0.1:{daemon.port}"
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    with connect(daemon.url("/broadcast/cli")) as ws:
        wait_members(daemon.port, "broadcast:cli", 1)
        done = run_cli("publish", "broadcast:cli", "one message", "--url", url, "--key-file", str(key_file), "-v")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"delivered_local": 1}
        assert ws.recv(timeout=5) == "one message"
        proc = subprocess.run(
            [sys.executable, "-m", "selectws", "publish", "broadcast:cli", "-", "--url", url, "--key-env",
             "SELECTWS_API_KEY"], input="line 1\nline 2\n\nline 4\n", capture_output=True, text=True, timeout=30,
            env=subprocess_env(),
        )
        assert proc.returncode == 0, proc.stderr
        assert [ws.recv(timeout=5) for _ in range(4)] == ["line 1", "line 2", "", "line 4"]
    wrong = tmp_path / "wrong"
    wrong.write_text("not the key")
    done = run_cli("publish", "broadcast:cli", "x", "--url", url, "--key-file", str(wrong))
    assert done.returncode == 1 and "401" in done.stderr and "wrong API key" in done.stderr, done.stderr
    done = run_cli("publish", "", "x", "--url", url, "--key-file", str(key_file))
    assert done.returncode == 1 and "field 'group'" in done.stderr, done.stderr
    done = run_cli("publish", "g", "x", "--url", url, "--key-file", str(tmp_path / "missing"))
    assert done.returncode == 2 and "--key-file" in done.stderr, done.stderr


# ---------------------------------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    ("api_toml", "key", "words"),
    [
        ('key_file = "missing.key"', "api.key_file", "cannot read"),
        ('key_file = "empty.key"', "api.key_file", "empty"),
        ('key_env = "SELECTWS_TEST_UNSET_KEY"', "api.key_env", "not set"),
        ('key_env = "SELECTWS_TEST_EMPTY_KEY"', "api.key_env", "empty"),
        ('key_file = "empty.key"\nkey_env = "SELECTWS_API_KEY"', "api.key_env", "not both"),
    ],
)
def test_a_missing_or_empty_key_is_a_configuration_error(tmp_path, monkeypatch, api_toml, key, words):
    (tmp_path / "empty.key").write_text(" \n")
    monkeypatch.delenv("SELECTWS_TEST_UNSET_KEY", raising=False)
    monkeypatch.setenv("SELECTWS_TEST_EMPTY_KEY", "")
    config = tmp_path / "c.toml"
    config.write_text(f"[api]\n{api_toml}\n")
    done = run_cli("check-config", str(config), cwd=tmp_path)
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{key}: " in lines[0] and words in lines[0], done.stderr
    # serve refuses to start the same way: nothing listens
    done = run_cli("serve", "--config", str(config), "--port", "0", cwd=tmp_path, timeout=20)
    assert done.returncode == 2 and f"{key}: " in done.stderr and "listening" not in done.stderr, done.stderr


@pytest.fixture
def two_on_redis(start_daemon) -> Iterator[tuple[Any, Any, Any]]:
    redis_binary = shutil.which("redis-server")
    if redis_binary is None:
        pytest.skip("redis-server not installed")
    pytest.importorskip("hiredis")
    from test_redis_broker import Redis

    server = Redis(redis_binary)
    server.start()
    try:
        toml = API_TOML + f'[broker]\nurl = "{server.url}"\nreconnect_min = 0.05\nreconnect_max = 0.5\n'
        yield start_daemon(toml), start_daemon(toml), server
    finally:
        server.kill()


def test_publish_reaches_both_instances_on_one_redis(two_on_redis):
    a, b, redis = two_on_redis
    with connect(a.url("/broadcast/news")) as on_a, connect(b.url("/broadcast/news")) as on_b:
        redis.wait_subscribers("selectws:broadcast:news", 2)
        done = curl("-H", f"X-API-Key: {KEY}", "-d", '{"group":"broadcast:news","data":"hi"}',
                    f"http://127.0.0.1:{a.port}/api/publish")
        assert json.loads(done.stdout) == {"result": {"delivered_local": 1}}, done
        assert on_a.recv(timeout=5) == "hi" and on_b.recv(timeout=5) == "hi"
        blob = b"\x00\xff binary"
        status, _, answer = api(b.port, "broadcast", {"groups": ["broadcast:news"],
                                                      "data_b64": base64.b64encode(blob).decode()})
        assert (status, answer) == (200, {"result": {"delivered_local": 1, "groups": 1}})
        assert on_a.recv(timeout=5) == blob and on_b.recv(timeout=5) == blob
        # session ids are unique across the instances: each carries its instance id
        ids = [members(d.port, "broadcast:news")[0]["session"] for d in (a, b)]
        instances = [d.wait_for(event="listening")["instance"] for d in (a, b)]
        assert instances[0] != instances[1]
        assert [i.rpartition(".")[0] for i in ids] == instances
