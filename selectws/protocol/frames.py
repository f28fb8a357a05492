"""Frame-level pieces of RFC 6455 section 5: header encoding, masking, close payloads.

Everything here is a pure function of bytes. The parser itself lives in :mod:`selectws.protocol.connection`
because it needs the connection's state (fragmentation, limits) to judge a header before the payload arrives.
"""

from __future__ import annotations

import struct

from selectws.protocol.errors import CloseCode, ProtocolError, is_valid_close_code

__all__ = [
    "encode_close_payload",
    "encode_frame",
    "encode_header",
    "mask_in_place",
    "mask_payload",
    "parse_close_payload",
]


_PACK_16 = struct.Struct("!BBH").pack
_PACK_64 = struct.Struct("!BBQ").pack


def encode_header(first_byte: int, length: int, mask_bit: int = 0) -> bytes:
    """The 2-, 4- or 10-byte frame header for a payload of ``length`` bytes (RFC 6455 section 5.2).

    ``first_byte`` already holds FIN, RSV and the opcode; ``mask_bit`` is 0x80 in the client role.
    """
    if length < 126:
        return bytes((first_byte, mask_bit | length))
    if length < 65536:
        return _PACK_16(first_byte, mask_bit | 126, length)
    return _PACK_64(first_byte, mask_bit | 127, length)


#: From this size on, masking uses byte translation instead of big-integer XOR (measured crossover ~2 KiB).
TRANSLATE_MIN = 2048
_XOR_TABLES: list[bytes | None] = [None] * 256


def _xor_table(k: int) -> bytes:
    table = _XOR_TABLES[k]
    if table is None:
        table = _XOR_TABLES[k] = bytes([i ^ k for i in range(256)])
    return table


def mask_in_place(buf: bytearray, mask: bytes) -> None:
    """XOR ``buf`` with the repeating 4-byte ``mask``, in place, without a per-byte Python loop.

    Every fourth byte is XORed with the same mask byte, which ``bytes.translate`` does in C with a 256-byte
    table: four strided slices, four translations. About 1.1 ms per MiB here, against 3.4 ms for the
    big-integer XOR (whose ``from_bytes`` / ``to_bytes`` conversions dominate at that size).
    """
    for j in range(4):
        buf[j::4] = buf[j::4].translate(_xor_table(mask[j]))


def mask_payload(payload: bytes | bytearray | memoryview, mask: bytes) -> bytes:
    """XOR ``payload`` with the 4-byte ``mask`` (RFC 6455 section 5.3); masking and unmasking are the same.

    Small payloads: one XOR of two big integers (CPython's long arithmetic runs in C over 30-bit digits).
    Large ones: :func:`mask_in_place` on a copy. Never a per-byte loop in Python.
    """
    n = len(payload)
    if n == 0:
        return b""
    if n >= TRANSLATE_MIN:
        out = bytearray(payload)
        mask_in_place(out, mask)
        return bytes(out)
    key = (mask * ((n >> 2) + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


def encode_frame(
    opcode: int, payload: bytes | bytearray | memoryview, *, fin: bool = True, rsv1: bool = False,
    mask: bytes | None = None,
) -> bytes:
    """One whole frame. ``mask`` (4 bytes) is given in the client role, where every frame must be masked."""
    first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    if mask is None:
        return encode_header(first, len(payload)) + payload
    return encode_header(first, len(payload), 0x80) + mask + mask_payload(payload, mask)


def encode_close_payload(code: int | None, reason: str = "") -> bytes:
    """The body of a close frame: empty, or a 2-byte code and a UTF-8 reason of at most 123 bytes."""
    if code is None or code == CloseCode.NO_STATUS:
        return b""
    raw = reason.encode("utf-8")
    if len(raw) > 123:
        # Cut at a character boundary so the peer never sees a broken UTF-8 reason.
        raw = raw[:123].decode("utf-8", "ignore").encode("utf-8")
    return code.to_bytes(2, "big") + raw


def parse_close_payload(payload: bytes) -> tuple[int, str]:
    """Code and reason of a received close frame (RFC 6455 sections 5.5.1 and 7.4).

    An empty body means 1005 (no status). A 1-byte body, a code that may not be sent, or a reason that is not
    UTF-8 are protocol errors with the codes the RFC names (1002, 1002, 1007).
    """
    if not payload:
        return CloseCode.NO_STATUS, ""
    if len(payload) == 1:
        raise ProtocolError(CloseCode.PROTOCOL_ERROR, "close frame with a 1-byte payload")
    code = int.from_bytes(payload[:2], "big")
    if not is_valid_close_code(code):
        raise ProtocolError(CloseCode.PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(CloseCode.INVALID_DATA, "close reason is not valid UTF-8") from None
    return code, reason
