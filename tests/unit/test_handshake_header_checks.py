"""The opening handshake, RFC 6455 sections 1.3, 4.1 (client) and 4.2 (server), checked status by status."""

from __future__ import annotations

import base64

import pytest

from selectws.protocol.errors import HandshakeError
from selectws.protocol.handshake import (
    WS_GUID,
    accept_key,
    build_accept_response,
    build_client_request,
    check_accept_response,
    check_upgrade_request,
    choose_subprotocol,
    make_key,
)
from selectws.protocol.http11 import Request, Response, parse_request, parse_response

RFC_KEY = "dGhlIHNhbXBsZSBub25jZQ=="
RFC_ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="

GOOD = {
    "Host": "server.example.com",
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Key": RFC_KEY,
    "Sec-WebSocket-Version": "13",
}


def make_request(
    headers: dict[str, str] | list[tuple[str, str]] | None = None,
    *,
    method: str = "GET",
    version: str = "HTTP/1.1",
    drop: tuple[str, ...] = (),
    **override: str,
) -> Request:
    """Parse a request built from GOOD (or ``headers``), with ``override`` (underscores for dashes) applied."""
    if headers is None:
        items = dict(GOOD)
        for name, value in override.items():
            items[name.replace("_", "-")] = value
        for name in drop:
            del items[name]
        pairs = list(items.items())
    elif isinstance(headers, dict):
        pairs = list(headers.items())
    else:
        pairs = headers
    raw = f"{method} /chat {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in pairs) + "\r\n"
    result = parse_request(raw.encode("latin-1"))
    assert result is not None
    return result[0]


def refusal(req: Request) -> HandshakeError:
    with pytest.raises(HandshakeError) as info:
        check_upgrade_request(req)
    return info.value


class TestSection1_3AcceptKey:
    def test_rfc_sample(self) -> None:
        assert accept_key(RFC_KEY) == RFC_ACCEPT

    def test_guid(self) -> None:
        assert WS_GUID == "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    def test_other_key(self) -> None:
        # The example of the Wikipedia and MDN WebSocket pages.
        assert accept_key("x3JJHMbDL1EzLkh9GBhXDw==") == "HSmrc0sMlYUkAGmm5OPpG2HaGWk="

    def test_make_key(self) -> None:
        keys = {make_key() for _ in range(20)}
        assert len(keys) == 20
        for key in keys:
            assert len(key) == 24
            assert len(base64.b64decode(key, validate=True)) == 16


class TestSection4_2_1ServerChecks:
    def test_rfc_request_accepted(self) -> None:
        assert check_upgrade_request(make_request()) == RFC_KEY

    @pytest.mark.parametrize("method", ["POST", "HEAD", "PUT", "get"])
    def test_method_not_get(self, method: str) -> None:
        err = refusal(make_request(method=method))
        assert err.status == 405
        assert err.headers == [("Allow", "GET")]

    def test_no_upgrade(self) -> None:
        err = refusal(make_request(drop=("Upgrade",)))
        assert err.status == 426
        assert ("Upgrade", "websocket") in err.headers

    def test_upgrade_to_something_else(self) -> None:
        err = refusal(make_request(Upgrade="h2c"))
        assert err.status == 426
        assert ("Upgrade", "websocket") in err.headers

    def test_plain_get(self) -> None:
        err = refusal(make_request({"Host": "x"}))
        assert err.status == 426

    @pytest.mark.parametrize("connection", [None, "keep-alive", "close", "upgraded"])
    def test_connection_without_upgrade_token(self, connection: str | None) -> None:
        req = make_request(drop=("Connection",)) if connection is None else make_request(Connection=connection)
        err = refusal(req)
        assert err.status == 400

    def test_http_1_0(self) -> None:
        err = refusal(make_request(version="HTTP/1.0"))
        assert err.status == 400

    def test_http_1_2_accepted(self) -> None:
        assert check_upgrade_request(make_request(version="HTTP/1.2")) == RFC_KEY

    def test_missing_host(self) -> None:
        err = refusal(make_request(drop=("Host",)))
        assert err.status == 400

    @pytest.mark.parametrize("version", ["8", "12", "14", "13, 8", ""])
    def test_wrong_version(self, version: str) -> None:
        err = refusal(make_request(Sec_WebSocket_Version=version))
        assert err.status == 426
        assert err.headers == [("Sec-WebSocket-Version", "13")]

    def test_missing_version(self) -> None:
        err = refusal(make_request(drop=("Sec-WebSocket-Version",)))
        assert err.status == 426
        assert err.headers == [("Sec-WebSocket-Version", "13")]

    def test_duplicate_version(self) -> None:
        pairs = [*GOOD.items(), ("Sec-WebSocket-Version", "13")]
        err = refusal(make_request(pairs))
        assert err.status == 426

    def test_missing_key(self) -> None:
        err = refusal(make_request(drop=("Sec-WebSocket-Key",)))
        assert err.status == 400

    @pytest.mark.parametrize(
        "key",
        [
            "not base64!!",
            "dGhlIHNhbXBsZSBub25jZQ",  # unpadded
            "dGhlIHNhbXBsZSBub25jZQ==x",
            base64.b64encode(b"\x00" * 15).decode(),
            base64.b64encode(b"\x00" * 17).decode(),
            base64.b64encode(b"\x00" * 32).decode(),
            "",
            "dGhlIHNhbXBs\xe9ZSBub25jZQ==",
        ],
    )
    def test_bad_key(self, key: str) -> None:
        err = refusal(make_request(Sec_WebSocket_Key=key))
        assert err.status == 400

    def test_duplicate_key(self) -> None:
        pairs = [*GOOD.items(), ("Sec-WebSocket-Key", RFC_KEY)]
        err = refusal(make_request(pairs))
        assert err.status == 400

    def test_case_insensitive_names_and_values(self) -> None:
        req = make_request(
            {
                "host": "h",
                "UPGRADE": "WebSocket",
                "connection": "UPGRADE",
                "sec-websocket-key": RFC_KEY,
                "SEC-WEBSOCKET-VERSION": "13",
            }
        )
        assert check_upgrade_request(req) == RFC_KEY

    @pytest.mark.parametrize("connection", ["keep-alive, Upgrade", "Upgrade, keep-alive", "keep-alive,upgrade"])
    def test_connection_token_list(self, connection: str) -> None:
        assert check_upgrade_request(make_request(Connection=connection)) == RFC_KEY

    def test_connection_split_over_two_fields(self) -> None:
        pairs = [(k, v) for k, v in GOOD.items() if k != "Connection"]
        pairs += [("Connection", "keep-alive"), ("Connection", "Upgrade")]
        assert check_upgrade_request(make_request(pairs)) == RFC_KEY

    def test_upgrade_token_list(self) -> None:
        assert check_upgrade_request(make_request(Upgrade="foo/1, websocket")) == RFC_KEY

    def test_check_order(self) -> None:
        # The most useful status first: a non-GET is a 405 even when everything else is missing too.
        assert refusal(make_request({}, method="POST")).status == 405
        assert refusal(make_request({"Host": "x"}, version="HTTP/1.0")).status == 426
        assert refusal(make_request({"Upgrade": "websocket"}, version="HTTP/1.0")).status == 400


class TestSection4_2_2Subprotocols:
    @pytest.mark.parametrize(
        ("offered", "supported", "chosen"),
        [
            ("chat, superchat", ["superchat", "chat"], "chat"),
            ("superchat, chat", ["chat", "superchat"], "superchat"),
            ("a, b", ["b"], "b"),
            ("a, b", ["c"], None),
            ("a", [], None),
            (None, ["chat"], None),
            ("Chat", ["chat"], None),
            (" , chat ,", ["chat"], "chat"),
        ],
    )
    def test_choice(self, offered: str | None, supported: list[str], chosen: str | None) -> None:
        req = make_request() if offered is None else make_request(Sec_WebSocket_Protocol=offered)
        assert choose_subprotocol(req, supported) == chosen

    def test_several_fields_in_order(self) -> None:
        pairs = [*GOOD.items(), ("Sec-WebSocket-Protocol", "one"), ("Sec-WebSocket-Protocol", "two, three")]
        req = make_request(pairs)
        assert choose_subprotocol(req, ["three", "two"]) == "two"
        assert choose_subprotocol(req, ["three"]) == "three"


class TestSection4_2_2AcceptResponse:
    def test_rfc_response_exact_bytes(self) -> None:
        assert build_accept_response(RFC_KEY) == (
            b"HTTP/1.1 101 Switching Protocols\r\n"
            b"Upgrade: websocket\r\n"
            b"Connection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
            b"\r\n"
        )

    def test_with_subprotocol_extensions_and_extra(self) -> None:
        out = build_accept_response(
            RFC_KEY, "chat", "permessage-deflate; server_no_context_takeover", [("X-Server", "selectws")]
        )
        assert out == (
            b"HTTP/1.1 101 Switching Protocols\r\n"
            b"Upgrade: websocket\r\n"
            b"Connection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
            b"Sec-WebSocket-Protocol: chat\r\n"
            b"Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover\r\n"
            b"X-Server: selectws\r\n"
            b"\r\n"
        )

    def test_no_content_length_or_connection_close(self) -> None:
        out = build_accept_response(RFC_KEY)
        assert b"Content-Length" not in out
        assert b"close" not in out


class TestSection4_1Client:
    def test_build_client_request_exact(self) -> None:
        assert build_client_request("server.example.com", "/chat", RFC_KEY) == (
            b"GET /chat HTTP/1.1\r\n"
            b"Host: server.example.com\r\n"
            b"Upgrade: websocket\r\n"
            b"Connection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n"
            b"\r\n"
        )

    def test_build_client_request_options(self) -> None:
        out = build_client_request(
            "h:8080",
            "/x?y=1",
            RFC_KEY,
            subprotocols=["chat", "superchat"],
            extensions="permessage-deflate",
            origin="http://example.com",
            extra_headers=[("Authorization", "Bearer t")],
        )
        assert out.endswith(
            b"Sec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Protocol: chat, superchat\r\n"
            b"Sec-WebSocket-Extensions: permessage-deflate\r\n"
            b"Origin: http://example.com\r\n"
            b"Authorization: Bearer t\r\n"
            b"\r\n"
        )

    def test_client_request_passes_server_checks(self) -> None:
        key = make_key()
        result = parse_request(build_client_request("h", "/chat?room=1", key, subprotocols=["b", "a"]))
        assert result is not None
        req = result[0]
        assert (req.path, req.query) == ("/chat", {"room": "1"})
        assert check_upgrade_request(req) == key
        assert choose_subprotocol(req, ["a", "b"]) == "b"

    def test_full_round_trip(self) -> None:
        key = make_key()
        req_result = parse_request(build_client_request("h", "/", key, subprotocols=["chat"]))
        assert req_result is not None
        server_key = check_upgrade_request(req_result[0])
        proto = choose_subprotocol(req_result[0], ["chat"])
        answer = build_accept_response(server_key, proto)
        resp_result = parse_response(answer + b"\x81\x02hi")
        assert resp_result is not None
        resp, used = resp_result
        assert used == len(answer)
        assert check_accept_response(resp, key, ["chat"]) == "chat"

    def parse(self, data: bytes) -> Response:
        result = parse_response(data)
        assert result is not None
        return result[0]

    def test_accept_rfc_response(self) -> None:
        resp = self.parse(build_accept_response(RFC_KEY))
        assert check_accept_response(resp, RFC_KEY) is None

    def test_wrong_accept(self) -> None:
        resp = self.parse(build_accept_response("AAAAAAAAAAAAAAAAAAAAAA=="))
        with pytest.raises(HandshakeError) as info:
            check_accept_response(resp, RFC_KEY)
        assert info.value.status == 400
        assert "Accept" in info.value.reason

    def test_missing_accept(self) -> None:
        resp = self.parse(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        with pytest.raises(HandshakeError) as info:
            check_accept_response(resp, RFC_KEY)
        assert info.value.status == 400

    @pytest.mark.parametrize(
        "headers",
        [
            b"Connection: Upgrade\r\n",
            b"Upgrade: websocket\r\n",
            b"Upgrade: h2c\r\nConnection: Upgrade\r\n",
        ],
    )
    def test_missing_upgrade_headers(self, headers: bytes) -> None:
        resp = self.parse(
            b"HTTP/1.1 101 Switching Protocols\r\n"
            + headers
            + b"Sec-WebSocket-Accept: "
            + RFC_ACCEPT.encode()
            + b"\r\n\r\n"
        )
        with pytest.raises(HandshakeError) as info:
            check_accept_response(resp, RFC_KEY)
        assert info.value.status == 400

    def test_not_101(self) -> None:
        resp = self.parse(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
        with pytest.raises(HandshakeError) as info:
            check_accept_response(resp, RFC_KEY)
        assert info.value.status == 403
        assert info.value.reason == "server answered 403 Forbidden"

    def test_subprotocol_not_offered(self) -> None:
        resp = self.parse(build_accept_response(RFC_KEY, "superchat"))
        with pytest.raises(HandshakeError) as info:
            check_accept_response(resp, RFC_KEY, ["chat"])
        assert info.value.status == 400
        with pytest.raises(HandshakeError):
            check_accept_response(resp, RFC_KEY)

    def test_subprotocol_offered(self) -> None:
        resp = self.parse(build_accept_response(RFC_KEY, "superchat"))
        assert check_accept_response(resp, RFC_KEY, ["chat", "superchat"]) == "superchat"
