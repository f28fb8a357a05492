"""The server's answer to a request head (``selectws.server.handshake.answer_request``), decided from values.

Every test builds a :class:`ServerProtocol`, feeds it request bytes, builds a :class:`Router` of :class:`Route` s
carrying small test plugins and an :class:`Admission`, asks :func:`answer_request` for the :class:`Outcome`, sends
its response and checks the bytes that would go on the wire and the protocol's state. No socket, no Server.
The wire is read with a small reader of its own (:func:`split_response`), not with the module's parsers.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from selectws.protocol.connection import State
from selectws.protocol.deflate import DeflateSettings
from selectws.protocol.events import Message
from selectws.protocol.frames import encode_frame
from selectws.protocol.handshake import ServerProtocol
from selectws.protocol.http11 import Request
from selectws.server.api import Accept, HandshakeRequest, Plugin, Reject
from selectws.server.handshake import Admission, Outcome, answer_request
from selectws.server.proxy import parse_networks
from selectws.server.routing import HttpResult, Route, Router

KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 section 1.3
ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
PEER = ("192.0.2.1", 40000)
MASK = b"\x01\x02\x03\x04"
DEFLATE_OFFER = ("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits")

UPGRADE = [
    ("Host", "ws.example"),
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Key", KEY),
    ("Sec-WebSocket-Version", "13"),
]


def head(target: str = "/ws", *, method: str = "GET", fields: Sequence[tuple[str, str]] = UPGRADE,
         extra: Sequence[tuple[str, str]] = ()) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", *(f"{k}: {v}" for k, v in [*fields, *extra])]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def plain(target: str = "/ws", *, method: str = "GET", extra: Sequence[tuple[str, str]] = ()) -> bytes:
    """A plain HTTP request (no upgrade)."""
    return head(target, method=method, fields=[("Host", "ws.example")], extra=extra)


def split_response(data: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
    """Status, header fields and what follows the head."""
    raw, sep, rest = data.partition(b"\r\n\r\n")
    assert sep, data
    lines = raw.decode("latin-1").split("\r\n")
    version, status, _ = lines[0].split(" ", 2)
    assert version == "HTTP/1.1"
    fields = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields.append((name, value.strip()))
    return int(status), fields, rest


def values(fields: list[tuple[str, str]], name: str) -> list[str]:
    return [v for k, v in fields if k.lower() == name.lower()]


class Wire:
    """What one request produced: the protocol, the outcome, and the parsed bytes of the answer."""

    def __init__(self, ws: ServerProtocol, outcome: Outcome, data: bytes) -> None:
        self.ws = ws
        self.outcome = outcome
        self.data = data
        self.status, self.fields, self.body = split_response(data)

    def header(self, name: str) -> list[str]:
        return values(self.fields, name)


def answer(data: bytes, router: Router, admission: Admission | None = None,
           remote: tuple[str, int] = PEER) -> Wire:
    ws = ServerProtocol()
    events = ws.receive_data(data)
    assert len(events) == 1 and isinstance(events[0], Request), events
    outcome = answer_request(ws, events[0], remote, router, admission or Admission())
    assert ws.state is State.CONNECTING  # answer_request decides; it sends nothing
    assert not ws.has_output
    ws.send_response(outcome.response)
    return Wire(ws, outcome, ws.data_to_send())


def state_of(ws: ServerProtocol) -> State:
    return ws.state


def assert_refused(wire: Wire, status: int) -> None:
    """A refusal: the status, Connection: close, a body of the announced length, the protocol CLOSED."""
    assert wire.status == status, wire.data
    assert "close" in [t.strip().lower() for v in wire.header("Connection") for t in v.split(",")]
    assert wire.header("Content-Length") == [str(len(wire.body))]
    assert wire.body.startswith(f"{status} ".encode())
    assert wire.outcome.route is None
    assert state_of(wire.ws) is State.CLOSED and wire.ws.close_transport


def assert_opened(wire: Wire) -> None:
    assert wire.status == 101, wire.data
    assert wire.header("Sec-WebSocket-Accept") == [ACCEPT]
    assert wire.body == b""
    assert wire.outcome.route is not None
    assert state_of(wire.ws) is State.OPEN


# ---------------------------------------------------------------------------------------------- test plugins


class Echo(Plugin):
    pass


class Chat(Plugin):
    subprotocols = ("chat.v2", "chat.v1")


class StrictChat(Chat):
    subprotocol_required = True


class Seen(Plugin):
    """Records every HandshakeRequest it is asked about."""

    def __init__(self) -> None:
        super().__init__(None, {})  # type: ignore[arg-type]
        self.requests: list[HandshakeRequest] = []

    def on_handshake(self, request: HandshakeRequest) -> Accept | None:
        self.requests.append(request)
        return None


class NeedsToken(Plugin):
    def on_handshake(self, request: HandshakeRequest) -> Accept | None:
        if request.query.get("token") != "secret":
            raise Reject(401, "a valid token is required", [("WWW-Authenticate", 'Token realm="tests"')])
        return Accept(headers=[("X-Session", "s-1"), ("Set-Cookie", "sid=1")])


class Exploding(Plugin):
    def on_handshake(self, request: HandshakeRequest) -> Accept | None:
        raise RuntimeError("secret database password in this message")


class PicksLast(Chat):
    """Overrides the server's choice: the last subprotocol the client offered."""

    def on_handshake(self, request: HandshakeRequest) -> Accept | None:
        return Accept(subprotocol=request.subprotocols[-1])


def plugin(cls: type[Plugin]) -> Plugin:
    return cls(None, {})  # type: ignore[arg-type]


def router(*routes: Route, http: dict | None = None, fallback=None) -> Router:  # type: ignore[type-arg]
    return Router(list(routes) or [Route("/ws", plugin(Echo), "echo")], http, fallback)


def hello(request: Request) -> HttpResult:
    return 200, [("Content-Type", "text/plain")], b"hello\n"


def failing_handler(request: Request) -> HttpResult:
    raise ValueError("handler secret: /etc/shadow")


# ---------------------------------------------------------------------------------------------- routing


def test_unknown_path_without_fallback_is_404() -> None:
    wire = answer(head("/nowhere"), router())
    assert_refused(wire, 404)
    assert wire.outcome.reason == "no route for /nowhere"


def test_unknown_path_goes_to_the_fallback_when_there_is_one() -> None:
    wire = answer(plain("/index.html"), router(fallback=hello))
    assert wire.status == 200
    assert wire.body == b"hello\n"


def test_plain_http_route_answers_200_with_its_body() -> None:
    wire = answer(plain("/health"), router(http={"/health": hello}))
    assert wire.status == 200
    assert wire.header("Content-Length") == ["6"]
    assert wire.header("Content-Type") == ["text/plain"]
    assert wire.body == b"hello\n"
    assert wire.outcome.route is None and wire.outcome.raised is None
    assert state_of(wire.ws) is State.CLOSED  # one answer, then the connection ends


def test_head_on_a_plain_http_route_has_the_length_but_no_body() -> None:
    wire = answer(plain("/health", method="HEAD"), router(http={"/health": hello}))
    assert wire.status == 200
    assert wire.header("Content-Length") == ["6"]
    assert wire.body == b""


def test_post_on_a_plain_http_route_is_405_allowing_get_and_head() -> None:
    called = []
    wire = answer(plain("/health", method="POST"), router(http={"/health": lambda r: called.append(r) or hello(r)}))
    assert_refused(wire, 405)
    assert wire.header("Allow") == ["GET, HEAD"]
    assert called == []


def test_plain_get_on_a_websocket_route_is_426_upgrade_websocket() -> None:
    wire = answer(plain("/ws"), router())
    assert_refused(wire, 426)
    assert wire.header("Upgrade") == ["websocket"]


def test_http_handler_that_raises_is_500_with_the_exception_kept_out_of_the_body() -> None:
    wire = answer(plain("/health"), router(http={"/health": failing_handler}))
    assert_refused(wire, 500)
    assert isinstance(wire.outcome.raised, ValueError)
    assert b"secret" not in wire.data and b"shadow" not in wire.data


# ---------------------------------------------------------------------------------------------- origin allow-list

ORIGINS = frozenset({"https://app.example"})


@pytest.mark.parametrize("origin", [None, "https://evil.example", "https://app.example.evil", "null"])
def test_origin_missing_or_not_listed_is_403(origin: str | None) -> None:
    extra = [("Origin", origin)] if origin is not None else []
    wire = answer(head(extra=extra), router(Route("/ws", plugin(Echo), "echo", origins=ORIGINS)))
    assert_refused(wire, 403)


@pytest.mark.parametrize("origin", ["https://app.example", "HTTPS://App.Example", "https://app.example/"])
def test_listed_origin_is_accepted_ignoring_case_and_trailing_slash(origin: str) -> None:
    wire = answer(head(extra=[("Origin", origin)]), router(Route("/ws", plugin(Echo), "echo", origins=ORIGINS)))
    assert_opened(wire)


def test_any_origin_is_accepted_without_an_allow_list() -> None:
    assert_opened(answer(head(extra=[("Origin", "https://anywhere.example")]), router()))


# ---------------------------------------------------------------------------------------------- limits and draining

PROXIES = parse_networks(["10.0.0.0/8"])


def test_per_address_limit_is_503_with_retry_after() -> None:
    wire = answer(head(), router(), Admission(per_ip={PEER[0]: 2}, max_per_ip=2))
    assert_refused(wire, 503)
    assert wire.header("Retry-After") == ["5"]


def test_per_address_limit_leaves_room_below_it() -> None:
    assert_opened(answer(head(), router(), Admission(per_ip={PEER[0]: 1}, max_per_ip=2)))


def test_per_address_limit_counts_the_address_a_trusted_proxy_forwards() -> None:
    admission = Admission(per_ip={"203.0.113.7": 1, "10.1.2.3": 50}, max_per_ip=1, trusted_proxies=PROXIES)
    proxy = ("10.1.2.3", 55000)
    full = answer(head(extra=[("X-Forwarded-For", "203.0.113.7")]), router(), admission, remote=proxy)
    assert_refused(full, 503)
    assert full.header("Retry-After") == ["5"]
    assert full.outcome.remote == ("203.0.113.7", 0)
    assert "203.0.113.7" in full.outcome.reason
    # Another client behind the same proxy: the proxy's own count (50) is not what is limited.
    other = answer(head(extra=[("X-Forwarded-For", "198.51.100.9")]), router(), admission, remote=proxy)
    assert_opened(other)
    assert other.outcome.remote == ("198.51.100.9", 0)


def test_forwarded_address_from_an_untrusted_peer_is_not_believed() -> None:
    admission = Admission(per_ip={"203.0.113.7": 1}, max_per_ip=1, trusted_proxies=PROXIES)
    wire = answer(head(extra=[("X-Forwarded-For", "203.0.113.7")]), router(), admission, remote=PEER)
    assert_opened(wire)
    assert wire.outcome.remote == PEER
    # ...and the peer's own count is what is limited.
    full = Admission(per_ip={PEER[0]: 1}, max_per_ip=1, trusted_proxies=PROXIES)
    assert_refused(answer(head(extra=[("X-Forwarded-For", "198.51.100.9")]), router(), full, remote=PEER), 503)


def test_the_plugin_sees_the_forwarded_address() -> None:
    seen = Seen()
    admission = Admission(trusted_proxies=PROXIES)
    assert_opened(answer(head(extra=[("X-Forwarded-For", "203.0.113.7")]), router(Route("/ws", seen, "seen")),
                         admission, remote=("10.0.0.1", 1)))
    assert seen.requests[0].remote == ("203.0.113.7", 0)


def test_global_connection_limit_is_503_with_retry_after() -> None:
    wire = answer(head(), router(), Admission(open_count=10, max_connections=10))
    assert_refused(wire, 503)
    assert wire.header("Retry-After") == ["5"]
    assert_opened(answer(head(), router(), Admission(open_count=9, max_connections=10)))


def test_draining_server_refuses_new_websockets_with_503() -> None:
    wire = answer(head(), router(), Admission(draining=True))
    assert_refused(wire, 503)
    assert wire.outcome.reason == "server is shutting down"


def test_draining_server_still_answers_plain_http_routes() -> None:
    wire = answer(plain("/health"), router(http={"/health": hello}), Admission(draining=True))
    assert wire.status == 200


# ---------------------------------------------------------------------------------------------- the plugin's say


def test_plugin_reject_is_answered_with_its_status_and_headers() -> None:
    wire = answer(head("/ws?token=wrong"), router(Route("/ws", plugin(NeedsToken), "token")))
    assert_refused(wire, 401)
    assert wire.header("WWW-Authenticate") == ['Token realm="tests"']
    assert wire.body == b"401 a valid token is required\n"
    assert wire.outcome.raised is None


def test_plugin_accept_headers_are_added_to_the_101() -> None:
    wire = answer(head("/ws?token=secret"), router(Route("/ws", plugin(NeedsToken), "token")))
    assert_opened(wire)
    assert wire.header("X-Session") == ["s-1"]
    assert wire.header("Set-Cookie") == ["sid=1"]


def test_plugin_on_handshake_raising_is_500_and_its_text_is_not_sent() -> None:
    wire = answer(head(), router(Route("/ws", plugin(Exploding), "boom")))
    assert_refused(wire, 500)
    assert isinstance(wire.outcome.raised, RuntimeError)
    assert b"secret" not in wire.data and b"password" not in wire.data


def test_plugin_sees_path_params_query_and_offered_subprotocols() -> None:
    seen = Seen()
    wire = answer(head("/room/blue?user=ann", extra=[("Sec-WebSocket-Protocol", "b, a"),
                                                     ("Sec-WebSocket-Protocol", "c")]),
                  router(Route("/room/{name}", seen, "seen")))
    assert_opened(wire)
    [request] = seen.requests
    assert (request.path, request.params, request.query) == ("/room/blue", {"name": "blue"}, {"user": "ann"})
    assert request.subprotocols == ["b", "a", "c"]
    assert wire.outcome.params == {"name": "blue"}


# ---------------------------------------------------------------------------------------------- subprotocols


def test_subprotocol_is_chosen_in_the_clients_order_among_the_routes() -> None:
    route = Route("/ws", plugin(Chat), "chat", subprotocols=("b", "a"))
    wire = answer(head(extra=[("Sec-WebSocket-Protocol", "c, a, b")]), router(route))
    assert_opened(wire)
    assert wire.header("Sec-WebSocket-Protocol") == ["a"]


def test_subprotocol_falls_back_to_the_plugins_list() -> None:
    wire = answer(head(extra=[("Sec-WebSocket-Protocol", "chat.v1, chat.v2")]), router(Route("/ws", plugin(Chat), "c")))
    assert wire.header("Sec-WebSocket-Protocol") == ["chat.v1"]


def test_no_common_subprotocol_opens_without_one_unless_required() -> None:
    wire = answer(head(extra=[("Sec-WebSocket-Protocol", "other")]), router(Route("/ws", plugin(Chat), "chat")))
    assert_opened(wire)
    assert wire.header("Sec-WebSocket-Protocol") == []


@pytest.mark.parametrize("route", [
    Route("/ws", plugin(StrictChat), "strict"),
    Route("/ws", plugin(Chat), "chat", subprotocol_required=True),
], ids=["plugin-requires", "route-requires"])
@pytest.mark.parametrize("offer", [[], [("Sec-WebSocket-Protocol", "other")]], ids=["none", "unknown"])
def test_required_subprotocol_missing_is_400(route: Route, offer: list[tuple[str, str]]) -> None:
    wire = answer(head(extra=offer), router(route))
    assert_refused(wire, 400)
    assert b"chat.v2" in wire.body


def test_route_can_lift_the_plugins_subprotocol_requirement() -> None:
    wire = answer(head(), router(Route("/ws", plugin(StrictChat), "strict", subprotocol_required=False)))
    assert_opened(wire)


def test_plugin_accept_subprotocol_overrides_the_servers_choice() -> None:
    wire = answer(head(extra=[("Sec-WebSocket-Protocol", "chat.v2, chat.v1")]),
                  router(Route("/ws", plugin(PicksLast), "picks")))
    assert_opened(wire)
    assert wire.header("Sec-WebSocket-Protocol") == ["chat.v1"]


# ---------------------------------------------------------------------------------------------- permessage-deflate


def test_deflate_is_agreed_when_the_server_and_the_route_allow_it() -> None:
    wire = answer(head(extra=[DEFLATE_OFFER]), router(), Admission(deflate=DeflateSettings()))
    assert_opened(wire)
    [agreed] = wire.header("Sec-WebSocket-Extensions")
    assert agreed.startswith("permessage-deflate")
    assert wire.ws.extension is not None


def test_deflate_is_not_agreed_when_the_server_has_it_off() -> None:
    wire = answer(head(extra=[DEFLATE_OFFER]), router(), Admission(deflate=None))
    assert_opened(wire)
    assert wire.header("Sec-WebSocket-Extensions") == []
    assert wire.ws.extension is None


def test_deflate_is_never_agreed_on_a_route_with_compression_off() -> None:
    route = Route("/ws", plugin(Echo), "echo", compression=False)
    wire = answer(head(extra=[DEFLATE_OFFER]), router(route), Admission(deflate=DeflateSettings()))
    assert_opened(wire)
    assert wire.header("Sec-WebSocket-Extensions") == []
    assert wire.ws.extension is None


def test_invalid_extension_offer_is_400() -> None:
    wire = answer(head(extra=[("Sec-WebSocket-Extensions", "permessage-deflate; =")]), router(),
                  Admission(deflate=DeflateSettings()))
    assert_refused(wire, 400)
    assert wire.outcome.reason  # the log line says why
    assert wire.ws.extension is None


# ---------------------------------------------------------------------------------------------- the order of checks


def test_plain_get_on_a_route_with_an_origin_list_is_426_not_403() -> None:
    wire = answer(plain("/ws"), router(Route("/ws", plugin(Echo), "echo", origins=ORIGINS)))
    assert_refused(wire, 426)


def test_unknown_origin_while_draining_is_403_not_503() -> None:
    route = Route("/ws", plugin(Echo), "echo", origins=ORIGINS)
    wire = answer(head(extra=[("Origin", "https://evil.example")]), router(route), Admission(draining=True))
    assert_refused(wire, 403)


def test_unknown_origin_over_the_limits_is_403_not_503() -> None:
    route = Route("/ws", plugin(Echo), "echo", origins=ORIGINS)
    admission = Admission(open_count=1, max_connections=1, per_ip={PEER[0]: 1}, max_per_ip=1)
    assert_refused(answer(head(extra=[("Origin", "https://evil.example")]), router(route), admission), 403)


def test_post_upgrade_on_a_websocket_route_is_405_before_anything_else() -> None:
    route = Route("/ws", plugin(Echo), "echo", origins=ORIGINS)
    wire = answer(head(method="POST"), router(route), Admission(draining=True))
    assert_refused(wire, 405)
    assert wire.header("Allow") == ["GET"]


def test_limits_are_checked_before_the_plugin_is_asked() -> None:
    seen = Seen()
    wire = answer(head(), router(Route("/ws", seen, "seen")), Admission(draining=True))
    assert_refused(wire, 503)
    assert seen.requests == []


def test_plugin_reject_comes_before_a_missing_required_subprotocol() -> None:
    class RejectingStrict(StrictChat):
        def on_handshake(self, request: HandshakeRequest) -> Accept | None:
            raise Reject(401, "no")

    assert_refused(answer(head(), router(Route("/ws", plugin(RejectingStrict), "r"))), 401)


# ---------------------------------------------------------------------------------------------- pipelined frames


def test_frames_pipelined_after_the_request_come_out_after_the_101() -> None:
    ws = ServerProtocol()
    frame = encode_frame(0x1, b"early bird", fin=True, rsv1=False, mask=MASK)
    events = ws.receive_data(head() + frame)
    assert len(events) == 1 and isinstance(events[0], Request)
    outcome = answer_request(ws, events[0], PEER, router(), Admission())
    assert not ws.events_held
    ws.send_response(outcome.response)
    assert outcome.response.status == 101
    assert ws.events_held
    assert ws.receive_data(b"") == [Message("early bird")]
    assert not ws.events_held
    status, _, rest = split_response(ws.data_to_send())
    assert status == 101 and rest == b""


def test_frames_pipelined_after_a_refused_request_are_never_parsed() -> None:
    ws = ServerProtocol()
    events = ws.receive_data(head("/nowhere") + encode_frame(0x1, b"x", fin=True, rsv1=False, mask=MASK))
    assert isinstance(events[0], Request)
    ws.send_response(answer_request(ws, events[0], PEER, router(), Admission()).response)
    assert not ws.events_held
    assert ws.receive_data(b"") == []
    assert state_of(ws) is State.CLOSED
