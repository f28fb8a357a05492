"""``broadcast``: fan-out on ``/broadcast/{channel}``.

A message from one client goes verbatim (same opcode) to every other client on the same channel, in order, and
never back to its sender. The frame is encoded once by :meth:`ServerAPI.broadcast` for all recipients.
"""

from __future__ import annotations

from selectws.plugins.api import Plugin, Session


class BroadcastPlugin(Plugin):
    """Joins each connection to the group named by the ``channel`` path parameter (or the option ``channel``)."""

    def _group(self, session: Session) -> str:
        channel = session.params.get("channel") or str(self.options.get("channel", "default"))
        return f"broadcast:{channel}"

    def on_open(self, session: Session) -> None:
        session.join(self._group(session))

    def on_message(self, session: Session, message: str | bytes) -> None:
        self.server.broadcast(self._group(session), message, exclude=session)
