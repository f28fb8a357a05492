"""OnDemand (selectws/protocol/ondemand.py): a field kept in a side object made on demand."""

from __future__ import annotations

from selectws.protocol.ondemand import OnDemand


class Side:
    __slots__ = ("count", "name")

    def __init__(self) -> None:
        self.count = 0
        self.name: str | None = None

    @property
    def unused(self) -> bool:
        return self.count == 0 and self.name is None


class Owner:
    __slots__ = ("_side",)
    count: OnDemand[int] = OnDemand(0, "_side", Side)
    _name: OnDemand[str | None] = OnDemand(None, "_side", Side)

    def __init__(self) -> None:
        self._side: Side | None = None


def test_defaults_make_no_side_object_and_values_make_one() -> None:
    o = Owner()
    assert o.count == 0 and o._name is None and o._side is None
    o.count = 0
    o._name = None
    assert o._side is None  # a default assigned while there is none makes none
    o._name = "x"
    assert o._side is not None and o._side.name == "x" and o._name == "x"  # "_name" is the side's "name"
    o.count = 3
    assert o.count == 3 and o._side.count == 3


def test_a_side_object_left_unused_by_a_default_is_dropped() -> None:
    o = Owner()
    o.count, o._name = 2, "y"
    o.count = 0
    assert o._side is not None  # name still set
    o._name = None
    assert o._side is None and o.count == 0 and o._name is None
