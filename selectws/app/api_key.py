"""Reading secrets named by the configuration: the server API key (``[api] key_file`` / ``key_env``).

The configuration layer only validates names (it is pure data and is world-readable); the secret itself is read
here, by the application, at start, by ``check-config`` and on every reload, and handed to the server. A key file
that is missing or empty, or an environment variable that is unset or empty, is a :class:`ConfigError` naming the
key, so the operator learns about it before anything listens (or the reload keeps the running configuration).
"""

from __future__ import annotations

import os

from selectws.config import Config, ConfigError

__all__ = ["read_api_key", "read_secret"]


def read_secret(key: str, *, path: str = "", env: str = "", base: str | None = None) -> str:
    """The secret in file ``path`` (relative to ``base``) or environment variable ``env``, surrounding whitespace
    stripped; :class:`ConfigError` naming ``key`` (``"api.key_file"``) when it is missing, unreadable or empty."""
    if env:
        value = os.environ.get(env)
        if value is None:
            raise ConfigError(key, f"environment variable {env} is not set")
        value = value.strip()
        if not value:
            raise ConfigError(key, f"environment variable {env} is empty")
        return value
    full = os.path.join(base, path) if base and not os.path.isabs(path) else path
    try:
        with open(full, "rb") as fh:
            raw = fh.read(65537)
    except OSError as exc:
        raise ConfigError(key, f"cannot read {full}: {exc.strerror or exc}") from None
    if len(raw) > 65536:
        raise ConfigError(key, f"{full} is larger than 64 KiB: not a key")
    try:
        value = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(key, f"{full} is not UTF-8 text") from None
    if not value:
        raise ConfigError(key, f"{full} is empty")
    return value


def read_api_key(config: Config) -> str | None:
    """The server API key ``config`` names, or None when the API is off (neither ``key_file`` nor ``key_env``)."""
    api = config.api
    if api.key_env:
        return read_secret("api.key_env", env=api.key_env)
    if api.key_file:
        base = os.path.dirname(os.path.abspath(config.source)) if config.source else None
        return read_secret("api.key_file", path=api.key_file, base=base)
    return None
