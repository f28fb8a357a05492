"""One message framed once for many recipients: the single framing path of a broadcast.

A broadcast goes to connections that may differ in how a message must look on the wire: uncompressed, compressed
without context takeover (the same bytes are valid for every such recipient of the same window size), or
compressed with a context of the recipient's own. :class:`SharedFrame` makes each shareable form once and hands
the very same ``bytes`` object to every recipient that takes it; for a recipient with its own compression
context it answers None, and that connection frames the message itself (``send_message``).
"""

from __future__ import annotations

from selectws.protocol.connection import Extension
from selectws.protocol.deflate import PerMessageDeflate, compress_shared
from selectws.protocol.frames import encode_frame

__all__ = ["SharedFrame"]


class SharedFrame:
    """The wire forms of one message, each built on first use and then shared."""

    __slots__ = ("_compressed", "_memory_level", "_opcode", "_payload", "plain")

    def __init__(self, message: str | bytes, memory_level: int = 8) -> None:
        text = isinstance(message, str)
        self._opcode = 0x01 if text else 0x02
        self._payload: bytes = message.encode("utf-8") if isinstance(message, str) else message
        self._memory_level = memory_level
        self._compressed: dict[int, bytes] = {}  # window bits -> the compressed frame
        #: The uncompressed frame (for recipients without permessage-deflate, or below its ``min_size``).
        self.plain = encode_frame(self._opcode, self._payload)

    def for_extension(self, extension: Extension | None) -> bytes | None:
        """The frame for a recipient with ``extension``; None when it must compress with its own context."""
        payload = self._payload
        if extension is None or not extension.should_compress(len(payload)):
            return self.plain
        if not isinstance(extension, PerMessageDeflate) or not extension.params.shareable:
            return None
        # No context takeover on our side: the same compressed bytes are valid for all such recipients.
        bits = max(9, extension.params.server_max_window_bits)
        frame = self._compressed.get(bits)
        if frame is None:
            frame = self._compressed[bits] = encode_frame(
                self._opcode, compress_shared(payload, bits, self._memory_level), rsv1=True
            )
        return frame
