"""The optional C masking (selectws/protocol/_speedups.c) against the pure-Python masking of frames.py.

Both must give the same bytes for every size (0, 1..7, around the 8-, 16- and 64-byte blocks of the C loop,
around TRANSLATE_MIN, large), every mask, every offset into a reassembly buffer, and every kind of input
(bytes, bytearray, memoryview at odd addresses, strided memoryviews). Both are also checked against the RFC's
definition, so that they cannot agree on a wrong answer. SELECTWS_NO_SPEEDUPS=1 must select the Python path; that
is checked in a fresh interpreter, since the choice is made once at import.

Under CI (``CI`` set, as .ci/run does) a missing extension fails these tests instead of skipping them: CI builds
it, and a C path that silently stopped building would otherwise go unnoticed.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from types import ModuleType
from typing import Any

import pytest

from selectws.protocol import frames


def _load_c() -> ModuleType | None:
    try:
        from selectws.protocol import _speedups
    except ImportError:
        return None
    return _speedups


C = _load_c()
needs_c = pytest.mark.skipif(
    C is None and not os.environ.get("CI"), reason="the C extension is not built (pip install -e . builds it)"
)

SIZES = [*range(0, 80), 127, 128, 129, 255, 256, 257, 1023, 2047, 2048, 2049, 4099, 65535, 65536, 65537, 262147]
MASKS = [b"\x37\xfa\x21\x3d", b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", b"\x01\x80\x00\xfe"]


def reference(data: bytes, mask: bytes) -> bytes:
    """RFC 6455 section 5.3, literally (via a pre-expanded key so that large sizes stay quick)."""
    key = (mask * (len(data) // 4 + 1))[: len(data)]
    return bytes(a ^ b for a, b in zip(data, key, strict=True))


def c_module() -> Any:
    if C is None:
        pytest.fail("the C extension selectws.protocol._speedups is not built (CI must build it)")
    return C


class _Py:
    """The pure-Python functions under the C module's names."""

    apply_mask = staticmethod(frames._py_apply_mask)
    mask_inplace = staticmethod(frames._py_mask_inplace)
    mask_into = staticmethod(frames._py_mask_into)
    BytesPayload = frames.PayloadBuffer


@pytest.fixture(params=["python", pytest.param("c", marks=needs_c)])
def impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Any:
    if request.param == "python":
        monkeypatch.setattr(frames, "mask_into", frames._py_mask_into)  # what PayloadBuffer calls
        return _Py
    return c_module()


def random_inputs(rng: random.Random, data: bytes) -> list[bytes | bytearray | memoryview]:
    """The same bytes as bytes, bytearray, a memoryview at an odd address, and a strided memoryview."""
    odd = bytearray(rng.randbytes(3)) + data
    strided = bytearray(2 * len(data))
    strided[1::2] = data
    return [data, bytearray(data), memoryview(odd)[3:], memoryview(bytes(strided))[1::2]]


class TestApplyMask:
    @pytest.mark.parametrize("size", SIZES)
    def test_same_bytes_as_the_definition(self, impl: Any, size: int) -> None:
        rng = random.Random(size)
        data = rng.randbytes(size)
        for mask in [*MASKS, rng.randbytes(4)]:
            expected = reference(data, mask)
            for given in random_inputs(rng, data):
                out = impl.apply_mask(given, mask)
                assert type(out) is bytes
                assert out == expected, (size, mask, type(given))

    @needs_c
    def test_c_and_python_agree_on_random_cases(self) -> None:
        c = c_module()
        rng = random.Random(17)
        for _ in range(300):
            size = rng.choice([rng.randrange(0, 64), rng.randrange(64, 5000), rng.randrange(5000, 300_000)])
            data = rng.randbytes(size)
            mask = rng.randbytes(4)
            start = rng.randrange(0, 8)  # odd alignments of the input
            view = memoryview(rng.randbytes(start) + data)[start:]
            assert c.apply_mask(view, mask) == frames._py_apply_mask(view, mask)

    def test_mask_must_be_four_bytes(self, impl: Any) -> None:
        for mask in (b"", b"abc", b"abcde"):
            with pytest.raises(ValueError):
                impl.apply_mask(b"payload", mask)

    def test_rejects_text(self, impl: Any) -> None:
        with pytest.raises(TypeError):
            impl.apply_mask("not bytes", b"abcd")


class TestMaskInplace:
    @pytest.mark.parametrize("size", SIZES)
    def test_bytearray(self, impl: Any, size: int) -> None:
        rng = random.Random(size + 1)
        data = rng.randbytes(size)
        mask = rng.randbytes(4)
        buf = bytearray(data)
        impl.mask_inplace(buf, mask)
        assert buf == reference(data, mask)
        impl.mask_inplace(buf, mask)
        assert buf == data  # an involution

    @pytest.mark.parametrize("start", range(8))
    def test_memoryview_slice_at_odd_offsets(self, impl: Any, start: int) -> None:
        rng = random.Random(start)
        data = rng.randbytes(70_001)
        mask = rng.randbytes(4)
        buf = bytearray(b"\xaa" * 16 + data + b"\xbb" * 16)
        with memoryview(buf) as view:
            impl.mask_inplace(view[16 + start : 16 + len(data)], mask)
        assert buf[:16] == b"\xaa" * 16 and buf[-16:] == b"\xbb" * 16  # nothing written outside
        assert buf[16 : 16 + start] == data[:start]
        assert buf[16 + start : 16 + len(data)] == reference(data[start:], mask)

    def test_read_only_buffer_is_refused(self, impl: Any) -> None:
        with pytest.raises((TypeError, BufferError)):
            impl.mask_inplace(b"immutable", b"abcd")
        with pytest.raises((TypeError, BufferError)):
            impl.mask_inplace(memoryview(b"immutable"), b"abcd")


class TestMaskInto:
    @pytest.mark.parametrize("size", SIZES)
    def test_every_offset_phase(self, impl: Any, size: int) -> None:
        rng = random.Random(size + 2)
        data = rng.randbytes(size)
        mask = rng.randbytes(4)
        for offset in (0, 1, 2, 3, 5, 4096 + 3):
            dst = bytearray(b"\xcc" * (offset + size + 9))
            given = random_inputs(rng, data)[rng.randrange(4)]
            impl.mask_into(dst, offset, given, mask)
            assert dst[:offset] == b"\xcc" * offset
            assert dst[offset : offset + size] == reference(data, mask)
            assert dst[offset + size :] == b"\xcc" * 9

    def test_pieces_reassemble_a_payload(self, impl: Any) -> None:
        # How the connection uses it: pieces of one masked payload, each unmasked into place with the mask
        # rotated to the piece's offset, give the whole unmasked payload.
        rng = random.Random(9)
        payload = rng.randbytes(300_001)
        mask = rng.randbytes(4)
        masked = reference(payload, mask)
        dst = bytearray(len(payload))
        pos = 0
        while pos < len(masked):
            n = min(rng.choice([1, 2, 3, 5, 7, 100, 4097, 65536, 100_003]), len(masked) - pos)
            shift = pos & 3
            impl.mask_into(dst, pos, memoryview(masked)[pos : pos + n], mask[shift:] + mask[:shift])
            pos += n
        assert dst == payload

    @needs_c
    def test_c_and_python_agree_on_random_cases(self) -> None:
        c = c_module()
        rng = random.Random(23)
        for _ in range(200):
            size = rng.choice([rng.randrange(0, 64), rng.randrange(64, 5000), rng.randrange(5000, 200_000)])
            data = rng.randbytes(size)
            mask = rng.randbytes(4)
            offset = rng.randrange(0, 64)
            a = bytearray(offset + size + 3)
            b = bytearray(a)
            c.mask_into(a, offset, data, mask)
            frames._py_mask_into(b, offset, data, mask)
            assert a == b

    def test_writable_memoryview_destination(self, impl: Any) -> None:
        data = bytes(range(200)) * 30
        dst = bytearray(len(data) + 10)
        with memoryview(dst) as view:
            impl.mask_into(view[5:], 0, data, b"abcd")
        assert dst[5 : 5 + len(data)] == reference(data, b"abcd")

    @pytest.mark.parametrize(("offset", "size"), [(-1, 4), (7, 4), (11, 0), (0, 11)])
    def test_out_of_range_is_refused(self, impl: Any, offset: int, size: int) -> None:
        dst = bytearray(10)
        with pytest.raises(ValueError):
            impl.mask_into(dst, offset, b"x" * size, b"abcd")
        assert dst == bytearray(10)

    def test_read_only_destination_is_refused(self, impl: Any) -> None:
        with pytest.raises((TypeError, BufferError)):
            impl.mask_into(b"0123456789", 0, b"abc", b"abcd")


class TestBytesPayload:
    @pytest.mark.parametrize("size", [0, 1, 3, 4, 5, 7, 8, 63, 64, 65, 4099, 65537, 300_001])
    def test_pieces_give_the_unmasked_payload(self, impl: Any, size: int) -> None:
        rng = random.Random(size + 3)
        payload = rng.randbytes(size)
        for mask in [None, *MASKS, rng.randbytes(4)]:
            wire = payload if mask is None else reference(payload, mask)
            p = impl.BytesPayload(size, mask)
            assert p.missing == size
            pos = 0
            while pos < size:
                n = rng.choice([1, 2, 3, 5, 7, 64, 1000, 70_000])
                given = random_inputs(rng, wire[pos : pos + n + 9])[rng.randrange(4)]  # more than it misses
                took = p.feed(given)
                assert took == min(n + 9, size - pos)
                pos += took
                assert p.missing == size - pos
            assert p.feed(b"more") == 0  # complete: nothing more is taken
            out = p.take()
            assert type(out) is bytes and out == payload
            with pytest.raises(ValueError):
                p.take()
            with pytest.raises(ValueError):
                p.feed(b"x")

    def test_take_before_complete_is_refused(self, impl: Any) -> None:
        p = impl.BytesPayload(10, b"abcd")
        p.feed(b"12345")
        with pytest.raises(ValueError):
            p.take()
        p.feed(b"67890")
        assert p.take() == reference(b"1234567890", b"abcd")

    def test_bad_arguments(self, impl: Any) -> None:
        with pytest.raises(ValueError):
            impl.BytesPayload(-1, None)
        with pytest.raises(ValueError):
            impl.BytesPayload(4, b"abc")
        with pytest.raises(TypeError):
            impl.BytesPayload(4, None).feed("text")

    @needs_c
    def test_c_and_python_agree_on_random_cases(self, monkeypatch: pytest.MonkeyPatch) -> None:
        c = c_module()
        monkeypatch.setattr(frames, "mask_into", frames._py_mask_into)
        rng = random.Random(29)
        for _ in range(100):
            size = rng.randrange(0, 200_000)
            mask = rng.choice([None, rng.randbytes(4)])
            wire = rng.randbytes(size)
            a, b = c.BytesPayload(size, mask), frames.PayloadBuffer(size, mask)
            pos = 0
            while pos < size:
                n = rng.randrange(1, 50_000)
                assert a.feed(wire[pos : pos + n]) == b.feed(memoryview(wire)[pos : pos + n])
                pos += n
            assert a.take() == b.take()


class TestSelection:
    def _probe(self, env: dict[str, str]) -> str:
        code = (
            "from selectws.protocol import frames, connection\n"
            "print(frames.SPEEDUPS_ACTIVE, frames.apply_mask.__module__, connection.BytesPayload.__module__)\n"
            "print(frames.SPEEDUPS)"
        )
        full = {k: v for k, v in os.environ.items() if k != frames.NO_SPEEDUPS_ENV}
        full.update(env)
        done = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    @pytest.mark.parametrize("value", ["1", "yes"])
    def test_no_speedups_env_selects_pure_python(self, value: str) -> None:
        out = self._probe({frames.NO_SPEEDUPS_ENV: value})
        assert out.splitlines() == [
            "False selectws.protocol.frames selectws.protocol.frames",
            "off, pure Python (SELECTWS_NO_SPEEDUPS=1)",
        ]

    @needs_c
    @pytest.mark.parametrize("env", [{}, {"SELECTWS_NO_SPEEDUPS": "0"}, {"SELECTWS_NO_SPEEDUPS": ""}])
    def test_c_is_used_when_built(self, env: dict[str, str]) -> None:
        c_module()
        out = self._probe(env)
        # Built-in functions report the extension's module name.
        assert out.splitlines() == ["True selectws.protocol._speedups selectws.protocol._speedups", "C"]

    def test_this_process_reports_what_it_uses(self) -> None:
        if frames.SPEEDUPS_ACTIVE:
            assert frames.SPEEDUPS == "C"
            assert frames.apply_mask is c_module().apply_mask
        else:
            assert frames.SPEEDUPS.startswith("off, pure Python")
            assert frames.apply_mask is frames._py_apply_mask
