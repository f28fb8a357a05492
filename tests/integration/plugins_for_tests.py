"""Small plugins the integration tests mount through the configuration (``plugins_for_tests:Class``).

The daemon subprocess imports this module by name: the fixtures put ``tests/integration`` on its ``PYTHONPATH``.
Each plugin exists to provoke one server behaviour from a real socket.
"""

from __future__ import annotations

from selectws.plugins.api import Accept, HandshakeRequest, Plugin, Reject, Session


class BoomPlugin(Plugin):
    """Echo, but a hook raises on demand.

    * message ``"boom"`` -> ``on_message`` raises (the server must close this client with 1011, log, carry on);
    * ``?fail=handshake`` -> ``on_handshake`` raises (the server must answer 500);
    * ``?fail=open`` -> ``on_open`` raises (the server must close with 1011);
    * ``?fail=close`` -> ``on_close`` raises (the server must log it and carry on).
    """

    def on_handshake(self, request: HandshakeRequest) -> Accept | None:
        if request.query.get("fail") == "handshake":
            raise RuntimeError("BoomPlugin.on_handshake exploded on purpose")
        return None

    def on_open(self, session: Session) -> None:
        if session.query.get("fail") == "open":
            raise RuntimeError("BoomPlugin.on_open exploded on purpose")

    def on_message(self, session: Session, message: str | bytes) -> None:
        if message == "boom":
            raise RuntimeError("BoomPlugin.on_message exploded on purpose")
        session.send(message)

    def on_close(self, session: Session, code: int, reason: str) -> None:
        if session.query.get("fail") == "close":
            raise RuntimeError("BoomPlugin.on_close exploded on purpose")


class TokenPlugin(Plugin):
    """Refuses the upgrade with 401 unless the query has ``token=secret``; then echoes."""

    def on_handshake(self, request: HandshakeRequest) -> Accept | None:
        if request.query.get("token") != "secret":
            raise Reject(401, "a valid token is required", [("WWW-Authenticate", 'Token realm="tests"')])
        return Accept(headers=[("X-Test-Accepted", "yes")])

    def on_message(self, session: Session, message: str | bytes) -> None:
        session.send(message)


class ProtoPlugin(Plugin):
    """Speaks ``chat.v2`` and ``chat.v1``; answers every message with the negotiated subprotocol (or "none")."""

    subprotocols = ("chat.v2", "chat.v1")

    def on_message(self, session: Session, message: str | bytes) -> None:
        session.send_text(session.subprotocol or "none")


class StrictProtoPlugin(ProtoPlugin):
    """Like :class:`ProtoPlugin` but refuses clients that offer none of its subprotocols."""

    subprotocol_required = True


class ByePlugin(Plugin):
    """Echo; on ``"bye"`` the server starts the closing handshake with code 4000."""

    def on_message(self, session: Session, message: str | bytes) -> None:
        if message == "bye":
            session.close(4000, "bye from the server")
            return
        session.send(message)
