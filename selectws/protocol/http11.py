"""A strict, bounded HTTP/1.1 request-head parser and response builder, sans-I/O.

It serves the WebSocket opening handshake and the daemon's plain HTTP routes alike. It is deliberately small:
a request head is parsed only once complete (``\\r\\n\\r\\n`` seen) and refused as soon as it can no longer fit the
limits, so a client dribbling an endless header costs at most ``max_header_bytes`` of memory.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote

from selectws.protocol.errors import HandshakeError

__all__ = [
    "REASONS",
    "Headers",
    "HttpLimits",
    "Request",
    "Response",
    "build_response",
    "make_response",
    "parse_request",
    "parse_response",
]

REASONS = {
    101: "Switching Protocols",
    200: "OK",
    204: "No Content",
    301: "Moved Permanently",
    303: "See Other",
    304: "Not Modified",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    411: "Length Required",
    413: "Content Too Large",
    414: "URI Too Long",
    426: "Upgrade Required",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_VERSION = re.compile(rb"HTTP/(\d)\.(\d)\Z")


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Hard limits on a request head; exceeding one is answered before the rest is read."""

    max_request_line: int = 8192
    max_header_count: int = 100
    max_header_bytes: int = 16384


class Headers:
    """Header fields in arrival order, looked up case-insensitively."""

    __slots__ = ("_index", "_items")

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._items = list(items)
        # Lower-cased name -> values, built once: a handshake asks for half a dozen fields.
        index: dict[str, list[str]] = {}
        for key, value in self._items:
            lname = key.lower()
            values = index.get(lname)
            if values is None:
                index[lname] = [value]
            else:
                values.append(value)
        self._index = index

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of ``name``."""
        values = self._index.get(name.lower())
        return values[0] if values else default

    def get_all(self, name: str) -> list[str]:
        return list(self._index.get(name.lower(), ()))

    def tokens(self, name: str) -> list[str]:
        """Comma-separated tokens of every ``name`` field, lower-cased (``Connection: keep-alive, Upgrade``)."""
        return [t.strip().lower() for value in self.get_all(name) for t in value.split(",") if t.strip()]

    def add(self, name: str, value: str) -> None:
        """Append a field (a response value may be changed this way before it is sent)."""
        self._items.append((name, value))
        self._index.setdefault(name.lower(), []).append(value)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def as_dict(self) -> dict[str, str]:
        """Lower-cased names; repeated fields joined with ``", "`` as RFC 9110 section 5.3 allows."""
        out: dict[str, str] = {}
        for key, value in self._items:
            k = key.lower()
            out[k] = f"{out[k]}, {value}" if k in out else value
        return out

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"

    @classmethod
    def from_head(cls, head: bytes) -> Headers:
        """Re-read the fields of a request head that :func:`parse_request` already validated.

        Connections keep their request head as one ``bytes`` object and build :class:`Headers` only when a
        plugin asks: twenty small strings per connection would be most of an idle connection's memory.
        """
        return cls(_parse_fields(head.split(b"\r\n")[1:], strict=False))


@dataclass(slots=True)
class Request:
    """A parsed request head. ``path`` is percent-decoded; ``query`` keeps the first value of each name."""

    method: str
    target: str
    version: tuple[int, int]
    headers: Headers
    path: str = ""
    query_string: str = ""
    query: dict[str, str] = field(default_factory=dict)
    head: bytes = b""  # the request head as received, without the final blank line

    def serialize(self) -> bytes:
        """The request head as written on the wire (client role)."""
        lines = [f"{self.method} {self.target} HTTP/{self.version[0]}.{self.version[1]}"]
        lines.extend(f"{k}: {v}" for k, v in self.headers)
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@dataclass(slots=True)
class Response:
    """An HTTP response: a value to inspect or change before :meth:`serialize` (server role), or a parsed response
    head (client role, where ``body`` is empty)."""

    status: int
    reason: str
    version: tuple[int, int]
    headers: Headers
    body: bytes = b""

    def serialize(self) -> bytes:
        """The response as written on the wire: status line, the fields as they are, blank line, body."""
        lines = [f"HTTP/{self.version[0]}.{self.version[1]} {self.status} {self.reason}"]
        lines.extend(f"{k}: {v}" for k, v in self.headers)
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


def _parse_fields(lines: list[bytes], *, strict: bool = True) -> list[tuple[str, str]]:
    """The header fields of a head's lines (after the start line): the one field parser of this module.

    ``strict`` judges them (RFC 9112 section 5: no obsolete folding, a token for a name, no control characters
    in a value); without it the lines are known to be valid already (a head kept after :func:`parse_request`).
    """
    items: list[tuple[str, str]] = []
    for line in lines:
        name, sep, value = line.partition(b":")
        value = value.strip(b" \t")
        if strict:
            if line[:1] in (b" ", b"\t"):
                raise HandshakeError(400, "obsolete header line folding")
            if not sep or not _TOKEN.match(name):
                raise HandshakeError(400, "malformed header field")
            if _BAD_VALUE.search(value):
                raise HandshakeError(400, "control character in a header value")
        items.append((name.decode("ascii"), value.decode("latin-1")))
    return items


def parse_request(buf: bytes | bytearray, limits: HttpLimits = HttpLimits()) -> tuple[Request, int] | None:
    """Parse a request head from the start of ``buf``.

    Returns the request and the number of bytes it used (what follows may already be WebSocket frames), or
    ``None`` when more bytes are needed. Raises :class:`HandshakeError` with the status to answer: 400 for
    malformed input, 414 for an over-long request line, 431 for too many or too large header fields.
    """
    line_end = buf.find(b"\r\n", 0, limits.max_request_line + 2)
    if line_end < 0:
        # A line of exactly the limit may be waiting for the "\n" of its CRLF: do not count a trailing "\r".
        if len(buf) - buf.endswith(b"\r") > limits.max_request_line:
            raise HandshakeError(414, "request line too long")
        return None
    end = buf.find(b"\r\n\r\n", 0, limits.max_header_bytes + 4)
    if end < 0:
        # The head may be up to max_header_bytes before its CRLFCRLF (as when it arrives in one piece): it can
        # no longer fit only once the terminator could not end within max_header_bytes + 4.
        if len(buf) >= limits.max_header_bytes + 4:
            raise HandshakeError(431, "request header too large")
        # Count complete header lines already here, so a client cannot send 10,000 tiny headers slowly.
        if buf.count(b"\r\n", 0, limits.max_header_bytes) - 1 > limits.max_header_count:
            raise HandshakeError(431, "too many header fields")
        return None
    head = bytes(buf[:end])
    lines = head.split(b"\r\n")
    request_line = lines[0]
    parts = request_line.split(b" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise HandshakeError(400, "malformed request line")
    method, target, version = parts
    if not _TOKEN.match(method):
        raise HandshakeError(400, "malformed method")
    match = _VERSION.match(version)
    if not match:
        raise HandshakeError(400, "malformed HTTP version")
    major, minor = int(match.group(1)), int(match.group(2))
    if major != 1:
        raise HandshakeError(505, f"HTTP/{major}.{minor} is not supported")
    if len(lines) - 1 > limits.max_header_count:
        raise HandshakeError(431, "too many header fields")
    items = _parse_fields(lines[1:])
    try:
        target_text = target.decode("ascii")
    except UnicodeDecodeError:
        raise HandshakeError(400, "non-ASCII request target") from None
    if not target_text.startswith("/"):
        # Absolute-form targets are for proxies; a WebSocket server only needs origin-form.
        raise HandshakeError(400, "request target must be a path")
    raw_path, _, query_string = target_text.partition("?")
    raw_path = raw_path.partition("#")[0]
    request = Request(
        method=method.decode("ascii"),
        target=target_text,
        version=(major, minor),
        headers=Headers(items),
        path=unquote(raw_path) if "%" in raw_path else raw_path,
        query_string=query_string,
        query=parse_query(query_string),
        head=head,
    )
    return request, end + 4


def parse_query(query_string: str) -> dict[str, str]:
    """Query parameters, the first value of each name."""
    query: dict[str, str] = {}
    if not query_string:
        return query
    for qkey, qvalue in parse_qsl(query_string, keep_blank_values=True):
        query.setdefault(qkey, qvalue)
    return query


def parse_response(buf: bytes | bytearray, max_bytes: int = 65536) -> tuple[Response, int] | None:
    """Parse a response head (the client side of the opening handshake)."""
    end = buf.find(b"\r\n\r\n", 0, max_bytes + 4)
    if end < 0:
        if len(buf) >= max_bytes:
            raise HandshakeError(431, "response header too large")
        return None
    lines = bytes(buf[:end]).split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    match = _VERSION.match(parts[0]) if parts else None
    if len(parts) < 2 or not match or not parts[1].isdigit() or len(parts[1]) != 3:
        raise HandshakeError(400, "malformed status line")
    items = _parse_fields(lines[1:])
    reason = parts[2].decode("latin-1") if len(parts) > 2 else ""
    version = (int(match.group(1)), int(match.group(2)))
    return Response(int(parts[1]), reason, version, Headers(items)), end + 4


def make_response(
    status: int,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    *,
    content_type: str | None = "text/plain; charset=utf-8",
    close: bool = True,
    head_only: bool = False,
) -> Response:
    """A complete HTTP/1.1 response value: ``Content-Type``, ``Content-Length`` and ``Connection: close`` are
    added unless given (not on a 101); ``head_only`` answers a HEAD (the length of the body, no body)."""
    extra = list(headers)
    names = {k.lower() for k, _ in extra}
    fields: list[tuple[str, str]] = []
    if status != 101:
        if content_type and "content-type" not in names and (body or status >= 400):
            fields.append(("Content-Type", content_type))
        if "content-length" not in names:
            fields.append(("Content-Length", str(len(body))))
        if close and "connection" not in names:
            fields.append(("Connection", "close"))
    fields.extend(extra)
    return Response(status, REASONS.get(status, "Unknown"), (1, 1), Headers(fields), b"" if head_only else body)


def build_response(
    status: int,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    *,
    content_type: str | None = "text/plain; charset=utf-8",
    close: bool = True,
    head_only: bool = False,
) -> bytes:
    """:func:`make_response`, serialized: every HTTP answer of the daemon is built by these two."""
    return make_response(
        status, headers, body, content_type=content_type, close=close, head_only=head_only
    ).serialize()
