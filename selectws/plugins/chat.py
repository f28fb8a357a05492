"""``chat``: the article's instant-messaging flow, as JSON text messages on ``/chat``.

* ``{"type":"login","name":"alice","room":"lobby"}`` -> to her ``welcome`` with the room's members (on every
  instance), to the others ``joined``;
* ``{"type":"say","text":"hi"}`` -> ``said`` to everyone in the room, sender included;
* when she goes -> ``left`` to the room (also when her instance dies: docs/presence.md).

On a route with ``auth = "jwt"`` the name comes from the token (its ``name`` claim, else ``sub``): ``login`` needs
only ``room``, a ``name`` that disagrees with the token is an error, and one user's tabs share the name (``joined``
goes out for the first, ``left`` for the last).

On a route with ``history_size`` (docs/history.md): ``said``, ``joined`` and ``left`` carry ``"offset": N``;
``welcome`` carries ``"epoch"`` and ``"offset"`` (the room's latest message); a ``login`` with
``"since": {"epoch": "E", "offset": N}`` first gets every room message above N, in order and in its original shape,
then ``welcome`` with ``"recovered": true`` -- or nothing and ``"recovered": false`` when the epoch differs or
messages were trimmed (the client reloads its state).

Everything else gets ``{"type":"error","reason":...}`` and the connection stays open. Options: :class:`ChatOptions`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from selectws.plugins.api import Member, OptionError, Position, Recovery, ServerAPI, Session, option
from selectws.plugins.jsondispatch import JsonPlugin, MessageError, dumps, handles, require_str


@dataclass(frozen=True)
class ChatOptions:
    """The chat route's ``options``, in characters."""

    max_name_length: int = option(32, min=1)
    """Longest nickname."""
    max_room_length: int = option(64, min=1)
    """Longest room name."""
    max_text_length: int = option(4096, min=1)
    """Longest ``say`` text."""
    default_room: str = option("lobby", non_empty=True)
    """Room joined by a ``login`` that names none."""

    def __post_init__(self) -> None:
        if len(self.default_room) > self.max_room_length:  # else every login without a room would be refused
            raise OptionError("default_room", f"longer than max_room_length ({self.max_room_length} characters), got "
                                              f"{len(self.default_room)}")


class ChatPlugin(JsonPlugin):
    """Rooms are groups named ``chat:<room>``; a member's name lives in ``session.state`` and in its presence info,
    so the member list and the "name taken" check see every instance."""

    Options = ChatOptions
    opts: ChatOptions

    def __init__(self, server: ServerAPI, options: Mapping[str, Any]) -> None:
        super().__init__(server, options)
        self.max_name = self.opts.max_name_length
        self.max_room = self.opts.max_room_length
        self.max_text = self.opts.max_text_length
        self.default_room = self.opts.default_room

    # -------------------------------------------------------------- history and presence
    def owns_group(self, group: str) -> bool:
        return group.startswith("chat:")

    def with_position(self, group: str, message: str | bytes, offset: int, epoch: str) -> str | bytes:
        """Room messages are JSON objects: the offset becomes their last field, ``"offset": N``."""
        if isinstance(message, str) and message.endswith("}"):
            body = message[:-1].rstrip()
            return f'{body}{"" if body.endswith("{") else ","}"offset":{offset}}}'
        return message

    def _names(self, room: str) -> list[str]:
        # Every instance's members; a user of a JWT route may be in the room from several tabs: listed once.
        names = (m.info.get("name") for m in self.server.presence(f"chat:{room}"))
        return list(dict.fromkeys(n for n in names if isinstance(n, str)))

    def _others_named(self, session: Session, room: str, name: str) -> list[Member]:
        """The other members of ``room``, on any instance, logged in as ``name``."""
        members = self.server.presence(f"chat:{room}")
        return [m for m in members if m.session != session.id and m.info.get("name") == name]

    @staticmethod
    def _token_name(session: Session) -> str | None:
        """On an ``auth = "jwt"`` route the name comes from the token: its ``name`` claim, else ``sub``."""
        if session.user is None:
            return None
        claimed = session.claims.get("name")
        return claimed.strip() if isinstance(claimed, str) and claimed.strip() else session.user

    @staticmethod
    def _since(msg: Mapping[str, Any]) -> Position | None:
        since = msg.get("since")
        if since is None:
            return None
        if not isinstance(since, dict):
            raise MessageError("field 'since' must be an object {\"epoch\": \"...\", \"offset\": N}")
        epoch, offset = since.get("epoch"), since.get("offset")
        if not isinstance(epoch, str) or len(epoch) > 64:
            raise MessageError("field 'since.epoch' must be a string (the epoch from 'welcome')")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise MessageError("field 'since.offset' must be an integer >= 0")
        return Position(epoch, offset)

    @handles("login")
    def login(self, session: Session, msg: Mapping[str, Any]) -> None:
        if "name" in session.state:
            raise MessageError("already logged in")
        name = self._token_name(session)
        if name is None:
            name = require_str(msg, "name", max_length=self.max_name).strip()
            if not name:
                raise MessageError("field 'name' is empty")
        elif "name" in msg and (not isinstance(msg["name"], str) or msg["name"].strip() != name):
            raise MessageError(f"field 'name' does not match your token (it says '{name}'); leave 'name' out")
        room = msg.get("room", self.default_room)
        if not isinstance(room, str):
            raise MessageError("field 'room' must be a string")
        room = require_str({"room": room}, "room", max_length=self.max_room)
        since = self._since(msg)
        same = self._others_named(session, room, name)
        # Taken by someone else; on a JWT route, the same user's other tabs share the name.
        if any(session.user is None or m.user != session.user for m in same):
            raise MessageError(f"name '{name}' is already taken in room '{room}'")
        session.state["name"] = name
        session.state["room"] = room
        group = f"chat:{room}"

        def welcome(recovery: Recovery) -> None:
            # Again, now that the other instances' members of the room are known (an instance that just started
            # following the room asked them): the name may be taken on another instance.
            others = self._others_named(session, room, name)
            if any(session.user is None or m.user != session.user for m in others):
                session.leave(group)
                session.state.pop("name", None)
                session.state.pop("room", None)
                self.send_json(session, {"type": "error", "reason": f"name '{name}' is already taken in room '{room}'"})
                return
            answer: dict[str, Any] = {"type": "welcome", "name": name, "room": room, "members": self._names(room)}
            if recovery.epoch is not None:
                answer["epoch"] = recovery.epoch
                answer["offset"] = recovery.offset
            if recovery.recovered is not None:
                answer["recovered"] = recovery.recovered
            self.send_json(session, answer)
            if not others:  # the user's first tab in the room
                self.server.broadcast(group, dumps({"type": "joined", "name": name}), exclude=session)

        session.join(group, info={"name": name}, since=since, then=welcome)

    @handles("say")
    def say(self, session: Session, msg: Mapping[str, Any]) -> None:
        name = session.state.get("name")
        if name is None:
            raise MessageError("log in first")
        text = require_str(msg, "text", max_length=self.max_text)
        self.server.broadcast(f"chat:{session.state['room']}", dumps({"type": "said", "from": name, "text": text}))

    def on_close(self, session: Session, code: int, reason: str) -> None:
        name = session.state.get("name")
        if name is not None and not self._others_named(session, session.state["room"], name):  # its last tab
            left = dumps({"type": "left", "name": name})
            self.server.broadcast(f"chat:{session.state['room']}", left, exclude=session)

    def on_presence_gone(self, group: str, members: list[Member]) -> None:
        """Another instance died: ``left`` for each of its members whose name is now nowhere in the room."""
        still = {m.info.get("name") for m in self.server.presence(group)}
        for name in dict.fromkeys(m.info.get("name") for m in members):
            if isinstance(name, str) and name not in still:
                self.server.broadcast(group, dumps({"type": "left", "name": name}))
