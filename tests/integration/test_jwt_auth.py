"""JWT authentication against the real daemon (docs/auth.md): ``auth = "jwt"`` routes, driven by the python-websockets
client, the server API through http.client, and ``selectws gentoken`` / ``check-config`` as subprocesses.

Tokens are signed with PyJWT and, separately, with the standard library alone (hmac, hashlib, base64, json), so a
bug shared by PyJWT and the daemon cannot hide.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from typing import Any

import pytest
from conftest import run_cli, subprocess_env
from websockets.exceptions import ConnectionClosed, InvalidStatus
from wstools import connect

jwt = pytest.importorskip("jwt")

SECRET = "integration-secret-0123456789abcdefghijklmnopqrstuvwxyz"
API_KEY = "jwt-tests-api-key_0123456789"

JWT_TOML = """
[api]
key_env = "SELECTWS_API_KEY"

[auth]
jwt_secret_env = "SELECTWS_JWT_SECRET"
{auth_extra}

[limits]
max_connections_per_user = {per_user}

[[routes]]
path = "/echo"
plugin = "echo"
auth = "jwt"

[[routes]]
path = "/chat"
plugin = "chat"
auth = "jwt"

[[routes]]
path = "/open"
plugin = "echo"
"""


def jwt_toml(auth_extra: str = "", per_user: int = 0) -> str:
    return JWT_TOML.format(auth_extra=auth_extra, per_user=per_user)


@pytest.fixture(autouse=True)
def secrets_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Daemons started here inherit the JWT secret and the API key through the environment."""
    monkeypatch.setenv("SELECTWS_JWT_SECRET", SECRET)
    monkeypatch.setenv("SELECTWS_API_KEY", API_KEY)


# ---------------------------------------------------------------------------------------------- tokens
def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def stdlib_token(claims: dict[str, Any], secret: str = SECRET, alg: str = "HS256") -> str:
    signing_input = f"{b64url(json.dumps({'alg': alg, 'typ': 'JWT'}).encode())}.{b64url(json.dumps(claims).encode())}"
    if alg == "none":
        return signing_input + "."
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    return f"{signing_input}.{b64url(hmac.new(secret.encode(), signing_input.encode(), digest).digest())}"


def pyjwt_token(claims: dict[str, Any], secret: str = SECRET, alg: str = "HS256") -> str:
    return jwt.encode(claims, secret, algorithm=alg)


SIGNERS = [pytest.param(stdlib_token, id="stdlib"), pytest.param(pyjwt_token, id="pyjwt")]


def refused(url: str, **kwargs: Any) -> InvalidStatus:
    with pytest.raises(InvalidStatus) as info:
        connect(url, **kwargs)
    return info.value


def api(port: int, method: str, body: dict[str, Any]) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("POST", f"/api/{method}", body=json.dumps(body).encode(), headers={"X-API-Key": API_KEY})
        response = conn.getresponse()
        answer = json.loads(response.read())
    finally:
        conn.close()
    assert response.status == 200, answer
    result: dict[str, Any] = answer["result"]
    return result


def wait_members(port: int, group: str, n: int) -> None:
    deadline = time.monotonic() + 5
    while api(port, "presence", {"group": group})["count"] != n:
        assert time.monotonic() < deadline, f"{group}: never {n} members"
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------- the handshake
@pytest.mark.parametrize("sign", SIGNERS)
def test_a_valid_token_opens_from_the_query_the_header_and_the_cookie(start_daemon, sign):
    daemon = start_daemon(jwt_toml())
    token = sign({"sub": "42", "exp": int(time.time()) + 60})
    for url, headers in [(daemon.url(f"/echo?token={token}"), None),
                         (daemon.url("/echo"), [("Authorization", f"Bearer {token}")]),
                         (daemon.url("/echo"), [("Cookie", f"theme=dark; token={token}")])]:
        with connect(url, additional_headers=headers) as ws:
            ws.send("hello")
            assert ws.recv(timeout=5) == "hello"
    # a route without auth stays open to everyone, token or not
    with connect(daemon.url("/open")) as ws:
        ws.send("x")
        assert ws.recv(timeout=5) == "x"


def test_no_token_is_401_with_www_authenticate(start_daemon):
    daemon = start_daemon(jwt_toml())
    error = refused(daemon.url("/echo"))
    assert error.response.status_code == 401
    assert error.response.headers["WWW-Authenticate"] == "Bearer"
    daemon.wait_for(event="handshake refused", status=401, reason="no token")


@pytest.mark.parametrize("sign", SIGNERS)
def test_tampered_unsigned_and_wrong_algorithm_tokens_are_403_and_the_reason_is_only_logged(start_daemon, sign):
    daemon = start_daemon(jwt_toml())
    now = int(time.time())
    good = sign({"sub": "42", "exp": now + 60})
    head, _, signature = good.split(".")
    tampered = f"{head}.{b64url(json.dumps({'sub': '1', 'exp': now + 60}).encode())}.{signature}"
    cases = {
        "tampered": (tampered, "Signature verification failed"),
        "alg none": (stdlib_token({"sub": "42"}, alg="none"), "alg"),
        "HS512 when only HS256": (sign({"sub": "42"}, SECRET + SECRET, "HS512"), "alg"),
        "another secret": (sign({"sub": "42"}, SECRET[::-1]), "Signature verification failed"),
        "expired": (sign({"sub": "42", "exp": now - 30}), "expired"),
    }
    for name, (token, why) in cases.items():
        error = refused(daemon.url(f"/echo?token={token}"))
        assert error.response.status_code == 403, name
        assert bytes(error.response.body or b"") == b"403 invalid token\n", name  # nothing more for the client
        record = daemon.wait_for(lambda r, w=why: w in r.get("reason", ""), event="handshake refused",
                                 status=403)
        assert record["reason"].startswith("invalid token: "), record


def test_nbf_aud_and_iss(start_daemon):
    daemon = start_daemon(jwt_toml('audience = "chat"\nissuer = "https://auth.example"\nleeway = 1'))
    now = int(time.time())
    base = {"sub": "5", "aud": "chat", "iss": "https://auth.example", "exp": now + 60}
    for sign in (stdlib_token, pyjwt_token):
        with connect(daemon.url(f"/echo?token={sign(base)}")) as ws:
            ws.send("ok")
            assert ws.recv(timeout=5) == "ok"
        for bad in ({**base, "nbf": now + 30}, {**base, "aud": "billing"}, {**base, "iss": "https://evil.example"},
                    {k: v for k, v in base.items() if k != "aud"}, {k: v for k, v in base.items() if k != "iss"}):
            assert refused(daemon.url(f"/echo?token={sign(bad)}")).response.status_code == 403, bad


def test_algorithm_confusion_an_hs256_token_signed_with_the_rs256_public_key_is_403(start_daemon, tmp_path):
    pytest.importorskip("cryptography")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    (tmp_path / "jwt.pem").write_text(public)
    daemon = start_daemon("""
        [auth]
        jwt_public_key_file = "jwt.pem"
        algorithms = ["RS256"]

        [[routes]]
        path = "/echo"
        plugin = "echo"
        auth = "jwt"
    """)
    with connect(daemon.url(f"/echo?token={jwt.encode({'sub': '1'}, private, algorithm='RS256')}")) as ws:
        ws.send("rs")
        assert ws.recv(timeout=5) == "rs"
    forged = stdlib_token({"sub": "1"}, secret=public, alg="HS256")  # the public key is no secret
    assert refused(daemon.url(f"/echo?token={forged}")).response.status_code == 403


# ---------------------------------------------------------------------------------------------- expiry
@pytest.mark.parametrize("sign", SIGNERS)
def test_a_token_two_seconds_from_expiry_is_closed_with_3000(start_daemon, sign):
    daemon = start_daemon(jwt_toml())
    with connect(daemon.url(f"/echo?token={sign({'sub': '42', 'exp': int(time.time()) + 2})}")) as ws:
        opened = time.monotonic()
        ws.send("still valid")
        assert ws.recv(timeout=2) == "still valid"
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=4)  # bounded: the close must come within ~2 s (exp is a whole second)
        took = time.monotonic() - opened
    assert info.value.rcvd is not None
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (3000, "token expired")
    assert took < 3.2, took
    daemon.wait_for(event="token expired; closing", user="42")


def test_connections_without_exp_have_no_expiry_timer_beyond_their_own(start_daemon):
    daemon = start_daemon(jwt_toml())
    with connect(daemon.url(f"/echo?token={stdlib_token({'sub': '8'})}")) as ws:
        ws.send("a")
        assert ws.recv(timeout=5) == "a"


# ---------------------------------------------------------------------------------------------- users
def test_one_publish_to_user_group_reaches_every_tab_and_disconnect_by_user_closes_them(start_daemon):
    daemon = start_daemon(jwt_toml())
    with ExitStack() as stack:
        tabs = [stack.enter_context(connect(daemon.url(f"/echo?token={sign({'sub': '42'})}")))
                for sign in (stdlib_token, pyjwt_token)]
        other = stack.enter_context(connect(daemon.url(f"/echo?token={stdlib_token({'sub': '43'})}")))
        wait_members(daemon.port, "user:42", 2)
        wait_members(daemon.port, "user:43", 1)
        assert api(daemon.port, "publish", {"group": "user:42", "data": "for 42"}) == {"delivered_local": 2}
        for ws in tabs:
            assert ws.recv(timeout=5) == "for 42"
        other.send("ping")
        assert other.recv(timeout=5) == "ping"  # 43 got nothing before its own echo
        result = api(daemon.port, "disconnect", {"user": "42", "code": 4001, "reason": "logged out"})
        assert result == {"disconnected": 2, "scope": "local"}
        for ws in tabs:
            with pytest.raises(ConnectionClosed) as info:
                ws.recv(timeout=5)
            assert info.value.rcvd is not None and info.value.rcvd.code == 4001
        other.send("still here")
        assert other.recv(timeout=5) == "still here"


def test_max_connections_per_user_refuses_with_429_and_frees_the_slot_on_close(start_daemon):
    daemon = start_daemon(jwt_toml(per_user=2))
    url = daemon.url(f"/echo?token={stdlib_token({'sub': '42'})}")
    with connect(url), connect(url) as second:
        error = refused(url)
        assert error.response.status_code == 429
        daemon.wait_for(event="handshake refused", status=429)
        with connect(daemon.url(f"/echo?token={stdlib_token({'sub': '7'})}")) as ws:  # other users are not limited
            ws.send("7")
            assert ws.recv(timeout=5) == "7"
        second.close()
        deadline = time.monotonic() + 5
        while True:  # the slot is free once the server has seen the close
            try:
                with connect(url) as third:
                    third.send("3")
                    assert third.recv(timeout=5) == "3"
                break
            except InvalidStatus as exc:
                assert exc.response.status_code == 429 and time.monotonic() < deadline
                time.sleep(0.05)


# ---------------------------------------------------------------------------------------------- chat
def test_chat_takes_the_name_from_the_token(start_daemon):
    daemon = start_daemon(jwt_toml())
    alice = pyjwt_token({"sub": "1", "name": "alice"})
    with connect(daemon.url(f"/chat?token={alice}")) as a, \
            connect(daemon.url(f"/chat?token={stdlib_token({'sub': 'bob-id'})}")) as b, \
            connect(daemon.url(f"/chat?token={alice}")) as a2:
        a.send(json.dumps({"type": "login", "room": "r"}))
        welcome = json.loads(a.recv(timeout=5))
        assert (welcome["type"], welcome["name"], welcome["members"]) == ("welcome", "alice", ["alice"])
        b.send(json.dumps({"type": "login", "name": "mallory", "room": "r"}))  # disagrees with the token
        error = json.loads(b.recv(timeout=5))
        assert error["type"] == "error" and "does not match your token" in error["reason"]
        b.send(json.dumps({"type": "login", "name": "bob-id", "room": "r"}))  # agrees: fine (no name claim: sub)
        assert json.loads(b.recv(timeout=5))["name"] == "bob-id"
        assert json.loads(a.recv(timeout=5)) == {"type": "joined", "name": "bob-id"}
        a2.send(json.dumps({"type": "login", "room": "r"}))  # alice's second tab: same name, allowed
        welcome = json.loads(a2.recv(timeout=5))
        assert welcome["name"] == "alice" and sorted(welcome["members"]) == ["alice", "bob-id"]
        a.send(json.dumps({"type": "say", "text": "hi"}))
        said = {"type": "said", "from": "alice", "text": "hi"}
        assert json.loads(b.recv(timeout=5)) == said  # bob saw no second "joined" for alice's other tab
        assert json.loads(a2.recv(timeout=5)) == said


def test_the_default_configuration_chat_needs_no_token(daemon):
    with connect(daemon.url("/chat")) as ws:
        ws.send(json.dumps({"type": "login", "name": "anon", "room": "lobby"}))
        assert json.loads(ws.recv(timeout=5))["type"] == "welcome"


# ---------------------------------------------------------------------------------------------- gentoken
def test_gentoken_output_opens_echo_on_a_jwt_route(start_daemon, tmp_path):
    secret = tmp_path / "jwt.secret"
    secret.write_text(SECRET + "\n")
    daemon = start_daemon(jwt_toml().replace('jwt_secret_env = "SELECTWS_JWT_SECRET"',
                                             f'jwt_secret_file = "{secret}"'))
    done = run_cli("gentoken", "--sub", "42", "--name", "alice", "--ttl", "60", "--secret-file", str(secret))
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert claims["sub"] == "42" and claims["name"] == "alice" and 55 <= claims["exp"] - time.time() <= 61
    with connect(daemon.url(f"/echo?token={token}")) as ws:
        ws.send("from gentoken")
        assert ws.recv(timeout=5) == "from gentoken"
    env_done = run_cli("gentoken", "--sub", "9", "--secret-env", "SELECTWS_JWT_SECRET", "--aud", "a", "--iss", "i",
                       "--algorithm", "HS384", "--ttl", "0")
    assert env_done.returncode == 0, env_done.stderr
    assert jwt.decode(env_done.stdout.strip(), SECRET, algorithms=["HS384"], audience="a", issuer="i") == {
        "sub": "9", "iat": pytest.approx(time.time(), abs=5), "aud": "a", "iss": "i"}
    assert run_cli("gentoken", "--sub", "1").returncode == 2  # no secret given


# ---------------------------------------------------------------------------------------------- config errors
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


ROUTE = '\n[[routes]]\npath = "/echo"\nplugin = "echo"\nauth = "jwt"\n'


@pytest.mark.parametrize(("auth", "setup", "key", "words"), [
    ("", None, "auth.jwt_secret_file", 'routes[0] (/echo) has auth = "jwt"'),
    ('[auth]\njwt_secret_file = "missing.secret"\n', None, "auth.jwt_secret_file", "cannot read"),
    ('[auth]\njwt_secret_file = "empty.secret"\n', "empty.secret", "auth.jwt_secret_file", "is empty"),
    ('[auth]\njwt_secret_env = "SELECTWS_UNSET_SECRET"\n', None, "auth.jwt_secret_env", "is not set"),
])
def test_configuration_errors_name_the_key_and_nothing_starts(write_config, tmp_path, auth, setup, key, words):
    if setup:
        (tmp_path / setup).write_text("\n")
    path = write_config(auth + ROUTE)
    checked = run_cli("check-config", str(path))
    assert checked.returncode == 2 and f"{key}: " in checked.stderr and words in checked.stderr, checked.stderr
    port = free_port()
    served = run_cli("serve", "--config", str(path), "--port", str(port), timeout=20)
    assert served.returncode == 2 and f"{key}: " in served.stderr, served.stderr
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0  # nothing listened


def test_without_pyjwt_the_configuration_error_says_what_to_install(write_config, tmp_path):
    fake = tmp_path / "nojwt" / "jwt"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('PyJWT hidden by the test')\n")
    path = write_config('[auth]\njwt_secret_env = "SELECTWS_JWT_SECRET"\n' + ROUTE)
    env = subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join([str(fake.parent), env["PYTHONPATH"]])
    done = subprocess.run([sys.executable, "-m", "selectws", "check-config", str(path)], capture_output=True,
                          text=True, timeout=30, env=env, stdin=subprocess.DEVNULL)
    assert done.returncode == 2, done.stderr
    assert "routes[0].auth: " in done.stderr and "pip install 'selectws[jwt]'" in done.stderr, done.stderr
