"""Plugin options (issue 16): a plugin declares them as a dataclass; the loader checks every route's table against it.

The mechanism (selectws.server.options, re-exported by selectws.plugins.api), the built-ins' declarations, the
configuration loader's errors naming the route by index and path, and the server's apply_config for a configuration
loaded without the plugin resolver.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from selectws.config import Config, ConfigError, parse_config
from selectws.plugins.api import NoOptions, OptionError, Plugin, option
from selectws.plugins.broadcast import BroadcastPlugin
from selectws.plugins.chat import ChatPlugin
from selectws.plugins.echo import EchoPlugin
from selectws.plugins.registry import find_plugin
from selectws.server.options import parse_options
from selectws.server.server import Server


@dataclass(frozen=True, kw_only=True)  # kw_only: a required option may follow ones with defaults
class TickerOptions:
    interval: float = option(1.0, min=0.1, max=60)
    symbols: tuple[str, ...] = option(("ACME",), non_empty=True)
    levels: list[int] = field(default_factory=list)
    feed_url: str = option(non_empty=True)  # required
    mode: str = option("fast", choices=("fast", "slow"))
    label: str | None = None
    verbose: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    anything: Any = None


def _error(options_cls: type, options: dict[str, Any]) -> tuple[str | None, str]:
    with pytest.raises(OptionError) as info:
        parse_options(options_cls, options)
    return info.value.option, info.value.reason


# ---------------------------------------------------------------------------------------------- the mechanism
def test_defaults_are_filled_in_and_values_normalised() -> None:
    opts = parse_options(TickerOptions, {"feed_url": "https://feed", "interval": 2, "levels": [1, 2]})
    assert opts == TickerOptions(interval=2.0, feed_url="https://feed", levels=[1, 2])
    assert isinstance(opts.interval, float)  # an integer where a number is expected: accepted, as a float
    assert opts.symbols == ("ACME",) and opts.mode == "fast" and opts.label is None and opts.verbose is False
    given = parse_options(TickerOptions, {"feed_url": "f", "symbols": ["A", "B"], "label": "x", "verbose": True,
                                          "extra": {"a": [1]}, "anything": [1, "two"], "mode": "slow"})
    assert given.symbols == ("A", "B") and given.label == "x" and given.verbose is True
    assert given.extra == {"a": [1]} and given.anything == [1, "two"] and given.mode == "slow"


@pytest.mark.parametrize(
    ("options", "option_name", "reason"),
    [
        ({"interval": "1"}, "interval", 'expected a number between 0.1 and 60, got "1"'),
        ({"interval": 0.05}, "interval", "expected a number between 0.1 and 60, got 0.05"),
        ({"interval": 61}, "interval", "expected a number between 0.1 and 60, got 61"),
        ({"interval": True}, "interval", "expected a number between 0.1 and 60, got true"),
        ({"interval": float("nan")}, "interval", "expected a number between 0.1 and 60, got nan"),
        ({"symbols": []}, "symbols", "expected a non-empty array of non-empty strings, got []"),
        ({"symbols": ["A", ""]}, "symbols", 'expected a non-empty array of non-empty strings, got ["A", ""]'),
        ({"symbols": "ACME"}, "symbols", 'expected a non-empty array of non-empty strings, got "ACME"'),
        ({"levels": [1, "2"]}, "levels", 'expected an array of integers, got [1, "2"]'),
        ({"mode": "Fast"}, "mode", 'expected one of "fast", "slow", got "Fast"'),
        ({"label": 3}, "label", "expected a string, got 3"),
        ({"verbose": "yes"}, "verbose", 'expected a boolean (true or false), got "yes"'),
        ({"extra": [1]}, "extra", "expected a table, got [1]"),
        ({"feed_url": ""}, "feed_url", 'expected a non-empty string, got ""'),
        ({"intervall": 1}, "intervall", "unknown option; did you mean 'interval'?"),
        ({"zzz": 1}, "zzz",
         "unknown option (known: anything, extra, feed_url, interval, label, levels, mode, symbols, verbose)"),
    ],
)
def test_each_kind_of_mistake_names_the_option(options: dict[str, Any], option_name: str, reason: str) -> None:
    assert _error(TickerOptions, {"feed_url": "f", **options}) == (option_name, reason)


def test_a_required_option_must_be_given() -> None:
    assert _error(TickerOptions, {"interval": 2}) == ("feed_url", "missing: the plugin needs it (a non-empty string)")


def test_the_first_problem_in_the_table_order_wins() -> None:
    assert _error(TickerOptions, {"zzz": 1, "interval": "x"})[0] == "zzz"
    assert _error(TickerOptions, {"interval": "x", "zzz": 1})[0] == "interval"


def test_long_values_are_shortened_in_the_error() -> None:
    _, reason = _error(TickerOptions, {"feed_url": "f", "mode": "m" * 200})
    assert reason.endswith('got "' + "m" * 76 + "...")


def test_an_empty_declaration_takes_no_options() -> None:
    assert parse_options(NoOptions, {}) == NoOptions()
    assert _error(NoOptions, {"anything": 1}) == ("anything", "unknown option (this plugin takes no options)")


def test_post_init_checks_combinations() -> None:
    @dataclass(frozen=True)
    class Window:
        low: int = 0
        high: int = 10

        def __post_init__(self) -> None:
            if self.high < self.low:
                raise OptionError("high", f"must be >= low ({self.low})")
            if self.high == self.low:
                raise ValueError("an empty window")  # a plain ValueError: the table as a whole

    assert _error(Window, {"low": 5, "high": 1}) == ("high", "must be >= low (5)")
    assert _error(Window, {"low": 5, "high": 5}) == (None, "an empty window")
    assert str(OptionError("high", "x")) == "high: x" and str(OptionError(None, "y")) == "y"


@pytest.mark.parametrize(
    ("annotation", "default", "bounds", "message"),
    [
        (set, None, {}, "type <class 'set'> is not supported"),
        (int | str, 1, {}, "only 'X | None' is supported"),
        (tuple[int, str], (1, "a"), {}, "arrays are tuple[X, ...] or list[X]"),
        (list[dict], None, {}, "arrays are tuple[X, ...] or list[X]"),
        (str, "a", {"min": 1}, "min and max are for numbers"),
        (int, 1, {"choices": ("a",)}, "choices for strings"),
        (int, 0, {"min": 1}, "the default 0 is not an integer >= 1"),
        (str, "x", {"choices": ("a", "b")}, 'the default "x" is not one of "a", "b"'),
    ],
)
def test_a_wrong_declaration_fails_when_the_plugin_class_is_defined(annotation: Any, default: Any,
                                                                    bounds: dict[str, Any], message: str) -> None:
    options_cls = dataclass(type("Bad", (), {"__annotations__": {"x": annotation},
                                             "x": option(default, **bounds) if bounds else default}))
    with pytest.raises(TypeError, match=message.replace("[", r"\[").replace("|", r"\|")):
        type("BadPlugin", (Plugin,), {"Options": options_cls})


def test_options_must_be_a_dataclass_and_mutable_defaults_are_refused() -> None:
    with pytest.raises(TypeError, match="Options must be a dataclass"):
        type("BadPlugin", (Plugin,), {"Options": dict})
    with pytest.raises(TypeError, match="use a tuple"):
        option([1])


# ---------------------------------------------------------------------------------------------- the plugin sees
class Undeclared(Plugin):
    pass


class Declared(Plugin):
    Options = TickerOptions
    opts: TickerOptions


def test_a_plugin_without_a_declaration_gets_its_table_unchecked() -> None:
    plugin = Undeclared(None, {"whatever": [1], "x": "y"})  # type: ignore[arg-type]
    assert plugin.options == {"whatever": [1], "x": "y"}
    assert plugin.opts == {"whatever": [1], "x": "y"}
    assert Undeclared.validate_options({"a": 1}) == {"a": 1}


def test_a_declaring_plugin_gets_opts_and_keeps_the_raw_options() -> None:
    plugin = Declared(None, {"feed_url": "f", "interval": 3})  # type: ignore[arg-type]
    assert plugin.opts.interval == 3.0 and plugin.opts.mode == "fast"
    assert plugin.options == {"feed_url": "f", "interval": 3}  # as written, without the defaults
    with pytest.raises(OptionError):
        Declared(None, {"interval": 3})  # type: ignore[arg-type]


def test_the_built_ins_declare_their_options() -> None:
    chat = ChatPlugin(None, {"max_name_length": 3})  # type: ignore[arg-type]
    assert (chat.max_name, chat.max_room, chat.max_text, chat.default_room) == (3, 64, 4096, "lobby")
    assert chat.opts.max_name_length == 3 and chat.options == {"max_name_length": 3}
    broadcast = BroadcastPlugin(None, {"envelope": True})  # type: ignore[arg-type]
    assert broadcast.opts.channel is None and broadcast.envelope is True and broadcast.fixed is None
    assert BroadcastPlugin(None, {"channel": "news"}).fixed == "broadcast:news"  # type: ignore[arg-type]
    assert EchoPlugin.validate_options({}) == NoOptions()
    for cls, options, name in [
        (ChatPlugin, {"max_text_length": 0}, "max_text_length"),
        (ChatPlugin, {"max_room_length": 3}, "default_room"),  # "lobby" would be refused on every login
        (ChatPlugin, {"default_room": ""}, "default_room"),
        (BroadcastPlugin, {"channel": ""}, "channel"),
        (BroadcastPlugin, {"envelope": 1}, "envelope"),
        (EchoPlugin, {"prefix": ">"}, "prefix"),
    ]:
        with pytest.raises(OptionError) as info:
            cls.validate_options(options)
        assert info.value.option == name


# ---------------------------------------------------------------------------------------------- the loader
def _routes(*options: dict[str, Any], plugin: str = "chat") -> dict[str, Any]:
    return {"routes": [{"path": "/echo", "plugin": "echo"}, {"path": "/b/{channel}", "plugin": "broadcast"},
                       *({"path": f"/chat{i or ''}", "plugin": plugin, "options": o} for i, o in enumerate(options))]}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_name_length": "x"}, 'routes[2] (/chat).options.max_name_length: expected an integer >= 1, got "x"'),
        ({"max_name_lenght": 3}, "routes[2] (/chat).options.max_name_lenght: unknown option; did you mean "
                                 "'max_name_length'?"),
        ({"max_name_length": -1}, "routes[2] (/chat).options.max_name_length: expected an integer >= 1, got -1"),
        ({"a b": 1}, 'routes[2] (/chat).options."a b": unknown option (known: default_room, max_name_length, '
                     "max_room_length, max_text_length)"),
    ],
)
def test_the_loader_names_the_route_by_index_and_path(options: dict[str, Any], message: str) -> None:
    parse_config(_routes(options))  # without the plugin resolver: not checked
    with pytest.raises(ConfigError) as info:
        parse_config(_routes(options), plugin_resolver=find_plugin)
    assert str(info.value) == message
    assert info.value.key == message.split(": ", 1)[0]


def test_the_loader_keeps_the_options_as_written() -> None:
    config = parse_config(_routes({"max_name_length": 3}), plugin_resolver=find_plugin)
    assert config.routes[2].options == {"max_name_length": 3}


def test_the_loader_calls_a_duck_typed_hook_and_reports_any_refusal() -> None:
    class Picky:
        @classmethod
        def validate_options(cls, options: Any) -> None:
            raise RuntimeError("no thanks")

    class Plain:  # no validate_options at all: nothing to check
        pass

    with pytest.raises(ConfigError) as info:
        parse_config(_routes({"x": 1}, plugin="picky"), plugin_resolver=lambda name: {"picky": Picky}.get(name, Plain))
    assert str(info.value) == "routes[2] (/chat).options: plugin 'picky' refused them: no thanks"
    parse_config(_routes({"x": 1}, plugin="plain"), plugin_resolver=lambda name: Plain)


def test_apply_config_without_the_resolver_gives_the_same_error() -> None:
    server = Server(Config(), plugins=find_plugin)
    try:
        before = server.router
        with pytest.raises(ConfigError) as info:
            server.apply_config(parse_config(_routes({}, {"max_name_length": -1})))
        assert str(info.value) == "routes[3] (/chat1).options.max_name_length: expected an integer >= 1, got -1"
        assert server.router is before
    finally:
        server.loop.close()
