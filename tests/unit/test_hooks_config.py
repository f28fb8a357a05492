"""``[[hooks]]``: validation in selectws.config, and the application's loader (secrets, h11, addresses)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from selectws.app import hooks as app_hooks
from selectws.app.hooks import HookLoader, check_hooks
from selectws.config import ConfigError, HookConfig, parse_config


def hook(**kw: Any) -> dict[str, Any]:
    return {"url": "http://127.0.0.1:9/h", "events": ["open"], "secret_file": "s", **kw}


def error(*hooks: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config({"hooks": list(hooks)})
    return info.value


def test_defaults_and_no_hooks() -> None:
    assert parse_config({}).hooks == ()
    [h] = parse_config({"hooks": [hook()]}).hooks
    assert h == HookConfig(url="http://127.0.0.1:9/h", events=("open",), secret_file="s")
    assert (h.batch_interval, h.max_batch, h.max_queue, h.timeout) == (0.1, 100, 10000, 5.0)


@pytest.mark.parametrize(
    ("item", "key", "words"),
    [
        (hook(url="ftp://x/"), "hooks[0].url", "http:// or https://"),
        (hook(url="http:///nohost"), "hooks[0].url", "no host"),
        (hook(url="http://u:p@x/"), "hooks[0].url", "user names"),
        (hook(url="http://x:99999/"), "hooks[0].url", "invalid URL"),
        ({"events": ["open"], "secret_file": "s"}, "hooks[0].url", "missing"),
        (hook(events=[]), "hooks[0].events", "at least one"),
        (hook(events=["open", "joined"]), "hooks[0].events[1]", "did you mean 'join'"),
        (hook(events=["open", "open"]), "hooks[0].events[1]", "duplicate"),
        (hook(events="open"), "hooks[0].events", "array of strings"),
        ({"url": "http://x/", "events": ["open"]}, "hooks[0].secret_file", "exactly one"),
        (hook(secret_env="S"), "hooks[0].secret_env", "exactly one"),
        (hook(batch_interval=0), "hooks[0].batch_interval", "> 0"),
        (hook(max_batch=0), "hooks[0].max_batch", "between 1 and 10000"),
        (hook(max_queue=True), "hooks[0].max_queue", "integer"),
        (hook(backoff_min=5, backoff_max=1), "hooks[0].backoff_max", ">= backoff_min"),
        (hook(ca_file="ca.pem"), "hooks[0].ca_file", "no effect"),
        (hook(secrt_file="s"), "hooks[0].secrt_file", "did you mean 'hooks[0].secret_file'"),
        ("nope", "hooks[0]", "expected a table"),
    ],
)
def test_one_error_naming_the_key(item: Any, key: str, words: str) -> None:
    exc = error(item)
    assert exc.key == key and words in exc.reason, str(exc)


def test_second_table_is_named() -> None:
    assert error(hook(), hook(url="gopher://x")).key == "hooks[1].url"


def config_with(tmp_path: Path, **kw: Any) -> Any:
    config = parse_config({"hooks": [hook(**kw)]}, source=str(tmp_path / "selectws.toml"))
    return config


def test_loader_reads_the_secret_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "s").write_text("  abc\n")
    [target] = HookLoader()(config_with(tmp_path), True)
    assert target.secret == b"abc"
    assert target.addresses == ((socket.AF_INET, ("127.0.0.1", 9)),)
    assert target.tls is None and target.label == "http://127.0.0.1:9/h"


@pytest.mark.parametrize("content", [None, "", "\n  \n"])
def test_missing_or_empty_secret_file(tmp_path: Path, content: str | None) -> None:
    if content is not None:
        (tmp_path / "s").write_text(content)
    with pytest.raises(ConfigError) as info:
        check_hooks(config_with(tmp_path))
    assert info.value.key == "hooks[0].secret_file"


def test_secret_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = parse_config({"hooks": [{"url": "http://[::1]:8/", "events": ["close"], "secret_env": "HOOK_S"}]})
    monkeypatch.delenv("HOOK_S", raising=False)
    with pytest.raises(ConfigError) as info:
        check_hooks(config)
    assert info.value.key == "hooks[0].secret_env" and "HOOK_S" in info.value.reason
    monkeypatch.setenv("HOOK_S", "xyz")
    [target] = HookLoader()(config, False)  # an IP literal: no resolver, even in the loop
    assert target.secret == b"xyz" and target.addresses == ((socket.AF_INET6, ("::1", 8, 0, 0)),)


def test_without_h11_it_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "s").write_text("abc")
    real = app_hooks.importlib.util.find_spec
    monkeypatch.setattr(app_hooks.importlib.util, "find_spec", lambda name: None if name == "h11" else real(name))
    with pytest.raises(ConfigError) as info:
        check_hooks(config_with(tmp_path))
    assert info.value.key == "hooks" and "pip install 'selectws[hooks]'" in info.value.reason
    assert HookLoader()(parse_config({}), True) == []  # no [[hooks]]: h11 not needed


def test_host_names_resolve_only_before_the_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "s").write_text("abc")
    calls: list[str] = []

    def fake_getaddrinfo(host: str, port: int, **kw: Any) -> list[Any]:
        calls.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.7", port))]

    monkeypatch.setattr(app_hooks.socket, "getaddrinfo", fake_getaddrinfo)
    loader = HookLoader()
    config = config_with(tmp_path, url="http://hooks.example:8080/x")
    [target] = loader(config, True)  # at start
    assert target.addresses == ((socket.AF_INET, ("192.0.2.7", 8080)),)
    [again] = loader(config, False)  # a reload: from the cache, no DNS
    assert again.addresses == target.addresses and calls == ["hooks.example"]
    with pytest.raises(ConfigError) as info:  # a reload naming a new host: refused, never resolved in the loop
        loader(config_with(tmp_path, url="http://other.example/x"), False)
    assert info.value.key == "hooks[0].url" and "restart" in info.value.reason
    assert calls == ["hooks.example"]
    [local] = loader(config_with(tmp_path, url="http://localhost:7/"), False)
    assert [family for family, _ in local.addresses] == [socket.AF_INET, socket.AF_INET6]


def test_https_builds_a_verifying_context(tmp_path: Path) -> None:
    (tmp_path / "s").write_text("abc")
    [target] = HookLoader()(config_with(tmp_path, url="https://127.0.0.1/x"), True)
    assert target.tls is not None and target.tls.check_hostname
    with pytest.raises(ConfigError) as info:
        check_hooks(config_with(tmp_path, url="https://127.0.0.1/x", ca_file="nope.pem"))
    assert info.value.key == "hooks[0].ca_file"
