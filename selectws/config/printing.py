"""``selectws check-config --print``: the effective configuration as TOML, each value with where it came from.

Every key of every table is shown, with its value after defaults, the file, the environment and the command line
were applied, followed by a comment naming its origin: ``default``, ``file``, ``env SELECTWS_SERVER_PORT`` or
``flag --port``. The output is valid TOML (a key whose value is "not set" is a comment), so it can be saved and
edited into a configuration file. Secrets are never printed: ``[broker] password`` and a password in
``[broker] url`` are masked.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import fields
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from selectws.config import _SECTIONS, Config

__all__ = ["MASK", "render_effective"]

MASK = "********"
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_SECRET_KEYS = frozenset({"broker.password"})
_SECRET_URLS = frozenset({"broker.url"})


def render_effective(config: Config, flags: Mapping[str, str] | None = None) -> str:
    """The text of ``check-config --print``; ``flags`` names the option behind an override (``{"server.port":
    "--port"}``)."""
    flags = flags or {}
    out: list[str] = []

    def origin(dotted: str) -> str:
        where = config.origins.get(dotted, "default")
        return f"flag {flags.get(dotted, '')}".rstrip() if where == "flag" else where

    def table(header: str, dotted_prefix: str, obj: Any) -> None:
        rows = []
        for f in fields(obj):
            dotted = f"{dotted_prefix}.{f.name}"
            value = getattr(obj, f.name)
            if value is None:
                rows.append((f"# {f.name} = (not set)", origin(dotted)))
                continue
            if dotted in _SECRET_KEYS and value:
                value = MASK
            elif dotted in _SECRET_URLS and value:
                value = _mask_url(value)
            rows.append((f"{_key(f.name)} = {_value(value)}", origin(dotted)))
        width = min(max((len(text) for text, _ in rows), default=0), 60)
        out.append("")
        out.append(header)
        out.extend(f"{text.ljust(width)}  # {where}" for text, where in rows)

    for name in _SECTIONS:
        table(f"[{name}]", name, getattr(config, name))
    for name in ("hooks", "routes"):
        items = getattr(config, name)
        if not items:
            out.append("")
            out.append(f"# no [[{name}]]")
        for i, item in enumerate(items):
            source = "file" if any(k.startswith(f"{name}[{i}].") for k in config.origins) else "default"
            table(f"[[{name}]]  # {source}", f"{name}[{i}]", item)
    return "\n".join(out).lstrip("\n") + "\n"


def _mask_url(url: str) -> str:
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.netloc.rpartition("@")[2]
        user = parts.username or ""
        return urlunsplit(parts._replace(netloc=f"{user}:{MASK}@{host}"))
    except ValueError:
        return url


def _key(name: str) -> str:
    return name if _BARE_KEY.fullmatch(name) else _string(name)


def _string(text: str) -> str:
    # A JSON string is a TOML basic string, except that TOML does not allow a raw DEL.
    return json.dumps(text).replace("\x7f", "\\u007f")


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, Mapping):
        inner = ", ".join(f"{_key(str(k))} = {_value(v)}" for k, v in value.items())
        return f"{{ {inner} }}" if inner else "{}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return _string(str(value))  # dates and times from plugin options: shown, not round-tripped
