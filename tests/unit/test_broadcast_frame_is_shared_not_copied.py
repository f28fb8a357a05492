"""SharedFrame: one broadcast message is framed once per wire form, and every recipient gets the same object."""

from __future__ import annotations

import zlib

from selectws.protocol.broadcast import SharedFrame
from selectws.protocol.deflate import DeflateParams, PerMessageDeflate


def _ext(no_takeover: bool, bits: int = 15, min_size: int = 0) -> PerMessageDeflate:
    return PerMessageDeflate(DeflateParams(no_takeover, False, bits, 15), is_server=True, min_size=min_size)


def test_uncompressed_recipients_share_one_frame_object() -> None:
    shared = SharedFrame("hello")
    assert shared.plain == b"\x81\x05hello"
    assert shared.for_extension(None) is shared.plain
    assert SharedFrame(b"\x00\x01").plain == b"\x82\x02\x00\x01"


def test_shareable_compressed_recipients_of_one_window_share_one_frame_object() -> None:
    message = "the same bytes for everybody " * 20
    shared = SharedFrame(message)
    first = shared.for_extension(_ext(True))
    second = shared.for_extension(_ext(True))
    assert first is not None and first is second
    assert first[0] == 0xC1  # FIN + RSV1 + text
    payload = first[4:] if first[1] == 126 else first[2:]
    assert zlib.decompressobj(-15).decompress(payload + b"\x00\x00\xff\xff").decode() == message


def test_each_window_size_gets_its_own_compressed_frame() -> None:
    shared = SharedFrame("x" * 500)
    assert shared.for_extension(_ext(True, 10)) is not shared.for_extension(_ext(True, 15))
    assert shared.for_extension(_ext(True, 8)) is shared.for_extension(_ext(True, 9))  # 8 is compressed as 9


def test_a_recipient_with_its_own_context_frames_the_message_itself() -> None:
    assert SharedFrame("x" * 500).for_extension(_ext(False)) is None


def test_messages_below_min_size_go_uncompressed() -> None:
    shared = SharedFrame("tiny")
    assert shared.for_extension(_ext(True, min_size=100)) is shared.plain
