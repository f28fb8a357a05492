"""The bounded HTTP/1.1 request-head parser and response builder (RFC 9112, as RFC 6455 section 4 uses it).

Every request is parsed both in one piece and byte by byte, and the answer must be the same: a client cannot get
a different status by choosing how to split its bytes.
"""

from __future__ import annotations

import pytest

from selectws.protocol.errors import HandshakeError
from selectws.protocol.http11 import (
    REASONS,
    Headers,
    HttpLimits,
    Request,
    build_response,
    parse_request,
    parse_response,
)

DEFAULT_LIMITS = HttpLimits()

RFC_REQUEST = (
    b"GET /chat HTTP/1.1\r\n"
    b"Host: server.example.com\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Origin: http://example.com\r\n"
    b"Sec-WebSocket-Protocol: chat, superchat\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
    b"\r\n"
)


def parse_whole(data: bytes, limits: HttpLimits = DEFAULT_LIMITS) -> tuple[Request, int] | int | None:
    """The parsed request, or the HTTP status of the refusal."""
    try:
        return parse_request(data, limits)
    except HandshakeError as exc:
        return exc.status


def parse_bytewise(data: bytes, limits: HttpLimits = DEFAULT_LIMITS) -> tuple[Request, int] | int | None:
    """Feed ``data`` one byte at a time into a growing buffer, as a slow client would."""
    buf = bytearray()
    for i in range(len(data)):
        buf += data[i : i + 1]
        try:
            result = parse_request(buf, limits)
        except HandshakeError as exc:
            return exc.status
        if result is not None:
            assert i == len(data) - 1 or result[1] <= len(buf)
            return result
    return None


def status_of(data: bytes, limits: HttpLimits = DEFAULT_LIMITS) -> int:
    """The refusal status, checked to be the same in one piece and byte by byte."""
    whole = parse_whole(data, limits)
    bytewise = parse_bytewise(data, limits)
    assert isinstance(whole, int), whole
    assert whole == bytewise, (whole, bytewise)
    return whole


def request(*headers: str, line: str = "GET / HTTP/1.1") -> bytes:
    return ("\r\n".join([line, *headers]) + "\r\n\r\n").encode("latin-1")


class TestParseValid:
    @pytest.mark.parametrize("parse", [parse_whole, parse_bytewise])
    def test_rfc_example(self, parse: object) -> None:
        result = parse(RFC_REQUEST)  # type: ignore[operator]
        assert isinstance(result, tuple)
        req, used = result
        assert used == len(RFC_REQUEST)
        assert req.method == "GET"
        assert req.target == "/chat"
        assert req.path == "/chat"
        assert req.version == (1, 1)
        assert req.query_string == ""
        assert req.query == {}
        assert list(req.headers) == [
            ("Host", "server.example.com"),
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Origin", "http://example.com"),
            ("Sec-WebSocket-Protocol", "chat, superchat"),
            ("Sec-WebSocket-Version", "13"),
        ]

    def test_incomplete_returns_none(self) -> None:
        for cut in range(len(RFC_REQUEST)):
            assert parse_request(RFC_REQUEST[:cut]) is None, cut

    def test_bytes_after_head_are_not_used(self) -> None:
        frame = b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"
        data = RFC_REQUEST + frame + frame
        result = parse_request(data)
        assert result is not None
        _, used = result
        assert used == len(RFC_REQUEST)
        assert data[used:] == frame + frame

    def test_bytearray_input(self) -> None:
        result = parse_request(bytearray(RFC_REQUEST + b"tail"))
        assert result is not None
        assert result[1] == len(RFC_REQUEST)

    def test_no_headers(self) -> None:
        result = parse_request(b"GET / HTTP/1.1\r\n\r\n")
        assert result is not None
        req, used = result
        assert (len(req.headers), used) == (0, 18)

    def test_http_1_0(self) -> None:
        result = parse_request(request("Host: a", line="GET / HTTP/1.0"))
        assert result is not None
        assert result[0].version == (1, 0)

    def test_header_value_whitespace_stripped_and_tab_allowed(self) -> None:
        result = parse_request(request("X-A:   spaced \t ", "X-B:\tin\tside", "X-C:", "X-D: latin \xe9"))
        assert result is not None
        assert list(result[0].headers) == [("X-A", "spaced"), ("X-B", "in\tside"), ("X-C", ""), ("X-D", "latin é")]

    def test_other_methods_are_tokens(self) -> None:
        for method in ("POST", "HEAD", "OPTIONS", "M-SEARCH", "X_Y!"):
            result = parse_request(request(line=f"{method} / HTTP/1.1"))
            assert result is not None
            assert result[0].method == method

    @pytest.mark.parametrize(
        ("target", "path", "query_string", "query"),
        [
            ("/", "/", "", {}),
            ("/a%20b/%E2%82%AC", "/a b/€", "", {}),
            ("/chat?room=lobby&user=%C3%A9", "/chat", "room=lobby&user=%C3%A9", {"room": "lobby", "user": "é"}),
            ("/q?a=1&a=2&b=&c", "/q", "a=1&a=2&b=&c", {"a": "1", "b": "", "c": ""}),
            ("/q?x=a+b", "/q", "x=a+b", {"x": "a b"}),
            ("/p%3Fnot-query?real=1", "/p?not-query", "real=1", {"real": "1"}),
            ("/frag#part", "/frag", "", {}),
        ],
    )
    def test_path_and_query(self, target: str, path: str, query_string: str, query: dict[str, str]) -> None:
        result = parse_request(request("Host: x", line=f"GET {target} HTTP/1.1"))
        assert result is not None
        req = result[0]
        assert req.target == target
        assert req.path == path
        assert req.query_string == query_string
        assert req.query == query


class TestLimits:
    def test_request_line_too_long(self) -> None:
        limits = HttpLimits(max_request_line=64)
        assert status_of(request(line="GET /" + "a" * 100 + " HTTP/1.1"), limits) == 414

    def test_request_line_too_long_without_crlf(self) -> None:
        limits = HttpLimits(max_request_line=64)
        with pytest.raises(HandshakeError) as info:
            parse_request(b"GET /" + b"a" * 60, limits)
        assert info.value.status == 414
        assert parse_request(b"GET /" + b"a" * 59, limits) is None  # exactly 64 bytes: may still end

    @pytest.mark.parametrize("delta", [-1, 0, 1])
    def test_request_line_at_the_limit(self, delta: int) -> None:
        line = "GET /" + "a" * (64 - 14 + delta) + " HTTP/1.1"
        assert len(line) == 64 + delta
        data = request("Host: x", line=line)
        limits = HttpLimits(max_request_line=64)
        if delta <= 0:
            for result in (parse_whole(data, limits), parse_bytewise(data, limits)):
                assert isinstance(result, tuple)
                assert result[0].target.startswith("/aaa")
        else:
            assert status_of(data, limits) == 414

    def test_header_bytes_over_limit(self) -> None:
        limits = HttpLimits(max_header_bytes=256)
        assert status_of(request("Host: x", "X-Big: " + "b" * 300), limits) == 431

    def test_header_bytes_over_limit_while_incomplete(self) -> None:
        limits = HttpLimits(max_header_bytes=256)
        with pytest.raises(HandshakeError) as info:
            parse_request(b"GET / HTTP/1.1\r\nX-Big: " + b"b" * 400, limits)
        assert info.value.status == 431

    @pytest.mark.parametrize("delta", [-1, 0, 1])
    def test_head_at_the_limit(self, delta: int) -> None:
        base = request("Host: x", "X-Pad: ")
        pad = 256 - (len(base) - 4) + delta
        data = request("Host: x", "X-Pad: " + "p" * pad)
        assert len(data) - 4 == 256 + delta  # the head before its CRLFCRLF
        limits = HttpLimits(max_header_bytes=256)
        if delta <= 0:
            for result in (parse_whole(data, limits), parse_bytewise(data, limits)):
                assert isinstance(result, tuple)
                assert result[1] == len(data)
        else:
            assert status_of(data, limits) == 431

    def test_header_count_over_limit(self) -> None:
        limits = HttpLimits(max_header_count=5)
        assert status_of(request(*[f"X-{i}: v" for i in range(6)]), limits) == 431

    def test_header_count_at_limit(self) -> None:
        limits = HttpLimits(max_header_count=5)
        data = request(*[f"X-{i}: v" for i in range(5)])
        for result in (parse_whole(data, limits), parse_bytewise(data, limits)):
            assert isinstance(result, tuple)
            assert len(result[0].headers) == 5

    def test_header_count_over_limit_while_incomplete(self) -> None:
        limits = HttpLimits(max_header_count=5)
        head = b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(6))
        with pytest.raises(HandshakeError) as info:
            parse_request(head, limits)  # no blank line yet
        assert info.value.status == 431
        assert parse_request(b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(5)), limits) is None

    def test_defaults(self) -> None:
        assert HttpLimits() == HttpLimits(max_request_line=8192, max_header_count=100, max_header_bytes=16384)


class TestMalformed:
    @pytest.mark.parametrize(
        "line",
        [
            "GET /",
            "GET / HTTP/1.1 extra",
            "GET  / HTTP/1.1",
            " GET / HTTP/1.1",
            "GET / ",
            "GET",
            "",
        ],
    )
    def test_request_line(self, line: str) -> None:
        assert status_of(request("Host: x", line=line)) == 400

    @pytest.mark.parametrize("method", ["G(T", "GE\tT", "G:T", "GÉT", "G/T"])
    def test_method(self, method: str) -> None:
        assert status_of(request("Host: x", line=f"{method} / HTTP/1.1")) == 400

    @pytest.mark.parametrize("version", ["HTTP/1", "HTTP/1.", "http/1.1", "HTTP/1.1x", "HTTP/11.1", "HTTPS/1.1", "1.1"])
    def test_version(self, version: str) -> None:
        assert status_of(request("Host: x", line=f"GET / {version}")) == 400

    @pytest.mark.parametrize("version", ["HTTP/2.0", "HTTP/0.9", "HTTP/3.0"])
    def test_unsupported_version(self, version: str) -> None:
        assert status_of(request("Host: x", line=f"GET / {version}")) == 505

    @pytest.mark.parametrize("fold", [" folded", "\tfolded"])
    def test_obs_fold(self, fold: str) -> None:
        assert status_of(request("Host: x", "X-Long: first", fold)) == 400

    @pytest.mark.parametrize("char", ["\x00", "\x01", "\x08", "\x0b", "\x1f", "\x7f", "\r", "\n"])
    def test_control_chars_in_value(self, char: str) -> None:
        assert status_of(request("Host: x", f"X-Bad: a{char}b")) == 400

    @pytest.mark.parametrize("line", ["NoColon", "Bad Name: v", "Host : x", ": empty-name", "X(y): v", "Ñ: v"])
    def test_bad_header_line(self, line: str) -> None:
        assert status_of(request("Host: x", line)) == 400

    @pytest.mark.parametrize("target", ["http://example.com/chat", "example.com:80", "*", "chat"])
    def test_target_not_origin_form(self, target: str) -> None:
        assert status_of(request("Host: x", line=f"GET {target} HTTP/1.1")) == 400

    def test_non_ascii_target(self) -> None:
        assert status_of(b"GET /\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n") == 400


class TestHeaders:
    def test_case_insensitive_lookup(self) -> None:
        h = Headers([("Content-Type", "a"), ("X-Multi", "1"), ("x-multi", "2")])
        assert h.get("content-type") == "a"
        assert h.get("CONTENT-TYPE") == "a"
        assert h.get("missing") is None
        assert h.get("missing", "d") == "d"
        assert h.get("X-MULTI") == "1"
        assert h.get_all("x-Multi") == ["1", "2"]
        assert "x-multi" in h
        assert "nope" not in h
        assert 3 not in h
        assert len(h) == 3
        assert h.as_dict() == {"content-type": "a", "x-multi": "1, 2"}

    def test_tokens(self) -> None:
        h = Headers([("Connection", "keep-alive, Upgrade"), ("connection", " ,TE ,, "), ("Upgrade", "WebSocket")])
        assert h.tokens("Connection") == ["keep-alive", "upgrade", "te"]
        assert h.tokens("upgrade") == ["websocket"]
        assert h.tokens("absent") == []


class TestBuildResponse:
    def test_error_response(self) -> None:
        assert build_response(404, body=b"no route\n") == (
            b"HTTP/1.1 404 Not Found\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: 9\r\n"
            b"Connection: close\r\n"
            b"\r\n"
            b"no route\n"
        )

    def test_error_without_body_still_typed(self) -> None:
        assert build_response(426, [("Upgrade", "websocket")]) == (
            b"HTTP/1.1 426 Upgrade Required\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: 0\r\n"
            b"Connection: close\r\n"
            b"Upgrade: websocket\r\n"
            b"\r\n"
        )

    def test_ok_without_body_keep_alive(self) -> None:
        assert build_response(204, close=False) == b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"

    def test_given_headers_are_not_duplicated(self) -> None:
        out = build_response(
            200, [("Content-Type", "application/json"), ("Content-Length", "2"), ("Connection", "keep-alive")], b"{}"
        )
        assert out == (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
            b"Connection: keep-alive\r\n\r\n{}"
        )

    def test_head_only(self) -> None:
        out = build_response(200, body=b"hello", head_only=True)
        assert out == (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 5\r\n"
            b"Connection: close\r\n\r\n"
        )

    def test_101_has_no_entity_headers(self) -> None:
        assert build_response(101, [("Upgrade", "websocket")], close=False) == (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"
        )

    def test_unknown_status(self) -> None:
        assert build_response(299).startswith(b"HTTP/1.1 299 Unknown\r\n")

    def test_reasons(self) -> None:
        assert REASONS[414] == "URI Too Long"
        assert REASONS[431] == "Request Header Fields Too Large"
        assert REASONS[505] == "HTTP Version Not Supported"

    def test_round_trip_through_parse_response(self) -> None:
        data = build_response(503, [("Retry-After", "5")], b"busy")
        result = parse_response(data)
        assert result is not None
        resp, used = result
        assert data[used:] == b"busy"
        assert (resp.status, resp.reason, resp.version) == (503, "Service Unavailable", (1, 1))
        assert resp.headers.get("retry-after") == "5"
        assert resp.headers.get("content-length") == "4"
        assert resp.headers.get("connection") == "close"


class TestParseResponse:
    def test_valid(self) -> None:
        data = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nX-E:\r\n\r\n\x81\x00"
        result = parse_response(data)
        assert result is not None
        resp, used = result
        assert (resp.status, resp.reason, resp.version) == (101, "Switching Protocols", (1, 1))
        assert list(resp.headers) == [("Upgrade", "websocket"), ("X-E", "")]
        assert data[used:] == b"\x81\x00"

    def test_no_reason(self) -> None:
        result = parse_response(b"HTTP/1.1 200\r\n\r\n")
        assert result is not None
        assert (result[0].status, result[0].reason) == (200, "")

    def test_incomplete(self) -> None:
        assert parse_response(b"HTTP/1.1 101 Switching Protocols\r\n") is None

    def test_too_large(self) -> None:
        with pytest.raises(HandshakeError) as info:
            parse_response(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 200, max_bytes=100)
        assert info.value.status == 431

    @pytest.mark.parametrize(
        "head", [b"HTTP/1.1 20 OK", b"HTTP/1.1 abc OK", b"HTTX/1.1 200 OK", b"HTTP/1.1", b"garbage", b"HTTP/1.1 2000 X"]
    )
    def test_malformed_status_line(self, head: bytes) -> None:
        with pytest.raises(HandshakeError) as info:
            parse_response(head + b"\r\n\r\n")
        assert info.value.status == 400

    def test_malformed_header(self) -> None:
        with pytest.raises(HandshakeError) as info:
            parse_response(b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n")
        assert info.value.status == 400
