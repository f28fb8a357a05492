"""Attributes kept in a side object made on demand: memory per connection.

A connection object has a few fields that almost no connection ever sets (a fragmented message's buffer, the close
frame it sent, a token's expiry, ...). Each slot costs 8 bytes on every connection; keeping those fields in one side
object, made when the first of them is given a value other than its default, costs one slot instead. ``OnDemand``
is that field, declared on the class::

    class Conn:
        __slots__ = ("_aux", ...)
        close_code = OnDemand(None, "_aux", lambda: _Aux())

It reads the side object's attribute of the same name (without a leading underscore: ``_frag_buf`` is
``_aux.frag_buf``), or ``default`` while there is no side object; assigning the default while there is none makes
none. A side object with an ``unused`` property is dropped again when an assignment of a default leaves it unused.
Off the hot path: reading one costs a Python call, as a property does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar, overload

__all__ = ["OnDemand"]

T = TypeVar("T")


class OnDemand(Generic[T]):
    __slots__ = ("default", "factory", "field", "holder")

    def __init__(self, default: T, holder: str, factory: Callable[[], Any]) -> None:
        self.default = default
        self.holder = holder  # the slot that holds the side object, None until it is needed
        self.factory = factory  # makes the side object (a callable, so that its class may be defined later)
        self.field = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.field = name.lstrip("_")

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> OnDemand[T]: ...
    @overload
    def __get__(self, obj: object, owner: type | None = None) -> T: ...
    def __get__(self, obj: object | None, owner: type | None = None) -> T | OnDemand[T]:
        if obj is None:
            return self
        side = getattr(obj, self.holder)
        return self.default if side is None else getattr(side, self.field)

    def __set__(self, obj: object, value: T) -> None:
        side = getattr(obj, self.holder)
        if value == self.default:
            if side is not None:
                setattr(side, self.field, value)
                if getattr(side, "unused", False):
                    setattr(obj, self.holder, None)
            return
        if side is None:
            side = self.factory()
            setattr(obj, self.holder, side)
        setattr(side, self.field, value)
