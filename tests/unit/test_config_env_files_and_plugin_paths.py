"""selectws.config, the operator's side (issue 16): file errors, SELECTWS_<SECTION>_<KEY> variables and their
precedence, where each value came from (``Config.origins``, ``check-config --print``), ``[server] plugin_paths``."""

from __future__ import annotations

import dataclasses
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from selectws.config import Config, ConfigError, load_config, parse_config


def error_for(data: dict[str, Any], **kwargs: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(data, **kwargs)
    return info.value


# ------------------------------------------------------------------------------------------------ the file
def test_a_missing_file_says_no_such_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.toml")
    assert (info.value.key, str(info.value)) == ("<file>", f"cannot read config {tmp_path / 'nope.toml'}: no such file")


def test_a_directory_says_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert str(info.value) == f"cannot read config {tmp_path}: is a directory"


def test_a_file_that_is_not_utf8_says_where(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[server]\nhost = "caf\xe9"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}:2:12: not valid UTF-8 (byte 0xe9)"


def test_a_toml_error_at_the_end_of_the_document_has_a_position(tmp_path: Path) -> None:
    path = tmp_path / "cut.toml"
    path.write_text('[server]\nhost = "unterminated')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (info.value.line, info.value.column) == (2, 21)
    assert str(info.value).startswith(f"{path}:2:21: invalid TOML: ")


# ------------------------------------------------------------------------------------------ the environment
def test_environment_values_are_toml_values_or_strings() -> None:
    config = parse_config({}, environ={
        "SELECTWS_SERVER_PORT": "9000",
        "SELECTWS_TIMEOUTS_HANDSHAKE": "2.5",
        "SELECTWS_COMPRESSION_ENABLED": "false",
        "SELECTWS_SERVER_TRUSTED_PROXIES": '["10.0.0.0/8", "::1"]',
        "SELECTWS_BROKER_URL": "redis://h:6379/1",  # not TOML: a string
        "SELECTWS_TLS_MIN_VERSION": "1.3",  # a string key: as it is, not the float 1.3
        "SELECTWS_LOGGING_LEVEL": "debug",
    })
    assert config.server.port == 9000
    assert config.timeouts.handshake == 2.5
    assert config.compression.enabled is False
    assert config.server.trusted_proxies == ("10.0.0.0/8", "::1")
    assert config.broker.url == "redis://h:6379/1"
    assert config.tls.min_version == "1.3"
    assert config.logging.level == "debug"


def test_precedence_default_file_environment_flag(tmp_path: Path) -> None:
    path = tmp_path / "selectws.toml"
    path.write_text("[server]\nport = 1\nbacklog = 2\nworkers = 1\n[limits]\nburst = 3\n")
    env = {"SELECTWS_SERVER_PORT": "10", "SELECTWS_SERVER_BACKLOG": "20"}
    config = load_config(path, overrides={"server.port": 100}, environ=env)
    assert (config.server.port, config.server.backlog, config.limits.burst, config.limits.max_connections) == \
        (100, 20, 3, 0)
    assert config.origins["server.port"] == "flag"
    assert config.origins["server.backlog"] == "env SELECTWS_SERVER_BACKLOG"
    assert config.origins["limits.burst"] == "file"
    assert "limits.max_connections" not in config.origins  # a default


def test_a_bad_environment_value_names_the_variable_and_the_key() -> None:
    err = error_for({}, environ={"SELECTWS_SERVER_PORT": "abc"})
    assert (err.key, err.env) == ("server.port", "SELECTWS_SERVER_PORT")
    assert str(err) == "SELECTWS_SERVER_PORT: server.port: expected an integer, got string"
    err = error_for({}, environ={"SELECTWS_LIMITS_MAX_CONNECTIONS": "-1"})
    assert str(err) == "SELECTWS_LIMITS_MAX_CONNECTIONS: limits.max_connections: must be >= 0, got -1"


def test_an_unknown_key_of_a_known_section_is_an_error_with_a_suggestion() -> None:
    err = error_for({}, environ={"SELECTWS_LIMITS_MAX_CONECTIONS": "1"})
    assert str(err) == ("SELECTWS_LIMITS_MAX_CONECTIONS: limits.max_conections: not a configuration key; did you "
                        "mean SELECTWS_LIMITS_MAX_CONNECTIONS?")
    err = error_for({}, environ={"SELECTWS_HOOKS_0_URL": "http://x/"})
    assert err.env == "SELECTWS_HOOKS_0_URL" and "cannot be set from the environment" in err.reason


def test_variables_that_are_not_configuration_are_left_alone() -> None:
    data = {"api": {"key_env": "SELECTWS_API_TOKEN"}, "auth": {"jwt_secret_env": "SELECTWS_AUTH_SECRET"},
            "hooks": [{"url": "http://h/", "events": ["open"], "secret_env": "SELECTWS_SERVER_HOOK_SECRET"}]}
    environ = {
        "SELECTWS_API_KEY": "x",  # publish's default API key variable
        "SELECTWS_API_TOKEN": "x",  # named by api.key_env
        "SELECTWS_AUTH_SECRET": "x",  # named by auth.jwt_secret_env
        "SELECTWS_SERVER_HOOK_SECRET": "x",  # named by hooks[0].secret_env
        "SELECTWS_JWT_SECRET": "x", "SELECTWS_NO_SPEEDUPS": "1", "SELECTWS_PYTHON": "python3",  # not a section
        "SELECTWS_SERVER_PORT": "9",
        "OTHER_SERVER_PORT": "8",
    }
    config = parse_config(data, environ=environ)
    assert config.server.port == 9
    # ... also when the secret's variable name itself comes from the environment.
    named = parse_config({}, environ={"SELECTWS_API_KEY_ENV": "SELECTWS_API_TOKEN", "SELECTWS_API_TOKEN": "k"})
    assert named.api.key_env == "SELECTWS_API_TOKEN"


def test_without_environ_the_environment_is_not_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SELECTWS_SERVER_PORT", "9")
    assert parse_config({}).server.port == 8000
    assert parse_config({}, environ={"SELECTWS_SERVER_PORT": "9"}).server.port == 9


# --------------------------------------------------------------------------------------- check-config --print
def test_print_is_toml_with_every_key_and_its_origin(tmp_path: Path) -> None:
    from selectws.config.printing import render_effective

    path = tmp_path / "selectws.toml"
    path.write_text('[server]\nport = 9001\n[broker]\nurl = "redis://:pw@h:1/0"\n[[routes]]\npath = "/e"\n'
                    'plugin = "echo"\noptions = { a = [1, "x"], "b c" = { d = true } }\n')
    config = load_config(path, overrides={"server.host": "::"}, environ={"SELECTWS_BROKER_PASSWORD": "hunter2"})
    text = render_effective(config, {"server.host": "--host"})
    printed = tomllib.loads(text)
    assert printed["server"]["port"] == 9001 and printed["server"]["host"] == "::"
    assert printed["routes"][0]["options"] == {"a": [1, "x"], "b c": {"d": True}}
    assert "hunter2" not in text and ":pw@" not in text
    assert printed["broker"]["url"] == "redis://:********@h:1/0"
    lines = text.splitlines()
    assert any(line.startswith('host = "::"') and line.endswith("# flag --host") for line in lines)
    assert any(line.startswith("port = 9001") and line.endswith("# file") for line in lines)
    assert any(line.startswith('password = "********"') and line.endswith("# env SELECTWS_BROKER_PASSWORD")
               for line in lines)
    assert any(line.startswith("backlog = 1024") and line.endswith("# default") for line in lines)
    for name in ("server", "limits", "timeouts", "logging", "compression", "ops", "static", "tls", "broker", "api",
                 "auth"):
        assert sorted(printed[name]) == sorted(f.name for f in dataclasses.fields(getattr(config, name))), name


# --------------------------------------------------------------------------------------- [server] plugin_paths
def test_plugin_paths_are_relative_to_the_file_and_must_exist(tmp_path: Path) -> None:
    (tmp_path / "plugins").mkdir()
    path = tmp_path / "selectws.toml"
    path.write_text('[server]\nplugin_paths = ["plugins", "."]\n')
    assert load_config(path).server.plugin_paths == (str(tmp_path / "plugins"), str(tmp_path))
    path.write_text('[server]\nplugin_paths = ["plugins", "missing"]\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"server.plugin_paths[1]: no such folder: {tmp_path / 'missing'}"
    path.write_text('[server]\nplugin_paths = ["selectws.toml"]\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"server.plugin_paths[0]: not a folder: {path}"


def test_plugin_paths_go_first_on_sys_path_before_plugins_are_resolved(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "unit_mymod_issue16.py").write_text(
        "from selectws.plugins.echo import EchoPlugin\n\nclass Mine(EchoPlugin):\n    pass\n")
    monkeypatch.delitem(sys.modules, "unit_mymod_issue16", raising=False)
    path = tmp_path / "selectws.toml"
    path.write_text('[server]\nplugin_paths = ["mine"]\n[[routes]]\npath = "/m"\nplugin = "unit_mymod_issue16:Mine"\n')
    from selectws.plugins.registry import find_plugin

    config = load_config(path, plugin_resolver=find_plugin)
    assert sys.path[0] == str(folder)
    assert find_plugin(config.routes[0].plugin).__name__ == "Mine"
    sys.modules.pop("unit_mymod_issue16", None)


def test_config_equality_ignores_origins(tmp_path: Path) -> None:
    path = tmp_path / "selectws.toml"
    path.write_text("[server]\nport = 8000\n")
    config = load_config(path)
    assert config.origins == {"server.port": "file"}
    assert config == dataclasses.replace(Config(), source=str(path))
