"""The plugin API, as plugins import it: :mod:`selectws.server.api` defines it (the server layer owns the
connections the API describes); this module is the stable import path for plugins, built-in or not."""

from selectws.server.api import Accept, HandshakeRequest, Plugin, Reject, ServerAPI, Session

__all__ = ["Accept", "HandshakeRequest", "Plugin", "Reject", "ServerAPI", "Session"]
