"""Plugin options: a plugin declares the ``options`` table of its route as a dataclass, and gets it checked.

A plugin sets :attr:`Plugin.Options <selectws.server.api.Plugin.Options>` to a dataclass. Each field is one option:
its annotation is the type, its default the default (a field without one is required), and :func:`option` adds
bounds. ``check-config``, ``serve`` and a ``SIGHUP`` reload then check every route's table against it, with the
same one-line errors as the rest of the file (``routes[2] (/chat).options.max_name_length: expected an integer >=
1, got "x"``; an unknown key gets a "did you mean"), and the plugin finds the checked values, defaults filled in, in
``self.opts``::

    from dataclasses import dataclass
    from selectws.plugins.api import Plugin, option

    @dataclass(frozen=True, kw_only=True)      # kw_only: a required option may follow ones with defaults
    class TickerOptions:
        interval: float = option(1.0, min=0.1, max=60)     # seconds, 0.1 to 60
        symbols: tuple[str, ...] = ()                     # a plain default: the type is checked, no bounds
        feed_url: str = option(non_empty=True)            # no default: required
        mode: str = option("fast", choices=("fast", "slow"))

    class TickerPlugin(Plugin):
        Options = TickerOptions
        opts: TickerOptions                               # for type checkers: self.opts.interval is a float

The types: ``int``, ``float`` (an integer is accepted and converted), ``bool``, ``str``, ``X | None`` (optional;
TOML has no null, so ``None`` can only be the default), ``tuple[X, ...]`` and ``list[X]`` (arrays of one of those
scalars, each element checked), ``dict[str, Any]`` (any table, not looked into) and ``Any`` (anything). A
``__post_init__`` may check combinations and raise :class:`OptionError` naming the option. A mistake in the
declaration itself (an unsupported type, a default outside its own bounds) is a ``TypeError`` when the plugin class
is defined.

A plugin that declares no ``Options`` gets its table unchecked, as before; one whose dataclass has no fields (such
as :class:`NoOptions`) takes none, and any key is an error.

This lives in the server layer because :class:`~selectws.server.api.Plugin` uses it; plugins import it from
:mod:`selectws.plugins.api`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass
from typing import Any, Final

__all__ = ["NoOptions", "OptionError", "check_options_class", "option", "parse_options"]

_OPTION: Final = "selectws.option"
_SCALARS: Final[tuple[type, ...]] = (bool, int, float, str)


class OptionError(ValueError):
    """One option of a route is wrong: ``option`` names it (``None``: the table as a whole), ``reason`` says why.

    The configuration loader turns it into its error naming the route: ``routes[2] (/chat).options.<option>:
    <reason>``.
    """

    option: str | None
    reason: str

    def __init__(self, option: str | None, reason: str) -> None:
        super().__init__(option, reason)
        self.option = option
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.option}: {self.reason}" if self.option is not None else self.reason


@dataclass(frozen=True)
class NoOptions:
    """The declaration of a plugin that takes no options: ``Options = NoOptions`` (any key is then an error)."""


@dataclass(frozen=True, slots=True)
class _Bounds:
    minimum: float | None = None
    maximum: float | None = None
    non_empty: bool = False
    choices: tuple[str, ...] = ()


def option(default: Any = MISSING, *, min: float | None = None, max: float | None = None,
           non_empty: bool = False, choices: tuple[str, ...] = ()) -> Any:
    """A field of an options dataclass with bounds: ``min`` / ``max`` (inclusive, for numbers and each number of an
    array), ``non_empty`` (a string, or an array, that must not be empty), ``choices`` (the allowed strings). Without
    ``default`` the option is required. A field needs this only for bounds: ``x: int = 3`` is an option too."""
    if isinstance(default, list | dict | set):
        raise TypeError("a mutable default would be shared by every route: use a tuple")
    return dataclasses.field(default=default, metadata={_OPTION: _Bounds(min, max, non_empty, tuple(choices))})


# --------------------------------------------------------------------------------------------------
# Compiling a declaration into checks (once per class).
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Check:
    name: str
    kind: type | None  # bool, int, float or str; None: anything
    shape: str  # "scalar", "tuple", "list" (arrays of kind) or "table"
    optional: bool
    required: bool
    bounds: _Bounds

    def expected(self) -> str:
        """What the operator should have written: ``an integer >= 1``, ``an array of strings``."""
        if self.shape == "table":
            return "a table"
        article, noun, plural = _NOUNS[self.kind] if self.kind is not None else ("", "", "")
        b = self.bounds
        if self.kind is str and b.choices:
            what = "one of " + ", ".join(_show(c) for c in b.choices)
            return what if self.shape == "scalar" else f"an array of strings, each {what}"
        if b.minimum is not None and b.maximum is not None:
            limits = f" between {_num(b.minimum)} and {_num(b.maximum)}"
        elif b.minimum is not None:
            limits = f" >= {_num(b.minimum)}"
        elif b.maximum is not None:
            limits = f" <= {_num(b.maximum)}"
        else:
            limits = ""
        if self.shape == "scalar":
            if self.kind is str and b.non_empty:
                return "a non-empty string"
            return f"{article} {noun}{limits}"
        array = "a non-empty array" if b.non_empty else "an array"
        if self.kind is str and b.non_empty:
            return f"{array} of non-empty strings"
        return f"{array} of {plural}{limits}"

    def check(self, value: Any) -> Any:
        """The value as the plugin gets it, or :class:`OptionError` naming the option."""
        if self.kind is None and self.shape == "scalar":
            return value
        if value is None and self.optional:
            return None
        if self.shape == "table":
            if not isinstance(value, Mapping):
                raise OptionError(self.name, f"expected a table, got {_show(value)}")
            return dict(value)
        if self.shape == "scalar":
            return self._one(value, value)
        b = self.bounds
        if not isinstance(value, list | tuple) or (b.non_empty and not value):
            raise OptionError(self.name, f"expected {self.expected()}, got {_show(value)}")
        items = [self._one(item, value) for item in value]
        return tuple(items) if self.shape == "tuple" else items

    def _one(self, value: Any, shown: Any) -> Any:
        """One scalar (of an array, whose whole ``shown`` goes into the error)."""
        b, kind = self.bounds, self.kind
        good = True
        if kind is bool:
            good = isinstance(value, bool)
        elif kind is int or kind is float:
            # bool is an int in Python, but "max_name_length = true" is a mistake, not 1.
            accepted = int if kind is int else int | float
            good = isinstance(value, accepted) and not isinstance(value, bool)
            if good:
                value = float(value) if kind is float else value
                good = math.isfinite(value) and not (b.minimum is not None and value < b.minimum) \
                    and not (b.maximum is not None and value > b.maximum)
        elif kind is str:
            good = isinstance(value, str) and not (b.non_empty and not value) \
                and not (b.choices and value not in b.choices)
        if not good:
            raise OptionError(self.name, f"expected {self.expected()}, got {_show(shown)}")
        return value


_NOUNS: Final[dict[type, tuple[str, str, str]]] = {
    bool: ("a", "boolean (true or false)", "booleans"),
    int: ("an", "integer", "integers"),
    float: ("a", "number", "numbers"),
    str: ("a", "string", "strings"),
}


def _num(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)


def _show(value: Any) -> str:
    """A value as it is written in TOML (``"x"``, ``-1``, ``true``, ``[1, 2]``), shortened if long."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, int | float):
        text = repr(value)
    elif isinstance(value, list | tuple):
        text = "[" + ", ".join(_show(v) for v in value) + "]"
    elif isinstance(value, Mapping):
        text = "a table"
    elif value is None:
        text = "nothing"
    else:  # TOML dates and times
        text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _describe(owner: type, name: str, hint: Any, field: dataclasses.Field[Any]) -> _Check:
    where = f"{owner.__qualname__}.{name}"
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(members) != 1 or len(typing.get_args(hint)) != 2:
            raise TypeError(f"option {where}: of a union, only 'X | None' is supported, not {hint!r}")
        optional, hint = True, members[0]
    origin = typing.get_origin(hint)
    if hint is Any:
        kind, shape = None, "scalar"
    elif hint in _SCALARS:
        kind, shape = hint, "scalar"
    elif origin in (tuple, list):
        args = typing.get_args(hint)
        element = args[0] if args and (origin is list or (len(args) == 2 and args[1] is Ellipsis)) else None
        if element not in _SCALARS:
            raise TypeError(f"option {where}: arrays are tuple[X, ...] or list[X] of int, float, bool or str, "
                            f"not {hint!r}")
        kind, shape = element, origin.__name__
    elif hint is dict or origin in (dict, Mapping, typing.Mapping):
        kind, shape = None, "table"
    else:
        raise TypeError(f"option {where}: type {hint!r} is not supported (int, float, bool, str, X | None, "
                        "tuple[X, ...], list[X], dict[str, Any], Any)")
    bounds = field.metadata.get(_OPTION, _Bounds())
    if (bounds.minimum is not None or bounds.maximum is not None) and kind not in (int, float):
        raise TypeError(f"option {where}: min and max are for numbers")
    arrays = ("tuple", "list")
    if (bounds.non_empty and kind is not str and shape not in arrays) or (bounds.choices and kind is not str):
        raise TypeError(f"option {where}: non_empty is for strings and arrays, choices for strings")
    required = field.default is MISSING and field.default_factory is MISSING
    check = _Check(name, kind, shape, optional, required, bounds)
    if field.default is not MISSING and not (field.default is None and optional):
        try:  # a default the plugin itself would refuse is a bug in the plugin: say so at once
            check.check(field.default)
        except OptionError as exc:
            raise TypeError(f"option {where}: the default {_show(field.default)} is not {check.expected()}") from exc
    return check


@functools.cache
def _compile(options_cls: type) -> tuple[_Check, ...]:
    if not (isinstance(options_cls, type) and dataclasses.is_dataclass(options_cls)):
        raise TypeError(f"Options must be a dataclass (selectws.plugins.api.option), got {options_cls!r}")
    try:
        hints = typing.get_type_hints(options_cls)
    except NameError as exc:  # an annotation naming something the module does not define
        raise TypeError(f"option types of {options_cls.__qualname__} cannot be resolved: {exc}") from exc
    return tuple(_describe(options_cls, f.name, hints[f.name], f) for f in dataclasses.fields(options_cls) if f.init)


def check_options_class(options_cls: type) -> None:
    """Raise ``TypeError`` if ``options_cls`` is not a usable declaration (called when a plugin class is defined)."""
    _compile(options_cls)


def parse_options(options_cls: type, options: Mapping[str, Any]) -> Any:
    """``options`` (a route's table) checked against the dataclass ``options_cls``: an instance of it, defaults
    filled in. Raises :class:`OptionError` for the first unknown key (in the table's order), bad value or missing
    required option."""
    checks = {check.name: check for check in _compile(options_cls)}
    values: dict[str, Any] = {}
    for key, value in options.items():
        check = checks.get(key)
        if check is None:
            raise OptionError(key, _unknown(key, checks))
        values[key] = check.check(value)
    for name, check in checks.items():
        if check.required and name not in values:
            raise OptionError(name, f"missing: the plugin needs it ({check.expected()})")
    try:
        return options_cls(**values)
    except OptionError:
        raise
    except ValueError as exc:  # a __post_init__ refusing a combination
        raise OptionError(None, str(exc)) from exc


def _unknown(key: str, checks: Mapping[str, _Check]) -> str:
    if not checks:
        return "unknown option (this plugin takes no options)"
    close = difflib.get_close_matches(key, list(checks), n=1, cutoff=0.6)
    if close:
        return f"unknown option; did you mean {close[0]!r}?"
    return f"unknown option (known: {', '.join(sorted(checks))})"

