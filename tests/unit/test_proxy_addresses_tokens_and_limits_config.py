"""Hardening pieces without sockets: client addresses behind trusted proxies, the token helpers, and the
validation of the new configuration keys."""

from __future__ import annotations

from typing import Any

import pytest

from selectws.config import ConfigError, parse_config
from selectws.plugins.api import HandshakeRequest, Reject
from selectws.plugins.auth import require_token, token_from
from selectws.protocol.http11 import Headers
from selectws.server.proxy import client_address, parse_networks

NETS = parse_networks(["127.0.0.1", "10.0.0.0/8", "::1"])


@pytest.mark.parametrize(
    ("peer", "headers", "expected"),
    [
        # untrusted peer: headers ignored whatever they say
        (("192.0.2.1", 5), [("X-Forwarded-For", "203.0.113.1")], ("192.0.2.1", 5)),
        (("192.0.2.1", 5), [("Forwarded", "for=203.0.113.1")], ("192.0.2.1", 5)),
        # trusted peer without headers: itself
        (("127.0.0.1", 5), [], ("127.0.0.1", 5)),
        # rightmost untrusted of X-Forwarded-For (the left part could be forged by the client)
        (("127.0.0.1", 5), [("X-Forwarded-For", "6.6.6.6, 203.0.113.1, 10.0.0.2")], ("203.0.113.1", 0)),
        (("127.0.0.1", 5), [("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-For", "203.0.113.1")],
         ("203.0.113.1", 0)),
        # all trusted: the leftmost
        (("127.0.0.1", 5), [("X-Forwarded-For", "10.0.0.3, 10.0.0.2")], ("10.0.0.3", 0)),
        # garbage stops the walk at the last address we could vouch for
        (("127.0.0.1", 5), [("X-Forwarded-For", "203.0.113.1, nonsense, 10.0.0.2")], ("10.0.0.2", 0)),
        (("127.0.0.1", 5), [("X-Forwarded-For", "nonsense")], ("127.0.0.1", 5)),
        # RFC 7239: quoted IPv6 with port, v4 with port, several elements, wins over X-Forwarded-For
        (("127.0.0.1", 5), [("Forwarded", 'for="[2001:db8::17]:4711";proto=https'),
                            ("X-Forwarded-For", "203.0.113.9")], ("2001:db8::17", 4711)),
        (("::1", 5), [("Forwarded", "for=198.51.100.4:8080, for=10.1.1.1;by=10.0.0.1")], ("198.51.100.4", 8080)),
        (("127.0.0.1", 5), [("Forwarded", "for=unknown")], ("127.0.0.1", 5)),
        (("127.0.0.1", 5), [("Forwarded", "for=_hidden, for=198.51.100.4")], ("198.51.100.4", 0)),
        # IPv4-mapped IPv6 peer counts as its IPv4 address
        (("::ffff:127.0.0.1", 5), [("X-Forwarded-For", "203.0.113.1")], ("203.0.113.1", 0)),
    ],
)
def test_client_address(peer: tuple[str, int], headers: list[tuple[str, str]], expected: tuple[str, int]) -> None:
    assert client_address(peer, Headers(headers), NETS) == expected


def test_client_address_without_trusted_proxies() -> None:
    assert client_address(("127.0.0.1", 1), Headers([("X-Forwarded-For", "1.2.3.4")]), ()) == ("127.0.0.1", 1)


def _request(query: dict[str, str] | None = None, headers: list[tuple[str, str]] | None = None) -> HandshakeRequest:
    return HandshakeRequest("/p", {}, query or {}, Headers(headers or []), ("127.0.0.1", 1), [])


def test_token_from_query_header_cookie() -> None:
    assert token_from(_request({"token": "q"}, [("Authorization", "Bearer h")])) == "q"
    assert token_from(_request(headers=[("Authorization", "bearer  h ")])) == "h"
    assert token_from(_request(headers=[("Authorization", "Basic xyz")])) is None
    assert token_from(_request(headers=[("Cookie", "a=1; token=c; b=2")])) == "c"
    assert token_from(_request(headers=[("Cookie", "mytoken=x")])) is None
    assert token_from(_request({"token": ""})) is None
    assert token_from(_request({"t": "q"}), query="t") == "q"
    assert token_from(_request({"token": "q"}), query=None) is None
    assert token_from(_request(headers=[("X-Api-Key", "k")]), header="X-Api-Key") == "k"


def test_require_token() -> None:
    with pytest.raises(Reject) as info:
        require_token(_request(), {"good"})
    assert info.value.status == 401
    with pytest.raises(Reject) as info:
        require_token(_request({"token": "bad"}), {"good"})
    assert info.value.status == 403
    assert require_token(_request({"token": "good"}), {"good"}) == "good"
    assert require_token(_request({"token": "x"}), lambda t: t == "x") == "x"


def _error(data: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value


def test_new_limits_validate() -> None:
    cfg = parse_config({"limits": {"max_connections_per_ip": 8, "max_pending_handshakes": 10,
                                   "write_buffer_limit": 1 << 20, "write_buffer_high": 1 << 18,
                                   "slow_consumer_close_code": 1008, "slow_consumer_action": "reset"}})
    assert cfg.limits.write_buffer_limit == 1 << 20 and cfg.limits.slow_consumer_close_code == 1008
    assert _error({"limits": {"write_buffer_limit": 1 << 19}}).key == "limits.write_buffer_limit"  # < high
    assert _error({"limits": {"max_buffered_total": 2 << 20}}).key == "limits.max_buffered_total"  # < limit
    assert _error({"limits": {"slow_consumer_close_code": 1011}}).key == "limits.slow_consumer_close_code"
    assert _error({"limits": {"slow_consumer_action": "ignore"}}).key == "limits.slow_consumer_action"
    assert _error({"limits": {"max_pending_handshakes": 0}}).key == "limits.max_pending_handshakes"


def test_trusted_proxies_validate() -> None:
    cfg = parse_config({"server": {"trusted_proxies": ["127.0.0.1", "10.0.0.0/8", "::1", "fd00::/8"]}})
    assert cfg.server.trusted_proxies == ("127.0.0.1", "10.0.0.0/8", "::1", "fd00::/8")
    assert _error({"server": {"trusted_proxies": ["localhost"]}}).key == "server.trusted_proxies[0]"
    assert _error({"server": {"trusted_proxies": "127.0.0.1"}}).key == "server.trusted_proxies"
    assert _error({"server": {"trusted_proxies": [1]}}).key == "server.trusted_proxies"


def test_route_origins_and_subprotocol_required() -> None:
    route = {"path": "/x", "plugin": "echo"}
    cfg = parse_config({"routes": [{**route, "origins": ["HTTPS://Example.com/", "http://h:8080", "null"],
                                    "subprotocol_required": False}]})
    assert cfg.routes[0].origins == ("https://example.com", "http://h:8080", "null")
    assert cfg.routes[0].subprotocol_required is False
    assert parse_config({"routes": [route]}).routes[0].subprotocol_required is None
    assert _error({"routes": [{**route, "origins": ["example.com"]}]}).key == "routes[0].origins[0]"
    assert _error({"routes": [{**route, "origins": ["https://e.com/path"]}]}).key == "routes[0].origins[0]"
    assert _error({"routes": [{**route, "origins": "https://e.com"}]}).key == "routes[0].origins"
    assert _error({"routes": [{**route, "subprotocol_required": 1}]}).key == "routes[0].subprotocol_required"
