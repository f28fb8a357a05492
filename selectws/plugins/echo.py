"""``echo``: every message goes back unchanged, with the same opcode."""

from __future__ import annotations

from selectws.plugins.api import NoOptions, Plugin, Session


class EchoPlugin(Plugin):
    """Returns each message to its sender: text as text, binary as binary."""

    Options = NoOptions  # takes none: any key in the route's options table is an error

    def on_message(self, session: Session, message: str | bytes) -> None:
        session.send(message)
