"""JWT authentication, unit level: where the token comes from, what verifies and what does not, the handshake
decision on an ``auth = "jwt"`` route (401 / 403 / 429 / 101 with an identity), the configuration checks and the
application's key loading.

Tokens are signed twice over: with PyJWT, and with the standard library alone (``hmac``, ``hashlib``, ``base64``,
``json``), so that a mistake PyJWT and the verifier would share cannot hide.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import pytest

jwt = pytest.importorskip("jwt")

from selectws.app.jwt_keys import load_jwt  # noqa: E402
from selectws.config import ConfigError, parse_config  # noqa: E402
from selectws.protocol.events import Request  # noqa: E402
from selectws.protocol.handshake import ServerProtocol  # noqa: E402
from selectws.server.api import Accept, HandshakeRequest, Plugin  # noqa: E402
from selectws.server.auth import Identity, JwtVerifier, TokenRejected, token_from_request  # noqa: E402
from selectws.server.handshake import Admission, Outcome, answer_request  # noqa: E402
from selectws.server.routing import Route, Router  # noqa: E402

SECRET = "unit-test-secret-0123456789abcdefghijklmnopqrstuvwxyz"  # >= 32 bytes (HS256)
OTHER = "another-secret-0123456789abcdefghijklmnopqrstuvwxyzABCD"
PEER = ("192.0.2.1", 40000)


# ---------------------------------------------------------------------------------------------- signing by hand
def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


_HASHES = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}


def stdlib_token(claims: dict[str, Any], secret: str = SECRET, alg: str = "HS256",
                 header: dict[str, Any] | None = None) -> str:
    """A JWT signed with the standard library only (alg "none": no signature at all)."""
    head = header or {"alg": alg, "typ": "JWT"}
    signing_input = f"{b64url(json.dumps(head).encode())}.{b64url(json.dumps(claims).encode())}"
    if alg == "none":
        return signing_input + "."
    digest = hmac.new(secret.encode(), signing_input.encode(), _HASHES[alg]).digest()
    return f"{signing_input}.{b64url(digest)}"


def pyjwt_token(claims: dict[str, Any], secret: str = SECRET, alg: str = "HS256") -> str:
    return jwt.encode(claims, secret, algorithm=alg)


SIGNERS = [pytest.param(stdlib_token, id="stdlib"), pytest.param(pyjwt_token, id="pyjwt")]


def verifier(**kwargs: Any) -> JwtVerifier:
    kwargs.setdefault("secret", SECRET)
    return JwtVerifier(**kwargs)


# ---------------------------------------------------------------------------------------------- where the token is
def request_with(target: str = "/ws", headers: list[tuple[str, str]] | None = None) -> Request:
    ws = ServerProtocol()
    lines = [f"GET {target} HTTP/1.1", "Host: x", "Upgrade: websocket", "Connection: Upgrade",
             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13",
             *(f"{k}: {v}" for k, v in headers or [])]
    events = ws.receive_data(("\r\n".join(lines) + "\r\n\r\n").encode())
    assert len(events) == 1 and isinstance(events[0], Request)
    return events[0]


def test_token_from_query_header_and_cookie_in_that_order() -> None:
    assert token_from_request(request_with("/ws?token=q")) == "q"
    assert token_from_request(request_with(headers=[("Authorization", "Bearer h.h.h")])) == "h.h.h"
    assert token_from_request(request_with(headers=[("Authorization", "bearer   spaced ")])) == "spaced"
    assert token_from_request(request_with(headers=[("Cookie", "a=1; token=c.c.c; b=2")])) == "c.c.c"
    assert token_from_request(request_with(headers=[("Cookie", 'token="quoted"')])) == "quoted"
    both = request_with("/ws?token=q", [("Authorization", "Bearer h"), ("Cookie", "token=c")])
    assert token_from_request(both) == "q"
    assert token_from_request(request_with(headers=[("Authorization", "Bearer h"), ("Cookie", "token=c")])) == "h"


@pytest.mark.parametrize("headers", [
    [], [("Authorization", "Basic dXNlcjpwdw==")], [("Authorization", "Bearer ")], [("Cookie", "tokens=x; xtoken=y")],
    [("Cookie", "token=")],
])
def test_no_token(headers: list[tuple[str, str]]) -> None:
    assert token_from_request(request_with("/ws?token=", headers)) is None


# ---------------------------------------------------------------------------------------------- verification
@pytest.mark.parametrize("sign", SIGNERS)
def test_a_valid_token_gives_its_identity(sign: Any) -> None:
    exp = int(time.time()) + 60
    identity = verifier(leeway=5).verify(sign({"sub": "42", "name": "alice", "exp": exp}))
    assert identity == Identity("42", {"sub": "42", "name": "alice", "exp": exp}, exp + 5.0)
    assert verifier().verify(sign({"sub": "7"})).expires is None  # no exp: never expires


@pytest.mark.parametrize("sign", SIGNERS)
def test_hs384_and_hs512_when_allowed(sign: Any) -> None:
    v = verifier(secret=SECRET + SECRET, algorithms=["HS384", "HS512"])
    for alg in ("HS384", "HS512"):
        assert v.verify(sign({"sub": "1"}, SECRET + SECRET, alg)).user == "1"


def rejected(v: JwtVerifier, token: str) -> str:
    with pytest.raises(TokenRejected) as info:
        v.verify(token)
    return info.value.reason


@pytest.mark.parametrize("sign", SIGNERS)
def test_bad_tokens_are_rejected_with_a_reason(sign: Any) -> None:
    v = verifier()
    now = int(time.time())
    good = sign({"sub": "42"})
    head, payload, signature = good.split(".")
    forged_payload = b64url(json.dumps({"sub": "1"}).encode())
    assert "Signature" in rejected(v, f"{head}.{forged_payload}.{signature}")  # claims changed, signature kept
    flipped = signature[:-2] + ("AA" if signature[-2:] != "AA" else "BB")
    assert rejected(v, f"{head}.{payload}.{flipped}")
    assert "Signature" in rejected(v, sign({"sub": "42"}, OTHER))  # another key
    assert "alg" in rejected(v, stdlib_token({"sub": "42"}, alg="none"))  # alg=none, hand-made
    assert "alg" in rejected(v, jwt.encode({"sub": "42"}, None, algorithm="none"))  # ... and by PyJWT
    assert "alg" in rejected(v, sign({"sub": "42"}, SECRET + SECRET, "HS512"))  # not in algorithms
    assert "expired" in rejected(v, sign({"sub": "42", "exp": now - 10}))
    assert "not yet valid" in rejected(v, sign({"sub": "42", "nbf": now + 60}))
    assert rejected(v, sign({"name": "no sub"}))
    assert rejected(v, sign({"sub": ""}))
    assert rejected(v, sign({"sub": 42}))  # sub is a string (RFC 7519 StringOrURI)
    assert rejected(v, "not-a-jwt")
    assert rejected(v, "a.b.c")
    # a token with an audience is refused when none is configured: it was meant for another service
    assert "aud" in rejected(v, sign({"sub": "42", "aud": "elsewhere"})).lower()


@pytest.mark.parametrize("sign", SIGNERS)
def test_leeway_nbf_audience_and_issuer(sign: Any) -> None:
    now = int(time.time())
    assert verifier(leeway=30).verify(sign({"sub": "1", "exp": now - 10})).expires == now + 20
    assert verifier(leeway=30).verify(sign({"sub": "1", "nbf": now + 10})).user == "1"
    v = verifier(audience="chat", issuer="https://auth.example")
    ok = {"sub": "1", "aud": "chat", "iss": "https://auth.example"}
    assert v.verify(sign(ok)).user == "1"
    assert v.verify(sign({**ok, "aud": ["other", "chat"]})).user == "1"
    assert "aud" in rejected(v, sign({**ok, "aud": "other"})).lower()
    assert "aud" in rejected(v, sign({k: ok[k] for k in ("sub", "iss")})).lower()
    assert "iss" in rejected(v, sign({**ok, "iss": "https://evil.example"})).lower()
    assert "iss" in rejected(v, sign({k: ok[k] for k in ("sub", "aud")})).lower()


def rsa_pair() -> tuple[str, str]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return private, public


def test_rs256_and_algorithm_confusion() -> None:
    pytest.importorskip("cryptography")
    private, public = rsa_pair()
    v = JwtVerifier(public_key=public, algorithms=["RS256"])
    assert v.verify(jwt.encode({"sub": "9"}, private, algorithm="RS256")).user == "9"
    # The public key is public: an HS256 token "signed" with it must not pass (the classic confusion attack).
    forged = stdlib_token({"sub": "9"}, secret=public, alg="HS256")
    assert "alg" in rejected(v, forged)
    with pytest.raises(ValueError):  # and a public key can never be configured as an HMAC secret
        JwtVerifier(secret=public, algorithms=["HS256"])
    with pytest.raises(ValueError):  # nor an RSA key for ES256
        JwtVerifier(public_key=public, algorithms=["ES256"])


def test_short_hmac_secrets_are_refused() -> None:
    with pytest.raises(ValueError, match="32"):
        JwtVerifier(secret="short", algorithms=["HS256"])
    with pytest.raises(ValueError, match="64"):
        JwtVerifier(secret=SECRET[:40], algorithms=["HS512"])


# ---------------------------------------------------------------------------------------------- the handshake
class Seen(Plugin):
    def __init__(self) -> None:
        super().__init__(None, {})  # type: ignore[arg-type]
        self.requests: list[HandshakeRequest] = []

    def on_handshake(self, request: HandshakeRequest) -> Accept | None:
        self.requests.append(request)
        return None


def decide(target: str, headers: list[tuple[str, str]] | None = None, *, auth: str = "jwt",
           admission: Admission | None = None, plugin: Plugin | None = None) -> tuple[Outcome, bytes]:
    ws = ServerProtocol()
    request = request_with(target, headers)
    route = Route("/ws", plugin or Seen(), "seen", auth=auth)
    adm = admission if admission is not None else Admission(jwt=verifier())
    outcome = answer_request(ws, request, PEER, Router([route]), adm)
    ws.send_response(outcome.response)
    return outcome, ws.data_to_send()


def test_handshake_without_a_token_is_401_with_www_authenticate() -> None:
    outcome, wire = decide("/ws")
    assert wire.startswith(b"HTTP/1.1 401 ")
    assert b"\r\nWWW-Authenticate: Bearer\r\n" in wire
    assert outcome.reason == "no token" and outcome.identity is None


@pytest.mark.parametrize("sign", SIGNERS)
def test_handshake_with_a_bad_token_is_403_and_the_reason_stays_in_the_log(sign: Any) -> None:
    expired = sign({"sub": "42", "exp": int(time.time()) - 5})
    outcome, wire = decide(f"/ws?token={expired}")
    assert wire.startswith(b"HTTP/1.1 403 ")
    assert b"expired" not in wire.lower() and b"signature" not in wire.lower()
    assert wire.endswith(b"403 invalid token\n")
    assert "expired" in outcome.reason


@pytest.mark.parametrize("sign", SIGNERS)
def test_handshake_with_a_good_token_opens_with_the_identity(sign: Any) -> None:
    plugin = Seen()
    token = sign({"sub": "42", "name": "alice"})
    outcome, wire = decide("/ws", [("Authorization", f"Bearer {token}")], plugin=plugin)
    assert wire.startswith(b"HTTP/1.1 101 ")
    assert outcome.identity is not None and outcome.identity.user == "42"
    assert plugin.requests[0].user == "42" and plugin.requests[0].claims == {"sub": "42", "name": "alice"}


def test_per_user_limit_is_429_and_only_for_that_user() -> None:
    adm = Admission(jwt=verifier(), per_user={"42": 2}, max_per_user=2)
    outcome, wire = decide(f"/ws?token={stdlib_token({'sub': '42'})}", admission=adm)
    assert wire.startswith(b"HTTP/1.1 429 ") and "max_connections_per_user" in outcome.reason
    outcome, wire = decide(f"/ws?token={stdlib_token({'sub': '43'})}", admission=adm)
    assert wire.startswith(b"HTTP/1.1 101 ")


def test_routes_without_auth_ignore_tokens_and_have_no_identity() -> None:
    outcome, wire = decide("/ws?token=garbage", auth="none", admission=Admission())
    assert wire.startswith(b"HTTP/1.1 101 ") and outcome.identity is None


def test_a_jwt_route_without_a_verifier_answers_500() -> None:
    _, wire = decide(f"/ws?token={stdlib_token({'sub': '1'})}", admission=Admission())
    assert wire.startswith(b"HTTP/1.1 500 ")


# ---------------------------------------------------------------------------------------------- configuration
JWT_ROUTE = {"routes": [{"path": "/echo", "plugin": "echo", "auth": "jwt"}]}


@pytest.mark.parametrize(("data", "key", "words"), [
    (JWT_ROUTE, "auth.jwt_secret_file", "routes[0] (/echo)"),
    ({"routes": [{"path": "/e", "plugin": "echo", "auth": "basic"}]}, "routes[0].auth", "'none' or 'jwt'"),
    ({"auth": {"algorithms": ["none"]}}, "auth.algorithms[0]", "never"),
    ({"auth": {"algorithms": ["HS257"]}}, "auth.algorithms[0]", "HS256"),
    ({"auth": {"algorithms": []}}, "auth.algorithms", "at least one"),
    ({"auth": {"jwt_secret_env": "S", "jwt_public_key_file": "k.pem"}}, "auth.jwt_public_key_file", "not both"),
    ({"auth": {"jwt_public_key_file": "k.pem", "algorithms": ["RS256", "HS256"]}}, "auth.algorithms", "secret"),
    ({"auth": {"jwt_secret_env": "S", "algorithms": ["RS256"]}}, "auth.algorithms", "jwt_public_key_file"),
    ({"auth": {"jwt_secret_env": "not a name"}}, "auth.jwt_secret_env", "environment variable"),
    ({"auth": {"leeway": -1}}, "auth.leeway", "between 0 and 300"),
    ({"limits": {"max_connections_per_user": -1}}, "limits.max_connections_per_user", ">= 0"),
])
def test_configuration_errors_name_the_key(data: dict[str, Any], key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert info.value.key == key and words in info.value.reason, info.value


def test_load_jwt_reads_the_secret_and_names_the_key_when_it_cannot(tmp_path: Any, monkeypatch: Any) -> None:
    assert load_jwt(parse_config({})) is None  # no jwt route: nothing read, PyJWT not needed
    monkeypatch.setenv("JWT_SECRET", SECRET)
    v = load_jwt(parse_config({**JWT_ROUTE, "auth": {"jwt_secret_env": "JWT_SECRET"}}))
    assert v is not None and v.verify(stdlib_token({"sub": "1"})).user == "1"
    config = tmp_path / "c.toml"
    config.write_text("")
    for content, words in [(None, "cannot read"), ("  \n", "is empty"), ("short\n", "32"),
                           ("-----BEGIN PUBLIC KEY-----\nxx\n", "jwt_public_key_file")]:
        secret = tmp_path / "jwt.secret"
        if content is None:
            secret.unlink(missing_ok=True)
        else:
            secret.write_text(content)
        data = {**JWT_ROUTE, "auth": {"jwt_secret_file": "jwt.secret"}}
        with pytest.raises(ConfigError) as info:
            load_jwt(parse_config(data, str(config)))
        assert info.value.key == "auth.jwt_secret_file" and words in info.value.reason, info.value
    monkeypatch.delenv("JWT_SECRET")
    with pytest.raises(ConfigError) as info:
        load_jwt(parse_config({**JWT_ROUTE, "auth": {"jwt_secret_env": "JWT_SECRET"}}))
    assert info.value.key == "auth.jwt_secret_env" and "not set" in info.value.reason


def test_without_pyjwt_the_error_says_what_to_install(monkeypatch: Any) -> None:
    import builtins

    real_import = builtins.__import__

    def no_jwt(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "jwt" or name.startswith("jwt."):
            raise ImportError("No module named 'jwt'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_jwt)
    monkeypatch.setenv("JWT_SECRET", SECRET)
    with pytest.raises(ConfigError) as info:
        load_jwt(parse_config({**JWT_ROUTE, "auth": {"jwt_secret_env": "JWT_SECRET"}}))
    assert info.value.key == "routes[0].auth" and "pip install 'selectws[jwt]'" in info.value.reason
