"""The plugin API: everything a plugin may see of the server and of a connection.

A plugin never sees a socket. It gets:

* :class:`Session` -- one WebSocket connection: ``send_text`` / ``send_bytes`` / ``send``, ``close``, a per-connection
  ``state`` dict, ``remote`` address, ``path``, ``params`` (path parameters such as ``{channel}``), ``query`` and
  ``headers``, and ``join`` / ``leave`` for groups; on an ``auth = "jwt"`` route ``user`` (the token's ``sub``) and
  ``claims`` (None and ``{}`` elsewhere; docs/auth.md);
* :class:`ServerAPI` -- the server: groups (``join``, ``leave``, ``members``), ``broadcast(group, message,
  exclude=...)`` which encodes the frame once for every recipient, connection lookup by id (``session.id`` is a
  string, ``"<instance>.<n>"``, unique across instances), and a logger.

The built-in plugins are written against this API only, so anything they do a user's plugin can do too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from selectws.protocol.http11 import Headers

__all__ = ["Accept", "HandshakeRequest", "Plugin", "Reject", "ServerAPI", "Session"]


class Reject(Exception):
    """Raised by :meth:`Plugin.on_handshake` to refuse the upgrade with an HTTP status (401, 403, ...)."""

    def __init__(self, status: int = 403, reason: str = "forbidden", headers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = list(headers)


@dataclass(slots=True)
class Accept:
    """What :meth:`Plugin.on_handshake` may return to shape the 101 answer."""

    subprotocol: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)


@dataclass(slots=True)
class HandshakeRequest:
    """The upgrade request as a plugin sees it, before the connection exists."""

    path: str
    params: dict[str, str]
    query: dict[str, str]
    headers: Headers
    remote: tuple[str, int]
    subprotocols: list[str]  # what the client offered, in its order
    #: On an ``auth = "jwt"`` route: the verified token's ``sub`` and its claims (None elsewhere).
    user: str | None = None
    claims: dict[str, Any] | None = None


class Session(Protocol):
    """One open WebSocket connection, as plugins see it."""

    params: dict[str, str]  # path parameters such as ``{channel}``
    subprotocol: str | None

    @property
    def id(self) -> str:
        """``"<instance>.<n>"``: unique across the instances of a cluster (each process draws a random 12-hex-digit
        instance id at start), and never reused by this process. The server API and webhooks name sessions by
        it; ``ServerAPI.get`` finds it again (on its own instance)."""
        ...

    @property
    def path(self) -> str:
        """The request path (percent-decoded)."""
        ...

    @property
    def remote(self) -> tuple[str, int]:
        """The client's address (from trusted proxy headers when configured)."""
        ...

    @property
    def query(self) -> dict[str, str]:
        """Query parameters of the upgrade request (first value of each name)."""
        ...

    @property
    def headers(self) -> Headers:
        """Header fields of the upgrade request."""
        ...

    @property
    def state(self) -> dict[str, Any]:
        """Per-connection storage for the plugin (created on first use)."""
        ...

    @property
    def user(self) -> str | None:
        """On an ``auth = "jwt"`` route: the ``sub`` claim of the verified token (the session is in the group
        ``user:<sub>``); None on other routes."""
        ...

    @property
    def claims(self) -> dict[str, Any]:
        """On an ``auth = "jwt"`` route: every claim of the verified token (``sub``, ``exp``, ``name``, ...);
        ``{}`` on other routes."""
        ...

    @property
    def groups(self) -> frozenset[str]: ...

    @property
    def open(self) -> bool: ...

    def send_text(self, text: str) -> bool: ...

    def send_bytes(self, data: bytes | bytearray | memoryview) -> bool: ...

    def send(self, message: str | bytes) -> bool: ...

    def close(self, code: int = 1000, reason: str = "") -> None: ...

    def join(self, group: str) -> None: ...

    def leave(self, group: str) -> None: ...


class ServerAPI(Protocol):
    """The server as plugins see it."""

    def join(self, session: Session, group: str) -> None: ...

    def leave(self, session: Session, group: str) -> None: ...

    def members(self, group: str) -> list[Session]: ...

    def broadcast(self, group: str, message: str | bytes, exclude: Session | Iterable[Session] | None = None) -> int:
        """Send ``message`` to every member of ``group`` but ``exclude``; returns how many got it locally."""
        ...

    def get(self, session_id: str) -> Session | None:
        """The open session with this :attr:`Session.id` on this instance (None: closed, or another instance's)."""
        ...

    def all_sessions(self) -> list[Session]: ...

    @property
    def log(self) -> Any: ...


class Plugin:
    """Base class of plugins; override the hooks you need.

    One instance serves every connection of the route it is mounted on, so per-connection data belongs in
    ``session.state``. ``options`` is the route's ``options`` table from the config. An exception raised by a hook
    closes that connection with 1011 and is logged; it never stops the server.
    """

    #: Subprotocols the plugin speaks, in preference order (the client's order decides among them).
    subprotocols: ClassVar[Sequence[str]] = ()
    #: Refuse clients that offer none of ``subprotocols`` (400) instead of accepting without one.
    subprotocol_required: ClassVar[bool] = False

    def __init__(self, server: ServerAPI, options: Mapping[str, Any]) -> None:
        self.server = server
        self.options = dict(options)

    def on_handshake(self, request: HandshakeRequest) -> Accept | None:
        """Decide on an upgrade: return ``None`` or :class:`Accept` to accept, raise :class:`Reject` to refuse."""
        return None

    def on_open(self, session: Session) -> None:
        """The connection is open: the 101 went out."""

    def on_message(self, session: Session, message: str | bytes) -> None:
        """A whole message arrived: ``str`` for text, ``bytes`` for binary."""

    def on_close(self, session: Session, code: int, reason: str) -> None:
        """The connection is gone (``code`` 1006 when it went without a close frame)."""
