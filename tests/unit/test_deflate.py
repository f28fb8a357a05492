"""permessage-deflate (RFC 7692): negotiation, compression and the decompression limits.

Classes follow the RFC: header grammar (RFC 6455 section 9.1), server negotiation (RFC 7692 sections 5 and 7.1),
client negotiation (section 5.1), compression (section 7.2) and the size limits that protect the server.
"""

from __future__ import annotations

import random
import tracemalloc
import zlib
from typing import Any

import pytest
from websockets.extensions.permessage_deflate import (
    ClientPerMessageDeflateFactory,
    ServerPerMessageDeflateFactory,
)
from websockets.extensions.permessage_deflate import PerMessageDeflate as WsPerMessageDeflate
from websockets.frames import Frame, Opcode
from websockets.headers import build_extension, parse_extension

from selectws.protocol.deflate import (
    DeflateParams,
    DeflateSettings,
    PerMessageDeflate,
    accept_response,
    client_offer,
    compress_shared,
    negotiate_server,
    parse_extensions,
)
from selectws.protocol.errors import NegotiationError, ProtocolError

TAIL = b"\x00\x00\xff\xff"
MiB = 1024 * 1024
DEFAULT = DeflateSettings()
FULL = DeflateParams(
    server_no_context_takeover=False,
    client_no_context_takeover=False,
    server_max_window_bits=15,
    client_max_window_bits=15,
)


def text(size: int, seed: int = 0) -> bytes:
    """Compressible but not trivial data: words drawn from a small vocabulary."""
    rng = random.Random(seed)
    words = [bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(300)]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words) + b" "
    return bytes(out[:size])


def params(snct: bool = False, cnct: bool = False, sbits: int = 15, cbits: int = 15) -> DeflateParams:
    return DeflateParams(
        server_no_context_takeover=snct,
        client_no_context_takeover=cnct,
        server_max_window_bits=sbits,
        client_max_window_bits=cbits,
    )


def ws_extension(p: DeflateParams, *, is_server: bool) -> WsPerMessageDeflate:
    """The python-websockets codec for the *same* side as ``is_server`` with parameters ``p``."""
    if is_server:
        return WsPerMessageDeflate(
            p.client_no_context_takeover,
            p.server_no_context_takeover,
            p.client_max_window_bits,
            max(9, p.server_max_window_bits),
        )
    return WsPerMessageDeflate(
        p.server_no_context_takeover,
        p.client_no_context_takeover,
        p.server_max_window_bits,
        max(9, p.client_max_window_bits),
    )


def ws_encode(ext: WsPerMessageDeflate, message: bytes) -> bytes:
    frame = ext.encode(Frame(Opcode.BINARY, message))
    assert frame.rsv1
    return bytes(frame.data)


def ws_decode(ext: WsPerMessageDeflate, payload: bytes) -> bytes:
    return bytes(ext.decode(Frame(Opcode.BINARY, payload, rsv1=True), max_size=None).data)


# ----------------------------------------------------------------------------------------------------------------
# RFC 6455 section 9.1: Sec-WebSocket-Extensions grammar
# ----------------------------------------------------------------------------------------------------------------


class TestHeaderGrammar:
    """RFC 6455 section 9.1: the Sec-WebSocket-Extensions grammar."""

    def test_single_extension_without_parameters(self) -> None:
        assert parse_extensions(["permessage-deflate"]) == [("permessage-deflate", [])]

    def test_parameters_with_and_without_values(self) -> None:
        assert parse_extensions(["permessage-deflate; client_max_window_bits; server_max_window_bits=10"]) == [
            ("permessage-deflate", [("client_max_window_bits", None), ("server_max_window_bits", "10")])
        ]

    def test_comma_separated_offers_and_several_lines_keep_order(self) -> None:
        lines = ["a; x=1, b", "c;y", "d"]
        assert parse_extensions(lines) == [("a", [("x", "1")]), ("b", []), ("c", [("y", None)]), ("d", [])]

    def test_whitespace_around_separators(self) -> None:
        assert parse_extensions(["  a \t;  x = 1 ;y\t,\tb  "]) == [("a", [("x", "1"), ("y", None)]), ("b", [])]

    def test_empty_list_elements_are_ignored(self) -> None:
        assert parse_extensions([", a ,, b,", "", " "]) == [("a", []), ("b", [])]

    def test_quoted_values_are_unquoted(self) -> None:
        assert parse_extensions(['a; x="10"; y="a\\b"']) == [("a", [("x", "10"), ("y", "ab")])]

    @pytest.mark.parametrize(
        "header",
        [
            "permessage-deflate;",  # parameter name missing
            "permessage-deflate; =10",
            "permessage-deflate; x=",  # value missing
            "permessage-deflate; x=1 2",  # two tokens
            "permessage-deflate x",  # missing ',' between elements
            "permessage-deflate; x=@",  # '@' is not a token character
            'permessage-deflate; x="10',  # unterminated quoted string
            'permessage-deflate; x="1 0"',  # unescaped value is not a token (RFC 6455 section 9.1)
            'permessage-deflate; x=""',  # empty is not a token either
            "@",
            "a; b; ;c",
        ],
    )
    def test_syntax_errors_raise_400(self, header: str) -> None:
        with pytest.raises(NegotiationError) as info:
            parse_extensions([header])
        assert info.value.status == 400

    def test_syntax_error_fails_the_handshake(self) -> None:
        with pytest.raises(NegotiationError):
            negotiate_server(["permessage-deflate; x=", "permessage-deflate"], DEFAULT)


# ----------------------------------------------------------------------------------------------------------------
# RFC 7692 sections 5 and 7.1: server-side negotiation
# ----------------------------------------------------------------------------------------------------------------


class TestNegotiation:
    """RFC 7692 sections 5 and 7.1: the server answers offers."""

    def test_nothing_offered(self) -> None:
        assert negotiate_server([], DEFAULT) is None
        assert negotiate_server([""], DEFAULT) is None

    def test_other_extensions_are_ignored(self) -> None:
        assert negotiate_server(["x-webkit-deflate-frame, foo; bar=1"], DEFAULT) is None
        result = negotiate_server(["x-webkit-deflate-frame", "permessage-deflate"], DEFAULT)
        assert result == ("permessage-deflate", FULL)

    @pytest.mark.parametrize(
        ("offer", "response", "agreed"),
        [
            ("permessage-deflate", "permessage-deflate", params()),
            (
                "permessage-deflate; server_no_context_takeover",
                "permessage-deflate; server_no_context_takeover",
                params(snct=True),
            ),
            (
                "permessage-deflate; client_no_context_takeover",
                "permessage-deflate; client_no_context_takeover",
                params(cnct=True),
            ),
            (
                "permessage-deflate; server_max_window_bits=10",
                "permessage-deflate; server_max_window_bits=10",
                params(sbits=10),
            ),
            (
                "permessage-deflate; server_max_window_bits=15",
                "permessage-deflate; server_max_window_bits=15",
                params(),
            ),
            ("permessage-deflate; client_max_window_bits", "permessage-deflate", params()),
            (
                "permessage-deflate; client_max_window_bits=11",
                "permessage-deflate; client_max_window_bits=11",
                params(cbits=11),
            ),
            (
                "permessage-deflate; client_max_window_bits=8",
                "permessage-deflate; client_max_window_bits=8",
                params(cbits=8),
            ),
            (
                'permessage-deflate; server_max_window_bits="12"; client_max_window_bits="9"',
                "permessage-deflate; server_max_window_bits=12; client_max_window_bits=9",
                params(sbits=12, cbits=9),
            ),
            (
                "PerMessage-Deflate; Server_No_Context_Takeover",
                "permessage-deflate; server_no_context_takeover",
                params(snct=True),
            ),
        ],
    )
    def test_single_offer_with_each_parameter(self, offer: str, response: str, agreed: DeflateParams) -> None:
        assert negotiate_server([offer], DEFAULT) == (response, agreed)

    def test_server_max_window_bits_8_is_accepted_and_compressed_with_9(self) -> None:
        # zlib cannot compress with a raw 8-bit window; the agreed value stays 8 and the codec uses 9.
        result = negotiate_server(["permessage-deflate; server_max_window_bits=8"], DEFAULT)
        assert result == ("permessage-deflate; server_max_window_bits=8", params(sbits=8))
        payload = text(20_000) + bytes(range(256)) * 20
        inflater = zlib.decompressobj(wbits=-8)
        assert inflater.decompress(PerMessageDeflate(result[1]).compress(payload) + TAIL) == payload

    @pytest.mark.parametrize(
        ("settings", "offer", "response", "agreed"),
        [
            (
                # The example of the brief: both settings apply when the client allows them.
                DeflateSettings(server_no_context_takeover=True, client_max_window_bits=12),
                "permessage-deflate; client_max_window_bits",
                "permessage-deflate; server_no_context_takeover; client_max_window_bits=12",
                params(snct=True, cbits=12),
            ),
            (
                # The client did not offer client_max_window_bits: accepted, but the client cannot be limited.
                DeflateSettings(client_max_window_bits=12),
                "permessage-deflate",
                "permessage-deflate",
                params(),
            ),
            (
                # The client's own limit is smaller than ours: echo the client's.
                DeflateSettings(client_max_window_bits=12),
                "permessage-deflate; client_max_window_bits=10",
                "permessage-deflate; client_max_window_bits=10",
                params(cbits=10),
            ),
            (
                DeflateSettings(client_max_window_bits=12),
                "permessage-deflate; client_max_window_bits=14",
                "permessage-deflate; client_max_window_bits=12",
                params(cbits=12),
            ),
            (
                # Our own window is smaller than 15: announced even if the client did not ask.
                DeflateSettings(server_max_window_bits=11),
                "permessage-deflate",
                "permessage-deflate; server_max_window_bits=11",
                params(sbits=11),
            ),
            (
                DeflateSettings(server_max_window_bits=11),
                "permessage-deflate; server_max_window_bits=13",
                "permessage-deflate; server_max_window_bits=11",
                params(sbits=11),
            ),
            (
                DeflateSettings(server_max_window_bits=11),
                "permessage-deflate; server_max_window_bits=9",
                "permessage-deflate; server_max_window_bits=9",
                params(sbits=9),
            ),
            (
                DeflateSettings(server_no_context_takeover=True, client_no_context_takeover=True),
                "permessage-deflate",
                "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
                params(snct=True, cnct=True),
            ),
            (
                DeflateSettings(
                    server_max_window_bits=10,
                    client_max_window_bits=9,
                    server_no_context_takeover=True,
                    client_no_context_takeover=True,
                ),
                "permessage-deflate; client_max_window_bits",
                "permessage-deflate; server_no_context_takeover; client_no_context_takeover; "
                "server_max_window_bits=10; client_max_window_bits=9",
                params(snct=True, cnct=True, sbits=10, cbits=9),
            ),
        ],
    )
    def test_response_text_follows_settings(
        self, settings: DeflateSettings, offer: str, response: str, agreed: DeflateParams
    ) -> None:
        assert negotiate_server([offer], settings) == (response, agreed)

    @pytest.mark.parametrize(
        "bad",
        [
            "server_no_context_takeover; server_no_context_takeover",  # duplicate
            "client_max_window_bits=10; client_max_window_bits=10",  # duplicate with the same value
            "client_max_window_bits; client_max_window_bits=10",
            "foo",  # unknown
            "foo=1",
            "server_max_window_bits=7",
            "server_max_window_bits=16",
            "server_max_window_bits=abc",
            "server_max_window_bits=09",  # leading zero
            "server_max_window_bits",  # needs a value
            "client_max_window_bits=7",
            "client_max_window_bits=16",
            'client_max_window_bits="abc"',
            "server_no_context_takeover=1",
            'client_no_context_takeover="x"',
        ],
    )
    def test_invalid_offer_is_declined_and_next_offer_taken(self, bad: str) -> None:
        # RFC 7692 section 5: the server MUST decline such an offer; declining is not a handshake failure.
        assert negotiate_server([f"permessage-deflate; {bad}"], DEFAULT) is None
        offers = [f"permessage-deflate; {bad}, permessage-deflate; server_no_context_takeover"]
        assert negotiate_server(offers, DEFAULT) == (
            "permessage-deflate; server_no_context_takeover",
            params(snct=True),
        )

    def test_first_acceptable_offer_wins(self) -> None:
        offers = ["permessage-deflate; client_max_window_bits=10", "permessage-deflate"]
        assert negotiate_server(offers, DEFAULT) == ("permessage-deflate; client_max_window_bits=10", params(cbits=10))

    @pytest.mark.parametrize(
        "factory_kwargs",
        [
            {},
            {"server_no_context_takeover": True},
            {"client_no_context_takeover": True},
            {"server_max_window_bits": 10},
            {"server_max_window_bits": 8},
            {"client_max_window_bits": 9},
            {"client_max_window_bits": None},
            {"server_no_context_takeover": True, "server_max_window_bits": 12, "client_max_window_bits": 11},
        ],
    )
    @pytest.mark.parametrize(
        "settings",
        [
            DEFAULT,
            DeflateSettings(client_max_window_bits=12, server_max_window_bits=12),
            DeflateSettings(server_no_context_takeover=True, client_no_context_takeover=True),
        ],
    )
    def test_websockets_client_accepts_our_response(
        self, factory_kwargs: dict[str, Any], settings: DeflateSettings
    ) -> None:
        factory = ClientPerMessageDeflateFactory(**factory_kwargs)
        offer = build_extension([(factory.name, factory.get_request_params())])
        result = negotiate_server([offer], settings)
        assert result is not None
        response, agreed = result
        ((_, response_params),) = parse_extension(response)
        client = factory.process_response_params(response_params, [])
        assert client.remote_no_context_takeover == agreed.server_no_context_takeover
        assert client.local_no_context_takeover == agreed.client_no_context_takeover
        assert client.remote_max_window_bits == agreed.server_max_window_bits
        assert client.local_max_window_bits == agreed.client_max_window_bits
        # And the codecs talk to each other.
        server = PerMessageDeflate(agreed)
        for i in range(3):
            message = text(5000, seed=i)
            assert ws_decode(client, server.compress(message)) == message
            assert server.decompress(ws_encode(client, message), None) == message


# ----------------------------------------------------------------------------------------------------------------
# RFC 7692 sections 5.1 and 7.1: client-side negotiation
# ----------------------------------------------------------------------------------------------------------------


class TestClientNegotiation:
    """RFC 7692 sections 5.1 and 7.1: the client offers and checks the response."""

    @pytest.mark.parametrize(
        ("settings", "offer"),
        [
            (DEFAULT, "permessage-deflate; client_max_window_bits"),
            (
                DeflateSettings(server_no_context_takeover=True, client_no_context_takeover=True),
                "permessage-deflate; server_no_context_takeover; client_no_context_takeover; client_max_window_bits",
            ),
            (
                DeflateSettings(server_max_window_bits=10, client_max_window_bits=12),
                "permessage-deflate; server_max_window_bits=10; client_max_window_bits=12",
            ),
        ],
    )
    def test_offer_text(self, settings: DeflateSettings, offer: str) -> None:
        assert client_offer(settings) == offer

    def test_no_extension_in_response(self) -> None:
        assert accept_response([], DEFAULT) is None

    @pytest.mark.parametrize(
        ("settings", "response", "agreed"),
        [
            (DEFAULT, "permessage-deflate", params()),
            (DEFAULT, "permessage-deflate; client_max_window_bits=10", params(cbits=10)),
            (DEFAULT, "permessage-deflate; server_max_window_bits=9", params(sbits=9)),
            (DEFAULT, "permessage-deflate; client_no_context_takeover", params(cnct=True)),
            (DEFAULT, "permessage-deflate; server_no_context_takeover", params(snct=True)),
            (DeflateSettings(client_max_window_bits=12), "permessage-deflate", params(cbits=12)),
            (DeflateSettings(client_no_context_takeover=True), "permessage-deflate", params(cnct=True)),
            (
                DeflateSettings(server_max_window_bits=10, server_no_context_takeover=True),
                "permessage-deflate; server_no_context_takeover; server_max_window_bits=8",
                params(snct=True, sbits=8),
            ),
        ],
    )
    def test_valid_responses(self, settings: DeflateSettings, response: str, agreed: DeflateParams) -> None:
        assert accept_response([response], settings) == agreed

    @pytest.mark.parametrize(
        ("settings", "response"),
        [
            (DEFAULT, "x-webkit-deflate-frame"),  # not offered
            (DEFAULT, "permessage-deflate, permessage-deflate"),
            (DEFAULT, "permessage-deflate; foo"),
            (DEFAULT, "permessage-deflate; server_no_context_takeover; server_no_context_takeover"),
            (DEFAULT, "permessage-deflate; client_max_window_bits"),  # a value is required in a response
            (DEFAULT, "permessage-deflate; server_max_window_bits=16"),
            (DEFAULT, "permessage-deflate; client_no_context_takeover=1"),
            (DeflateSettings(server_no_context_takeover=True), "permessage-deflate"),
            (DeflateSettings(server_max_window_bits=10), "permessage-deflate"),
            (DeflateSettings(server_max_window_bits=10), "permessage-deflate; server_max_window_bits=11"),
            (DeflateSettings(client_max_window_bits=10), "permessage-deflate; client_max_window_bits=11"),
            (DEFAULT, "permessage-deflate; x="),  # syntax
        ],
    )
    def test_invalid_responses_fail(self, settings: DeflateSettings, response: str) -> None:
        with pytest.raises(NegotiationError):
            accept_response([response], settings)

    @pytest.mark.parametrize(
        "factory_kwargs",
        [
            {},
            {"server_no_context_takeover": True, "client_no_context_takeover": True},
            {"server_max_window_bits": 10, "client_max_window_bits": 11},
            {"client_max_window_bits": 8},
        ],
    )
    @pytest.mark.parametrize(
        "settings",
        [
            DEFAULT,
            DeflateSettings(server_max_window_bits=12, client_max_window_bits=10, server_no_context_takeover=True),
        ],
    )
    def test_websockets_server_response_is_accepted(
        self, factory_kwargs: dict[str, Any], settings: DeflateSettings
    ) -> None:
        factory = ServerPerMessageDeflateFactory(**factory_kwargs)
        ((_, offer_params),) = parse_extension(client_offer(settings))
        response_params, server = factory.process_request_params(offer_params, [])
        agreed = accept_response([build_extension([(factory.name, response_params)])], settings)
        assert agreed is not None
        assert server.local_no_context_takeover == agreed.server_no_context_takeover
        assert server.remote_no_context_takeover == agreed.client_no_context_takeover
        assert server.local_max_window_bits == agreed.server_max_window_bits
        client = PerMessageDeflate(agreed, is_server=False)
        for i in range(3):
            message = text(5000, seed=i)
            assert ws_decode(server, client.compress(message)) == message
            assert client.decompress(ws_encode(server, message), None) == message

    def test_our_client_and_server_agree(self) -> None:
        client_settings = DeflateSettings(server_max_window_bits=12, client_no_context_takeover=True)
        server_settings = DeflateSettings(client_max_window_bits=10, server_no_context_takeover=True)
        result = negotiate_server([client_offer(client_settings)], server_settings)
        assert result is not None
        response, server_agreed = result
        assert accept_response([response], client_settings) == server_agreed
        assert server_agreed == params(snct=True, cnct=True, sbits=12, cbits=10)


# ----------------------------------------------------------------------------------------------------------------
# RFC 7692 section 7.2: compression and decompression
# ----------------------------------------------------------------------------------------------------------------

CONTEXT_CASES = [
    pytest.param(params(), id="takeover"),
    pytest.param(params(snct=True, cnct=True), id="no-takeover"),
    pytest.param(params(snct=True), id="server-no-takeover"),
    pytest.param(params(cnct=True, sbits=9, cbits=10), id="client-no-takeover-small-windows"),
    pytest.param(params(sbits=8, cbits=8), id="windows-8"),
]


class TestCompression:
    """RFC 7692 section 7.2: compressing and decompressing messages."""

    @pytest.mark.parametrize("agreed", CONTEXT_CASES)
    @pytest.mark.parametrize("size", [0, 1, 64, MiB])
    def test_round_trip_both_roles(self, agreed: DeflateParams, size: int) -> None:
        server = PerMessageDeflate(agreed, is_server=True)
        client = PerMessageDeflate(agreed, is_server=False)
        for seed in range(2):
            message = text(size, seed)
            assert client.decompress(server.compress(message), None) == message
            assert server.decompress(client.compress(message), None) == message

    @pytest.mark.parametrize("agreed", CONTEXT_CASES)
    def test_many_messages_in_sequence(self, agreed: DeflateParams) -> None:
        server = PerMessageDeflate(agreed)
        client = PerMessageDeflate(agreed, is_server=False)
        for i in range(50):
            message = text(i * 37, seed=i % 3)
            assert client.decompress(server.compress(message), 10_000) == message

    def test_empty_message_is_a_single_zero_octet(self) -> None:
        # RFC 7692 section 7.2.3.6: 0x00 plus the appended 00 00 ff ff is an empty stored block.
        codec = PerMessageDeflate(FULL)
        assert codec.compress(b"") == b"\x00"
        assert codec.decompress(b"\x00", 0) == b""
        assert zlib.decompressobj(wbits=-15).decompress(b"\x00" + TAIL) == b""
        assert compress_shared(b"", 15, 8) == b"\x00"

    def test_empty_payload_does_not_break_context(self) -> None:
        sender, receiver = PerMessageDeflate(FULL), PerMessageDeflate(FULL, is_server=False)
        assert receiver.decompress(sender.compress(b"hello hello"), None) == b"hello hello"
        assert receiver.decompress(b"", None) == b""
        assert receiver.decompress(sender.compress(b"hello hello"), None) == b"hello hello"

    def test_context_takeover_reuses_the_window(self) -> None:
        codec = PerMessageDeflate(FULL)
        message = text(2000)
        first, second = codec.compress(message), codec.compress(message)
        assert len(second) < len(first) // 4
        receiver = PerMessageDeflate(FULL, is_server=False)
        assert receiver.decompress(first, None) == message
        assert receiver.decompress(second, None) == message

    def test_no_context_takeover_resets(self) -> None:
        codec = PerMessageDeflate(params(snct=True))
        message = text(2000)
        first, second = codec.compress(message), codec.compress(message)
        assert first == second
        # Each message inflates on its own, as a receiver with a fresh window would.
        assert zlib.decompressobj(wbits=-15).decompress(second + TAIL) == message

    def test_context_takeover_on_the_peer_side_only(self) -> None:
        # The server compresses without takeover, the client keeps its context: each side follows its own flag.
        agreed = params(snct=True)
        server, client = PerMessageDeflate(agreed), PerMessageDeflate(agreed, is_server=False)
        message = text(2000)
        assert server.compress(message) == server.compress(message)
        first, second = client.compress(message), client.compress(message)
        assert len(second) < len(first)
        assert server.decompress(first, None) == message
        assert server.decompress(second, None) == message

    def test_zlib_objects_are_lazy_and_dropped_without_takeover(self) -> None:
        codec = PerMessageDeflate(params(snct=True, cnct=True))
        assert codec._compressor is None and codec._decompressor is None
        codec.decompress(codec.compress(b"abc"), None)
        assert codec._compressor is None and codec._decompressor is None
        kept = PerMessageDeflate(FULL)
        assert kept._compressor is None and kept._decompressor is None
        kept.decompress(kept.compress(b"abc"), None)
        assert kept._compressor is not None and kept._decompressor is not None

    @pytest.mark.parametrize(
        ("payloads", "messages"),
        [
            # 7.2.3.1: one compressed block.
            ([bytes.fromhex("f248cdc9c90700")], [b"Hello"]),
            # 7.2.3.2: the second message refers back to the first.
            ([bytes.fromhex("f248cdc9c90700"), bytes.fromhex("f200110000")], [b"Hello", b"Hello"]),
            # 7.2.3.3: a stored block.
            ([bytes.fromhex("000500faff48656c6c6f00")], [b"Hello"]),
            # 7.2.3.4: BFINAL set, then another message on the same connection.
            (
                [bytes.fromhex("f348cdc9c9070000"), bytes.fromhex("f248cdc9c90700")],
                [b"Hello", b"Hello"],
            ),
            # 7.2.3.5: two blocks in one message.
            ([bytes.fromhex("f24805000000ffffcac9c90700")], [b"Hello"]),
        ],
    )
    def test_rfc_examples(self, payloads: list[bytes], messages: list[bytes]) -> None:
        receiver = PerMessageDeflate(FULL)
        assert [receiver.decompress(p, 100) for p in payloads] == messages

    def test_rfc_example_compresses_identically(self) -> None:
        assert PerMessageDeflate(FULL).compress(b"Hello") == bytes.fromhex("f248cdc9c90700")

    @pytest.mark.parametrize("bits", [9, 12, 15])
    def test_stdlib_zlib_interoperates(self, bits: int) -> None:
        agreed = params(sbits=bits, cbits=bits)
        ours = PerMessageDeflate(agreed)
        inflater = zlib.decompressobj(wbits=-bits)
        deflater = zlib.compressobj(9, zlib.DEFLATED, -bits)
        for seed in range(3):
            message = text(30_000, seed)
            assert inflater.decompress(ours.compress(message) + TAIL) == message
            theirs = deflater.compress(message) + deflater.flush(zlib.Z_SYNC_FLUSH)
            assert theirs.endswith(TAIL)
            assert ours.decompress(theirs[:-4], None) == message

    def test_compressed_payload_that_keeps_the_tail_is_accepted(self) -> None:
        # Senders SHOULD strip 00 00 ff ff but need not (RFC 7692 section 7.2.1): a second empty block is harmless.
        deflater = zlib.compressobj(6, zlib.DEFLATED, -15)
        message = text(1000)
        payload = deflater.compress(message) + deflater.flush(zlib.Z_SYNC_FLUSH)
        assert PerMessageDeflate(FULL).decompress(payload, None) == message

    @pytest.mark.parametrize("agreed", CONTEXT_CASES)
    @pytest.mark.parametrize("is_server", [True, False])
    def test_websockets_codec_interoperates(self, agreed: DeflateParams, is_server: bool) -> None:
        ours = PerMessageDeflate(agreed, is_server=is_server)
        theirs = ws_extension(agreed, is_server=not is_server)
        for seed in range(4):
            message = text(10_000 * seed + 1, seed)
            assert ws_decode(theirs, ours.compress(message)) == message
            assert ours.decompress(ws_encode(theirs, message), None) == message

    def test_fragmented_message_from_websockets(self) -> None:
        # Each fragment is sync-flushed separately and only the last loses its tail: joined, they are one payload.
        theirs = ws_extension(FULL, is_server=False)
        parts = [text(3000, seed) for seed in range(3)]
        frames = [
            theirs.encode(Frame(Opcode.TEXT, parts[0], fin=False)),
            theirs.encode(Frame(Opcode.CONT, parts[1], fin=False)),
            theirs.encode(Frame(Opcode.CONT, parts[2], fin=True)),
        ]
        ours = PerMessageDeflate(FULL)
        assert ours.decompress(b"".join(bytes(f.data) for f in frames), None) == b"".join(parts)

    def test_memoryview_and_bytearray_payloads(self) -> None:
        codec = PerMessageDeflate(FULL)
        message = text(5000)
        compressed = codec.compress(bytearray(message))
        receiver = PerMessageDeflate(FULL, is_server=False)
        assert receiver.decompress(memoryview(compressed), None) == message

    def test_window_8_output_inflates_with_an_8_bit_window(self) -> None:
        # The claim behind accepting server_max_window_bits=8: zlib's 9-bit deflate never reaches back more than
        # 250 bytes. Repeats at distances 200..600 would break an 8-bit inflater if it did.
        rng = random.Random(8)
        codec = PerMessageDeflate(params(sbits=8))
        inflater = zlib.decompressobj(wbits=-8)
        for distance in range(200, 600, 7):
            block = bytes(rng.randrange(256) for _ in range(distance))
            message = block * 4 + text(500, distance)
            assert inflater.decompress(codec.compress(message) + TAIL) == message

    def test_should_compress(self) -> None:
        codec = PerMessageDeflate(FULL, min_size=100)
        assert not codec.should_compress(99)
        assert codec.should_compress(100)
        assert PerMessageDeflate(FULL).should_compress(0)

    def test_compress_shared_inflates_with_a_fresh_inflater(self) -> None:
        message = text(50_000)
        shared = compress_shared(message, 15, 8)
        assert zlib.decompressobj(wbits=-15).decompress(shared + TAIL) == message
        # Same bytes as a connection's own compressor without context takeover would produce.
        assert shared == PerMessageDeflate(params(snct=True)).compress(message)

    @pytest.mark.parametrize("bits", [8, 9, 12, 15])
    def test_compress_shared_is_valid_for_every_shareable_recipient(self, bits: int) -> None:
        message = text(20_000)
        shared = compress_shared(message, bits, 5)
        for recipient_bits in range(max(bits, 8), 16):
            agreed = params(snct=True, sbits=recipient_bits)
            assert agreed.shareable
            # A recipient keeps its own inflater context: unrelated earlier messages must not disturb it.
            client = ws_extension(agreed, is_server=False)
            server = PerMessageDeflate(agreed)
            assert ws_decode(client, server.compress(text(3000, 1))) == text(3000, 1)
            assert ws_decode(client, shared) == message
            assert ws_decode(client, server.compress(text(3000, 2))) == text(3000, 2)

    def test_shareable_follows_server_no_context_takeover(self) -> None:
        assert not params().shareable
        assert not params(cnct=True).shareable
        assert params(snct=True).shareable

    def test_window_bigger_than_agreed_is_rejected(self) -> None:
        # A peer that ignores the agreed client_max_window_bits=9 refers back further than the 512 bytes of
        # history the inflater keeps between messages. (Within one inflate call zlib resolves such distances from
        # its output buffer, so the check only bites across messages.)
        rng = random.Random(1)
        block = bytes(rng.randrange(256) for _ in range(4000))
        deflater = zlib.compressobj(6, zlib.DEFLATED, -15)
        first, second = ((deflater.compress(block) + deflater.flush(zlib.Z_SYNC_FLUSH))[:-4] for _ in range(2))
        receiver = PerMessageDeflate(params(cbits=9))
        assert receiver.decompress(first, None) == block
        with pytest.raises(ProtocolError) as info:
            receiver.decompress(second, None)
        assert info.value.code == 1007

    @pytest.mark.parametrize(
        "payload",
        [
            b"\xff\xff\xff\xff",  # BTYPE 11 is reserved
            b"\x07",  # BFINAL + BTYPE 11
            bytes.fromhex("0005000000"),  # stored block whose NLEN does not match LEN
        ],
    )
    def test_corrupt_data_is_1007(self, payload: bytes) -> None:
        with pytest.raises(ProtocolError) as info:
            PerMessageDeflate(FULL).decompress(payload, MiB)
        assert info.value.code == 1007


class TestSettings:
    """Configuration and agreed parameters reject values zlib or the RFC cannot take."""

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"server_max_window_bits": 8},
            {"server_max_window_bits": 16},
            {"client_max_window_bits": 8},
            {"memory_level": 0},
            {"memory_level": 10},
            {"min_size": -1},
        ],
    )
    def test_invalid_settings(self, kwargs: dict[str, Any]) -> None:
        with pytest.raises(ValueError):
            DeflateSettings(**kwargs)

    @pytest.mark.parametrize("bits", [7, 16])
    def test_invalid_params(self, bits: int) -> None:
        with pytest.raises(ValueError):
            params(sbits=bits)
        with pytest.raises(ValueError):
            params(cbits=bits)

    def test_invalid_memory_level(self) -> None:
        with pytest.raises(ValueError):
            PerMessageDeflate(FULL, memory_level=0)


# ----------------------------------------------------------------------------------------------------------------
# Limits: message size after inflation
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zip_bomb() -> bytes:
    """16 MiB of zeros, about 16 KiB compressed."""
    deflater = zlib.compressobj(9, zlib.DEFLATED, -15)
    payload = deflater.compress(bytes(16 * MiB)) + deflater.flush(zlib.Z_SYNC_FLUSH)
    assert len(payload) < 20_000
    return payload[:-4]


class TestLimits:
    """Size limits after inflation: 1009 without ever holding much more than max_size."""

    def test_exactly_max_size_is_accepted(self) -> None:
        message = text(1000)
        payload = PerMessageDeflate(FULL).compress(message)
        assert PerMessageDeflate(FULL).decompress(payload, 1000) == message

    def test_one_byte_over_is_1009(self) -> None:
        payload = PerMessageDeflate(FULL).compress(text(1001))
        with pytest.raises(ProtocolError) as info:
            PerMessageDeflate(FULL).decompress(payload, 1000)
        assert info.value.code == 1009

    def test_max_size_zero(self) -> None:
        codec = PerMessageDeflate(FULL)
        assert codec.decompress(codec.compress(b""), 0) == b""
        with pytest.raises(ProtocolError) as info:
            codec.decompress(codec.compress(b"x"), 0)
        assert info.value.code == 1009

    @pytest.mark.parametrize("size", [MiB - 1, MiB])
    @pytest.mark.parametrize("compressible", [True, False])
    def test_messages_near_the_limit(self, size: int, compressible: bool) -> None:
        # Incompressible data makes zlib stop with input left over once the output limit is reached; that tail
        # must not be mistaken for "too big" when the message is exactly the limit.
        message = text(size) if compressible else random.Random(size).randbytes(size)
        sender, receiver = PerMessageDeflate(FULL, is_server=False), PerMessageDeflate(FULL)
        assert receiver.decompress(sender.compress(message), MiB) == message
        # And the context is intact for the next message.
        assert receiver.decompress(sender.compress(message[:100]), MiB) == message[:100]
        with pytest.raises(ProtocolError) as info:
            receiver.decompress(sender.compress(message + b"xx"), MiB)
        assert info.value.code == 1009

    def test_no_limit(self, zip_bomb: bytes) -> None:
        assert PerMessageDeflate(FULL).decompress(zip_bomb, None) == bytes(16 * MiB)

    def test_zip_bomb_is_1009_without_inflating_it(self, zip_bomb: bytes) -> None:
        codec = PerMessageDeflate(FULL)
        tracemalloc.start()
        try:
            with pytest.raises(ProtocolError) as info:
                codec.decompress(zip_bomb, MiB)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert info.value.code == 1009
        # About max_size of output (plus the output buffer's join and the inflater), never the 16 MiB.
        assert peak < 3 * MiB, peak

    def test_inflater_is_always_bounded(self, zip_bomb: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
        calls: list[int] = []

        class Spy:
            def __init__(self, inner: Any) -> None:
                self.inner = inner

            def decompress(self, data: Any, max_length: int = 0) -> bytes:
                calls.append(max_length)
                result: bytes = self.inner.decompress(data, max_length)
                return result

            def __getattr__(self, name: str) -> Any:
                return getattr(self.inner, name)

        real = zlib.decompressobj
        monkeypatch.setattr(zlib, "decompressobj", lambda **kw: Spy(real(**kw)))
        codec = PerMessageDeflate(FULL)
        assert codec.decompress(codec.compress(text(100)), MiB) == text(100)
        with pytest.raises(ProtocolError):
            PerMessageDeflate(FULL).decompress(zip_bomb, MiB)
        assert calls and all(0 < n <= MiB + 1 for n in calls)
