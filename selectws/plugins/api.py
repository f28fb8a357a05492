"""The plugin API, as plugins import it: :mod:`selectws.server.api` defines it (the server layer owns the
connections the API describes); this module is the stable import path for plugins, built-in or not."""

from selectws.server.api import (
    Accept,
    HandshakeRequest,
    HistoryResult,
    Member,
    Plugin,
    Position,
    Recovery,
    Reject,
    ServerAPI,
    Session,
)
from selectws.server.options import NoOptions, OptionError, option

__all__ = ["Accept", "HandshakeRequest", "HistoryResult", "Member", "NoOptions", "OptionError", "Plugin", "Position",
           "Recovery", "Reject", "ServerAPI", "Session", "option"]
