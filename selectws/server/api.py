"""The plugin API: everything a plugin may see of the server and of a connection.

A plugin never sees a socket. It gets:

* :class:`Session` -- one WebSocket connection: ``send_text`` / ``send_bytes`` / ``send``, ``close``, a per-connection
  ``state`` dict, ``remote`` address, ``path``, ``params`` (path parameters such as ``{channel}``), ``query`` and
  ``headers``, and ``join`` / ``leave`` for groups; on an ``auth = "jwt"`` route ``user`` (the token's ``sub``) and
  ``claims`` (None and ``{}`` elsewhere; docs/auth.md);
* :class:`ServerAPI` -- the server: groups (``join``, ``leave``, ``members``), ``broadcast(group, message,
  exclude=...)`` which encodes the frame once for every recipient, connection lookup by id (``session.id`` is a
  string, ``"<instance>.<n>"``, unique across instances), and a logger;
* history and presence (docs/history.md, docs/presence.md): ``join(..., since=, then=)`` replays what a
  reconnecting client missed, ``history(group, ...)`` reads a group's past, ``presence(group)`` lists the members on
  every instance; a plugin says which groups are its own (:meth:`Plugin.owns_group`) and how a message carries its
  offset (:meth:`Plugin.with_position`).

The built-in plugins are written against this API only, so anything they do a user's plugin can do too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from selectws.protocol.http11 import Headers
from selectws.server.history import HistoryResult, Position, Recovery
from selectws.server.options import check_options_class, parse_options
from selectws.server.presence import Member

__all__ = ["Accept", "HandshakeRequest", "HistoryResult", "Member", "Plugin", "Position", "Recovery", "Reject",
           "ServerAPI", "Session"]


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

    def join(self, group: str, *, info: dict[str, Any] | None = None, since: Position | None = None,
             then: Callable[[Recovery], None] | None = None) -> None:
        """``server.join(self, group, ...)``."""

    def leave(self, group: str) -> None: ...


class ServerAPI(Protocol):
    """The server as plugins see it."""

    def join(self, session: Session, group: str, *, info: dict[str, Any] | None = None,
             since: Position | None = None, then: Callable[[Recovery], None] | None = None) -> None:
        """Add ``session`` to ``group``.

        ``info``: a small JSON-able dict (at most 1 KiB as JSON) shown with the session in :meth:`presence` on every
        instance (the chat gives the name). ``then``: called with a :class:`Recovery` once the group's position is
        known -- at once with the memory broker, after one round trip with Redis. With ``since`` (a
        :class:`Position` the client remembered) every message of the group above it is first sent to the session,
        in order and in its route's shape (``recovered`` True), or nothing when the epoch differs or messages were
        trimmed (``recovered`` False). Messages published meanwhile are delivered after ``then`` returns, none lost
        and none twice. On a group no route keeps history, ``then`` gets ``Recovery(None, None, ...)``.
        """

    def presence(self, group: str) -> list[Member]:
        """The members of ``group`` on every instance, each with its session id, instance, user and info.

        A synchronous read of what this instance knows: exact for the groups it has members in (the broker keeps it
        up to date), this instance's members only for the others."""
        ...

    def history(self, group: str, since: int | None, limit: int, callback: Callable[[HistoryResult], None]) -> None:
        """Read ``group``'s epoch, latest offset and up to ``limit`` messages above ``since`` (oldest first);
        ``callback`` gets them (maybe before this returns). :class:`LookupError` when no route keeps the group's
        history."""

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
    ``session.state``. ``options`` is the route's ``options`` table from the config, as written; ``opts`` the same
    checked against :attr:`Options` (docs/plugins.md, "Plugin options"). An exception raised by a hook closes that
    connection with 1011 and is logged; it never stops the server.
    """

    #: Subprotocols the plugin speaks, in preference order (the client's order decides among them).
    subprotocols: ClassVar[Sequence[str]] = ()
    #: Refuse clients that offer none of ``subprotocols`` (400) instead of accepting without one.
    subprotocol_required: ClassVar[bool] = False
    #: The options the plugin takes, as a dataclass (:mod:`selectws.server.options`): checked by ``check-config``,
    #: ``serve`` and a reload, then an instance in ``self.opts``. ``None``: the table is taken unchecked.
    Options: ClassVar[type[Any] | None] = None

    options: dict[str, Any]
    """The route's ``options`` table as written in the configuration."""
    opts: Any
    """An instance of :attr:`Options` (checked, defaults filled in); without ``Options``, the table, unchecked.
    Annotate it in a plugin (``opts: MyOptions``) for type checkers."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("Options") is not None:
            check_options_class(cls.__dict__["Options"])  # a mistake in the declaration: TypeError at import

    @classmethod
    def validate_options(cls, options: Mapping[str, Any]) -> Any:
        """``options`` checked against :attr:`Options` (what ``self.opts`` gets); raises
        :class:`~selectws.server.options.OptionError` naming the option. The configuration loader calls it for
        every route, so a bad option fails ``check-config``, ``serve`` and a reload, not the plugin's constructor."""
        return dict(options) if cls.Options is None else parse_options(cls.Options, options)

    def __init__(self, server: ServerAPI, options: Mapping[str, Any]) -> None:
        self.server = server
        self.options = dict(options)
        self.opts = self.validate_options(self.options)

    def on_handshake(self, request: HandshakeRequest) -> Accept | None:
        """Decide on an upgrade: return ``None`` or :class:`Accept` to accept, raise :class:`Reject` to refuse."""
        return None

    def on_open(self, session: Session) -> None:
        """The connection is open: the 101 went out."""

    def on_message(self, session: Session, message: str | bytes) -> None:
        """A whole message arrived: ``str`` for text, ``bytes`` for binary."""

    def on_close(self, session: Session, code: int, reason: str) -> None:
        """The connection is gone (``code`` 1006 when it went without a close frame)."""

    def owns_group(self, group: str) -> bool:
        """Whether ``group`` is one of this route's groups. The route's ``history_size`` and ``history_ttl`` apply to
        the groups it owns (whoever publishes to them: a plugin, the server API), and their messages are shaped by
        :meth:`with_position`. A route with history needs a plugin that overrides this; the first such route in
        the configuration that owns a group wins."""
        return False

    owns_group.selectws_default = True  # type: ignore[attr-defined]  # the config check: "owns no group"

    def with_position(self, group: str, message: str | bytes, offset: int, epoch: str) -> str | bytes:
        """``message`` of one of this route's groups, as it goes out with its place in the history (on delivery and
        on replay, the same shape). The default sends it unchanged."""
        return message

    def on_presence_gone(self, group: str, members: list[Member]) -> None:
        """``members`` of another instance left ``group`` without saying so (the instance died or lost its broker).
        Called on one instance only (of those with members in the group), for each plugin with members in it."""
