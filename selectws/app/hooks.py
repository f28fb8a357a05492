"""The application's part of ``[[hooks]]``: reading the secrets and resolving the receivers' host names.

Both may block, so neither happens in the server's loop uncontrolled:

* **Secrets** are read from ``secret_file`` (relative to the configuration file) or the ``secret_env`` variable,
  at start and again on every reload (a file read, like the configuration itself: that is how a secret is
  rotated). A missing or empty file or variable is a :class:`ConfigError` naming the key.
* **Host names**: ``getaddrinfo`` may wait for DNS for seconds, so it runs only before the loop starts
  (``may_block``), and its answer is kept for the life of the process. IP literals need no resolver
  (``AI_NUMERICHOST``) and ``localhost`` is taken as the loopback addresses, so both work anywhere, reload included.
  A reload that brings a host name not resolved at start fails (and keeps the running configuration): a new
  receiver host name takes effect on restart.
* **h11** is the HTTP/1.1 library of the webhook client; configuring ``[[hooks]]`` without it installed is a
  configuration error saying what to install.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import socket
import ssl
from urllib.parse import urlsplit

from selectws.config import Config, ConfigError, HookConfig
from selectws.server.hooks import HookTarget

__all__ = ["HookLoader", "check_hooks"]

_LOOPBACK = ((socket.AF_INET, ("127.0.0.1", 0)), (socket.AF_INET6, ("::1", 0, 0, 0)))


def _need_h11() -> None:
    if importlib.util.find_spec("h11") is None:
        raise ConfigError("hooks", "webhooks need the h11 package: pip install 'selectws[hooks]' (or: pip install h11)")


def _read_secret(i: int, hook: HookConfig, base: str | None) -> bytes:
    if hook.secret_env:
        key = f"hooks[{i}].secret_env"
        value = os.environ.get(hook.secret_env, "").strip()
        if not value:
            raise ConfigError(key, f"environment variable {hook.secret_env} is not set or empty")
        return value.encode("utf-8")
    key = f"hooks[{i}].secret_file"
    path = os.path.expanduser(hook.secret_file)
    if not os.path.isabs(path) and base is not None:
        path = os.path.join(base, path)
    try:
        with open(path, "rb") as fh:
            secret = fh.read().strip()  # a trailing newline (echo > file) is not part of the secret
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror or exc}") from None
    if not secret:
        raise ConfigError(key, f"{path} is empty")
    return secret


def _tls_context(i: int, hook: HookConfig, base: str | None) -> ssl.SSLContext:
    from selectws.transport.http_client import client_context

    cafile = None
    if hook.ca_file:
        cafile = os.path.expanduser(hook.ca_file)
        if not os.path.isabs(cafile) and base is not None:
            cafile = os.path.join(base, cafile)
    try:
        return client_context(cafile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"hooks[{i}].ca_file", f"cannot load CA certificates from {cafile}: {exc}") from None


def check_hooks(config: Config) -> None:
    """``check-config``: everything :class:`HookLoader` checks except DNS (h11, secrets, CA files)."""
    HookLoader(resolve=False)(config, True)


class HookLoader:
    """``loader(config, may_block)`` -> the :class:`HookTarget` of every ``[[hooks]]`` table (the server calls it
    at start with ``may_block`` True, and on each reload with False)."""

    def __init__(self, *, resolve: bool = True) -> None:
        self.resolve = resolve
        self._resolved: dict[tuple[str, int], tuple[tuple[int, object], ...]] = {}

    def __call__(self, config: Config, may_block: bool) -> list[HookTarget]:
        if not config.hooks:
            return []
        _need_h11()
        base = os.path.dirname(os.path.abspath(config.source)) if config.source else None
        targets = []
        for i, hook in enumerate(config.hooks):
            secret = _read_secret(i, hook, base)
            parts = urlsplit(hook.url)
            https = parts.scheme == "https"
            tls = _tls_context(i, hook, base) if https else None
            host = parts.hostname or ""
            port = parts.port or (443 if https else 80)
            addresses = self._addresses(f"hooks[{i}].url", host, port, may_block)
            targets.append(HookTarget(hook, secret, addresses, tls))
        return targets

    def _addresses(self, key: str, host: str, port: int, may_block: bool) -> tuple[tuple[int, object], ...]:
        if host == "localhost":
            return tuple((family, (addr[0], port, *addr[2:])) for family, addr in _LOOPBACK)
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            if ip.version == 4:
                return ((socket.AF_INET, (host, port)),)
            return ((socket.AF_INET6, (host, port, 0, 0)),)
        cached = self._resolved.get((host, port))
        if cached is not None:
            return cached
        if not self.resolve:
            return ()
        if not may_block:
            raise ConfigError(key, f"host name {host!r} was not resolved at start and is not resolved in the loop "
                              "(DNS would block it): a new receiver host name takes effect on restart")
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise ConfigError(key, f"cannot resolve {host!r}: {exc}") from None
        addresses = tuple((family, addr) for family, _, _, _, addr in infos)
        self._resolved[(host, port)] = addresses
        return addresses
