"""Tests for selectws.config: defaults, precedence, validation errors, routes, the reference file."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from selectws.config import (
    DEFAULT_ROUTES,
    CompressionConfig,
    Config,
    ConfigError,
    LimitsConfig,
    LoggingConfig,
    RouteConfig,
    ServerConfig,
    TimeoutsConfig,
    load_config,
    parse_config,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
REFERENCE = REPO_ROOT / "config" / "selectws.toml"


def write(tmp_path: Path, text: str, name: str = "selectws.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_for(data: dict[str, Any], **kwargs: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(data, **kwargs)
    return info.value


# ------------------------------------------------------------------------------------------------
# Defaults
# ------------------------------------------------------------------------------------------------


def test_defaults_from_no_file() -> None:
    cfg = load_config()
    assert cfg == Config()
    assert cfg.source is None
    assert cfg.server == ServerConfig("127.0.0.1", 8000, 1024)
    assert cfg.limits == LimitsConfig()
    assert cfg.limits.max_message_size == 1 << 20
    assert cfg.limits.write_buffer_high == 1 << 20
    assert cfg.limits.write_buffer_limit == 16 << 20
    assert cfg.limits.max_buffered_total == 256 << 20
    assert cfg.timeouts == TimeoutsConfig(10.0, 20.0, 20.0, 10.0, 10.0)
    assert cfg.logging == LoggingConfig("info", "auto")
    assert cfg.compression == CompressionConfig()
    assert cfg.routes == DEFAULT_ROUTES


def test_default_routes() -> None:
    assert [(r.path, r.plugin) for r in DEFAULT_ROUTES] == [
        ("/echo", "echo"),
        ("/broadcast/{channel}", "broadcast"),
        ("/chat", "chat"),
    ]


def test_default_route_options_are_not_shared_with_module_constant() -> None:
    cfg = parse_config({})
    assert cfg.routes[0].options is not DEFAULT_ROUTES[0].options


def test_config_is_frozen() -> None:
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.server.port = 1  # type: ignore[misc]


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    cfg = load_config(path)
    assert dataclasses.replace(cfg, source=None) == Config()
    assert cfg.source == str(path)


def test_reference_file_is_exactly_the_defaults() -> None:
    cfg = load_config(REFERENCE)
    assert cfg == dataclasses.replace(Config(), source=str(REFERENCE))


def test_reference_file_documents_every_key() -> None:
    text = REFERENCE.read_text(encoding="utf-8")
    for section in (ServerConfig, LimitsConfig, TimeoutsConfig, LoggingConfig, CompressionConfig):
        for f in dataclasses.fields(section):
            assert re.search(rf"^{f.name} = ", text, re.MULTILINE), f"{section.__name__}.{f.name} missing"


def test_reference_file_commented_examples_are_valid() -> None:
    """Uncommenting the examples in the reference file must give a loadable config."""
    text = REFERENCE.read_text(encoding="utf-8")
    lines = []
    in_examples = False
    for line in text.splitlines():
        if line.startswith("# [routes.options]") or line.startswith("# [[routes]]"):
            in_examples = True
        if in_examples and line.startswith("# ") and not line.startswith("# A third-party"):
            line = line[2:]
        elif in_examples and line == "#":
            line = ""
        lines.append(line)
    cfg = parse_config(tomllib.loads("\n".join(lines)))
    chat = next(r for r in cfg.routes if r.plugin == "chat")
    assert chat.options == {
        "max_name_length": 32,
        "max_room_length": 64,
        "max_text_length": 4096,
        "default_room": "lobby",
    }
    ticker = cfg.routes[-1]
    assert ticker.plugin == "mycompany.ws.ticker:TickerPlugin"
    assert ticker.subprotocols == ("ticker.v2", "ticker.v1")
    assert ticker.compression is False


# ------------------------------------------------------------------------------------------------
# Precedence: defaults < file < overrides
# ------------------------------------------------------------------------------------------------


def test_file_overrides_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [server]
        host = "0.0.0.0"
        port = 9001

        [limits]
        max_message_size = 65536

        [timeouts]
        ping_interval = 5       # int accepted for a float field
        close = 2.5

        [logging]
        level = "DEBUG"
        format = "Json"

        [compression]
        enabled = false
        server_max_window_bits = 10
        """,
    )
    cfg = load_config(path)
    assert cfg.server == ServerConfig("0.0.0.0", 9001, 1024)
    assert cfg.limits.max_message_size == 65536
    assert cfg.limits.max_frame_size == 1 << 20
    assert cfg.timeouts.ping_interval == 5.0
    assert isinstance(cfg.timeouts.ping_interval, float)
    assert cfg.timeouts.close == 2.5
    assert cfg.logging == LoggingConfig("debug", "json")
    assert cfg.compression.enabled is False
    assert cfg.compression.server_max_window_bits == 10
    assert cfg.routes == DEFAULT_ROUTES


def test_overrides_beat_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nhost = "10.0.0.1"\nport = 9001\n[logging]\nlevel = "error"\n')
    cfg = load_config(
        path,
        overrides={
            "server.host": "0.0.0.0",
            "server.port": 9000,
            "logging.level": "debug",
            "logging.format": "json",
        },
    )
    assert cfg.server.host == "0.0.0.0"
    assert cfg.server.port == 9000
    assert cfg.logging == LoggingConfig("debug", "json")


def test_none_overrides_are_ignored(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 9001\n")
    cfg = load_config(path, overrides={"server.port": None, "server.host": None, "logging.level": None})
    assert cfg.server.port == 9001
    assert cfg.server.host == "127.0.0.1"


def test_overrides_without_file() -> None:
    cfg = load_config(None, overrides={"server.port": 0, "compression.enabled": False})
    assert cfg.server.port == 0
    assert cfg.compression.enabled is False


def test_override_does_not_drop_other_file_keys(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nhost = "::"\nbacklog = 7\n')
    cfg = load_config(path, overrides={"server.port": 1234})
    assert cfg.server == ServerConfig("::", 1234, 7)


def test_bad_override_value_is_reported_as_from_command_line() -> None:
    err = error_for({}, overrides={"server.port": 70000})
    assert err.key == "server.port"
    assert "command-line" in err.reason


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [("server.prot", "server.port"), ("logging.levle", "logging.level"), ("routes", None), ("port", None)],
)
def test_unknown_override_key(key: str, suggestion: str | None) -> None:
    err = error_for({}, overrides={key: 1})
    assert err.key == key
    assert "unknown key" in err.reason
    if suggestion:
        assert repr(suggestion) in err.reason


def test_parse_config_does_not_mutate_input() -> None:
    data: dict[str, Any] = {"server": {"port": 1}}
    parse_config(data, overrides={"server.host": "::"})
    assert data == {"server": {"port": 1}}


# ------------------------------------------------------------------------------------------------
# Validation errors name the right key
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "key", "fragment"),
    [
        # unknown tables / keys
        ({"serverr": {}}, "serverr", "unknown key"),
        ({"server": {"hots": "x"}}, "server.hots", "unknown key"),
        ({"limits": {"max_msg": 1}}, "limits.max_msg", "unknown key"),
        # a table that is not a table
        ({"server": 5}, "server", "expected a table"),
        ({"logging": "debug"}, "logging", "expected a table"),
        # wrong types
        ({"server": {"port": "8000"}}, "server.port", "expected an integer"),
        ({"server": {"port": True}}, "server.port", "expected an integer, got boolean"),
        ({"server": {"port": 80.0}}, "server.port", "expected an integer, got float"),
        ({"server": {"host": 127}}, "server.host", "expected a string"),
        ({"limits": {"max_connections": False}}, "limits.max_connections", "got boolean"),
        ({"timeouts": {"close": "10s"}}, "timeouts.close", "expected a number"),
        ({"timeouts": {"handshake": True}}, "timeouts.handshake", "got boolean"),
        ({"compression": {"enabled": 1}}, "compression.enabled", "expected a boolean"),
        ({"compression": {"enabled": "yes"}}, "compression.enabled", "expected a boolean"),
        ({"logging": {"level": 10}}, "logging.level", "expected a string"),
        # out of range
        ({"server": {"port": -1}}, "server.port", "between 0 and 65535"),
        ({"server": {"port": 65536}}, "server.port", "between 0 and 65535"),
        ({"server": {"backlog": 0}}, "server.backlog", ">= 1"),
        ({"server": {"host": ""}}, "server.host", "must not be empty"),
        ({"limits": {"max_message_size": 0}}, "limits.max_message_size", ">= 1"),
        ({"limits": {"max_frame_size": 0}}, "limits.max_frame_size", ">= 1"),
        ({"limits": {"max_request_line": 63}}, "limits.max_request_line", ">= 64"),
        ({"limits": {"max_header_count": 0}}, "limits.max_header_count", ">= 1"),
        ({"limits": {"max_header_bytes": 255}}, "limits.max_header_bytes", ">= 256"),
        ({"limits": {"write_buffer_high": 1023}}, "limits.write_buffer_high", ">= 1024"),
        ({"limits": {"max_connections": -1}}, "limits.max_connections", ">= 0"),
        ({"timeouts": {"handshake": 0}}, "timeouts.handshake", "> 0"),
        ({"timeouts": {"ping_interval": -1.5}}, "timeouts.ping_interval", "> 0"),
        ({"timeouts": {"ping_timeout": 0.0}}, "timeouts.ping_timeout", "> 0"),
        ({"timeouts": {"close": float("nan")}}, "timeouts.close", "finite"),
        ({"timeouts": {"shutdown_grace": float("inf")}}, "timeouts.shutdown_grace", "finite"),
        ({"compression": {"server_max_window_bits": 8}}, "compression.server_max_window_bits", "9 and 15"),
        ({"compression": {"client_max_window_bits": 16}}, "compression.client_max_window_bits", "9 and 15"),
        ({"compression": {"memory_level": 0}}, "compression.memory_level", "1 and 9"),
        ({"compression": {"memory_level": 10}}, "compression.memory_level", "1 and 9"),
        ({"compression": {"min_size": -1}}, "compression.min_size", ">= 0"),
        # bad enum values
        ({"logging": {"level": "verbose"}}, "logging.level", "must be one of"),
        ({"logging": {"level": "critical"}}, "logging.level", "must be one of"),
        ({"logging": {"format": "xml"}}, "logging.format", "must be one of"),
        # routes
        ({"routes": {"path": "/x"}}, "routes", "array of tables"),
        ({"routes": []}, "routes", "at least one route"),
        ({"routes": ["/echo"]}, "routes[0]", "expected a table"),
        ({"routes": [{"plugin": "echo"}]}, "routes[0].path", "missing required key"),
        ({"routes": [{"path": "/echo"}]}, "routes[0].plugin", "missing required key"),
        ({"routes": [{"path": "/e", "plugin": "echo", "pth": "/x"}]}, "routes[0].pth", "unknown key"),
        ({"routes": [{"path": 1, "plugin": "echo"}]}, "routes[0].path", "expected a string"),
        ({"routes": [{"path": "echo", "plugin": "echo"}]}, "routes[0].path", "must start with '/'"),
        ({"routes": [{"path": "", "plugin": "echo"}]}, "routes[0].path", "must start with '/'"),
        ({"routes": [{"path": "/a b", "plugin": "echo"}]}, "routes[0].path", "must not contain"),
        ({"routes": [{"path": "/a?b=1", "plugin": "echo"}]}, "routes[0].path", "must not contain"),
        ({"routes": [{"path": "/a#b", "plugin": "echo"}]}, "routes[0].path", "must not contain"),
        ({"routes": [{"path": "/a//b", "plugin": "echo"}]}, "routes[0].path", "empty segment"),
        ({"routes": [{"path": "/a/x{id}", "plugin": "echo"}]}, "routes[0].path", "whole segments"),
        ({"routes": [{"path": "/a/{id", "plugin": "echo"}]}, "routes[0].path", "whole segments"),
        ({"routes": [{"path": "/a/{}", "plugin": "echo"}]}, "routes[0].path", "not an ASCII identifier"),
        ({"routes": [{"path": "/a/{1x}", "plugin": "echo"}]}, "routes[0].path", "not an ASCII identifier"),
        ({"routes": [{"path": "/a/{café}", "plugin": "echo"}]}, "routes[0].path", "not an ASCII identifier"),
        ({"routes": [{"path": "/{a}/{a}", "plugin": "echo"}]}, "routes[0].path", "duplicate parameter"),
        ({"routes": [{"path": "/e", "plugin": 3}]}, "routes[0].plugin", "expected a string"),
        ({"routes": [{"path": "/e", "plugin": ""}]}, "routes[0].plugin", "non-empty"),
        ({"routes": [{"path": "/e", "plugin": "my plugin"}]}, "routes[0].plugin", "without whitespace"),
        ({"routes": [{"path": "/e", "plugin": "pkg.mod:"}]}, "routes[0].plugin", "package.module:Class"),
        ({"routes": [{"path": "/e", "plugin": "pkg-x:Cls"}]}, "routes[0].plugin", "package.module:Class"),
        ({"routes": [{"path": "/e", "plugin": "e", "options": []}]}, "routes[0].options", "expected a table"),
        ({"routes": [{"path": "/e", "plugin": "e", "subprotocols": "chat"}]}, "routes[0].subprotocols", "array"),
        ({"routes": [{"path": "/e", "plugin": "e", "subprotocols": [1]}]}, "routes[0].subprotocols[0]", "string"),
        (
            {"routes": [{"path": "/e", "plugin": "e", "subprotocols": ["ok", "bad proto"]}]},
            "routes[0].subprotocols[1]",
            "not a valid subprotocol",
        ),
        (
            {"routes": [{"path": "/e", "plugin": "e", "subprotocols": ["a", "a"]}]},
            "routes[0].subprotocols[1]",
            "duplicate subprotocol",
        ),
        ({"routes": [{"path": "/e", "plugin": "e", "compression": 1}]}, "routes[0].compression", "boolean"),
        (
            {"routes": [{"path": "/e", "plugin": "echo"}, {"path": "/e", "plugin": "chat"}]},
            "routes[1].path",
            "duplicate route path",
        ),
        (
            {"routes": [{"path": "/b/{x}", "plugin": "echo"}, {"path": "/b/{y}", "plugin": "chat"}]},
            "routes[1].path",
            "duplicate route path",
        ),
    ],
)
def test_validation_error_names_key(data: dict[str, Any], key: str, fragment: str) -> None:
    err = error_for(data)
    assert err.key == key
    assert fragment in err.reason
    assert str(err) == f"{key}: {err.reason}"


def test_config_error_attributes() -> None:
    err = ConfigError("limits.max_message_size", "must be >= 1, got 0")
    assert err.key == "limits.max_message_size"
    assert err.reason == "must be >= 1, got 0"
    assert str(err) == "limits.max_message_size: must be >= 1, got 0"
    assert isinstance(err, Exception)


def test_only_first_error_is_reported() -> None:
    err = error_for({"server": {"port": -1, "backlog": 0}, "limits": {"max_frame_size": 0}})
    assert err.key == "server.port"


def test_range_error_shows_value_as_written() -> None:
    err = error_for({"timeouts": {"close": 0}})
    assert err.reason == "must be > 0, got 0"


@pytest.mark.parametrize(
    ("data", "key", "suggestion"),
    [
        ({"serverr": {}}, "serverr", "server"),
        ({"limit": {}}, "limit", "limits"),
        ({"route": []}, "route", "routes"),
        ({"server": {"hots": "x"}}, "server.hots", "server.host"),
        ({"limits": {"max_mesage_size": 1}}, "limits.max_mesage_size", "limits.max_message_size"),
        ({"timeouts": {"ping_intervall": 1}}, "timeouts.ping_intervall", "timeouts.ping_interval"),
        ({"compression": {"enable": True}}, "compression.enable", "compression.enabled"),
        # right key, wrong table
        ({"port": 8000}, "port", "server.port"),
        ({"server": {"level": "debug"}}, "server.level", "logging.level"),
        ({"routes": [{"path": "/e", "plugin": "e", "option": {}}]}, "routes[0].option", "routes[0].options"),
    ],
)
def test_unknown_key_suggestions(data: dict[str, Any], key: str, suggestion: str) -> None:
    err = error_for(data)
    assert err.key == key
    assert "unknown key" in err.reason
    assert f"did you mean {suggestion!r}?" in err.reason


def test_unknown_key_without_close_match_has_no_suggestion() -> None:
    err = error_for({"server": {"zzzzzz": 1}})
    assert err.key == "server.zzzzzz"
    assert err.reason == "unknown key"


def test_enum_typo_suggests_value() -> None:
    err = error_for({"logging": {"level": "warn"}})
    assert "did you mean 'warning'?" in err.reason


# ------------------------------------------------------------------------------------------------
# Routes
# ------------------------------------------------------------------------------------------------


def test_routes_from_file_replace_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [[routes]]
        path = "/rooms/{room}/users/{user}"
        plugin = "myapp.plugins:Rooms"
        subprotocols = ["rooms.v2", "rooms.v1"]
        compression = false

        [routes.options]
        max_users = 50
        motd = "hi"
        nested = { colours = ["red", "blue"] }

        [[routes]]
        path = "/"
        plugin = "echo"
        """,
    )
    cfg = load_config(path)
    assert cfg.routes == (
        RouteConfig(
            path="/rooms/{room}/users/{user}",
            plugin="myapp.plugins:Rooms",
            options={"max_users": 50, "motd": "hi", "nested": {"colours": ["red", "blue"]}},
            subprotocols=("rooms.v2", "rooms.v1"),
            compression=False,
        ),
        RouteConfig("/", "echo"),
    )
    assert cfg.routes[1].compression is None
    assert cfg.routes[1].subprotocols == ()
    assert cfg.routes[1].options == {}


def test_route_options_are_copied() -> None:
    options: dict[str, Any] = {"a": {"b": [1]}}
    cfg = parse_config({"routes": [{"path": "/x", "plugin": "echo", "options": options}]})
    options["a"]["b"].append(2)
    assert cfg.routes[0].options == {"a": {"b": [1]}}


@pytest.mark.parametrize(
    "path",
    ["/", "/echo", "/broadcast/{channel}", "/a/{x}/b/{y_2}", "/trailing/", "/%7Euser", "/a-b.c_d~e"],
)
def test_valid_route_paths(path: str) -> None:
    cfg = parse_config({"routes": [{"path": path, "plugin": "echo"}]})
    assert cfg.routes[0].path == path


@pytest.mark.parametrize("plugin", ["echo", "my-plugin", "pkg.mod:Class", "a.b.c:Outer.Inner", "_p:_C"])
def test_valid_plugin_references(plugin: str) -> None:
    cfg = parse_config({"routes": [{"path": "/x", "plugin": plugin}]})
    assert cfg.routes[0].plugin == plugin


def test_plugin_resolver_called_for_each_route() -> None:
    seen: list[str] = []
    parse_config(
        {"routes": [{"path": "/a", "plugin": "echo"}, {"path": "/b", "plugin": "chat"}]},
        plugin_resolver=seen.append,
    )
    assert seen == ["echo", "chat"]


def test_plugin_resolver_called_for_default_routes() -> None:
    seen: list[str] = []
    load_config(plugin_resolver=seen.append)
    assert seen == ["echo", "broadcast", "chat"]


def test_plugin_resolver_failure_names_route() -> None:
    def resolver(name: str) -> object:
        if name == "nope":
            raise LookupError("no such plugin")
        return object()

    data = {"routes": [{"path": "/a", "plugin": "echo"}, {"path": "/b", "plugin": "nope"}]}
    err = error_for(data, plugin_resolver=resolver)
    assert err.key == "routes[1].plugin"
    assert err.reason == "unknown plugin 'nope': no such plugin"
    assert isinstance(err.__cause__, LookupError)


def test_plugin_resolver_import_error_is_wrapped() -> None:
    def resolver(name: str) -> object:
        raise ModuleNotFoundError(f"No module named {name.partition(':')[0]!r}")

    err = error_for({"routes": [{"path": "/a", "plugin": "missing.mod:X"}]}, plugin_resolver=resolver)
    assert err.key == "routes[0].plugin"
    assert "unknown plugin 'missing.mod:X'" in err.reason
    assert "No module named 'missing.mod'" in err.reason


def test_plugin_resolver_not_called_when_validation_fails() -> None:
    calls: list[str] = []
    with pytest.raises(ConfigError):
        parse_config({"server": {"port": -1}}, plugin_resolver=calls.append)
    assert calls == []


# ------------------------------------------------------------------------------------------------
# File problems
# ------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.toml")
    assert info.value.key == "<file>"
    assert "nope.toml" in info.value.reason


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert info.value.key == "<file>"


def test_toml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nhost = "x"\nport = = 9\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert err.key == "<file>"
    assert (err.path, err.line, err.column) == (str(path), 3, 8)
    assert str(err) == f"{path}:3:8: invalid TOML: Invalid value"


def test_duplicate_toml_key_is_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 1\nport = 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "<file>"


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[server]\nhost = "caf\xe9"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "<file>"


def test_validation_error_from_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[limits]\nmax_message_size = 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "limits.max_message_size"


def test_source_is_recorded_for_str_and_pathlike(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    assert load_config(path).source == str(path)
    assert load_config(str(path)).source == str(path)
