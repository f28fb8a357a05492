"""permessage-deflate (RFC 7692), sans-I/O.

Three parts, each usable without a socket:

* :func:`parse_extensions` reads ``Sec-WebSocket-Extensions`` (RFC 6455 section 9.1 grammar).
* :func:`negotiate_server` / :func:`client_offer` + :func:`accept_response` agree on parameters
  (RFC 7692 sections 5 and 7.1).
* :class:`PerMessageDeflate` compresses and decompresses whole messages (RFC 7692 section 7.2);
  :func:`compress_shared` compresses a broadcast once for every recipient that can take the same bytes.

What fails the handshake and what only declines an offer
--------------------------------------------------------
RFC 7692 section 5 says the server MUST *decline* a permessage-deflate offer that has an unknown parameter, a
parameter with an invalid value, or the same parameter twice; declining means "try the next offer, and if none
is left, run without compression". So every such violation only drops *that* offer (python-websockets and wsproto
do the same). The only thing that answers 400 is a ``Sec-WebSocket-Extensions`` header that does not follow the
RFC 6455 section 9.1 grammar at all (unbalanced quotes, missing token, a quoted value that is not a token once
unescaped...): then we cannot tell where one offer ends and the next begins, and python-websockets answers 400 too.

In the client role the rules are stricter (RFC 7692 section 5.1, RFC 6455 section 4.1): any invalid response
must *fail the connection*, reported here as :class:`NegotiationError` (the status it carries is meaningless in
the client role; the caller closes the TCP connection).

Close codes used by the codec
-----------------------------
* 1009 (message too big) when a message inflates beyond ``max_size``. Inflation stops at ``max_size + 1``
  bytes, so a "zip bomb" never costs more memory than an honest message of the largest allowed size.
* 1007 (invalid data) when zlib rejects the data, as the Node ``ws`` library does. python-websockets uses 1002;
  we prefer 1007 because the frames were well-formed and only the payload is bad, and RFC 7692 names no code.

Window bits of 8
----------------
zlib cannot *compress* a raw stream with a 256-byte window (``wbits=-8`` is rejected, madler/zlib#171), but it
can inflate one. zlib's deflate never emits a match distance above ``window size - 262`` (``MAX_DIST`` in
deflate.c), i.e. 250 for a 512-byte window, so a stream compressed with 9 bits is always inflatable with an
8-bit window. So when a peer asks us to limit our window to 8 we accept, answer ``..._max_window_bits=8`` and
compress with 9. (python-websockets declines such an offer instead; the test suite checks the claim above.)
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from .errors import CloseCode, NegotiationError, ProtocolError

__all__ = [
    "EXTENSION_NAME",
    "DeflateParams",
    "DeflateSettings",
    "PerMessageDeflate",
    "accept_response",
    "client_offer",
    "compress_shared",
    "negotiate_server",
    "parse_extensions",
]

EXTENSION_NAME = "permessage-deflate"

#: The empty stored block a Z_SYNC_FLUSH ends with; removed by the sender, re-appended by the receiver
#: (RFC 7692 section 7.2.1 and 7.2.2).
_TAIL = b"\x00\x00\xff\xff"

#: What an empty message compresses to: the header of an empty stored block, which the receiver's
#: appended ``_TAIL`` completes (RFC 7692 section 7.2.3.6).
_EMPTY_MESSAGE = b"\x00"

#: zlib refuses to compress with a raw 8-bit window; 9-bit output is inflatable with 8 bits (module docstring).
_MIN_COMPRESS_BITS = 9

#: Valid window bits values on the wire: decimal 8..15 without leading zeros (RFC 7692 section 7.1.2).
_WINDOW_BITS_VALUES = {str(bits): bits for bits in range(8, 16)}

_PARAM_NAMES = frozenset(
    {"server_no_context_takeover", "client_no_context_takeover", "server_max_window_bits", "client_max_window_bits"}
)

ExtensionParam = tuple[str, str | None]
Extension = tuple[str, list[ExtensionParam]]


# --------------------------------------------------------------------------------------------------------------
# Configuration and agreed parameters
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeflateSettings:
    """This endpoint's compression configuration (mirrors the ``[compression]`` config table).

    In the server role, ``server_*`` limit our own compressor and ``client_*`` are what we ask of the client. In
    the client role the meaning is the same from the client's side: ``client_*`` limit our own compressor (and
    are announced in the offer), ``server_*`` are what we ask of the server.
    """

    server_max_window_bits: int = 15
    client_max_window_bits: int = 15
    server_no_context_takeover: bool = False
    client_no_context_takeover: bool = False
    memory_level: int = 8
    min_size: int = 0

    def __post_init__(self) -> None:
        # 8 is not configurable: we could not compress with it ourselves (see module docstring), and asking a
        # peer for it buys almost nothing over 9.
        for name in ("server_max_window_bits", "client_max_window_bits"):
            bits = getattr(self, name)
            if not 9 <= bits <= 15:
                raise ValueError(f"{name} must be between 9 and 15, not {bits}")
        if not 1 <= self.memory_level <= 9:
            raise ValueError(f"memory_level must be between 1 and 9, not {self.memory_level}")
        if self.min_size < 0:
            raise ValueError(f"min_size must not be negative, not {self.min_size}")


@dataclass(frozen=True, slots=True)
class DeflateParams:
    """What both ends agreed for one connection: the values written in the server's response.

    Window bits are the *agreed* values and may be 8; the compressor silently uses 9 in that case.
    """

    server_no_context_takeover: bool
    client_no_context_takeover: bool
    server_max_window_bits: int
    client_max_window_bits: int

    def __post_init__(self) -> None:
        for name in ("server_max_window_bits", "client_max_window_bits"):
            bits = getattr(self, name)
            if not 8 <= bits <= 15:
                raise ValueError(f"{name} must be between 8 and 15, not {bits}")

    @property
    def shareable(self) -> bool:
        """Whether the server's compressed messages may be produced by :func:`compress_shared`.

        Only a server that resets its context for every message can send bytes compressed by someone else: with
        context takeover the client's window would contain data our own compressor never saw, and our next
        back-references would point at the wrong bytes.
        """
        return self.server_no_context_takeover


# --------------------------------------------------------------------------------------------------------------
# Sec-WebSocket-Extensions parsing, RFC 6455 section 9.1
# --------------------------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_QUOTED = re.compile(r'"((?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*)"')
_UNESCAPE = re.compile(r"\\(.)", re.DOTALL)


def _skip_ows(value: str, pos: int) -> int:
    """Skip optional whitespace (``OWS``, RFC 7230 section 3.2.3) around separators."""
    end = len(value)
    while pos < end and value[pos] in " \t":
        pos += 1
    return pos


def _token_at(value: str, pos: int, what: str) -> tuple[str, int]:
    match = _TOKEN.match(value, pos)
    if match is None:
        raise NegotiationError(f"invalid Sec-WebSocket-Extensions header: expected {what} at {pos}: {value!r}")
    return match.group(), match.end()


def _param_value_at(value: str, pos: int) -> tuple[str, int]:
    if value.startswith('"', pos):
        match = _QUOTED.match(value, pos)
        if match is None:
            raise NegotiationError(f"invalid Sec-WebSocket-Extensions header: bad quoted string at {pos}: {value!r}")
        unquoted = _UNESCAPE.sub(r"\1", match.group(1))
        # RFC 6455 section 9.1: "the value MUST conform to the 'token' ABNF" after unescaping.
        if _TOKEN.fullmatch(unquoted) is None:
            raise NegotiationError(
                f"invalid Sec-WebSocket-Extensions header: quoted value is not a token at {pos}: {value!r}"
            )
        return unquoted, match.end()
    return _token_at(value, pos, "parameter value")


def parse_extensions(header_values: Iterable[str]) -> list[Extension]:
    """Parse every ``Sec-WebSocket-Extensions`` line into ``[(name, [(param, value or None), ...]), ...]``.

    Several header lines are the same as one comma-joined line (RFC 7230 section 3.2.2), so the result is the
    offers of all lines in order. Empty list elements (``a, , b``) are skipped as RFC 7230 section 7 requires.
    Quoted values are returned unquoted. Raises :class:`NegotiationError` (400) on a syntax error.
    """
    extensions: list[Extension] = []
    for value in header_values:
        pos = 0
        end = len(value)
        while True:
            pos = _skip_ows(value, pos)
            if pos == end:
                break
            if value[pos] == ",":
                pos += 1
                continue
            name, pos = _token_at(value, pos, "extension name")
            params: list[ExtensionParam] = []
            pos = _skip_ows(value, pos)
            while pos < end and value[pos] == ";":
                pos = _skip_ows(value, pos + 1)
                param, pos = _token_at(value, pos, "parameter name")
                pos = _skip_ows(value, pos)
                param_value: str | None = None
                if pos < end and value[pos] == "=":
                    pos = _skip_ows(value, pos + 1)
                    param_value, pos = _param_value_at(value, pos)
                    pos = _skip_ows(value, pos)
                params.append((param, param_value))
            extensions.append((name, params))
            if pos == end:
                break
            if value[pos] != ",":
                raise NegotiationError(f"invalid Sec-WebSocket-Extensions header: expected ',' at {pos}: {value!r}")
    return extensions


# --------------------------------------------------------------------------------------------------------------
# Negotiation, RFC 7692 sections 5 and 7.1
# --------------------------------------------------------------------------------------------------------------


class _Declined(Exception):
    """An offer (or response) that breaks a RFC 7692 rule; its message says which."""


@dataclass(slots=True)
class _Parsed:
    """The four parameters of one offer or response as written; ``True`` is a window bits without a value."""

    server_no_context_takeover: bool = False
    client_no_context_takeover: bool = False
    server_max_window_bits: int | None = None
    client_max_window_bits: int | Literal[True] | None = None


def _parse_params(params: list[ExtensionParam], *, in_offer: bool) -> _Parsed:
    """Validate one permessage-deflate element (RFC 7692 section 7.1); raise :class:`_Declined` on a violation.

    ``client_max_window_bits`` without a value is only valid in an offer (section 7.1.2.2).
    """
    parsed = _Parsed()
    seen: set[str] = set()
    for raw_name, value in params:
        name = raw_name.lower()
        if name not in _PARAM_NAMES:
            raise _Declined(f"unknown parameter {raw_name}")
        if name in seen:
            raise _Declined(f"duplicate parameter {raw_name}")
        seen.add(name)
        if name.endswith("_no_context_takeover"):
            if value is not None:
                raise _Declined(f"{raw_name} must not have a value")
            setattr(parsed, name, True)
        elif value is None:
            if name == "server_max_window_bits" or not in_offer:
                raise _Declined(f"{raw_name} needs a value")
            parsed.client_max_window_bits = True
        elif value in _WINDOW_BITS_VALUES:
            setattr(parsed, name, _WINDOW_BITS_VALUES[value])
        else:
            raise _Declined(f"invalid value for {raw_name}: {value!r}")
    return parsed


def _build_header(
    *,
    server_no_context_takeover: bool,
    client_no_context_takeover: bool,
    server_max_window_bits: int | None,
    client_max_window_bits: int | Literal[True] | None,
) -> str:
    """Format one permessage-deflate element; ``True`` writes ``client_max_window_bits`` without a value."""
    parts = [EXTENSION_NAME]
    if server_no_context_takeover:
        parts.append("server_no_context_takeover")
    if client_no_context_takeover:
        parts.append("client_no_context_takeover")
    if server_max_window_bits is not None:
        parts.append(f"server_max_window_bits={server_max_window_bits}")
    if client_max_window_bits is True:
        parts.append("client_max_window_bits")
    elif client_max_window_bits is not None:
        parts.append(f"client_max_window_bits={client_max_window_bits}")
    return "; ".join(parts)


def _accept_offer(params: list[ExtensionParam], settings: DeflateSettings) -> tuple[str, DeflateParams]:
    """Answer one permessage-deflate offer, or raise :class:`_Declined`."""
    offer = _parse_params(params, in_offer=True)

    # No context takeover: the offer asks for it, or our configuration imposes it. A client's
    # client_no_context_takeover is only a hint (section 7.1.1.2); echoing it lets us drop the inflater between
    # messages, which is what saves memory on a server with many connections.
    server_nct = offer.server_no_context_takeover or settings.server_no_context_takeover
    client_nct = offer.client_no_context_takeover or settings.client_no_context_takeover

    # server_max_window_bits (section 7.1.2.1): the client's limit must be honoured and echoed with the same or a
    # smaller value. Without one we may still announce our own smaller window, which saves the client memory.
    server_bits = settings.server_max_window_bits
    if offer.server_max_window_bits is not None:
        server_bits = min(server_bits, offer.server_max_window_bits)
    announce_server_bits = offer.server_max_window_bits is not None or server_bits < 15

    # client_max_window_bits (section 7.1.2.2): only if the client offered the parameter may we answer with it.
    # If it did not, the offer is still accepted, but we cannot limit the client and must inflate with 15 bits.
    client_bits = 15
    announce_client_bits = False
    if offer.client_max_window_bits is not None:
        client_bits = settings.client_max_window_bits
        if offer.client_max_window_bits is not True:
            client_bits = min(client_bits, offer.client_max_window_bits)
        announce_client_bits = client_bits < 15

    agreed = DeflateParams(
        server_no_context_takeover=server_nct,
        client_no_context_takeover=client_nct,
        server_max_window_bits=server_bits,
        client_max_window_bits=client_bits,
    )
    header = _build_header(
        server_no_context_takeover=server_nct,
        client_no_context_takeover=client_nct,
        server_max_window_bits=server_bits if announce_server_bits else None,
        client_max_window_bits=client_bits if announce_client_bits else None,
    )
    return header, agreed


def negotiate_server(header_values: Iterable[str], settings: DeflateSettings) -> tuple[str, DeflateParams] | None:
    """Pick the first acceptable permessage-deflate offer of a client's ``Sec-WebSocket-Extensions`` lines.

    Returns the value of the ``Sec-WebSocket-Extensions`` response header and the agreed parameters, or ``None``
    when nothing acceptable was offered (the connection then runs uncompressed, which is not an error). Offers
    of other extensions are ignored; names are compared case-insensitively, like other HTTP tokens (no RFC
    requires it, and no client depends on the opposite). An offer that breaks RFC 7692 (unknown or duplicate
    parameter, invalid value) is declined and the next one is tried (section 5). Raises
    :class:`NegotiationError` (400) only when the header itself is malformed.
    """
    for name, params in parse_extensions(header_values):
        if name.lower() != EXTENSION_NAME:
            continue
        try:
            return _accept_offer(params, settings)
        except _Declined:
            continue
    return None


def client_offer(settings: DeflateSettings) -> str:
    """The ``Sec-WebSocket-Extensions`` value a client sends to offer permessage-deflate.

    ``client_max_window_bits`` is always present: without a value it tells the server we can obey any limit it
    chooses (section 7.1.2.2); with a value it announces our own limit.
    """
    return _build_header(
        server_no_context_takeover=settings.server_no_context_takeover,
        client_no_context_takeover=settings.client_no_context_takeover,
        server_max_window_bits=settings.server_max_window_bits if settings.server_max_window_bits < 15 else None,
        client_max_window_bits=settings.client_max_window_bits if settings.client_max_window_bits < 15 else True,
    )


def accept_response(header_values: Iterable[str], settings: DeflateSettings) -> DeflateParams | None:
    """Validate the server's ``Sec-WebSocket-Extensions`` response to :func:`client_offer` (client role).

    Returns the agreed parameters, or ``None`` if the server declined compression. Raises
    :class:`NegotiationError` when the response must fail the connection (RFC 7692 section 5.1, RFC 6455
    section 4.1): a malformed header, an extension we did not offer, permessage-deflate twice, an
    invalid/unknown/duplicate parameter, or a configuration that contradicts our offer.
    """
    elements = parse_extensions(header_values)
    found: list[ExtensionParam] | None = None
    for name, params in elements:
        if name.lower() != EXTENSION_NAME:
            raise NegotiationError(f"server accepted extension {name} that was not offered")
        if found is not None:
            raise NegotiationError("server accepted permessage-deflate twice")
        found = params
    if found is None:
        return None
    try:
        response = _parse_params(found, in_offer=False)
    except _Declined as exc:
        raise NegotiationError(f"invalid permessage-deflate response: {exc}") from None

    # Section 7.1.1.1: a server that accepts server_no_context_takeover must say so.
    if settings.server_no_context_takeover and not response.server_no_context_takeover:
        raise NegotiationError("server did not accept server_no_context_takeover")

    # Section 7.1.2.1: a limit we asked for must be echoed with the same or a smaller value.
    server_bits = response.server_max_window_bits
    if settings.server_max_window_bits < 15:
        if server_bits is None:
            raise NegotiationError("server did not accept server_max_window_bits")
        if server_bits > settings.server_max_window_bits:
            raise NegotiationError(f"server_max_window_bits={server_bits} exceeds the offered limit")

    # Section 7.1.2.2: we always offer client_max_window_bits; a value is binding, and must not exceed ours.
    client_bits = response.client_max_window_bits
    if client_bits is True:  # pragma: no cover - _parse_params(in_offer=False) already rejects a missing value
        raise NegotiationError("client_max_window_bits needs a value")
    if client_bits is not None and client_bits > settings.client_max_window_bits:
        raise NegotiationError(f"client_max_window_bits={client_bits} exceeds the offered limit")

    return DeflateParams(
        server_no_context_takeover=response.server_no_context_takeover,
        client_no_context_takeover=response.client_no_context_takeover or settings.client_no_context_takeover,
        server_max_window_bits=15 if server_bits is None else server_bits,
        client_max_window_bits=settings.client_max_window_bits if client_bits is None else client_bits,
    )


# --------------------------------------------------------------------------------------------------------------
# Compression, RFC 7692 section 7.2
# --------------------------------------------------------------------------------------------------------------


def _compressor(window_bits: int, memory_level: int, level: int) -> zlib._Compress:
    return zlib.compressobj(level, zlib.DEFLATED, -max(window_bits, _MIN_COMPRESS_BITS), memory_level)


def _finish(compressor: zlib._Compress, payload: bytes | bytearray | memoryview) -> bytes:
    """Compress one message and flush it to a byte boundary, without the trailing empty block (section 7.2.1)."""
    data = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
    # A sync flush always ends with an empty stored block; its LEN/NLEN are the 4 octets the receiver re-adds.
    if not data.endswith(_TAIL):  # pragma: no cover - zlib guarantees this
        raise RuntimeError("zlib sync flush did not end with an empty stored block")
    return data[:-4]


def compress_shared(
    payload: bytes | bytearray | memoryview,
    window_bits: int,
    memory_level: int,
    *,
    level: int = zlib.Z_DEFAULT_COMPRESSION,
) -> bytes:
    """Compress one message with a fresh context, so the same bytes can go to many connections.

    The output is valid for every recipient whose :attr:`DeflateParams.shareable` is true (the server uses no
    context takeover) and whose agreed ``server_max_window_bits`` is at least ``window_bits`` (an 8-bit
    recipient can take the 9-bit output, see the module docstring). A broadcast thus compresses once per
    distinct window size instead of once per recipient.
    """
    if not payload:
        return _EMPTY_MESSAGE
    return _finish(_compressor(window_bits, memory_level, level), payload)


class PerMessageDeflate:
    """Per-connection compressor/decompressor; created only when negotiated (no zlib objects otherwise).

    The zlib objects are created on first use and, when the corresponding side uses no context takeover,
    dropped again after every message: an idle connection then holds no zlib state at all (a compressor with
    15 window bits and memLevel 8 costs about 256 KiB, an inflater about 40 KiB).
    """

    __slots__ = (
        "_compress_bits",
        "_compress_reset",
        "_compressor",
        "_decompress_bits",
        "_decompress_reset",
        "_decompressor",
        "_level",
        "_memory_level",
        "min_size",
        "params",
    )

    def __init__(
        self,
        params: DeflateParams,
        *,
        is_server: bool = True,
        memory_level: int = 8,
        min_size: int = 0,
        level: int = zlib.Z_DEFAULT_COMPRESSION,
    ) -> None:
        if not 1 <= memory_level <= 9:
            raise ValueError(f"memory_level must be between 1 and 9, not {memory_level}")
        self.params = params
        self.min_size = min_size
        self._memory_level = memory_level
        self._level = level
        if is_server:
            own_bits, own_reset = params.server_max_window_bits, params.server_no_context_takeover
            peer_bits, peer_reset = params.client_max_window_bits, params.client_no_context_takeover
        else:
            own_bits, own_reset = params.client_max_window_bits, params.client_no_context_takeover
            peer_bits, peer_reset = params.server_max_window_bits, params.server_no_context_takeover
        self._compress_bits = max(own_bits, _MIN_COMPRESS_BITS)
        self._compress_reset = own_reset
        # Inflating with the agreed window (8 included) saves memory and, across messages, catches a peer that
        # exceeds it ("invalid distance too far back" -> 1007).
        self._decompress_bits = peer_bits
        self._decompress_reset = peer_reset
        self._compressor: zlib._Compress | None = None
        self._decompressor: zlib._Decompress | None = None

    def should_compress(self, size: int) -> bool:
        """Whether a message of ``size`` bytes is worth compressing (``min_size`` from the settings)."""
        return size >= self.min_size

    def compress(self, payload: bytes | bytearray | memoryview) -> bytes:
        """Compress one whole message; the result is the payload of a frame (or frames) with RSV1 on the first."""
        if not payload:
            # The compressor is not touched: an empty stored block adds nothing to the peer's window either.
            return _EMPTY_MESSAGE
        compressor = self._compressor
        if compressor is None:
            compressor = _compressor(self._compress_bits, self._memory_level, self._level)
        data = _finish(compressor, payload)
        self._compressor = None if self._compress_reset else compressor
        return data

    def decompress(self, payload: bytes | bytearray | memoryview, max_size: int | None) -> bytes:
        """Inflate one whole message (all fragments joined; RSV1 was set on the first frame).

        Never produces more than ``max_size + 1`` bytes: inflation is bounded with zlib's ``max_length``, so a
        small payload that would inflate to gigabytes costs no more than an honest message of ``max_size``.
        ``None`` disables the limit. Raises :class:`ProtocolError` 1009 when the message is bigger than
        ``max_size`` and 1007 when the data is not valid DEFLATE; the connection must close after either.

        An empty payload is accepted as an empty message without touching the inflater: strictly it is not valid
        (the sender must at least emit a block header), but feeding it the bare ``00 00 ff ff`` would leave the
        inflater inside a stored block and corrupt every later message on a context-takeover connection.
        """
        if not payload:
            return b""
        decompressor = self._decompressor
        if decompressor is None:
            decompressor = zlib.decompressobj(wbits=-self._decompress_bits)
        # Ask for one byte more than allowed: getting it proves the message is too big, and getting less proves
        # zlib consumed the whole input (it only stops early when the output limit is reached), so there is no
        # unconsumed_tail to loop over. max_length=0 means "no limit" to zlib.
        limit = 0 if max_size is None else max_size + 1
        self._decompressor = None  # until the message is complete: any error leaves the inflater unusable
        try:
            data = decompressor.decompress(payload, limit)
            if max_size is not None and len(data) > max_size:
                raise ProtocolError(CloseCode.MESSAGE_TOO_BIG, f"message inflates to more than {max_size} bytes")
            # The tail completes the sender's final empty stored block (section 7.2.2). Fed separately rather
            # than appended so a large payload is not copied; it only yields output held back by the sender's
            # bit buffer, hence still bounded by what is left of the limit.
            rest = decompressor.decompress(_TAIL, 0 if max_size is None else max_size + 1 - len(data))
        except zlib.error as exc:
            raise ProtocolError(CloseCode.INVALID_DATA, f"invalid compressed data: {exc}") from None
        if rest:
            data += rest
            if max_size is not None and len(data) > max_size:
                raise ProtocolError(CloseCode.MESSAGE_TOO_BIG, f"message inflates to more than {max_size} bytes")
        # A sender that ends messages with a BFINAL block (section 7.2.3.4) ends the DEFLATE stream: zlib will not
        # read past it, so the next message needs a new inflater. Such a sender cannot keep its own context
        # either, so nothing is lost by starting from an empty window.
        if not (self._decompress_reset or decompressor.eof):
            self._decompressor = decompressor
        return data
