"""Frame-level pieces of RFC 6455 section 5: header encoding, masking, close payloads.

Everything here is a function of bytes alone (``mask_inplace`` and ``mask_into`` write into the buffer they are
given). Masking runs in C when the optional extension ``selectws.protocol._speedups`` is built (setup.py) and
``SELECTWS_NO_SPEEDUPS`` is not set, in pure Python otherwise; both give the same bytes. The parser itself lives
in :mod:`selectws.protocol.connection` because it needs the connection's state (fragmentation, limits) to judge a
header before the payload arrives.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from types import ModuleType
from typing import Protocol

from selectws.protocol.errors import CloseCode, ProtocolError, is_valid_close_code

__all__ = [
    "SPEEDUPS",
    "SPEEDUPS_ACTIVE",
    "BytesPayload",
    "Payload",
    "PayloadBuffer",
    "apply_mask",
    "encode_close_payload",
    "encode_frame",
    "encode_header",
    "mask_in_place",
    "mask_inplace",
    "mask_into",
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


#: From this size on, pure-Python masking uses byte translation instead of big-integer XOR (measured crossover
#: ~2 KiB).
TRANSLATE_MIN = 2048
_XOR_TABLES: list[bytes | None] = [None] * 256


def _xor_table(k: int) -> bytes:
    table = _XOR_TABLES[k]
    if table is None:
        table = _XOR_TABLES[k] = bytes([i ^ k for i in range(256)])
    return table


# ---------------------------------------------------------------------------------------------- pure Python
# Three functions and a class, each with a C twin in the optional extension selectws/protocol/_speedups.c (same names,
# same results; tests/unit/test_mask_speedups.py compares them). mask[0] always applies to the first byte given.


def _py_apply_mask(data: bytes | bytearray | memoryview, mask: bytes) -> bytes:
    """``data`` XOR the repeating 4-byte ``mask``, as new bytes.

    Small payloads: one XOR of two big integers (CPython's long arithmetic runs in C over 30-bit digits).
    Large ones: :func:`_py_mask_inplace` on a copy. Never a per-byte loop in Python.
    """
    if len(mask) != 4:
        raise ValueError("mask must be 4 bytes")
    if type(data) is memoryview and not (data.c_contiguous and data.itemsize == 1):
        data = data.tobytes()  # a strided view: its bytes in logical order, as the C version reads it
    n = len(data)
    if n == 0:
        return b""
    if n >= TRANSLATE_MIN:
        out = bytearray(data)
        _py_mask_inplace(out, mask)
        return bytes(out)
    key = (mask * ((n >> 2) + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


def _py_mask_inplace(buf: bytearray | memoryview, mask: bytes) -> None:
    """XOR the writable ``buf`` with the repeating 4-byte ``mask``, in place, without a per-byte Python loop.

    Every fourth byte is XORed with the same mask byte, which ``bytes.translate`` does in C with a 256-byte
    table: four strided slices, four translations (about 0.85 ms per MiB here; the C version takes ~20 µs).
    """
    if len(mask) != 4:
        raise ValueError("mask must be 4 bytes")
    if type(buf) is bytearray:
        for j in range(4):
            buf[j::4] = buf[j::4].translate(_xor_table(mask[j]))
        return
    view = memoryview(buf)
    if view.readonly:
        raise TypeError("mask_inplace() needs a writable buffer")
    if view.itemsize != 1:
        view = view.cast("B")
    for j in range(4):
        view[j::4] = bytes(view[j::4]).translate(_xor_table(mask[j]))


def _py_mask_into(dst: bytearray | memoryview, offset: int, src: bytes | bytearray | memoryview, mask: bytes) -> None:
    """``dst[offset:offset + len(src)] = src`` XOR the repeating 4-byte ``mask``: one copy, then the strided
    translations of :func:`_py_mask_inplace` on that region of ``dst``."""
    if len(mask) != 4:
        raise ValueError("mask must be 4 bytes")
    if type(src) is memoryview and not (src.c_contiguous and src.itemsize == 1):
        src = src.tobytes()
    n = len(src)
    if offset < 0 or offset > len(dst) or n > len(dst) - offset:
        raise ValueError(f"mask_into: {n} bytes at offset {offset} do not fit a buffer of {len(dst)}")
    if type(dst) is not bytearray:
        _py_mask_into_view(memoryview(dst), offset, src, mask)
        return
    end = offset + n
    if n >= TRANSLATE_MIN:
        dst[offset:end] = src
        for j in range(4):
            region = slice(offset + j, end, 4)
            dst[region] = dst[region].translate(_xor_table(mask[j]))
    elif n:
        dst[offset:end] = _py_apply_mask(src, mask)


def _py_mask_into_view(dst: memoryview, offset: int, src: bytes | bytearray | memoryview, mask: bytes) -> None:
    if dst.readonly:
        raise TypeError("mask_into() needs a writable buffer")
    if dst.itemsize != 1:
        dst = dst.cast("B")
    dst[offset : offset + len(src)] = _py_apply_mask(src, mask)


class PayloadBuffer:
    """A payload arriving in pieces (a large frame over several reads), unmasked piece by piece into a bytearray
    sized from the frame header: no growing buffer, no copy of the masked bytes.

    The pure-Python twin of the C ``BytesPayload`` (same ``feed`` / ``missing`` / ``take``); the connection also
    uses it where it wants the bytearray itself (``buf``: text checked as it arrives, fragments of a message)."""

    __slots__ = ("buf", "filled", "mask")

    def __init__(self, length: int, mask: bytes | None = None) -> None:
        if length < 0:
            raise ValueError("BytesPayload: negative length")
        if mask is not None and len(mask) != 4:
            raise ValueError("mask must be 4 bytes")
        self.buf: bytearray | None = bytearray(length)
        self.filled = 0
        self.mask = mask

    @property
    def missing(self) -> int:
        """Bytes still to come."""
        return 0 if self.buf is None else len(self.buf) - self.filled

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        """Unmask (or copy, without a mask) the start of ``data`` into the payload, as much as it still misses;
        returns how many bytes of ``data`` that was."""
        buf = self.buf
        if buf is None:
            raise ValueError("BytesPayload: already taken")
        if type(data) is memoryview and not (data.c_contiguous and data.itemsize == 1):
            data = data.tobytes()
        filled = self.filled
        n = len(buf) - filled
        if len(data) > n:
            data = memoryview(data)[:n]
        else:
            n = len(data)
        mask = self.mask
        if mask is None:
            buf[filled : filled + n] = data
        else:
            shift = filled & 3  # the mask's phase at this offset of the payload
            mask_into(buf, filled, data, mask[shift:] + mask[:shift] if shift else mask)
        self.filled = filled + n
        return n

    def take(self) -> bytes:
        """The complete payload, as bytes (ValueError while bytes are missing); empty afterwards."""
        buf = self.buf
        if buf is None:
            raise ValueError("BytesPayload: already taken")
        if self.filled < len(buf):
            raise ValueError(f"BytesPayload: {len(buf) - self.filled} of {len(buf)} bytes still missing")
        self.buf = None
        return bytes(buf)


class Payload(Protocol):
    """What :class:`PayloadBuffer` and the C ``BytesPayload`` have in common."""

    @property
    def missing(self) -> int: ...

    def feed(self, data: bytes | bytearray | memoryview, /) -> int: ...

    def take(self) -> bytes: ...


# ---------------------------------------------------------------------------------------------- selection
#: Set (to anything but "" or "0") in the environment: use the pure-Python masking even when the C extension is
#: built. Read once, at import.
NO_SPEEDUPS_ENV = "SELECTWS_NO_SPEEDUPS"


def _load_speedups() -> tuple[ModuleType | None, str]:
    if os.environ.get(NO_SPEEDUPS_ENV, "") not in ("", "0"):
        return None, f"off, pure Python ({NO_SPEEDUPS_ENV}=1)"
    try:
        from selectws.protocol import _speedups
    except ImportError:
        return None, "off, pure Python (the C extension is not built)"
    return _speedups, "C"


_c, SPEEDUPS = _load_speedups()  # "C", or "off, pure Python (<why>)": ``selectws --version`` shows it
#: Whether masking runs in C (the optional extension is built and not disabled by ``SELECTWS_NO_SPEEDUPS``).
SPEEDUPS_ACTIVE = _c is not None

apply_mask: Callable[[bytes | bytearray | memoryview, bytes], bytes]
mask_inplace: Callable[[bytearray | memoryview, bytes], None]
mask_into: Callable[[bytearray | memoryview, int, bytes | bytearray | memoryview, bytes], None]
#: ``BytesPayload(length, mask)``: a payload unmasked piece by piece; ``take()`` gives its bytes. In C the pieces
#: go straight into the bytes object the message carries (no zero-filled buffer, no copy at the end).
BytesPayload: Callable[[int, bytes | None], Payload]
if _c is not None:
    apply_mask, mask_inplace, mask_into = _c.apply_mask, _c.mask_inplace, _c.mask_into
    BytesPayload = _c.BytesPayload
else:
    apply_mask, mask_inplace, mask_into = _py_apply_mask, _py_mask_inplace, _py_mask_into
    BytesPayload = PayloadBuffer

#: The C module itself (None on the pure-Python path): the protocol core takes its frame scanner from it.
speedups: ModuleType | None = _c

#: The names the rest of the package (and older callers) use: masking and unmasking are the same XOR.
mask_payload = apply_mask
mask_in_place = mask_inplace


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
