"""The WebSocket connection state machine of RFC 6455, sans-I/O.

A :class:`Connection` is fed the bytes that arrived (:meth:`Connection.receive_data`) and returns the events they
complete; whatever it wants to send accumulates until :meth:`Connection.data_to_send` takes it. It never touches a
socket, never raises past :meth:`receive_data`, and never blocks, so the same object serves the server loop, the
CLI client and the unit tests, which drive it with bytes alone.

Design choices, each for a reason:

* Every complete frame in a ``receive_data`` call is parsed in one pass; an incomplete tail is kept in one
  ``bytearray`` (amortised appends, never quadratic concatenation).
* Limits are checked from the frame header, before a payload byte is buffered: a header announcing 2**40 bytes is
  refused with 1009 at once.
* Text is validated incrementally across fragments, so invalid UTF-8 fails the connection with 1007 as soon as
  the fragment containing it is complete, not at the end of the message.
* A violation fails the connection as section 7.1.7 says: the close frame with the right code is queued and
  ``close_transport`` is set, so the driver closes TCP as soon as the frame is written, without waiting. One
  exception, when the driver sets ``max_discard``: a message refused with 1009 from its frame header is still
  being sent by the peer, which would only see our close frame mid-send (browsers call that close unclean); the
  connection is CLOSED at once, but the close frame is held (``holding_close``) while the rest of the message is
  skipped by its frame headers, payload neither kept nor unmasked, and queued when the message ends.
* The connection is the only writer of its own state, and every transition happens inside the call that causes
  it (:meth:`receive_data`, :meth:`receive_eof`, :meth:`close`, :meth:`fail`, :meth:`abort`, and the handshake
  methods of the role subclasses in :mod:`selectws.protocol.handshake`); :meth:`data_to_send` only hands out
  bytes. When a close frame or a violation follows data messages in one read, :meth:`receive_data` returns the
  messages and holds the rest back (``events_held``), so that replies to those messages go out before our close
  frame; the driver handles the events, then calls ``receive_data(b"")`` for the rest.
* Once CLOSED, the connection drops everything it no longer needs (the inflater and deflater, partial messages,
  the input buffer) at once, so a closed connection holds only the bytes still to send.

The driver's rule is one: after any call into the connection, if ``has_output``, arrange for ``data_to_send()``
to be written; once it is written and ``close_transport`` is set, close the transport.
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Callable
from enum import Enum
from typing import Protocol

from selectws.protocol.errors import CloseCode, ProtocolError, is_valid_close_code
from selectws.protocol.events import Closed, Event, Message, Ping, Pong
from selectws.protocol.frames import (
    BytesPayload,
    Payload,
    PayloadBuffer,
    encode_close_payload,
    encode_header,
    mask_payload,
    parse_close_payload,
    speedups,
)
from selectws.protocol.ondemand import OnDemand

__all__ = ["CLIENT", "SERVER", "Connection", "Extension", "Role", "State"]

# The C scanner of whole small data frames (_speedups.scan_messages), or None on the pure-Python path: the
# general parser in receive_data then does all the work, with the same results.
_scan_messages: Callable[[bytes | bytearray | memoryview, int, int, int, list[Event], int], int] | None = None
if speedups is not None:
    speedups.set_message_type(Message)
    _scan_messages = speedups.scan_messages


class Role(Enum):
    SERVER = "server"
    CLIENT = "client"


SERVER = Role.SERVER
CLIENT = Role.CLIENT


class State(Enum):
    """Connection states. CONNECTING only exists in the role subclasses of :mod:`selectws.protocol.handshake`."""

    CONNECTING = "connecting"  # the opening handshake is in progress
    OPEN = "open"
    CLOSING = "closing"  # we sent a close frame and wait for the peer's
    CLOSED = "closed"  # the close handshake is over or the connection failed: close the transport


class Extension(Protocol):
    """What the connection needs of a negotiated permessage-deflate (see :mod:`selectws.protocol.deflate`)."""

    def decompress(self, payload: bytes | bytearray, max_size: int) -> bytes: ...

    def compress(self, payload: bytes) -> bytes: ...

    def should_compress(self, size: int) -> bool: ...


_Utf8Decoder = codecs.getincrementaldecoder("utf-8")
_BATCH_XOR_MAX = 32768  # reads up to this size are unmasked with one big-integer XOR
#: A data frame at least this large that is still incomplete at the end of a read is received in streaming mode
#: (``_Large``): each read is unmasked straight into a buffer sized from the header, with no growing input buffer
#: and no copy of the masked bytes.
_STREAM_MIN = 32768
_TEXT_HEADERS = [bytes((0x81, n)) for n in range(126)]
_BINARY_HEADERS = [bytes((0x82, n)) for n in range(126)]
_ZEROS = [bytes(n) for n in range(15)]  # key filler over frame headers (2 to 14 bytes, less the overshoot)
_CONNECTING = State.CONNECTING
_OPEN = State.OPEN
_CLOSING = State.CLOSING
_CLOSED = State.CLOSED


class Connection:
    """One WebSocket connection after a successful opening handshake."""

    __slots__ = (
        "_aux",
        "_buf",
        "_deflate",
        "_expect_mask",
        "_frag_compressed",
        "_frag_decoder",
        "_frag_opcode",
        "_frag_size",
        "_large",
        "_mask_source",
        "_out",
        "_partial_checked",
        "_plain",
        "close_transport",
        "held",
        "input_pending",
        "max_discard",
        "max_frame_size",
        "max_frames",
        "max_message_size",
        "role",
        "state",
    )

    def __init__(
        self,
        role: Role = SERVER,
        *,
        state: State = _OPEN,
        max_message_size: int = 1 << 20,
        max_frame_size: int | None = None,
        extension: Extension | None = None,
        mask_source: Callable[[], bytes] | None = None,
        max_frames: int = 1 << 30,
    ) -> None:
        # What a connection seldom holds (a fragmented message's buffer, the piecemeal UTF-8 check's decoder, an
        # oversized message being skipped, the close frame we sent): one object, made when first needed (_Aux).
        self._aux: _Aux | None = None
        self.role = role
        self.state = state
        self.max_message_size = max_message_size
        self.max_frame_size = max_message_size if max_frame_size is None else max_frame_size
        self._deflate = extension
        # A server requires masked frames from its client and sends unmasked ones; a client the reverse.
        self._expect_mask = 0x80 if role is SERVER else 0
        self._mask_source: Callable[[], bytes] | None = None
        if role is CLIENT:
            self._mask_source = mask_source or _random_mask
        self._buf: bytes | bytearray = b""  # a bytearray only while an incomplete frame waits
        # What waits to be sent, as pieces; None while nothing does (no empty list per idle connection).
        self._out: list[bytes | bytearray | memoryview] | None = None
        # Server role without compression: sends take the short path (no masking, no deflate).
        self._plain = role is SERVER and extension is None
        self._frag_opcode = 0  # opcode of the fragmented message in progress, 0 when none
        self._frag_size = 0
        self._frag_decoder: codecs.IncrementalDecoder | None = None
        self._frag_compressed = False
        # Fail-fast UTF-8 inside one text frame still arriving: how much of its payload is already checked.
        self._partial_checked = 0
        #: A close frame or a violation that followed data messages in one read, held back until the driver has
        #: acted on those messages: (close code, reason, error or None for the peer's close), or _RESUME when only
        #: buffered input is waiting (bytes that came with the opening handshake). Not None: call
        #: ``receive_data(b"")`` once the events are handled (``events_held``; a driver's hot path reads this).
        self.held: tuple[int, str, str | None] | None = None
        #: The most frames one ``receive_data`` call parses; what is left waits for the next call
        #: (``input_pending``), so that one peer's flood of tiny frames cannot hold the driver's loop.
        self.max_frames = max_frames
        #: Whether the last :meth:`receive_data` stopped at ``max_frames`` with more input buffered: call
        #: ``receive_data(b"")`` again, after serving other connections (a driver's fairness rule). A plain
        #: attribute, read once per read on the hot path.
        self.input_pending = False
        self.close_transport = False  # the driver closes TCP once data_to_send() is drained
        #: Bytes of a message over the limit that the connection will read past and throw away before its 1009
        #: close frame goes out (``holding_close``): a peer still sending that message only sees our close frame
        #: once it has finished (a browser reports a close that interrupted its own send as unclean). 0: the close
        #: frame is queued at once. A header announcing more than this is refused at once, as before.
        self.max_discard = 0
        self._large: _Large | None = None  # a large frame arriving over several reads (_STREAM_MIN)

    # ------------------------------------------------------------------ seldom held (_Aux)
    # What a connection seldom holds, kept in one _Aux made when first needed (ondemand.py): an idle connection
    # holds one None instead of five slots.

    #: The code and reason of the close frame we sent, once sent.
    close_code: OnDemand[int | None] = OnDemand(None, "_aux", lambda: _Aux())
    close_reason: OnDemand[str] = OnDemand("", "_aux", lambda: _Aux())
    #: The fragments of the message in progress, appended in place.
    _frag_buf: OnDemand[bytearray | None] = OnDemand(None, "_aux", lambda: _Aux())
    #: The UTF-8 decoder of the text frame checked piecemeal while it arrives (``_partial_checked``).
    _partial_decoder: OnDemand[codecs.IncrementalDecoder | None] = OnDemand(None, "_aux", lambda: _Aux())
    #: The rest of the oversized message being skipped, and our held close frame (``max_discard``).
    _skip: OnDemand[_Skip | None] = OnDemand(None, "_aux", lambda: _Aux())

    # ------------------------------------------------------------------ receiving

    def receive_data(self, data: bytes | bytearray | memoryview, size: int = -1) -> list[Event]:
        """Parse every complete frame in ``data`` (plus what an earlier call left) and return the events.

        ``data`` may be the driver's reusable receive buffer (or a view of it), with ``size`` the number of bytes
        its read put at the start (-1: all of ``data``): everything kept past this call is copied.
        When ``events_held`` is true afterwards, call ``receive_data(b"")`` once the events are handled.
        """
        if self.held is not None:
            return self._release_held(data if size < 0 else data[:size])
        self.input_pending = False
        state = self.state
        events: list[Event] = []
        budget = self.max_frames
        if state is _OPEN and self._large is None and _scan_messages is not None and not self._frag_opcode and (
            self._expect_mask
        ):
            # The C fast path: whole small text and binary frames, the bulk of most traffic. It stops before
            # anything else, and the general parser below goes on from there (and judges what stopped it).
            waiting = self._buf
            if waiting:
                waiting += data if size < 0 else data[:size]  # a bytearray while input waits
                data = waiting  # the general parser below takes it as its buffer, from self._buf
                size = -1
            left = _scan_messages(data, self.max_frame_size, self.max_message_size, budget, events, size)
            if not left:  # all of it: the common case
                if waiting:
                    self._buf = b""
                    if self._partial_checked:  # the text frame checked piecemeal was among the messages
                        self._partial_checked = 0
                        self._partial_decoder = None
                return events
            if events:
                if waiting:
                    if self._partial_checked:
                        self._partial_checked = 0
                        self._partial_decoder = None
                    del waiting[: len(waiting) - left]  # type: ignore[union-attr]
                else:
                    end = size if 0 <= size < len(data) else len(data)
                    data = data[end - left : end]
                budget -= len(events)
                if not budget:  # the rest waits for the next call
                    self.input_pending = left >= 2
                    if not waiting:
                        self._buf = bytearray(data)
                    return events
            elif size >= 0:  # nothing for the scan: the general parser takes the input as it came
                data = data[:size]
            if waiting:
                data = b""  # waiting is self._buf, which the general parser starts from
        else:
            if size >= 0:
                data = data[:size]
            if state is _CLOSED:
                if self._skip is not None:  # the rest of an oversized message (max_discard)
                    self._skip_input(data)
                return events
            if state is _CONNECTING:
                return self._receive_handshake(data)
            if self._large is not None:  # the rest of a large frame: unmasked straight into its buffer
                rest = self._receive_large(data, events)
                if rest is None:
                    return events
                data = rest  # what followed the completed frame in this read is parsed as usual
        buf: bytes | bytearray
        if self._buf:
            self._buf += data
            buf = self._buf
        else:
            # One copy of the whole read is cheaper than two small copies per frame out of a memoryview.
            buf = data.tobytes() if type(data) is memoryview else data
        append = events.append
        end = len(buf)
        pos = 0
        expect_mask = self._expect_mask
        # Pass 1 reads and judges every frame header and finds the complete frames; pass 2 unmasks them all with
        # one big-integer XOR (the key is built from each frame's mask, zeros over the headers) and turns them
        # into events. One XOR per read instead of one per frame is what makes small pipelined frames cheap.
        frames: list[tuple[int, int, int]] = []  # (first byte, payload offset, payload length)
        keys: list[bytes | bytearray | memoryview] = []
        overshoot = 0  # key bytes written past the end of the previous payload (the mask repeats in 4s)
        frag = self._frag_opcode
        frag_size = self._frag_size
        frag_text = self._frag_decoder is not None  # an uncompressed text message is in progress
        frag_compressed = self._frag_compressed
        partial_at = -1  # offset of the mask of an incomplete text frame, for the fail-fast check
        stream_at = -1  # offset of the mask (or payload) of an incomplete large frame, to receive in streaming mode
        stream_b0 = stream_length = 0
        error: ProtocolError | None = None
        try:
            while end - pos >= 2:
                b0 = buf[pos]
                b1 = buf[pos + 1]
                opcode = b0 & 0x0F
                length = b1 & 0x7F
                i = pos + 2
                if length == 126:
                    if end - i < 2:
                        break
                    length = (buf[i] << 8) | buf[i + 1]
                    i += 2
                elif length == 127:
                    if end - i < 8:
                        break
                    length = int.from_bytes(buf[i : i + 8], "big")
                    i += 8
                    if length >> 63:
                        raise ProtocolError(CloseCode.PROTOCOL_ERROR, "64-bit length with the high bit set")
                if (b1 & 0x80) != expect_mask:
                    raise ProtocolError(
                        CloseCode.PROTOCOL_ERROR,
                        "unmasked frame from a client" if expect_mask else "masked frame from a server",
                    )
                if b0 & 0x70:
                    self._check_rsv(b0, opcode)
                if opcode & 0x08:
                    if opcode > 0x0A:
                        raise ProtocolError(CloseCode.PROTOCOL_ERROR, f"reserved opcode {opcode:#x}")
                    if not b0 & 0x80:
                        raise ProtocolError(CloseCode.PROTOCOL_ERROR, "fragmented control frame")
                    if length > 125:
                        raise ProtocolError(CloseCode.PROTOCOL_ERROR, "control frame payload over 125 bytes")
                else:
                    if opcode > 0x02:
                        raise ProtocolError(CloseCode.PROTOCOL_ERROR, f"reserved opcode {opcode:#x}")
                    if opcode == 0:
                        if not frag:
                            raise ProtocolError(
                                CloseCode.PROTOCOL_ERROR, "continuation frame without a message to continue"
                            )
                    elif frag:
                        raise ProtocolError(
                            CloseCode.PROTOCOL_ERROR, "new data message before the fragmented one ended"
                        )
                    # A compressed message is judged by its inflated size in decompress(); on the wire it may be a
                    # little larger than that (incompressible data), so only the worst-case deflate overhead is
                    # allowed on top here.
                    slack = 0
                    if (b0 & 0x40 if opcode else frag_compressed):
                        slack = (self.max_message_size >> 3) + (self.max_message_size >> 6) + 64  # zlib's deflateBound
                    if length > self.max_frame_size + slack:
                        raise ProtocolError(
                            CloseCode.MESSAGE_TOO_BIG,
                            f"frame of {length} bytes exceeds the limit of {self.max_frame_size}",
                        )
                    if frag_size + length > self.max_message_size + slack:
                        raise ProtocolError(
                            CloseCode.MESSAGE_TOO_BIG,
                            f"message of {frag_size + length}+ bytes exceeds the limit of {self.max_message_size}",
                        )
                if expect_mask:
                    if end - i < length + 4:
                        if length >= _STREAM_MIN and end - i >= 4:
                            stream_at, stream_b0, stream_length = i, b0, length
                        elif end - i > 4 and ((opcode == 0x01 and not b0 & 0x40) or (opcode == 0 and frag_text)):
                            partial_at = i
                        break
                    if i + 4 + length <= _BATCH_XOR_MAX:  # key material only for the one-XOR path
                        keys.append(_ZEROS[i + 4 - pos - overshoot])
                        words = (length + 3) >> 2
                        keys.append(buf[i : i + 4] * words)
                        overshoot = (words << 2) - length
                    frames.append((b0, i + 4, length))
                    pos = i + 4 + length
                else:
                    if end - i < length:
                        if length >= _STREAM_MIN:
                            stream_at, stream_b0, stream_length = i, b0, length
                        elif end > i and ((opcode == 0x01 and not b0 & 0x40) or (opcode == 0 and frag_text)):
                            partial_at = i
                        break
                    frames.append((b0, i, length))
                    pos = i + length
                if opcode & 0x08:
                    if opcode == 0x08:
                        break  # nothing after a close frame is read
                elif opcode:
                    if not b0 & 0x80:
                        frag, frag_size = opcode, length
                        frag_text = opcode == 0x01 and not b0 & 0x40
                        frag_compressed = bool(b0 & 0x40)
                elif b0 & 0x80:
                    frag, frag_size = 0, 0
                else:
                    frag_size += length
                if len(frames) >= budget:
                    self.input_pending = end - pos >= 2  # the rest waits for the next call
                    break
        except ProtocolError as exc:
            error = exc
        try:
            if frames:
                if self._partial_checked:  # the frame checked piecemeal is complete now
                    self._partial_checked = 0
                    self._partial_decoder = None
                if expect_mask:
                    per_frame = pos > _BATCH_XOR_MAX  # large frames: one by one, by translation
                    clear = b"" if per_frame else (
                        int.from_bytes(buf[:pos], "little") ^ int.from_bytes(b"".join(keys), "little")
                    ).to_bytes(pos + overshoot, "little")
                else:
                    per_frame = False
                    clear = bytes(buf[:pos])
                view = memoryview(buf) if per_frame else None
                for b0, start, length in frames:
                    if view is not None:
                        payload = mask_payload(view[start : start + length], bytes(view[start - 4 : start]))
                    else:
                        payload = clear[start : start + length]
                    if b0 == 0x82:  # the common case first: a whole binary message
                        append(Message(payload))
                    elif b0 == 0x81:  # a whole uncompressed text message
                        try:
                            append(Message(payload.decode("utf-8")))
                        except UnicodeDecodeError:
                            raise ProtocolError(
                                CloseCode.INVALID_DATA, "invalid UTF-8 in a text message"
                            ) from None
                    elif b0 & 0x08:
                        if b0 == 0x88 and events and self.state is _OPEN:
                            # Messages came before the close in this read: hold it back, so that their answers
                            # go out before our reply to it.
                            code, reason = parse_close_payload(payload)
                            self.held = (code, reason, None)
                            self._buf = b""
                            self.input_pending = False
                            return events
                        if self._control_frame(b0 & 0x0F, payload, append):
                            break
                    else:
                        self._data_frame(b0, b0 & 0x0F, payload, append)
                if view is not None:
                    view.release()  # before the buffer is trimmed below
            if error is not None:
                raise error
            if partial_at >= 0 and self.state is _OPEN:
                self._check_partial_text(buf, partial_at, end)
            elif stream_at >= 0 and self.state is not _CLOSED:
                self._start_large(buf, stream_at, end, stream_b0, stream_length)
                pos = end  # all of it is in the large frame's buffer now
        except ProtocolError as exc:
            self._buf = b""
            self._large = None
            self.input_pending = False
            if exc is error and exc.code == CloseCode.MESSAGE_TOO_BIG and self.max_discard and self.state is _OPEN:
                # A header announced too much: the peer is still sending that message. Its rest (from the header
                # at pos on) is skipped, and our close frame held, until it ends (max_discard).
                self._skip = _Skip(bytes(buf[pos:end]), self.max_discard)
            if events and self.state is _OPEN:
                # Let the driver act on the frames that came before the violation first, so that (say) the echo
                # of a valid message still precedes our close frame: the failure is held back.
                self.held = (exc.code, exc.reason, exc.reason)
            else:
                append(self._fail_too_big(exc.code, exc.reason))
            return events
        if self.state is _CLOSED:
            self._buf = b""
        elif pos < end:
            if isinstance(buf, bytearray) and buf is self._buf:
                del buf[:pos]
            else:
                self._buf = bytearray(buf[pos:])
        elif buf is self._buf:
            self._buf = b""
        return events

    @property
    def events_held(self) -> bool:
        """Whether :meth:`receive_data` held events back: call ``receive_data(b"")`` after handling the others."""
        return self.held is not None

    def _release_held(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """The events held back by the previous :meth:`receive_data` (input after a close frame is ignored)."""
        held = self.held
        assert held is not None
        self.held = None
        if held is _RESUME:
            return self.receive_data(data)
        code, reason, error = held
        if error is not None:
            return [self._fail_too_big(code, error)]
        self._answer_close(code)
        return [Closed(code, reason, by_peer=True)]

    def _open(self, extension: Extension | None) -> None:
        """CONNECTING -> OPEN, with the extension the handshake agreed on (called by the role subclasses). Bytes
        that came with the handshake are parsed by the next ``receive_data`` (``events_held`` says so)."""
        self._deflate = extension
        self._plain = self.role is SERVER and extension is None
        self.state = _OPEN
        if self._buf:
            self.held = _RESUME

    def _receive_handshake(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """The opening handshake: implemented by the role subclasses (:mod:`selectws.protocol.handshake`)."""
        raise NotImplementedError("a Connection created in CONNECTING must be a ServerProtocol or ClientProtocol")

    def receive_eof(self) -> list[Event]:
        """The transport was closed by the peer. Without a completed close handshake that is a 1006."""
        if self.state is _CLOSED:
            return []
        was_connecting = self.state is _CONNECTING
        self.held = None
        self._set_closed()
        if was_connecting:
            return []
        return [Closed(CloseCode.ABNORMAL, "connection closed without a close frame", by_peer=True)]

    def abort(self, reason: str, code: int = CloseCode.ABNORMAL) -> Closed | None:
        """The transport is gone or is being dropped (I/O error, close timeout): CLOSED at once, with nothing
        more to send. Returns the ``Closed`` event (``code``, 1006 unless the caller says why otherwise), or None
        if the connection was already over (or never opened)."""
        state = self.state
        self._out = None  # the transport is gone: nothing queued can be sent any more
        self._skip = None
        if state is _CLOSED:
            return None
        self.held = None
        self._set_closed()
        if state is _CONNECTING:
            return None
        return Closed(code, reason, by_peer=False)

    def _set_closed(self) -> None:
        """Enter CLOSED and let go of everything but the output still to send (zlib contexts included)."""
        self.state = _CLOSED
        self.close_transport = True
        self._buf = b""
        self.input_pending = False
        self._deflate = None
        self._frag_buf = None
        self._frag_decoder = None
        self._partial_decoder = None
        self._skip = None
        self._large = None

    # ------------------------------------------------------------------ large frames, streamed

    def _start_large(self, buf: bytes | bytearray, i: int, end: int, b0: int, length: int) -> None:
        """Receive the large frame whose header ends at ``i`` in streaming mode (its limits are already checked):
        a buffer of its payload's size, and what of it is here already unmasked into it."""
        opcode = b0 & 0x0F
        decoder: codecs.IncrementalDecoder | None = None
        if (opcode == 0x01 and not b0 & 0x40) or (opcode == 0 and self._frag_decoder is not None):
            decoder = _Utf8Decoder()  # fail fast on invalid UTF-8 while the frame arrives (section 8.1)
            if opcode == 0 and self._frag_decoder is not None:
                decoder.setstate(self._frag_decoder.getstate())
        mask: bytes | None = None
        if self._expect_mask:
            mask = bytes(buf[i : i + 4])
            i += 4
        # A whole binary message, the common case, is unmasked straight into the bytes it is delivered as (with
        # the C speedups); anything else into a bytearray (text is checked as it comes, fragments are joined).
        payload = BytesPayload(length, mask) if b0 == 0x82 else PayloadBuffer(length, mask)
        large = _Large(b0, payload, decoder)
        self._large = large
        if end > i:
            with memoryview(buf) as view:
                self._feed_large(large, view[i:end])

    def _feed_large(self, large: _Large, chunk: memoryview) -> int:
        """Unmask (a client's frame) or copy the start of ``chunk`` into the large frame's buffer, as much of it as
        the frame still misses; returns how much that was."""
        payload = large.payload
        decoder = large.decoder
        if decoder is None:
            return payload.feed(chunk)
        assert isinstance(payload, PayloadBuffer) and payload.buf is not None
        start = payload.filled
        n = payload.feed(chunk)
        with memoryview(payload.buf) as view:
            try:
                decoder.decode(view[start : start + n], False)
            except UnicodeDecodeError:
                raise ProtocolError(CloseCode.INVALID_DATA, "invalid UTF-8 in a text message") from None
        return n

    def _receive_large(
        self, data: bytes | bytearray | memoryview, events: list[Event]
    ) -> bytes | bytearray | memoryview | None:
        """The next read of the large frame in progress: into its buffer, and once it is complete, its event.
        Returns what followed the frame in ``data``, or None when nothing more is to be parsed now (the frame is
        still incomplete, or it failed the connection)."""
        large = self._large
        assert large is not None
        try:
            with memoryview(data) as view:
                took = self._feed_large(large, view)
            payload = large.payload
            if payload.missing:
                return None
            self._large = None
            b0 = large.b0
            if b0 == 0x82:
                events.append(Message(payload.take()))
            else:
                assert isinstance(payload, PayloadBuffer) and payload.buf is not None
                if b0 == 0x81:
                    try:
                        events.append(Message(payload.buf.decode("utf-8")))
                    except UnicodeDecodeError:
                        raise ProtocolError(CloseCode.INVALID_DATA, "invalid UTF-8 in a text message") from None
                else:
                    self._data_frame(b0, b0 & 0x0F, payload.buf, events.append)
        except ProtocolError as exc:
            self._large = None
            events.append(self._fail(exc.code, exc.reason))
            return None
        return data[took:] if took < len(data) else b""

    def _check_partial_text(self, buf: bytes | bytearray | memoryview, i: int, end: int) -> None:
        """Validate the part of an incomplete text frame that is already here (fail fast, RFC 6455 section 8.1).

        Only the bytes not checked by an earlier call are decoded, on a copy of the message's decoder state, so a
        large frame arriving in many reads costs one extra pass, never a quadratic one.
        """
        masked = bool(self._expect_mask)  # a client's frames carry a 4-byte mask, a server's do not
        mask = bytes(buf[i : i + 4]) if masked else b""
        start = i + (4 if masked else 0) + self._partial_checked
        if end <= start:
            return
        if self._partial_decoder is None:
            self._partial_decoder = _Utf8Decoder()
            if self._frag_decoder is not None:
                self._partial_decoder.setstate(self._frag_decoder.getstate())
        if masked:
            shift = self._partial_checked & 3
            chunk = mask_payload(buf[start:end], mask[shift:] + mask[:shift])
        else:
            chunk = bytes(buf[start:end])
        self._partial_checked += len(chunk)
        try:
            self._partial_decoder.decode(chunk, False)
        except UnicodeDecodeError:
            raise ProtocolError(CloseCode.INVALID_DATA, "invalid UTF-8 in a text message") from None

    def _check_rsv(self, b0: int, opcode: int) -> None:
        # RSV1 belongs to permessage-deflate, on the first frame of a data message only (RFC 7692 section 6).
        if (b0 & 0x70) == 0x40 and self._deflate is not None and opcode in (0x01, 0x02):
            return
        raise ProtocolError(CloseCode.PROTOCOL_ERROR, f"reserved bits set ({(b0 >> 4) & 0x07:#05b})")

    def _data_frame(
        self, b0: int, opcode: int, payload: bytes | bytearray, append: Callable[[Event], None]
    ) -> None:
        """A fragment, a compressed message, or the end of a fragmented message."""
        fin = b0 & 0x80
        if opcode:  # first frame of a message
            compressed = bool(b0 & 0x40)
            if fin:  # a whole compressed message (uncompressed ones took the fast path)
                self._emit(opcode, payload, compressed, append)
                return
            self._frag_opcode = opcode
            self._frag_compressed = compressed
            self._frag_size = len(payload)
            if opcode == 0x01 and not compressed:
                self._frag_decoder = _Utf8Decoder()
                self._check_text_fragment(payload, False)
            # One growing bytearray, not a list of fragments: a million one-byte fragments would otherwise cost a
            # million list slots (and leave the heap fragmented once freed).
            # A large frame's own buffer (_Large) is adopted as it is: nobody else holds it.
            self._frag_buf = payload if type(payload) is bytearray else bytearray(payload)
            return
        self._frag_size += len(payload)
        frag_buf = self._frag_buf
        assert frag_buf is not None
        frag_buf += payload
        if self._frag_decoder is not None:
            self._check_text_fragment(payload, bool(fin))
        if fin:
            whole = bytes(frag_buf)
            opcode = self._frag_opcode
            compressed = self._frag_compressed
            self._frag_opcode = 0
            self._frag_buf = None
            self._frag_size = 0
            self._frag_decoder = None
            self._emit(opcode, whole, compressed, append)

    def _check_text_fragment(self, payload: bytes | bytearray, final: bool) -> None:
        """Fail fast: the incremental decoder raises at the first byte that cannot start or continue UTF-8."""
        assert self._frag_decoder is not None
        try:
            self._frag_decoder.decode(payload, final)
        except UnicodeDecodeError:
            raise ProtocolError(CloseCode.INVALID_DATA, "invalid UTF-8 in a text message") from None

    def _emit(
        self, opcode: int, payload: bytes | bytearray, compressed: bool, append: Callable[[Event], None]
    ) -> None:
        if compressed:
            assert self._deflate is not None
            payload = self._deflate.decompress(payload, self.max_message_size)
        elif isinstance(payload, bytearray):  # a large frame's buffer (_Large): the message gets bytes
            payload = bytes(payload)
        if opcode == 0x01:
            try:
                append(Message(payload.decode("utf-8")))
            except UnicodeDecodeError:
                raise ProtocolError(CloseCode.INVALID_DATA, "invalid UTF-8 in a text message") from None
        else:
            append(Message(payload))

    def _control_frame(self, opcode: int, payload: bytes, append: Callable[[Event], None]) -> bool:
        """Handle ping, pong and close; True when parsing must stop (a close frame ends the input)."""
        if opcode == 0x09:
            if self.state is _OPEN:
                self._write_frame(0x8A, payload)
            append(Ping(payload))
            return False
        if opcode == 0x0A:
            append(Pong(payload))
            return False
        code, reason = parse_close_payload(payload)
        if self.state is _OPEN:
            self._answer_close(code)
            append(Closed(code, reason, by_peer=True))
        else:  # CLOSING: the peer answered our close; the handshake is complete.
            self._set_closed()
            append(Closed(self.close_code or CloseCode.NORMAL, self.close_reason, by_peer=False))
        return True

    def _answer_close(self, code: int) -> None:
        """Reply to the peer's close frame and end the connection (the transport closes once this is sent)."""
        if self.state is _OPEN:
            # Echo the peer's code (RFC 6455 section 5.5.1); 1005 means it sent none, so neither do we.
            self._write_frame(0x88, encode_close_payload(None if code == CloseCode.NO_STATUS else code))
            self.close_code = code
        self._set_closed()

    def _fail(self, code: int, reason: str) -> Closed:
        """Fail the WebSocket connection (RFC 6455 section 7.1.7): send a close frame if we have not yet."""
        if self.state is _OPEN:
            self._write_frame(0x88, encode_close_payload(code, reason))
            self.close_code = code
            self.close_reason = reason
        self._set_closed()
        return Closed(code, reason, by_peer=False, error=reason)

    def _fail_too_big(self, code: int, reason: str) -> Closed:
        """:meth:`_fail`; for a header that announced too much (``_skip`` prepared, see ``max_discard``) the close
        frame is held back while the rest of the message is skipped, unless that rest cannot be followed."""
        skip = self._skip
        if skip is None or self.state is not _OPEN:
            return self._fail(code, reason)
        queued = len(self._out) if self._out is not None else 0
        closed = self._fail(code, reason)  # CLOSED now: the driver learns at once, the peer once it has finished
        out = self._output()
        skip.frame = out[queued:]
        del out[queued:]
        self._skip = skip
        data, skip.head = skip.head, b""
        self._skip_input(data)
        return closed

    def _skip_input(self, data: bytes | bytearray | memoryview) -> None:
        """Throw away what arrived of the oversized message, following its frames by their headers (no payload
        byte is kept or unmasked); the held close frame is released when the message ends, when the next frame
        would take the skipped bytes past ``max_discard``, or when anything but a continuation, ping or pong
        comes (the peer's close frame included)."""
        skip = self._skip
        assert skip is not None
        if skip.head:  # a frame header split across reads: at most 13 bytes kept
            data = skip.head + bytes(data)
            skip.head = b""
        end = len(data)
        pos = 0
        while True:
            left = skip.left
            if left:
                if end - pos < left:
                    skip.left = left - (end - pos)
                    return
                pos += left
                skip.left = 0
            if skip.final:
                break  # the message is over
            if end - pos < 2:
                skip.head = bytes(data[pos:end])
                return
            b0 = data[pos]
            b1 = data[pos + 1]
            opcode = b0 & 0x0F
            if not (opcode <= 0x02 if skip.first else opcode == 0 or opcode == 0x09 or opcode == 0x0A):
                break
            length = b1 & 0x7F
            i = pos + 2
            if length >= 126:
                size = 2 if length == 126 else 8
                if end - i < size:
                    skip.head = bytes(data[pos:end])
                    return
                length = int.from_bytes(data[i : i + size], "big")
                i += size
            length += 4 if b1 & 0x80 else 0  # the mask
            if i - pos + length > skip.budget:
                break
            skip.budget -= i - pos + length
            skip.first = False
            if opcode < 0x08:
                skip.final = bool(b0 & 0x80)
            skip.left = length
            pos = i
        self.release_close()

    @property
    def holding_close(self) -> bool:
        """Whether our 1009 close frame waits for the end of the oversized message the peer is still sending
        (``max_discard``): CLOSED, but ``receive_data`` still reads the peer's frame headers to find that end."""
        return self._skip is not None and self.state is _CLOSED

    def release_close(self) -> None:
        """Queue the held close frame now (the message ended, or the driver's time is up)."""
        skip = self._skip
        if skip is not None and self.state is _CLOSED:
            self._skip = None
            self._output().extend(skip.frame)

    # ------------------------------------------------------------------ sending

    def send_text(self, text: str) -> bool:
        """Queue a text message; False (nothing queued) once the connection is closing or closed."""
        if self.state is not _OPEN:
            return False
        payload = text.encode("utf-8")
        if self._plain:
            n = len(payload)
            out = self._out
            if n < 126:  # small: header and payload in one piece (one object, and one send() without a join)
                if out is None:
                    self._out = [_TEXT_HEADERS[n] + payload]
                else:
                    out.append(_TEXT_HEADERS[n] + payload)
            else:
                self._output().extend((encode_header(0x81, n), payload))
        else:
            self._write_message(0x01, payload)
        return True

    def send_binary(self, data: bytes | bytearray | memoryview) -> bool:
        """Queue a binary message; False (nothing queued) once the connection is closing or closed."""
        if self.state is not _OPEN:
            return False
        if self._plain:
            n = len(data)
            # A bytearray or memoryview may be reused by the caller before data_to_send(): keep a copy.
            out = self._out
            if n < 126:  # small: header and payload in one piece (one object, and one send() without a join)
                if out is None:
                    self._out = [_BINARY_HEADERS[n] + data]
                else:
                    out.append(_BINARY_HEADERS[n] + data)
            else:
                self._output().extend((encode_header(0x82, n), data if type(data) is bytes else bytes(data)))
        else:
            self._write_message(0x02, data)
        return True

    def send_message(self, data: str | bytes | bytearray | memoryview) -> bool:
        """Text for ``str``, binary otherwise."""
        if isinstance(data, str):
            return self.send_text(data)
        return self.send_binary(data)

    def send_fragment(self, opcode: int, data: bytes, fin: bool) -> bool:
        """Queue one data frame of a fragmented message (``opcode`` 0 for continuations); never compressed."""
        if self.state is not _OPEN:
            return False
        self._write_frame((0x80 if fin else 0) | opcode, data)
        return True

    def send_frame_bytes(self, frame: bytes) -> bool:
        """Queue an already encoded, unmasked frame (a broadcast encoded once for all recipients)."""
        if self.state is not _OPEN or self.role is not SERVER:
            return False
        out = self._out
        if out is None:
            self._out = [frame]
        else:
            out.append(frame)
        return True

    def send_ping(self, payload: bytes = b"") -> bool:
        if self.state is not _OPEN:
            return False
        if len(payload) > 125:
            raise ValueError("ping payload over 125 bytes")
        self._write_frame(0x89, payload)
        return True

    def send_pong(self, payload: bytes = b"") -> bool:
        if self.state is not _OPEN:
            return False
        if len(payload) > 125:
            raise ValueError("pong payload over 125 bytes")
        self._write_frame(0x8A, payload)
        return True

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> bool:
        """Start the closing handshake: queue a close frame and wait for the peer's (state CLOSING).

        ``code`` must be one that may be sent (RFC 6455 section 7.4; 1005 sends an empty close frame): ValueError
        otherwise, before anything changes."""
        if code != CloseCode.NO_STATUS and not is_valid_close_code(code):
            raise ValueError(f"close code {code} may not be sent (RFC 6455 section 7.4)")
        if self.state is not _OPEN:
            return False
        self._write_frame(0x88, encode_close_payload(code, reason))
        self.close_code = code
        self.close_reason = reason
        self.state = _CLOSING
        return True

    def fail(self, code: int, reason: str) -> Closed | None:
        """Give up on the connection now (keepalive timeout, server error): close frame if possible, then TCP."""
        if self.state is _CLOSED or self.state is _CONNECTING:
            return None
        self.held = None
        closed = self._fail(code, reason)
        closed.error = None  # the caller's decision, not a violation by the peer
        return closed

    def take_output(self) -> list[bytes | bytearray | memoryview]:
        """Everything queued since the last call, as the list of its pieces (frames encoded once for many
        recipients stay the same objects: a driver may queue them without copying). Never changes the state.

        The list is the caller's: the protocol starts a new one for what is queued next."""
        out = self._out
        if out is None:
            return []
        self._out = None
        return out

    def data_to_send(self) -> bytes:
        """Everything queued since the last call, as one buffer for one ``send``. Never changes the state."""
        out = self._out
        if not out:
            return b""
        data = out[0] if len(out) == 1 and isinstance(out[0], bytes) else b"".join(out)
        self._out = None
        return data

    @property
    def extension(self) -> Extension | None:
        """The negotiated permessage-deflate, if any."""
        return self._deflate

    @property
    def has_output(self) -> bool:
        """Whether :meth:`data_to_send` has something to give."""
        return bool(self._out)

    @property
    def pending_output(self) -> int:
        """Bytes queued and not yet taken by :meth:`data_to_send` (computed: for metrics, not the hot path)."""
        return sum(len(chunk) for chunk in self._out) if self._out is not None else 0

    def _write_message(self, opcode: int, payload: bytes | bytearray | memoryview) -> None:
        deflate = self._deflate
        if deflate is not None and deflate.should_compress(len(payload)):
            self._write_frame(0xC0 | opcode, deflate.compress(bytes(payload)))
        else:
            self._write_frame(0x80 | opcode, payload)

    def _write_frame(self, first: int, payload: bytes | bytearray | memoryview) -> None:
        n = len(payload)
        out = self._output()
        if self._mask_source is None:
            out.append(bytes((first, n)) if n < 126 else encode_header(first, n))
            if n:
                # A bytearray or memoryview may be reused by the caller before data_to_send(): keep a copy.
                out.append(payload if type(payload) is bytes else bytes(payload))
        else:
            mask = self._mask_source()
            out.append(encode_header(first, n, 0x80) + mask + mask_payload(payload, mask))

    def _output(self) -> list[bytes | bytearray | memoryview]:
        """The output list, started if nothing was queued (off the small-message path, which does this inline)."""
        out = self._out
        if out is None:
            out = self._out = []
        return out


class _Aux:
    """What a :class:`Connection` seldom holds, in one object made when it first does, so that an idle connection
    holds one None instead of five slots (memory per connection); read and written through the properties of the
    same names (``_frag_buf``, ``_partial_decoder``, ``_skip``, ``close_code``, ``close_reason``: ondemand.py), off the
    hot path."""

    __slots__ = ("close_code", "close_reason", "frag_buf", "partial_decoder", "skip")

    def __init__(self) -> None:
        self.frag_buf: bytearray | None = None
        self.partial_decoder: codecs.IncrementalDecoder | None = None
        self.skip: _Skip | None = None
        self.close_code: int | None = None
        self.close_reason = ""


class _Large:
    """A large data frame received in streaming mode: its payload, sized from the header and filled read by read
    (unmasked on the way in), delivered as a message or fragment once complete."""

    __slots__ = ("b0", "decoder", "payload")

    def __init__(self, b0: int, payload: Payload, decoder: codecs.IncrementalDecoder | None) -> None:
        self.b0 = b0  # FIN, RSV1 and opcode
        self.payload = payload  # a BytesPayload for a whole binary message, a PayloadBuffer otherwise
        self.decoder = decoder  # a text frame's fail-fast UTF-8 check, None otherwise


class _Skip:
    """The rest of a message over the size limit, skipped while our 1009 close frame waits (``max_discard``)."""

    __slots__ = ("budget", "final", "first", "frame", "head", "left")

    def __init__(self, head: bytes, budget: int) -> None:
        self.head = head  # input not parsed yet: the oversized frame from its header on, later a split header
        self.budget = budget  # bytes that may still be skipped
        self.left = 0  # bytes of the current frame (mask and payload) still to skip
        self.final = False  # the current frame ends the message
        self.first = True  # the next header is the oversized frame's own
        self.frame: list[bytes | bytearray | memoryview] = []  # our close frame, held


#: ``held`` when only buffered input waits (frames that came with the opening handshake).
_RESUME: tuple[int, str, str | None] = (0, "", None)


def _random_mask() -> bytes:
    return os.urandom(4)
