"""A helper for JSON text protocols: dispatch ``{"type": ...}`` messages to handler methods.

The article's browser client speaks exactly this shape (log in on open, show each message by its type), and so
do most chat-like protocols, so the boilerplate -- parse, check ``type``, find the handler, answer errors without
dropping the connection -- lives here once. Handlers raise :class:`MessageError` to answer
``{"type": "error", "reason": ...}`` and keep the connection open.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

from selectws.plugins.api import Plugin, Session

__all__ = ["JsonPlugin", "MessageError", "handles", "require_str"]

F = TypeVar("F", bound=Callable[..., None])


class MessageError(Exception):
    """A message the protocol refuses; its text goes back to the sender as the error reason."""


def handles(msg_type: str) -> Callable[[F], F]:
    """Mark a method of a :class:`JsonPlugin` as the handler of messages whose ``type`` is ``msg_type``."""

    def mark(func: F) -> F:
        func.__dict__["_handles"] = msg_type
        return func

    return mark


def require_str(obj: Mapping[str, Any], key: str, *, max_length: int, min_length: int = 1) -> str:
    """A string field, present and within its length limits, or a :class:`MessageError` naming it."""
    value = obj.get(key)
    if value is None:
        raise MessageError(f"missing field '{key}'")
    if not isinstance(value, str):
        raise MessageError(f"field '{key}' must be a string")
    if len(value) < min_length:
        raise MessageError(f"field '{key}' is empty" if min_length == 1 else f"field '{key}' is too short")
    if len(value) > max_length:
        raise MessageError(f"field '{key}' is longer than {max_length} characters")
    return value


class JsonPlugin(Plugin):
    """Plugin base whose messages are JSON objects with a string ``type`` field."""

    _handlers: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        handlers: dict[str, str] = {}
        for klass in reversed(cls.__mro__):
            for name, attr in vars(klass).items():
                msg_type = getattr(attr, "_handles", None)
                if isinstance(msg_type, str):
                    handlers[msg_type] = name
        cls._handlers = handlers

    def on_message(self, session: Session, message: str | bytes) -> None:
        try:
            if not isinstance(message, str):
                raise MessageError("binary messages are not supported: send JSON text")
            try:
                obj = json.loads(message)
            except ValueError:
                raise MessageError("invalid JSON") from None
            if not isinstance(obj, dict):
                raise MessageError("a message must be a JSON object")
            msg_type = obj.get("type")
            if not isinstance(msg_type, str):
                raise MessageError("missing field 'type'")
            name = self._handlers.get(msg_type)
            if name is None:
                raise MessageError(f"unknown message type '{msg_type[:64]}'")
            getattr(self, name)(session, obj)
        except MessageError as exc:
            self.send_json(session, {"type": "error", "reason": str(exc)})

    @staticmethod
    def send_json(session: Session, obj: Mapping[str, Any]) -> None:
        session.send_text(dumps(obj))


def dumps(obj: Mapping[str, Any]) -> str:
    """Compact JSON, non-ASCII kept as is (smaller frames, and UTF-8 on the wire anyway)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
