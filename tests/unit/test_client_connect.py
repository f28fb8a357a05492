"""Unit tests for the pure parts of ``selectws connect``: URLs and ``-H`` headers (the rest is in integration)."""

from __future__ import annotations

import base64

import pytest

from selectws.app.connect import ClientError, Target, parse_header, parse_target


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ws://example.com/chat", Target(False, "example.com", 80, "/chat", "example.com")),
        ("ws://example.com", Target(False, "example.com", 80, "/", "example.com")),
        ("wss://example.com/a?b=1&c=2", Target(True, "example.com", 443, "/a?b=1&c=2", "example.com")),
        ("wss://example.com:443/", Target(True, "example.com", 443, "/", "example.com")),
        ("ws://127.0.0.1:8000/echo", Target(False, "127.0.0.1", 8000, "/echo", "127.0.0.1:8000")),
        ("ws://[::1]:9000/x", Target(False, "::1", 9000, "/x", "[::1]:9000")),
        ("ws://[::1]/x", Target(False, "::1", 80, "/x", "[::1]")),
        ("http://h/x", Target(False, "h", 80, "/x", "h")),
        ("https://h/x", Target(True, "h", 443, "/x", "h")),
        ("WS://Example.COM/Path", Target(False, "example.com", 80, "/Path", "example.com")),
        ("ws://h/x#fragment", Target(False, "h", 80, "/x", "h")),
        ("ws://h/caf\u00e9 ok", Target(False, "h", 80, "/caf%C3%A9%20ok", "h")),
        ("ws://h/already%20encoded", Target(False, "h", 80, "/already%20encoded", "h")),
    ],
)
def test_parse_target(url: str, expected: Target) -> None:
    assert parse_target(url) == expected


def test_userinfo_becomes_basic_auth() -> None:
    target = parse_target("ws://alice:s%40cret@h/x")
    assert target.host_header == "h"
    assert target.authorization == "Basic " + base64.b64encode(b"alice:s@cret").decode()


@pytest.mark.parametrize("url", ["ftp://h/", "h:80/x", "ws:///nohost", "ws://h:99999/", "ws://h:port/"])
def test_parse_target_rejects(url: str) -> None:
    with pytest.raises(ClientError):
        parse_target(url)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("X-Token: abc", ("X-Token", "abc")),
        ("X-Token:abc", ("X-Token", "abc")),
        ("  Authorization :  Bearer a:b  ", ("Authorization", "Bearer a:b")),
        ("X-Empty:", ("X-Empty", "")),
    ],
)
def test_parse_header(text: str, expected: tuple[str, str]) -> None:
    assert parse_header(text) == expected


@pytest.mark.parametrize("text", ["no colon", ": value", "Bad Name: x", "X: a\r\nInjected: 1", "X: nul\x00"])
def test_parse_header_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_header(text)
