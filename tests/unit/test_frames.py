"""Frame-level pure functions of RFC 6455 section 5, checked byte by byte.

Classes follow the RFC: header encoding (section 5.2), masking (section 5.3), the examples of section 5.7, and
close payloads (sections 5.5.1 and 7.4).
"""

from __future__ import annotations

import random
import struct

import pytest

from selectws.protocol.errors import CloseCode, ProtocolError, is_valid_close_code
from selectws.protocol.frames import (
    encode_close_payload,
    encode_frame,
    encode_header,
    mask_payload,
    parse_close_payload,
)

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA  # RFC 6455 section 5.2

RFC_MASK = b"\x37\xfa\x21\x3d"  # the mask of the RFC 6455 section 5.7 examples


def reference_mask(payload: bytes, mask: bytes) -> bytes:
    """The RFC's definition, literally: octet i of the result is octet i of the payload XOR mask[i % 4]."""
    return bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class TestSection5_2HeaderEncoding:
    @pytest.mark.parametrize(
        ("length", "expected"),
        [
            (0, b"\x82\x00"),
            (1, b"\x82\x01"),
            (125, b"\x82\x7d"),
            (126, b"\x82\x7e\x00\x7e"),
            (127, b"\x82\x7e\x00\x7f"),
            (256, b"\x82\x7e\x01\x00"),
            (65535, b"\x82\x7e\xff\xff"),
            (65536, b"\x82\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
            (2**32, b"\x82\x7f\x00\x00\x00\x01\x00\x00\x00\x00"),
            (2**63 - 1, b"\x82\x7f\x7f\xff\xff\xff\xff\xff\xff\xff"),
        ],
    )
    def test_length_forms(self, length: int, expected: bytes) -> None:
        assert encode_header(0x82, length) == expected

    @pytest.mark.parametrize(
        ("length", "second", "size"),
        [(0, 0x80, 2), (125, 0xFD, 2), (126, 0xFE, 4), (65535, 0xFE, 4), (65536, 0xFF, 10)],
    )
    def test_mask_bit(self, length: int, second: int, size: int) -> None:
        header = encode_header(0x81, length, 0x80)
        assert header[0] == 0x81
        assert header[1] == second
        assert len(header) == size

    def test_first_byte_is_passed_through(self) -> None:
        for first in (0x00, 0x01, 0x80, 0x88, 0xC1, 0x7F, 0xFF):
            assert encode_header(first, 3) == bytes((first, 3))

    def test_encode_frame_flags(self) -> None:
        assert encode_frame(TEXT, b"a") == b"\x81\x01a"
        assert encode_frame(TEXT, b"a", fin=False) == b"\x01\x01a"
        assert encode_frame(CONT, b"b") == b"\x80\x01b"
        assert encode_frame(BINARY, b"c", rsv1=True) == b"\xc2\x01c"
        assert encode_frame(PING, b"") == b"\x89\x00"
        assert encode_frame(CLOSE, b"\x03\xe8") == b"\x88\x02\x03\xe8"

    @pytest.mark.parametrize("length", [0, 1, 125, 126, 65535, 65536])
    def test_encode_frame_masked_boundaries(self, length: int) -> None:
        payload = bytes(i & 0xFF for i in range(length))
        mask = b"\x01\x02\x03\x04"
        frame = encode_frame(BINARY, payload, mask=mask)
        header = encode_header(0x82, length, 0x80)
        assert frame[: len(header)] == header
        assert frame[len(header) : len(header) + 4] == mask
        assert frame[len(header) + 4 :] == reference_mask(payload, mask)
        assert len(frame) == len(header) + 4 + length


class TestSection5_3Masking:
    @pytest.mark.parametrize("length", range(71))
    def test_against_reference(self, length: int) -> None:
        rng = random.Random(length)
        payload = bytes(rng.randrange(256) for _ in range(length))
        for mask in (RFC_MASK, b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", b"\x01\x80\x00\xfe"):
            assert mask_payload(payload, mask) == reference_mask(payload, mask)

    def test_one_mebibyte(self) -> None:
        rng = random.Random(1)
        payload = rng.randbytes(1 << 20)
        masked = mask_payload(payload, RFC_MASK)
        # The reference per byte on 1 MiB is slow in bytecode; compare via a pre-expanded key instead, and a
        # few spot checks with the literal definition.
        key = RFC_MASK * (1 << 18)
        assert masked == bytes(a ^ b for a, b in zip(payload, key, strict=True))
        for i in (0, 1, 2, 3, 4, 65535, 65536, (1 << 20) - 1):
            assert masked[i] == payload[i] ^ RFC_MASK[i % 4]
        assert mask_payload(masked, RFC_MASK) == payload

    def test_involution(self) -> None:
        payload = b"the same function masks and unmasks"
        assert mask_payload(mask_payload(payload, RFC_MASK), RFC_MASK) == payload

    def test_accepts_bytearray_and_memoryview(self) -> None:
        payload = bytes(range(37))
        expected = reference_mask(payload, RFC_MASK)
        assert mask_payload(bytearray(payload), RFC_MASK) == expected
        assert mask_payload(memoryview(payload), RFC_MASK) == expected
        assert mask_payload(memoryview(b"xx" + payload)[2:], RFC_MASK) == expected

    def test_leading_and_trailing_zero_bytes_are_kept(self) -> None:
        # Integer-based XOR must not drop zero bytes at either end.
        payload = b"\x00\x00abc\x00\x00"
        assert mask_payload(payload, b"\x00\x00\x00\x00") == payload
        assert mask_payload(RFC_MASK * 2, RFC_MASK) == b"\x00" * 8
        assert len(mask_payload(b"\x00" * 9, b"\x00\x00\x00\x00")) == 9

    def test_empty(self) -> None:
        assert mask_payload(b"", RFC_MASK) == b""

    def test_result_is_bytes(self) -> None:
        assert type(mask_payload(bytearray(b"abc"), RFC_MASK)) is bytes


class TestSection5_7Examples:
    def test_unmasked_hello(self) -> None:
        assert encode_frame(TEXT, b"Hello") == bytes([0x81, 0x05, 0x48, 0x65, 0x6C, 0x6C, 0x6F])

    def test_masked_hello(self) -> None:
        expected = bytes([0x81, 0x85, 0x37, 0xFA, 0x21, 0x3D, 0x7F, 0x9F, 0x4D, 0x51, 0x58])
        assert encode_frame(TEXT, b"Hello", mask=RFC_MASK) == expected
        assert mask_payload(expected[6:], RFC_MASK) == b"Hello"

    def test_fragmented_unmasked_text(self) -> None:
        assert encode_frame(TEXT, b"Hel", fin=False) == bytes([0x01, 0x03, 0x48, 0x65, 0x6C])
        assert encode_frame(CONT, b"lo") == bytes([0x80, 0x02, 0x6C, 0x6F])

    def test_ping_and_pong(self) -> None:
        assert encode_frame(PING, b"Hello") == bytes([0x89, 0x05, 0x48, 0x65, 0x6C, 0x6C, 0x6F])
        expected_pong = bytes([0x8A, 0x85, 0x37, 0xFA, 0x21, 0x3D, 0x7F, 0x9F, 0x4D, 0x51, 0x58])
        assert encode_frame(PONG, b"Hello", mask=RFC_MASK) == expected_pong

    def test_256_bytes_binary(self) -> None:
        payload = bytes(range(256))
        frame = encode_frame(BINARY, payload)
        assert frame[:4] == b"\x82\x7e\x01\x00"
        assert frame[4:] == payload

    def test_64_kib_binary(self) -> None:
        payload = bytes(65536)
        frame = encode_frame(BINARY, payload)
        assert frame[:10] == b"\x82\x7f\x00\x00\x00\x00\x00\x01\x00\x00"
        assert len(frame) == 10 + 65536


class TestSection7_4CloseCodeValidity:
    @pytest.mark.parametrize(
        ("low", "high", "valid"),
        [
            (0, 999, False),
            (1000, 1003, True),
            (1004, 1006, False),
            (1007, 1014, True),
            (1015, 1015, False),
            (1016, 2999, False),
            (3000, 4999, True),
            (5000, 65535, False),
        ],
    )
    def test_classes(self, low: int, high: int, valid: bool) -> None:
        for code in range(low, high + 1):
            assert is_valid_close_code(code) is valid, code

    def test_never_on_the_wire(self) -> None:
        for code in (CloseCode.NO_STATUS, CloseCode.ABNORMAL, CloseCode.TLS_HANDSHAKE):
            assert not is_valid_close_code(code)


class TestSection5_5_1CloseEncoding:
    def test_code_only(self) -> None:
        assert encode_close_payload(1000) == b"\x03\xe8"
        assert encode_close_payload(CloseCode.GOING_AWAY) == b"\x03\xe9"
        assert encode_close_payload(4999) == b"\x13\x87"

    def test_code_and_reason(self) -> None:
        assert encode_close_payload(1001, "bye") == b"\x03\xe9bye"
        assert encode_close_payload(1000, "é") == b"\x03\xe8\xc3\xa9"

    def test_no_status(self) -> None:
        assert encode_close_payload(None) == b""
        assert encode_close_payload(None, "ignored") == b""
        assert encode_close_payload(CloseCode.NO_STATUS, "ignored") == b""

    def test_reason_exactly_123_bytes_kept(self) -> None:
        reason = "x" * 123
        assert encode_close_payload(1000, reason) == b"\x03\xe8" + reason.encode()

    def test_ascii_reason_truncated_to_123(self) -> None:
        payload = encode_close_payload(1000, "y" * 200)
        assert payload == b"\x03\xe8" + b"y" * 123
        assert len(payload) == 125

    def test_truncation_at_character_boundary_two_byte(self) -> None:
        # 100 x "é" is 200 bytes; 123 bytes would split the 62nd character, so 61 characters (122 bytes) remain.
        payload = encode_close_payload(1000, "é" * 100)
        assert payload == b"\x03\xe8" + ("é" * 61).encode()
        assert len(payload) == 124
        assert parse_close_payload(payload) == (1000, "é" * 61)

    @pytest.mark.parametrize("prefix", range(4))
    def test_truncation_at_character_boundary_four_byte(self, prefix: int) -> None:
        reason = "a" * prefix + "\U0001f600" * 40
        payload = encode_close_payload(1000, reason)
        raw = payload[2:]
        assert len(raw) <= 123
        assert len(raw) > 119  # nothing more than the broken character was dropped
        assert raw == reason.encode()[: len(raw)]
        assert raw.decode("utf-8") == "a" * prefix + "\U0001f600" * ((123 - prefix) // 4)


class TestSection5_5_1CloseParsing:
    def test_empty_is_no_status(self) -> None:
        assert parse_close_payload(b"") == (1005, "")

    def test_code_and_reason(self) -> None:
        assert parse_close_payload(b"\x03\xe8") == (1000, "")
        assert parse_close_payload(b"\x03\xe9bye") == (1001, "bye")
        assert parse_close_payload(b"\x0f\xa0\xf0\x9f\x98\x80") == (4000, "\U0001f600")

    @pytest.mark.parametrize("payload", [b"\x03", b"\x00", b"\xff"])
    def test_one_byte_payload(self, payload: bytes) -> None:
        with pytest.raises(ProtocolError) as info:
            parse_close_payload(payload)
        assert info.value.code == 1002

    @pytest.mark.parametrize("code", [0, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535])
    def test_invalid_codes_are_protocol_errors(self, code: int) -> None:
        with pytest.raises(ProtocolError) as info:
            parse_close_payload(struct.pack("!H", code))
        assert info.value.code == 1002

    @pytest.mark.parametrize(
        "code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 4999]
    )
    def test_valid_codes(self, code: int) -> None:
        assert parse_close_payload(struct.pack("!H", code) + b"ok") == (code, "ok")

    @pytest.mark.parametrize(
        "reason", [b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"ok\xce", b"\xe2\x82"]
    )
    def test_invalid_utf8_reason(self, reason: bytes) -> None:
        with pytest.raises(ProtocolError) as info:
            parse_close_payload(b"\x03\xe8" + reason)
        assert info.value.code == 1007

    def test_invalid_code_checked_before_reason(self) -> None:
        with pytest.raises(ProtocolError) as info:
            parse_close_payload(b"\x03\xed\xff")
        assert info.value.code == 1002

    def test_round_trip(self) -> None:
        for code in (1000, 1003, 1011, 3333, 4999):
            for reason in ("", "r", "ü" * 61, "\U0001f600" * 30):
                assert parse_close_payload(encode_close_payload(code, reason)) == (code, reason)
