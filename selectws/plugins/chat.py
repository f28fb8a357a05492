"""``chat``: the article's instant-messaging flow, as JSON text messages on ``/chat``.

* ``{"type":"login","name":"alice","room":"lobby"}`` -> to her ``welcome`` with the room's members, to the others
  ``joined``;
* ``{"type":"say","text":"hi"}`` -> ``said`` to everyone in the room, sender included;
* when she goes -> ``left`` to the room.

On a route with ``auth = "jwt"`` the name comes from the token (its ``name`` claim, else ``sub``): ``login`` needs
only ``room``, a ``name`` that disagrees with the token is an error, and one user's tabs share the name (``joined``
goes out for the first, ``left`` for the last).

Everything else gets ``{"type":"error","reason":...}`` and the connection stays open. Options: ``max_name_length``
(default 32), ``max_room_length`` (64), ``max_text_length`` (4096), ``default_room`` ("lobby").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from selectws.plugins.api import ServerAPI, Session
from selectws.plugins.jsondispatch import JsonPlugin, MessageError, dumps, handles, require_str


class ChatPlugin(JsonPlugin):
    """Rooms are groups named ``chat:<room>``; a member's name lives in ``session.state``."""

    def __init__(self, server: ServerAPI, options: Mapping[str, Any]) -> None:
        super().__init__(server, options)
        self.max_name = int(self.options.get("max_name_length", 32))
        self.max_room = int(self.options.get("max_room_length", 64))
        self.max_text = int(self.options.get("max_text_length", 4096))
        self.default_room = str(self.options.get("default_room", "lobby"))

    def _names(self, room: str) -> list[str]:
        # A user of a JWT route may be in the room from several tabs: listed once.
        return list(dict.fromkeys(s.state["name"] for s in self.server.members(f"chat:{room}") if "name" in s.state))

    def _others_named(self, session: Session, room: str, name: str) -> list[Session]:
        """The other sessions in ``room`` logged in as ``name``."""
        return [s for s in self.server.members(f"chat:{room}") if s is not session and s.state.get("name") == name]

    @staticmethod
    def _token_name(session: Session) -> str | None:
        """On an ``auth = "jwt"`` route the name comes from the token: its ``name`` claim, else ``sub``."""
        if session.user is None:
            return None
        claimed = session.claims.get("name")
        return claimed.strip() if isinstance(claimed, str) and claimed.strip() else session.user

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
        same = self._others_named(session, room, name)
        # Taken by someone else; on a JWT route, the same user's other tabs share the name.
        if any(session.user is None or s.user != session.user for s in same):
            raise MessageError(f"name '{name}' is already taken in room '{room}'")
        session.state["name"] = name
        session.state["room"] = room
        group = f"chat:{room}"
        session.join(group)
        self.send_json(session, {"type": "welcome", "name": name, "room": room, "members": self._names(room)})
        if not same:  # the user's first tab in the room
            self.server.broadcast(group, dumps({"type": "joined", "name": name}), exclude=session)

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
