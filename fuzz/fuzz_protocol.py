"""Coverage-guided fuzz targets (atheris / libFuzzer) for the sans-I/O protocol core.

Usage::

    python fuzz/fuzz_protocol.py TARGET [libFuzzer options] [CORPUS_DIR ...]
    python fuzz/fuzz_protocol.py --seed TARGET DIR     # write a few valid inputs into DIR

TARGET is one of ``frames``, ``frames_deflate``, ``frames_client``, ``http``, ``extensions``.
See fuzz/README.md and fuzz/run.sh.

Every target checks the contracts of the core, and any violation is raised as an exception (a libFuzzer crash):

* ``frames`` / ``frames_deflate`` (server role), ``frames_client`` (client role, unmasked frames, deflate when
  bit 2 of the config byte is set): ``Connection.receive_data`` never raises; the events and the bytes
  queued for sending are identical whether the stream is fed whole or cut at the split points taken from the head
  of the input; nothing follows a ``Closed`` event; ``data_to_send()`` returns ``bytes``; a failure's close code is
  one that may be sent on the wire.
* ``http``: ``parse_request`` raises nothing but ``HandshakeError``; whole and byte-split feeding agree.
* ``extensions``: ``parse_extensions`` / ``negotiate_server`` raise only ``NegotiationError``; ``decompress``
  raises only ``ProtocolError`` (1007 or 1009).

Input layout of the frame targets: ``[config byte][split count byte][2 bytes per split point...][stream]``.
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Callable

import atheris

with atheris.instrument_imports(include=["selectws"]):
    from selectws.protocol.connection import CLIENT, SERVER, Connection
    from selectws.protocol.deflate import (
        DeflateParams,
        DeflateSettings,
        PerMessageDeflate,
        negotiate_server,
        parse_extensions,
    )
    from selectws.protocol.errors import HandshakeError, NegotiationError, ProtocolError, is_valid_close_code
    from selectws.protocol.events import Closed, Event
    from selectws.protocol.http11 import HttpLimits, parse_request

# --------------------------------------------------------------------------------------------------------------
# frames
# --------------------------------------------------------------------------------------------------------------

_MAX_SIZES = (1 << 20, 1 << 10, 200, 0)


def _params(config: int) -> DeflateParams:
    return DeflateParams(
        server_no_context_takeover=bool(config & 0x10),
        client_no_context_takeover=bool(config & 0x20),
        server_max_window_bits=15,
        client_max_window_bits=(15, 8, 9, 12)[(config >> 6) & 3],
    )


def _fixed_masks() -> Callable[[], bytes]:
    masks = iter(range(1 << 30))
    return lambda: (next(masks) * 0x9E3779B1 & 0xFFFFFFFF).to_bytes(4, "big")


def _make_server(config: int, deflate: bool, client: bool = False) -> Connection:
    extension = PerMessageDeflate(_params(config), is_server=not client) if deflate else None
    if client:  # the client role reads unmasked frames from a server (and masks what it sends)
        conn = Connection(CLIENT, max_message_size=_MAX_SIZES[config & 3], extension=extension,
                          mask_source=_fixed_masks())
    else:
        conn = Connection(SERVER, max_message_size=_MAX_SIZES[config & 3], extension=extension)
    if config & 0x08:  # we started the closing handshake first (state CLOSING)
        conn.close(1001, "going")
        conn.data_to_send()
    return conn


def _split_input(data: bytes) -> tuple[int, list[int], bytes]:
    if len(data) < 2:
        return 0, [], b""
    config, count = data[0], data[1] & 7
    head = 2 + 2 * count
    points = sorted({int.from_bytes(data[2 + 2 * k : 4 + 2 * k], "big") for k in range(count)})
    stream = data[head:]
    return config, [p for p in points if 0 < p < len(stream)], stream


def _feed(conn: Connection, chunks: list[bytes]) -> tuple[list[Event], bytes]:
    events: list[Event] = []
    out: list[bytes] = []
    for chunk in chunks:
        new = conn.receive_data(chunk)
        while conn.events_held:  # the driver rule: the events held back come with receive_data(b"")
            if any(isinstance(e, Closed) for e in new):
                raise AssertionError(f"Closed returned while events are held: {new!r}")
            new += conn.receive_data(b"")
        if new and any(isinstance(e, Closed) for e in events):
            raise AssertionError(f"events after Closed: {new!r}")
        events.extend(new)
        sent = conn.data_to_send()
        if type(sent) is not bytes:
            raise AssertionError(f"data_to_send() returned {type(sent).__name__}")
        out.append(sent)
    closed = [e for e in events if isinstance(e, Closed)]
    if len(closed) > 1 or (closed and events[-1] is not closed[0]):
        raise AssertionError(f"Closed not last or not unique: {events!r}")
    for e in closed:
        if e.error is not None and not is_valid_close_code(e.code):
            raise AssertionError(f"failure with unsendable close code: {e!r}")
    return events, b"".join(out)


def check_frames(data: bytes, deflate: bool, client: bool = False) -> None:
    config, points, stream = _split_input(data)
    if client:
        deflate = bool(config & 0x04)
    whole = _feed(_make_server(config, deflate, client), [stream])
    bounds = [0, *points, len(stream)]
    pieces = [stream[a:b] for a, b in itertools.pairwise(bounds)]
    # memoryview and bytearray chunks too: the driver passes views of its receive buffer.
    kinds: list[Callable[[bytes], bytes]] = [bytes, bytearray, memoryview]  # type: ignore[list-item]
    pieces = [kinds[(config >> 2) % 3](p) for p in pieces]
    split = _feed(_make_server(config, deflate, client), pieces)
    if whole != split:
        raise AssertionError(f"split-dependent result:\n whole={whole!r}\n split={split!r}\n points={points}")


# --------------------------------------------------------------------------------------------------------------
# http
# --------------------------------------------------------------------------------------------------------------

_LIMITS = (HttpLimits(), HttpLimits(max_request_line=64, max_header_count=4, max_header_bytes=256))


def _parse(buf: bytes, limits: HttpLimits) -> object:
    try:
        result = parse_request(buf, limits)
    except HandshakeError as exc:
        return ("error", exc.status)
    if result is None:
        return None
    request, used = result
    return (request.method, request.target, request.version, list(request.headers), request.path,
            request.query, request.head, used)


def check_http(data: bytes) -> None:
    if not data:
        return
    limits = _LIMITS[data[0] & 1]
    buf = data[1:]
    whole = _parse(buf, limits)
    if isinstance(whole, tuple) and whole[0] != "error" and whole[-1] > limits.max_header_bytes + 4:  # type: ignore[operator]
        raise AssertionError(f"head over max_header_bytes accepted: {whole!r}")
    # Byte by byte, as a server accumulating a slow client: the first non-None answer must equal the whole one's
    # unless the whole buffer held more than the head (then the prefix answer is the same request or the same error).
    for n in range(len(buf) + 1):
        part = _parse(buf[:n], limits)
        if part is not None:
            if n == len(buf) and part != whole:
                raise AssertionError(f"prefix disagreement: {part!r} != {whole!r}")
            if isinstance(part, tuple) and part[0] != "error" and part != whole:
                raise AssertionError(f"request parsed differently on a prefix: {part!r} != {whole!r}")
            break


# --------------------------------------------------------------------------------------------------------------
# extensions + decompress
# --------------------------------------------------------------------------------------------------------------

_SETTINGS = (DeflateSettings(), DeflateSettings(server_max_window_bits=9, client_max_window_bits=10,
                                                server_no_context_takeover=True))


def check_extensions(data: bytes) -> None:
    if not data:
        return
    mode, body = data[0], data[1:]
    if mode & 1:
        text = body.decode("latin-1")
        try:
            parse_extensions(text.split("\n"))
        except NegotiationError:
            pass
        try:
            result = negotiate_server(text.split("\n"), _SETTINGS[(mode >> 1) & 1])
        except NegotiationError:
            return
        if result is not None:
            header, params = result
            # What we answer must itself parse as one permessage-deflate element.
            if [name for name, _ in parse_extensions([header])] != ["permessage-deflate"]:
                raise AssertionError(f"bad answer {header!r}")
            PerMessageDeflate(params)
    else:
        params = _params(mode)
        codec = PerMessageDeflate(params, is_server=True)
        max_size = _MAX_SIZES[(mode >> 1) & 3] or None
        # Several messages on one codec, so the context-takeover path is exercised too.
        for payload in body.split(b"\xfe\xfe"):
            try:
                out = codec.decompress(payload, max_size)
            except ProtocolError as exc:
                if exc.code not in (1007, 1009):
                    raise AssertionError(f"unexpected close code {exc.code}") from None
                return
            if max_size is not None and len(out) > max_size:
                raise AssertionError("decompress exceeded max_size")


# --------------------------------------------------------------------------------------------------------------

TARGETS: dict[str, Callable[[bytes], None]] = {
    "frames": lambda data: check_frames(data, False),
    "frames_deflate": lambda data: check_frames(data, True),
    "frames_client": lambda data: check_frames(data, False, client=True),
    "http": check_http,
    "extensions": check_extensions,
}


def _client_stream(config: int, deflate: bool, from_server: bool = False) -> bytes:
    """What a client (or, ``from_server``, a server) sends: frames to seed the corpus with."""
    masks = iter([bytes([n, 0x5A, 0xA5, n ^ 0xFF]) for n in range(100)])
    ext = PerMessageDeflate(_params(config), is_server=from_server) if deflate else None
    if from_server:
        client = Connection(SERVER, extension=ext)
    else:
        client = Connection(CLIENT, extension=ext, mask_source=lambda: next(masks))
    client.send_text("Hello, wörld 🌍")
    client.send_binary(bytes(range(200)))
    client.send_ping(b"ping")
    client.send_fragment(0x01, b"frag", False)
    client.send_fragment(0x00, b"ment", True)
    client.send_text("x" * 300)
    client.close(1000, "bye")
    return client.data_to_send()


def seeds(target: str) -> list[bytes]:
    """A few valid inputs in the target's own layout."""
    if target in ("frames", "frames_deflate", "frames_client"):
        out = []
        for config in (0x00, 0x30, 0x40, 0x04, 0x34):
            deflate = target == "frames_deflate" or (target == "frames_client" and bool(config & 0x04))
            stream = _client_stream(config, deflate, from_server=target == "frames_client")
            out.append(bytes([config, 0]) + stream)
            out.append(bytes([config, 2]) + (3).to_bytes(2, "big") + (40).to_bytes(2, "big") + stream)
        return out
    if target == "http":
        request = (
            b"GET /chat?room=a%20b&x=1 HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n"
        )
        return [b"\x00" + request, b"\x01" + request, b"\x00GET / HTTP/1.0\r\n\r\n\x81\x80abcd"]
    if target == "extensions":
        import zlib

        comp = zlib.compressobj(wbits=-15)
        payload = comp.compress(b"hello hello hello") + comp.flush(zlib.Z_SYNC_FLUSH)
        return [
            b"\x01permessage-deflate; client_max_window_bits; server_max_window_bits=10, permessage-deflate",
            b'\x03x-foo; a="b", permessage-deflate;server_no_context_takeover\npermessage-deflate',
            b"\x00" + payload[:-4],
            b"\x02" + payload[:-4] + b"\xfe\xfe" + payload[:-4],
        ]
    raise SystemExit(f"unknown target {target!r}")


def main() -> None:
    if len(sys.argv) >= 2 and sys.argv[1] == "--seed":
        target, directory = sys.argv[2], sys.argv[3]
        os.makedirs(directory, exist_ok=True)
        for n, seed in enumerate(seeds(target)):
            with open(os.path.join(directory, f"seed-{n}"), "wb") as f:
                f.write(seed)
        return
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        raise SystemExit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer args]")
    target = TARGETS[sys.argv.pop(1)]
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
