"""Configuration: one TOML file, parsed into frozen dataclasses, validated strictly.

Why this shape:

* **TOML via stdlib** :mod:`tomllib` -- no extra runtime dependency, and TOML has real integers,
  floats and booleans, so "is 8000 a number?" is answered by the parser, not by us.
* **Frozen dataclasses** -- the server reads configuration from many places; making it immutable
  means a SIGHUP reload builds a *new* :class:`Config` and swaps it in, instead of mutating one that
  live connections are reading.
* **Strict validation, first error only** -- a daemon that starts with a silently ignored typo
  (``max_mesage_size``) is worse than one that refuses to start. Every error is a
  :class:`ConfigError` naming the dotted key, so the operator knows exactly which line to fix, and
  unknown keys come with a "did you mean" suggestion.
* **Precedence** -- built-in defaults < the file < the environment (``SELECTWS_SERVER_PORT``, the scalar
  keys only) < command-line overrides (dotted keys such as ``"server.port"``). Both are merged into the
  raw data *before* validation, so a bad variable or flag value is reported with the same messages as a
  bad file value (plus the variable's name, or "from command-line override"). :attr:`Config.origins`
  records which of them set each value (``selectws check-config --print``).

The reference configuration with every key, its default and its range is ``config/selectws.toml``.
"""

from __future__ import annotations

import difflib
import errno
import ipaddress
import json
import math
import os
import re
import stat
import sys
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Final, TypeVar
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = [
    "DEFAULT_ROUTES",
    "ENV_PREFIX",
    "HOOK_EVENTS",
    "JWT_HMAC_ALGORITHMS",
    "JWT_KEY_ALGORITHMS",
    "RESERVED_ENV",
    "ApiConfig",
    "AuthConfig",
    "BrokerConfig",
    "CompressionConfig",
    "Config",
    "ConfigError",
    "HookConfig",
    "LimitsConfig",
    "LoggingConfig",
    "OpsConfig",
    "RouteConfig",
    "ServerConfig",
    "StaticConfig",
    "TimeoutsConfig",
    "TlsConfig",
    "env_name",
    "load_config",
    "parse_config",
    "parse_redis_url",
    "read_config_file",
    "route_options_error",
    "split_host_port",
    "use_plugin_paths",
]


class ConfigError(Exception):
    """A configuration problem, pinned to the dotted key that caused it.

    ``key`` is machine-friendly (``"limits.max_message_size"``, ``"routes[1].plugin"``, or
    ``"<file>"`` for problems reading/parsing the file itself) so callers and tests can tell errors
    apart without parsing prose; ``reason`` is the human explanation.
    """

    key: str
    reason: str
    env: str | None
    """The environment variable the bad value came from (``SELECTWS_SERVER_PORT``), else ``None``."""
    path: str | None
    line: int | None
    column: int | None
    """For a file that is not TOML (or not UTF-8): where, 1-based; ``str()`` is then ``path:line:column: reason``."""

    def __init__(self, key: str, reason: str, *, env: str | None = None, path: str | None = None,
                 line: int | None = None, column: int | None = None) -> None:
        super().__init__(key, reason)
        self.key = key
        self.reason = reason
        self.env = env
        self.path = path
        self.line = line
        self.column = column

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.path}:{self.line}:{self.column}: {self.reason}"
        if self.key == "<file>":  # the reason names the file: "cannot read config F: no such file"
            return self.reason
        if self.env is not None:
            return f"{self.env}: {self.key}: {self.reason}"
        return f"{self.key}: {self.reason}"


# --------------------------------------------------------------------------------------------------
# Validation rules, attached to dataclass fields as metadata.
#
# Keeping the rule next to the field (rather than in a separate schema) means a new setting is one
# line: the default, the type and the range live together and cannot drift apart.
# --------------------------------------------------------------------------------------------------

_RULE: Final = "selectws.rule"


@dataclass(frozen=True, slots=True)
class _Rule:
    """How to validate and normalise one scalar setting."""

    kind: type  # int, float, bool or str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False  # "> minimum" instead of ">= minimum"
    choices: tuple[str, ...] = ()  # for str: allowed values, compared case-insensitively
    non_empty: bool = False
    unit: str = "seconds"  # for float: what the number counts, in the "expected a number of ..." error

    def check(self, key: str, value: Any) -> Any:
        """Return the normalised value, or raise :class:`ConfigError` naming ``key``."""
        if self.kind is tuple:  # an array of strings
            if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                raise ConfigError(key, f"expected an array of strings, got {_type_name(value)}")
            return tuple(value)
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ConfigError(key, f"expected a boolean, got {_type_name(value)}")
            return value
        if self.kind is int:
            # bool is a subclass of int in Python; "port = true" is a mistake, not port 1.
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(key, f"expected an integer, got {_type_name(value)}")
            self._check_range(key, value, value)
            return value
        if self.kind is float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(key, f"expected a number of {self.unit}, got {_type_name(value)}")
            number = float(value)
            if not math.isfinite(number):
                raise ConfigError(key, f"must be a finite number, got {value!r}")
            self._check_range(key, number, value)
            return number
        # str
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {_type_name(value)}")
        if self.choices:
            lowered = value.lower()
            if lowered not in self.choices:
                allowed = ", ".join(repr(c) for c in self.choices)
                raise ConfigError(key, f"must be one of {allowed}, got {value!r}{_suggest(lowered, self.choices)}")
            return lowered
        if self.non_empty and not value:
            raise ConfigError(key, "must not be empty")
        return value

    def _check_range(self, key: str, value: float, shown: object) -> None:
        low, high = self.minimum, self.maximum
        too_low = low is not None and (value <= low if self.exclusive_minimum else value < low)
        too_high = high is not None and value > high
        if not (too_low or too_high):
            return
        if low is not None and high is not None:
            raise ConfigError(key, f"must be between {_num(low)} and {_num(high)}, got {shown!r}")
        if low is not None:
            op = ">" if self.exclusive_minimum else ">="
            raise ConfigError(key, f"must be {op} {_num(low)}, got {shown!r}")
        raise ConfigError(key, f"must be <= {_num(high)}, got {shown!r}")  # pragma: no cover


def _num(bound: float | None) -> str:
    """Render a bound without a spurious ``.0`` for integer limits."""
    if bound is None:  # pragma: no cover - callers check
        return "?"
    return str(int(bound)) if float(bound).is_integer() else str(bound)


def _int(default: int, minimum: int, maximum: int | None = None) -> Any:
    return field(default=default, metadata={_RULE: _Rule(int, minimum, maximum)})


def _seconds(default: float) -> Any:
    return field(default=default, metadata={_RULE: _Rule(float, 0, None, exclusive_minimum=True)})


def _bool(default: bool) -> Any:
    return field(default=default, metadata={_RULE: _Rule(bool)})


def _choice(default: str, *choices: str) -> Any:
    return field(default=default, metadata={_RULE: _Rule(str, choices=choices)})


def _type_name(value: object) -> str:
    """Name a Python value by its TOML type, since that is what the operator wrote."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "table"
    if isinstance(value, list | tuple):
        return "array"
    if value is None:
        return "nothing"
    return type(value).__name__  # datetime, date, time


def _suggest(word: str, candidates: Any) -> str:
    """``"; did you mean 'x'?"`` for the closest candidate, or ``""`` when nothing is close."""
    matches = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {matches[0]!r}?" if matches else ""


# --------------------------------------------------------------------------------------------------
# The configuration dataclasses.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Where to listen."""

    host: str = field(default="127.0.0.1", metadata={_RULE: _Rule(str, non_empty=True)})
    """Address to bind; loopback by default so an unconfigured daemon is not exposed."""
    port: int = _int(8000, 0, 65535)
    """TCP port; 0 asks the kernel for an ephemeral port (useful in tests)."""
    backlog: int = _int(1024, 1)
    """``listen()`` backlog: how many not-yet-accepted connections the kernel may queue."""
    workers: int = _int(1, 1, 256)
    """Worker processes sharing the listening socket(s); more than 1 needs ``[broker] url``."""
    worker_timeout: float = field(default=10.0, metadata={_RULE: _Rule(float, 0)})
    """With ``workers`` > 1: seconds a worker may go without a heartbeat before the supervisor kills and restarts
    it (0 = never; else >= 1)."""
    trusted_proxies: tuple[str, ...] = field(default=(), metadata={_RULE: _Rule(tuple)})
    """Addresses/CIDRs of reverse proxies whose ``Forwarded`` / ``X-Forwarded-For`` headers are believed."""
    plugin_paths: tuple[str, ...] = field(default=(), metadata={_RULE: _Rule(tuple)})
    """Folders (relative to the configuration file) put at the front of ``sys.path`` before plugins are loaded, so
    ``plugin = "mymod:MyPlugin"`` finds ``mymod.py`` there. Stored as absolute paths; each must exist."""


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """Resource ceilings: every one bounds memory a single peer can make us hold."""

    max_message_size: int = _int(1 << 20, 1)
    """Largest reassembled (and decompressed) message, in bytes; larger closes with 1009."""
    max_frame_size: int = _int(1 << 20, 1)
    """Largest single frame payload, in bytes."""
    max_request_line: int = _int(8192, 64)
    """Longest HTTP request line of the opening handshake."""
    max_header_count: int = _int(100, 1)
    """Most header fields in the opening handshake."""
    max_header_bytes: int = _int(16384, 256)
    """Total size of the request head (request line + headers)."""
    write_buffer_high: int = _int(1 << 20, 1024)
    """Per-connection outgoing buffer high-water mark: past it, we stop reading from that client."""
    max_connections: int = _int(0, 0)
    """Concurrent connection cap; 0 means unlimited (bounded only by file descriptors)."""
    max_connections_per_ip: int = _int(0, 0)
    """Open WebSocket connections per client address (after ``trusted_proxies``); over it: 503. 0 = no cap."""
    max_connections_per_user: int = _int(0, 0)
    """Open connections per user (the ``sub`` of a JWT, ``auth = "jwt"`` routes), on this instance; over it: 429.
    0 = no cap."""
    max_pending_handshakes: int = _int(1024, 1)
    """Sockets still in the opening handshake; a connection accepted beyond this is answered 503 and closed."""
    write_buffer_limit: int = _int(16 << 20, 1024)
    """Hard cap of one connection's outgoing buffer (>= ``write_buffer_high``): past it, a slow consumer."""
    max_buffered_total: int = _int(256 << 20, 1 << 20)
    """All connections' outgoing buffers together; past it the connections holding the most are dropped."""
    slow_consumer_action: str = _choice("close", "close", "reset")
    """``close``: send the close frame if the socket takes it, then drop; ``reset``: drop at once (TCP RST)."""
    slow_consumer_close_code: int = _int(1013, 1008, 1013)
    """Close code reported for a slow consumer: 1013 (try again later) or 1008 (policy violation)."""
    linger_max_bytes: int = _int(8 << 20, 0)
    """Bytes read and thrown away once we close: the rest of a message over the limit (before our 1009 close
    frame), and again what comes after our FIN. 0: none (the close frame goes at once, the socket closes at the
    first byte after our FIN)."""
    max_messages_per_second: float = field(
        default=0.0, metadata={_RULE: _Rule(float, 0, unit="messages per second")}
    )
    """Default per-connection message rate (a token bucket; a route may override it); 0 = no limit."""
    burst: int = _int(0, 0)
    """Default size of that bucket: messages a connection may send at once (>= 1 when the rate is set)."""
    rate_limit_action: str = _choice("close", "close", "drop")
    """A message over the rate: ``close`` the connection with 1008, or ``drop`` the message (and count it)."""


@dataclass(frozen=True, slots=True)
class TimeoutsConfig:
    """Deadlines in seconds; each prevents a peer from holding a connection open for free."""

    handshake: float = _seconds(10.0)
    """Time allowed for the HTTP upgrade to complete."""
    ping_interval: float = _seconds(20.0)
    """Idle time after which the server sends a ping."""
    ping_timeout: float = _seconds(20.0)
    """Time allowed for the pong before the connection is considered dead."""
    close: float = _seconds(10.0)
    """Time allowed for the closing handshake before the socket is dropped."""
    shutdown_grace: float = _seconds(10.0)
    """On SIGTERM, how long connections get to close cleanly before being cut."""
    linger: float = _seconds(2.0)
    """Lingering close: how long a 1009 close frame waits for the end of the oversized message, and how long we
    read and discard after our FIN, waiting for the peer's."""


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    """Structured logging; see :mod:`selectws.transport.logs`."""

    level: str = _choice("info", "debug", "info", "warning", "error")
    """Minimum level emitted; stored lower-case."""
    format: str = _choice("auto", "auto", "console", "json")
    """``auto`` = human-readable on a terminal, JSON lines otherwise (journald, log shippers)."""


@dataclass(frozen=True, slots=True)
class CompressionConfig:
    """permessage-deflate (RFC 7692) negotiation parameters and server-side policy."""

    enabled: bool = _bool(True)
    """Offer/accept permessage-deflate at all."""
    server_max_window_bits: int = _int(15, 9, 15)
    """LZ77 window for what we compress; smaller saves memory per connection."""
    client_max_window_bits: int = _int(12, 9, 15)
    """Window we ask clients to use (only if they advertise support). 12 by default: our inflater keeps 2**bits
    bytes per connection between messages (measured 15.8 KiB RSS per idle compressed connection, 43.8 at 15)."""
    server_no_context_takeover: bool = _bool(True)
    """Reset our compressor after every message. On by default: an idle connection then holds no compressor
    (about 256 KiB each with 15 window bits), and one compressed broadcast frame serves every recipient."""
    client_no_context_takeover: bool = _bool(False)
    """Ask clients to reset their compressor after every message."""
    memory_level: int = _int(8, 1, 9)
    """zlib ``memLevel`` for our compressor."""
    min_size: int = _int(0, 0)
    """Messages shorter than this many bytes are sent uncompressed (not worth the CPU)."""


@dataclass(frozen=True, slots=True)
class OpsConfig:
    """Operator endpoints served over plain HTTP: health check and Prometheus metrics."""

    healthz: bool = _bool(True)
    """Serve ``healthz_path``: 200 while serving, 503 while draining."""
    healthz_path: str = field(default="/healthz", metadata={_RULE: _Rule(str, non_empty=True)})
    """URL path of the health check."""
    readyz: bool = _bool(True)
    """Serve ``readyz_path``: 200 while serving with the broker up, 503 while draining or while the broker is down."""
    readyz_path: str = field(default="/readyz", metadata={_RULE: _Rule(str, non_empty=True)})
    """URL path of the readiness check."""
    metrics: bool = _bool(True)
    """Serve ``metrics_path`` in the Prometheus text format."""
    metrics_path: str = field(default="/metrics", metadata={_RULE: _Rule(str, non_empty=True)})
    """URL path of the metrics."""
    listen: str = field(default="", metadata={_RULE: _Rule(str)})
    """Empty: serve them on the WebSocket port. ``host:port``: serve them on a separate listener instead."""
    admin: bool = _bool(False)
    """Serve the live admin dashboard at ``/admin`` on ``listen`` (needed), behind the server API key ([api]
    key_file / key_env, needed): docs/operations.md."""


@dataclass(frozen=True, slots=True)
class StaticConfig:
    """The static file handler that serves the browser demo (or a folder of your own files)."""

    enabled: bool = _bool(True)
    """Serve static files at all."""
    directory: str = field(default="", metadata={_RULE: _Rule(str)})
    """Folder to serve (relative to the configuration file); empty serves the built-in chat demo in the package."""
    url_prefix: str = field(default="/", metadata={_RULE: _Rule(str, non_empty=True)})
    """URL prefix under which the files appear (``/`` serves ``index.html`` at the root)."""


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """TLS (``wss://``) on the WebSocket listeners, in the same loop. Both ``cert`` and ``key`` empty: plain TCP."""

    cert: str = field(default="", metadata={_RULE: _Rule(str)})
    """PEM certificate chain (relative to the configuration file); reloaded on SIGHUP."""
    key: str = field(default="", metadata={_RULE: _Rule(str)})
    """PEM private key (relative to the configuration file), unencrypted; reloaded on SIGHUP."""
    ca: str = field(default="", metadata={_RULE: _Rule(str)})
    """PEM CA bundle: when set, clients must present a certificate signed by one of these (mutual TLS)."""
    ciphers: str = field(default="", metadata={_RULE: _Rule(str)})
    """OpenSSL cipher list for TLS 1.2 (TLS 1.3 suites are not affected); empty keeps Python's defaults."""
    min_version: str = _choice("1.2", "1.2", "1.3")
    """Oldest TLS version accepted: ``"1.2"`` or ``"1.3"``."""

    @property
    def enabled(self) -> bool:
        return bool(self.cert and self.key)


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """Where group messages go beyond this process: "" = in memory, or a Redis server shared by instances."""

    url: str = field(default="", metadata={_RULE: _Rule(str)})
    """``""`` (in-memory, this process only), ``redis://host:port/db`` or ``rediss://`` (TLS)."""
    password: str = field(default="", metadata={_RULE: _Rule(str)})
    """Sent with ``AUTH`` on connect when non-empty (overrides a password in the URL)."""
    channel_prefix: str = field(default="selectws:", metadata={_RULE: _Rule(str)})
    """Redis channel of group ``g`` is ``<channel_prefix><g>``; instances sharing a prefix share groups."""
    reconnect_min: float = _seconds(0.5)
    """First delay before reconnecting after the connection to Redis is lost (doubles up to ``reconnect_max``)."""
    reconnect_max: float = _seconds(30.0)
    """Longest delay between reconnection attempts."""
    connect_timeout: float = _seconds(5.0)
    """A connection attempt (TCP, TLS, AUTH) that takes longer fails and is retried."""
    max_buffer: int = _int(16 << 20, 1024)
    """Bytes waiting to be written to Redis; a publish past this is dropped (and counted)."""
    health_timeout: float = _seconds(3.0)
    """A connection to Redis silent this long (no reply, no message; a PING goes every third of it when idle) is
    hung: the broker is marked down, both connections are dropped and reconnected."""
    presence_heartbeat: float = field(default=5.0, metadata={_RULE: _Rule(float, 0.1, 300)})
    """Each instance says it is alive this often (docs/presence.md); an instance silent for three of these is gone,
    and its members leave every group."""


@dataclass(frozen=True, slots=True)
class ApiConfig:
    """The HTTP server API (``POST /api/<method>``, docs/api.md): off until a key is configured. The key itself is
    never written here (this file is world-readable): it is read by the application from a file or the
    environment, at start and on reload."""

    key_file: str = field(default="", metadata={_RULE: _Rule(str)})
    """File holding the API key (relative to the configuration file; surrounding whitespace is ignored)."""
    key_env: str = field(default="", metadata={_RULE: _Rule(str)})
    """Or: the environment variable holding it. At most one of the two."""

    @property
    def enabled(self) -> bool:
        return bool(self.key_file or self.key_env)


#: What ``[auth] algorithms`` may list: HMAC with a shared secret, or a signature checked with a public key.
JWT_HMAC_ALGORITHMS: Final[tuple[str, ...]] = ("HS256", "HS384", "HS512")
JWT_KEY_ALGORITHMS: Final[tuple[str, ...]] = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES256K", "ES384", "ES512", "EdDSA",
)


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """JWT verification for the routes with ``auth = "jwt"`` (docs/auth.md). Like the API key, the secret is never
    written here: the application reads it from a file or the environment, at start and on reload."""

    jwt_secret_file: str = field(default="", metadata={_RULE: _Rule(str)})
    """File holding the HMAC secret (HS256/384/512), relative to the configuration file; whitespace around it
    is ignored."""
    jwt_secret_env: str = field(default="", metadata={_RULE: _Rule(str)})
    """Or: the environment variable holding that secret."""
    jwt_public_key_file: str = field(default="", metadata={_RULE: _Rule(str)})
    """Or: a PEM public key (RS*, PS*, ES*, EdDSA). Exactly one of the three when a route has ``auth = "jwt"``."""
    algorithms: tuple[str, ...] = field(default=("HS256",), metadata={_RULE: _Rule(tuple)})
    """Accepted ``alg`` values: HS* with a secret, the others with a public key (never both kinds, never none)."""
    audience: str = field(default="", metadata={_RULE: _Rule(str)})
    """Required ``aud`` (empty: a token carrying an ``aud`` is refused, one without is accepted)."""
    issuer: str = field(default="", metadata={_RULE: _Rule(str)})
    """Required ``iss`` (empty: not checked)."""
    leeway: float = field(default=0.0, metadata={_RULE: _Rule(float, 0, 300)})
    """Seconds of clock skew allowed on ``exp``, ``nbf`` and ``iat``; an open connection closes at exp + leeway."""

    @property
    def configured(self) -> bool:
        return bool(self.jwt_secret_file or self.jwt_secret_env or self.jwt_public_key_file)


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """One URL path served by one plugin."""

    path: str
    """Starts with ``/``; whole segments like ``{channel}`` are parameters passed to the plugin."""
    plugin: str
    """Built-in name, entry-point name (group ``selectws.plugins``) or ``package.module:Class``."""
    options: Mapping[str, Any] = field(default_factory=dict)
    """The plugin's options table, as written; checked against the options the plugin declares
    (``Plugin.Options``, docs/plugins.md) when the plugin is resolved. Treat as read-only."""
    subprotocols: tuple[str, ...] = ()
    """Overrides the subprotocols the plugin offers; empty means "the plugin's own list"."""
    compression: bool | None = None
    """Per-route permessage-deflate switch; ``None`` follows ``[compression].enabled``."""
    origins: tuple[str, ...] = ()
    """Allowed ``Origin`` values (lower-case ``scheme://host[:port]``); a missing or other Origin gets 403.
    Empty: any origin (and none) is accepted."""
    auth: str = "none"
    """``"none"``, or ``"jwt"``: the handshake needs a token verified with ``[auth]`` (docs/auth.md)."""
    subprotocol_required: bool | None = None
    """Refuse (400) clients offering none of the route's subprotocols; ``None`` follows the plugin's attribute."""
    max_messages_per_second: float | None = None
    """Per-connection message rate on this route (0: no limit); ``None`` follows ``[limits]``."""
    burst: int | None = None
    """Messages a connection may send at once on this route; ``None`` follows ``[limits]``."""
    rate_limit_action: str | None = None
    """``close`` (1008) or ``drop`` for a message over the rate; ``None`` follows ``[limits]``."""
    history_size: int = 0
    """Messages kept per group of this route, for clients that reconnect (docs/history.md); 0: no history."""
    history_ttl: float = 300.0
    """Seconds a group's history is kept after its latest message (a group that stays quiet longer starts over,
    with a new epoch)."""

    def rate_limit(self, limits: LimitsConfig) -> dict[str, Any]:
        """The route's effective ``max_messages_per_second``, ``burst`` and ``rate_limit_action`` (keyword
        arguments of the server's ``Route``): its own where set, else those of ``[limits]``."""
        return {key: getattr(limits, key) if getattr(self, key) is None else getattr(self, key) for key in _RATE_KEYS}


HOOK_EVENTS: Final[tuple[str, ...]] = ("open", "close", "join", "leave", "occupied", "vacated")
"""What a ``[[hooks]]`` table may ask for: occupied = a group's first member joined, vacated = its last one left."""


@dataclass(frozen=True, slots=True)
class HookConfig:
    """One webhook receiver (``[[hooks]]``): events POSTed as signed JSON batches (docs/webhooks.md)."""

    url: str = field(default="", metadata={_RULE: _Rule(str, non_empty=True)})
    """``http://`` or ``https://`` URL the batches are POSTed to."""
    events: tuple[str, ...] = field(default=(), metadata={_RULE: _Rule(tuple)})
    """A non-empty subset of :data:`HOOK_EVENTS`."""
    secret_file: str = field(default="", metadata={_RULE: _Rule(str)})
    """File holding the HMAC-SHA256 secret (relative to the configuration file); read by the application."""
    secret_env: str = field(default="", metadata={_RULE: _Rule(str)})
    """Or: the environment variable holding it. Exactly one of the two."""
    batch_interval: float = _seconds(0.1)
    """A batch goes at most this often (the first event after a quiet spell waits this long for company)."""
    max_batch: int = _int(100, 1, 10000)
    """Most events in one POST."""
    max_queue: int = _int(10000, 1)
    """Events waiting to be sent; past it new events are dropped and counted."""
    timeout: float = _seconds(5.0)
    """One request (connect, TLS, send, response) that takes longer fails."""
    backoff_min: float = _seconds(0.5)
    """First wait after a failed request; doubles per consecutive failure up to ``backoff_max``."""
    backoff_max: float = _seconds(30.0)
    """Longest wait between attempts while the receiver keeps failing."""
    ca_file: str = field(default="", metadata={_RULE: _Rule(str)})
    """https: PEM CA bundle the receiver's certificate is checked against (empty: the system's)."""


DEFAULT_ROUTES: Final[tuple[RouteConfig, ...]] = (
    RouteConfig("/echo", "echo"),
    RouteConfig("/broadcast/{channel}", "broadcast"),
    RouteConfig("/chat", "chat"),
)
"""Routes used when the file has no ``[[routes]]``: the built-in plugins, so a bare install works."""


def _default_routes() -> tuple[RouteConfig, ...]:
    # Fresh option dicts, so a plugin that mutates its options cannot change the module constant.
    return tuple(replace(r, options=dict(r.options)) for r in DEFAULT_ROUTES)


@dataclass(frozen=True, slots=True)
class Config:
    """The whole daemon configuration. ``Config()`` is the built-in default configuration."""

    server: ServerConfig = field(default_factory=ServerConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    ops: OpsConfig = field(default_factory=OpsConfig)
    static: StaticConfig = field(default_factory=StaticConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    hooks: tuple[HookConfig, ...] = ()
    routes: tuple[RouteConfig, ...] = field(default_factory=_default_routes)
    source: str | None = None
    """Path of the file this came from (``None`` for defaults/in-memory data); used by reload."""
    origins: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)
    """Where each value came from, by dotted key (``"server.port"``, ``"routes[0].path"``): ``"file"``,
    ``"env SELECTWS_SERVER_PORT"`` or ``"flag"``; a key not listed is a built-in default (``check-config --print``)."""


# The scalar tables, in the order they are validated (and so, which error wins).
_SECTIONS: Final[dict[str, type[Any]]] = {
    "server": ServerConfig,
    "limits": LimitsConfig,
    "timeouts": TimeoutsConfig,
    "logging": LoggingConfig,
    "compression": CompressionConfig,
    "ops": OpsConfig,
    "static": StaticConfig,
    "tls": TlsConfig,
    "broker": BrokerConfig,
    "api": ApiConfig,
    "auth": AuthConfig,
}
_TOP_LEVEL: Final[tuple[str, ...]] = (*_SECTIONS, "routes", "hooks")
# Route keys that override the [limits] key of the same name (validated by that key's rule).
_RATE_KEYS: Final[tuple[str, ...]] = ("max_messages_per_second", "burst", "rate_limit_action")
_ROUTE_KEYS: Final[tuple[str, ...]] = (
    "path", "plugin", "options", "subprotocols", "compression", "origins", "auth", "subprotocol_required",
    *_RATE_KEYS, "history_size", "history_ttl",
)
_HISTORY_RULES: Final[dict[str, _Rule]] = {
    "history_size": _Rule(int, 0, 1_000_000),
    "history_ttl": _Rule(float, 0, 30 * 86400, exclusive_minimum=True),
}


def _field_names(cls: type[DataclassInstance]) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


# --------------------------------------------------------------------------------------------------
# Parsing.
# --------------------------------------------------------------------------------------------------


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    plugin_resolver: Callable[[str], object] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Read and validate a TOML file (or just defaults + environment + overrides when ``path`` is None).

    Problems with the file itself are reported with key ``"<file>"``: ``cannot read config F: no such file``
    (``permission denied``, ``is a directory``), or ``F:LINE:COLUMN: invalid TOML: ...`` with
    :attr:`ConfigError.line` set; everything else names the offending key. See :func:`parse_config`.
    """
    if path is None:
        return parse_config({}, None, overrides, plugin_resolver, environ)
    source = os.fspath(path)
    return parse_config(read_config_file(source), source, overrides, plugin_resolver, environ)


# What an unreadable configuration file is called, by errno (anything else: the OS's words, lower-case).
_READ_ERRORS: Final[dict[int, str]] = {
    errno.ENOENT: "no such file",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EISDIR: "is a directory",
    errno.ENOTDIR: "no such file",  # a path through a file: "a.toml/b.toml"
}
# tomllib puts the position at the end of its message (Python 3.11-3.13 have no attributes for it).
_TOML_POSITION = re.compile(r"^(?P<message>.*?) \((?:at line (?P<line>\d+), column (?P<column>\d+)|"
                            r"(?P<end>at end of document))\)$", re.DOTALL)


def read_config_file(source: str) -> dict[str, Any]:
    """The parsed TOML of ``source``, or :class:`ConfigError` (key ``"<file>"``) saying why not."""
    try:
        with open(source, "rb") as fh:
            if stat.S_ISDIR(os.fstat(fh.fileno()).st_mode):  # not every OS refuses to open a folder
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), source)
            raw = fh.read()
    except OSError as exc:
        words = _READ_ERRORS.get(exc.errno or 0) or (exc.strerror or str(exc)).lower()
        raise ConfigError("<file>", f"cannot read config {source}: {words}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, column = _position(raw[:exc.start].decode("utf-8", "replace"), exc.start)
        raise ConfigError("<file>", f"not valid UTF-8 (byte 0x{raw[exc.start]:02x})", path=source, line=line,
                          column=column) from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = _TOML_POSITION.match(str(exc))
        if match is None:  # pragma: no cover - every tomllib error carries a position
            raise ConfigError("<file>", f"invalid TOML in {source}: {exc}") from exc
        if match["end"]:
            line, column = _position(text, len(text))
        else:
            line, column = int(match["line"]), int(match["column"])
        raise ConfigError("<file>", f"invalid TOML: {match['message']}", path=source, line=line,
                          column=column) from exc


def _position(text: str, offset: int) -> tuple[int, int]:
    """1-based (line, column) of ``offset`` in ``text``, as tomllib counts them."""
    before = text[:offset]
    return before.count("\n") + 1, offset - (before.rfind("\n") + 1) + 1


# --------------------------------------------------------------------------------------------------
# The environment: SELECTWS_<SECTION>_<KEY>, between the file and the command line.
# --------------------------------------------------------------------------------------------------

ENV_PREFIX: Final = "SELECTWS_"
#: Never configuration: the conventional variable of the server API key (``selectws publish``'s default).
#: Variables named by ``api.key_env``, ``auth.jwt_secret_env`` and ``hooks[].secret_env`` are not either.
RESERVED_ENV: Final[frozenset[str]] = frozenset({"SELECTWS_API_KEY"})
_SECRET_NAME_KEYS: Final[tuple[tuple[str, str], ...]] = (("api", "key_env"), ("auth", "jwt_secret_env"))


def env_name(dotted: str) -> str:
    """``"server.port"`` -> ``"SELECTWS_SERVER_PORT"``."""
    return ENV_PREFIX + dotted.replace(".", "_").upper()


def _secret_variables(data: Mapping[str, Any], environ: Mapping[str, str]) -> set[str]:
    """Variables that hold secrets (named by ``*_env`` keys of the file or the environment): not settings."""
    names = set(RESERVED_ENV)
    for section, key in _SECRET_NAME_KEYS:
        table = data.get(section)
        if isinstance(table, Mapping) and isinstance(table.get(key), str):
            names.add(table[key])
        names.add(environ.get(env_name(f"{section}.{key}"), ""))
    hooks = data.get("hooks")
    for hook in hooks if isinstance(hooks, list | tuple) else ():
        if isinstance(hook, Mapping) and isinstance(hook.get("secret_env"), str):
            names.add(hook["secret_env"])
    return names


def _env_layer(data: Mapping[str, Any], environ: Mapping[str, str] | None) -> dict[str, tuple[Any, str]]:
    """The configuration in ``environ``: dotted key -> (value, variable).

    Only ``SELECTWS_<SECTION>_<KEY>`` with a known scalar section is configuration (other ``SELECTWS_*`` variables
    are left alone); an unknown key in a known section, or a ``[[routes]]`` / ``[[hooks]]`` variable, is an error.
    A value is read as a TOML value (``9000``, ``2.5``, ``true``, ``["a", "b"]``) unless the key is a string, whose
    value is taken as it is; a value that is not TOML is a string too (and the key's rule says what was expected).
    """
    if not environ:
        return {}
    skip = _secret_variables(data, environ)
    found: dict[str, tuple[Any, str]] = {}
    for var in sorted(environ):
        if not var.startswith(ENV_PREFIX) or var in skip:
            continue
        section, _, name = var[len(ENV_PREFIX):].lower().partition("_")
        if section in ("routes", "hooks"):
            raise ConfigError(section, f"[[{section}]] cannot be set from the environment (only the keys of the "
                                       "top-level tables, like SELECTWS_SERVER_PORT)", env=var)
        cls = _SECTIONS.get(section)
        if cls is None:
            continue
        rules = {f.name: f.metadata[_RULE] for f in fields(cls)}
        if name not in rules:
            close = difflib.get_close_matches(name, list(rules), n=1, cutoff=0.6)
            hint = f"; did you mean {env_name(f'{section}.{close[0]}')}?" if close else ""
            raise ConfigError(f"{section}.{name}", f"not a configuration key{hint}", env=var)
        found[f"{section}.{name}"] = (_env_value(environ[var], rules[name]), var)
    return found


def _env_value(raw: str, rule: _Rule) -> Any:
    if rule.kind is str or "\n" in raw:
        return raw
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def parse_config(
    data: Mapping[str, Any],
    source: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    plugin_resolver: Callable[[str], object] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Validate already-parsed TOML data (plus ``environ`` and dotted-key ``overrides``) into a :class:`Config`.

    Precedence: built-in defaults < ``data`` < ``environ`` (``SELECTWS_<SECTION>_<KEY>``, see :func:`_env_layer`;
    ``None``: the environment is not read) < ``overrides``, which maps ``"section.key"`` to a value; ``None``
    values mean "flag not given" and are skipped. Only the scalar tables can be set by either, not ``routes``.
    :attr:`Config.origins` says where each value came from.

    If ``plugin_resolver`` is given, ``[server] plugin_paths`` are put at the front of ``sys.path``, then the
    resolver is called with every route's ``plugin`` string after everything else validated, so a typo in a
    plugin name fails at load/reload time rather than on the first client connection.

    Raises :class:`ConfigError` for the first problem found.
    """
    if not isinstance(data, Mapping):
        raise ConfigError("<file>", f"{source or 'configuration'}: expected a table at top level, got "
                                    f"{_type_name(data)}")
    for key in data:
        if key not in _TOP_LEVEL:
            raise ConfigError(str(key), f"unknown key{_suggest_key(str(key), _TOP_LEVEL)}")

    env = _env_layer(data, environ)
    merged, _ = _apply_overrides(data, {key: value for key, (value, _var) in env.items()})
    merged, overridden = _apply_overrides(merged, overrides)
    origins = _origins(data, env, overridden)

    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        sections[name] = _build_section(name, cls, merged.get(name, {}), origins)
    sections["server"] = replace(sections["server"], plugin_paths=_plugin_paths(sections["server"], source))

    ops = sections["ops"]
    for name in ("healthz_path", "readyz_path", "metrics_path"):
        if not getattr(ops, name).startswith("/"):
            raise ConfigError(f"ops.{name}", f"must start with '/', got {getattr(ops, name)!r}")
    if ops.listen:
        split_host_port("ops.listen", ops.listen)
    if ops.admin and not ops.listen:
        raise ConfigError("ops.admin", "the admin page is served on the operator listener only: set ops.listen")
    if ops.admin and not sections["api"].enabled:
        raise ConfigError("ops.admin", "the admin page needs the server API key as its credential: set "
                                       "api.key_file or api.key_env")

    tls = sections["tls"]
    if tls.cert and not tls.key:
        raise ConfigError("tls.key", "tls.cert is set but tls.key is empty: both are needed for TLS")
    if tls.key and not tls.cert:
        raise ConfigError("tls.cert", "tls.key is set but tls.cert is empty: both are needed for TLS")
    if (tls.ca or tls.ciphers) and not tls.enabled:
        name = "tls.ca" if tls.ca else "tls.ciphers"
        raise ConfigError(name, "has no effect without tls.cert and tls.key")

    limits = sections["limits"]
    if limits.write_buffer_limit < limits.write_buffer_high:
        raise ConfigError(
            "limits.write_buffer_limit",
            f"must be >= limits.write_buffer_high ({limits.write_buffer_high}), got {limits.write_buffer_limit}",
        )
    if limits.max_buffered_total < limits.write_buffer_limit:
        raise ConfigError(
            "limits.max_buffered_total",
            f"must be >= limits.write_buffer_limit ({limits.write_buffer_limit}), got {limits.max_buffered_total}",
        )
    if limits.slow_consumer_close_code not in (1008, 1013):
        raise ConfigError(
            "limits.slow_consumer_close_code", f"must be 1008 or 1013, got {limits.slow_consumer_close_code}"
        )
    for i, proxy in enumerate(sections["server"].trusted_proxies):
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise ConfigError(
                f"server.trusted_proxies[{i}]", f"{proxy!r} is not an IP address or network (CIDR)"
            ) from None

    broker = sections["broker"]
    if broker.url:
        parse_redis_url("broker.url", broker.url)
    if broker.reconnect_max < broker.reconnect_min:
        raise ConfigError("broker.reconnect_max", f"must be >= broker.reconnect_min ({broker.reconnect_min})")
    worker_timeout = sections["server"].worker_timeout
    if 0 < worker_timeout < 1:
        raise ConfigError("server.worker_timeout", f"must be 0 (off) or >= 1, got {worker_timeout!r}")
    if sections["server"].workers > 1 and not broker.url:
        raise ConfigError(
            "server.workers",
            f"{sections['server'].workers} workers need [broker] url (a Redis server): without a broker each "
            "worker has its own groups and broadcasts would silently reach only part of the clients",
        )

    api = sections["api"]
    if api.key_file and api.key_env:
        raise ConfigError("api.key_env", "set api.key_file or api.key_env, not both")
    if api.key_env and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", api.key_env):
        raise ConfigError("api.key_env", f"expected the name of an environment variable, got {api.key_env!r}")

    routes = _build_routes(data.get("routes"))
    _check_rate_limits(limits, routes)
    _check_auth(sections["auth"], routes)
    hooks = _build_hooks(data.get("hooks"))

    if plugin_resolver is not None:
        use_plugin_paths(sections["server"].plugin_paths)
        for i, route in enumerate(routes):
            try:
                plugin_cls = plugin_resolver(route.plugin)
            except Exception as exc:
                raise ConfigError(f"routes[{i}].plugin", f"unknown plugin {route.plugin!r}: {exc}") from exc
            # The plugin's declared options (Plugin.validate_options: duck-typed, this layer cannot import plugins).
            validate = getattr(plugin_cls, "validate_options", None)
            if callable(validate):
                try:
                    validate(route.options)
                except Exception as exc:
                    raise route_options_error(i, route, exc) from exc
            # History applies to the groups the plugin owns: the base class's owns_group (marked) owns none.
            if route.history_size and getattr(getattr(plugin_cls, "owns_group", None), "selectws_default", False):
                raise ConfigError(f"routes[{i}].history_size", f"plugin {route.plugin!r} does not say which groups "
                                  "are its own (Plugin.owns_group), so no history can be kept for it")

    return Config(**sections, routes=routes, hooks=hooks, source=source, origins=origins)


def route_options_error(index: int, route: RouteConfig, exc: Exception) -> ConfigError:
    """A plugin's refusal of its route's options (``exc``, whose ``option`` names the option, ``None`` or absent for
    the table as a whole, and ``reason`` says why) as the error naming the route by index and path:
    ``routes[2] (/chat).options.max_name_length: expected an integer >= 1, got "x"``."""
    option = getattr(exc, "option", None)
    key = f"routes[{index}] ({route.path}).options"
    if isinstance(option, str):
        key += "." + (option if re.fullmatch(r"[A-Za-z0-9_-]+", option) else json.dumps(option, ensure_ascii=False))
    reason = getattr(exc, "reason", None)
    if not isinstance(reason, str):
        reason = f"plugin {route.plugin!r} refused them: {str(exc) or type(exc).__name__}"
    return ConfigError(key, reason)


def _check_auth(auth: AuthConfig, routes: tuple[RouteConfig, ...]) -> None:
    """``[auth]``: one source of key material, algorithms of its kind; a route with ``auth = "jwt"`` needs one.
    Whether PyJWT is installed, and the secret itself, are checked by the application (it reads the secret)."""
    given = [name for name in ("jwt_secret_file", "jwt_secret_env", "jwt_public_key_file") if getattr(auth, name)]
    if len(given) > 1:
        raise ConfigError(f"auth.{given[1]}", f"set one of auth.jwt_secret_file, auth.jwt_secret_env and "
                                              f"auth.jwt_public_key_file, not both auth.{given[0]} and this")
    if auth.jwt_secret_env and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", auth.jwt_secret_env):
        raise ConfigError("auth.jwt_secret_env",
                          f"expected the name of an environment variable, got {auth.jwt_secret_env!r}")
    if not auth.algorithms:
        raise ConfigError("auth.algorithms", "at least one algorithm is required, e.g. [\"HS256\"]")
    known = JWT_HMAC_ALGORITHMS + JWT_KEY_ALGORITHMS
    for j, alg in enumerate(auth.algorithms):
        key = f"auth.algorithms[{j}]"
        if alg.lower() == "none":
            raise ConfigError(key, "'none' (an unsigned token) is never accepted")
        if alg not in known:
            raise ConfigError(key, f"unknown algorithm {alg!r}{_suggest(alg, known)}; expected one of "
                                   f"{', '.join(known)}")
        if alg in auth.algorithms[:j]:
            raise ConfigError(key, f"duplicate algorithm {alg!r}")
    hmac_algs = [a for a in auth.algorithms if a in JWT_HMAC_ALGORITHMS]
    if auth.jwt_public_key_file and hmac_algs:
        # Algorithm confusion: a public key used as an HMAC secret would let anyone holding it sign tokens.
        raise ConfigError("auth.algorithms", f"{hmac_algs[0]} needs a shared secret (auth.jwt_secret_file or "
                                             "auth.jwt_secret_env), not auth.jwt_public_key_file")
    if (auth.jwt_secret_file or auth.jwt_secret_env) and len(hmac_algs) != len(auth.algorithms):
        other = next(a for a in auth.algorithms if a not in JWT_HMAC_ALGORITHMS)
        raise ConfigError("auth.algorithms", f"{other} needs auth.jwt_public_key_file; a secret signs HS256, "
                                             "HS384 and HS512 only")
    for i, route in enumerate(routes):
        if route.auth == "jwt" and not given:
            raise ConfigError("auth.jwt_secret_file", f"routes[{i}] ({route.path}) has auth = \"jwt\": set "
                                                      "auth.jwt_secret_file, auth.jwt_secret_env or "
                                                      "auth.jwt_public_key_file")


def parse_redis_url(key: str, url: str) -> tuple[str, int, int, bool, str]:
    """``redis://[:password@]host[:port][/db]`` (``rediss://`` = TLS) -> (host, port, db, tls, password)."""
    try:
        parts = urlsplit(url)
        port = parts.port or 6379
    except ValueError as exc:
        raise ConfigError(key, f"invalid URL {url!r}: {exc}") from None
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigError(key, f"expected a redis:// or rediss:// URL, got {url!r}")
    if not parts.hostname:
        raise ConfigError(key, f"no host in {url!r}")
    db_text = parts.path.lstrip("/") or "0"
    if not db_text.isdigit():
        raise ConfigError(key, f"database must be a number in {url!r}")
    if parts.query or parts.fragment:
        raise ConfigError(key, f"query strings and fragments are not supported in {url!r}")
    return parts.hostname, port, int(db_text), parts.scheme == "rediss", unquote(parts.password or "")


def split_host_port(key: str, value: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6addr]:port"`` -> ``(host, port)``, or :class:`ConfigError` naming ``key``."""
    host, sep, raw_port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        sep = ""  # a bare IPv6 address: ambiguous without brackets
    if not (sep and host and raw_port.isascii() and raw_port.isdigit() and int(raw_port) <= 65535):
        raise ConfigError(key, f"expected 'host:port' (or '[ipv6]:port') with a port 0..65535, got {value!r}")
    return host, int(raw_port)


def _all_dotted_keys() -> list[str]:
    return [f"{section}.{name}" for section, cls in _SECTIONS.items() for name in _field_names(cls)]


def _suggest_key(key: str, candidates: tuple[str, ...], section: str | None = None) -> str:
    """Suggest a close key in the same table; failing that, the same key in the table it belongs to.

    The second case catches the common "right key, wrong table" mistake, e.g. ``port`` at top level
    or ``level`` under ``[server]``.
    """
    prefix = f"{section}." if section else ""
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    if close:
        return f"; did you mean {prefix + close[0]!r}?"
    elsewhere = [k for k in _all_dotted_keys() if k.split(".", 1)[1] == key]
    if elsewhere:
        return f"; did you mean {elsewhere[0]!r}?"
    return ""


def _apply_overrides(
    data: Mapping[str, Any], overrides: Mapping[str, Any] | None
) -> tuple[dict[str, Any], frozenset[str]]:
    """Merge dotted-key overrides into a shallow copy of ``data``; return it and the keys overridden."""
    merged: dict[str, Any] = dict(data)
    overridden: set[str] = set()
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, name = key.partition(".")
        cls = _SECTIONS.get(section)
        if cls is None or name not in _field_names(cls):
            raise ConfigError(key, f"unknown key (command-line override){_suggest(key, _all_dotted_keys())}")
        table = merged.get(section, {})
        if not isinstance(table, Mapping):
            raise ConfigError(section, f"expected a table, got {_type_name(table)}")
        merged[section] = {**table, name: value}
        overridden.add(key)
    return merged, frozenset(overridden)


_T = TypeVar("_T", bound="DataclassInstance")


def _build_section(name: str, cls: type[_T], raw: Any, origins: Mapping[str, str]) -> _T:
    """Validate one scalar table against the field rules of ``cls``."""
    if not isinstance(raw, Mapping):
        raise ConfigError(name, f"expected a table, got {_type_name(raw)}")
    known = _field_names(cls)
    for key in raw:
        if key not in known:
            raise ConfigError(f"{name}.{key}", f"unknown key{_suggest_key(str(key), known, name)}")
    values: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in raw:
            continue
        dotted = f"{name}.{f.name}"
        rule: _Rule = f.metadata[_RULE]
        try:
            values[f.name] = rule.check(dotted, raw[f.name])
        except ConfigError as exc:
            origin = origins.get(dotted, "file")
            if origin == "flag":
                raise ConfigError(exc.key, f"{exc.reason} (from command-line override)") from None
            if origin.startswith("env "):
                raise ConfigError(exc.key, exc.reason, env=origin[4:]) from None
            raise
    return cls(**values)


def _origins(data: Mapping[str, Any], env: Mapping[str, tuple[Any, str]], flags: frozenset[str]) -> dict[str, str]:
    """Where each value was set: ``"file"``, ``"env VAR"`` or ``"flag"``, by dotted key (absent: default)."""
    origins: dict[str, str] = {}
    for section in _SECTIONS:
        table = data.get(section)
        for key in table if isinstance(table, Mapping) else ():
            origins[f"{section}.{key}"] = "file"
    for name in ("routes", "hooks"):
        items = data.get(name)
        for i, item in enumerate(items if isinstance(items, list | tuple) else ()):
            for key in item if isinstance(item, Mapping) else ():
                origins[f"{name}[{i}].{key}"] = "file"
    origins.update((key, f"env {var}") for key, (_value, var) in env.items())
    origins.update((key, "flag") for key in flags)
    return origins


def _plugin_paths(server: ServerConfig, source: str | None) -> tuple[str, ...]:
    """``[server] plugin_paths`` made absolute (from the configuration file's folder, else the working directory);
    each must be an existing folder."""
    base = os.path.dirname(os.path.abspath(source)) if source else os.getcwd()
    paths = []
    for i, path in enumerate(server.plugin_paths):
        full = os.path.normpath(os.path.join(base, os.path.expanduser(path)))
        if not os.path.isdir(full):
            what = "not a folder" if os.path.exists(full) else "no such folder"
            raise ConfigError(f"server.plugin_paths[{i}]", f"{what}: {full}")
        paths.append(full)
    return tuple(paths)


def use_plugin_paths(paths: tuple[str, ...]) -> None:
    """Put ``paths`` at the front of ``sys.path``, in their order (a path already there moves to the front).
    Modules already imported stay as they are: new plugin code takes a restart."""
    for path in reversed(paths):
        while path in sys.path:
            sys.path.remove(path)
        sys.path.insert(0, path)


# Path parameters are whole segments "{name}" where name is an ASCII identifier, so the router can
# hand them to the plugin as keyword-friendly names.
_PARAM = re.compile(r"\{([^{}/]*)\}")
# RFC 7230 token characters: what a Sec-WebSocket-Protocol value may contain.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# ASCII-only on purpose: the router compiles parameters into regex group names.
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A serialised origin (RFC 6454): scheme "://" host [":" port], no path; compared lower-case.
_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s?#]+")
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def _build_routes(raw: Any) -> tuple[RouteConfig, ...]:
    """Validate ``[[routes]]``; absent means :data:`DEFAULT_ROUTES`, present means exactly these."""
    if raw is None:
        return _default_routes()
    if not isinstance(raw, list | tuple):
        raise ConfigError("routes", f"expected an array of tables ([[routes]]), got {_type_name(raw)}")
    if not raw:
        # An empty array is almost certainly a mistake: a daemon that answers every path with 404.
        raise ConfigError("routes", "at least one route is required (omit routes to get the defaults)")
    routes: list[RouteConfig] = []
    # Routes that differ only in parameter names ("/b/{x}" vs "/b/{y}") match the same requests,
    # so they are duplicates too; compare on a shape with the names erased.
    seen: dict[str, int] = {}
    for i, item in enumerate(raw):
        route = _build_route(i, item)
        shape = _PARAM.sub("{}", route.path)
        if shape in seen:
            raise ConfigError(
                f"routes[{i}].path", f"duplicate route path {route.path!r} (same as routes[{seen[shape]}])"
            )
        seen[shape] = i
        routes.append(route)
    return tuple(routes)


def _build_route(i: int, item: Any) -> RouteConfig:
    prefix = f"routes[{i}]"
    if not isinstance(item, Mapping):
        raise ConfigError(prefix, f"expected a table, got {_type_name(item)}")
    for key in item:
        if key not in _ROUTE_KEYS:
            close = difflib.get_close_matches(str(key), list(_ROUTE_KEYS), n=1, cutoff=0.6)
            hint = f"; did you mean {prefix + '.' + close[0]!r}?" if close else ""
            raise ConfigError(f"{prefix}.{key}", f"unknown key{hint}")

    for required in ("path", "plugin"):
        if required not in item:
            raise ConfigError(f"{prefix}.{required}", "missing required key")

    path = item["path"]
    if not isinstance(path, str):
        raise ConfigError(f"{prefix}.path", f"expected a string, got {_type_name(path)}")
    _check_route_path(f"{prefix}.path", path)

    plugin = item["plugin"]
    if not isinstance(plugin, str):
        raise ConfigError(f"{prefix}.plugin", f"expected a string, got {_type_name(plugin)}")
    _check_plugin_name(f"{prefix}.plugin", plugin)

    options = item.get("options", {})
    if not isinstance(options, Mapping):
        raise ConfigError(f"{prefix}.options", f"expected a table, got {_type_name(options)}")

    raw_protocols = item.get("subprotocols", [])
    if not isinstance(raw_protocols, list | tuple):
        raise ConfigError(f"{prefix}.subprotocols", f"expected an array of strings, got {_type_name(raw_protocols)}")
    subprotocols = list(raw_protocols)
    for j, proto in enumerate(subprotocols):
        key = f"{prefix}.subprotocols[{j}]"
        if not isinstance(proto, str):
            raise ConfigError(key, f"expected a string, got {_type_name(proto)}")
        if not _TOKEN.fullmatch(proto):
            raise ConfigError(key, f"{proto!r} is not a valid subprotocol name (an HTTP token)")
        if proto in subprotocols[:j]:
            raise ConfigError(key, f"duplicate subprotocol {proto!r}")

    compression = item.get("compression")
    if compression is not None and not isinstance(compression, bool):
        raise ConfigError(f"{prefix}.compression", f"expected a boolean, got {_type_name(compression)}")

    raw_origins = item.get("origins", [])
    if not isinstance(raw_origins, list | tuple):
        raise ConfigError(f"{prefix}.origins", f"expected an array of strings, got {_type_name(raw_origins)}")
    origins: list[str] = []
    for j, origin in enumerate(raw_origins):
        key = f"{prefix}.origins[{j}]"
        if not isinstance(origin, str):
            raise ConfigError(key, f"expected a string, got {_type_name(origin)}")
        normalised = origin.strip().lower().rstrip("/")
        if normalised != "null" and not _ORIGIN.fullmatch(normalised):
            raise ConfigError(key, f"{origin!r} is not an origin like 'https://example.com' or 'http://host:8080'")
        origins.append(normalised)

    auth = item.get("auth", "none")
    if auth not in ("none", "jwt"):
        shown = repr(auth) if isinstance(auth, str) else _type_name(auth)
        raise ConfigError(f"{prefix}.auth", f"must be 'none' or 'jwt', got {shown}")

    proto_required = item.get("subprotocol_required")
    if proto_required is not None and not isinstance(proto_required, bool):
        raise ConfigError(
            f"{prefix}.subprotocol_required", f"expected a boolean, got {_type_name(proto_required)}"
        )

    return RouteConfig(
        path=path,
        plugin=plugin,
        options=_copy_options(options),
        subprotocols=tuple(subprotocols),
        compression=compression,
        origins=tuple(origins),
        auth=auth,
        subprotocol_required=proto_required,
        **_route_rate_limits(prefix, item),
        **{key: rule.check(f"{prefix}.{key}", item[key]) for key, rule in _HISTORY_RULES.items() if key in item},
    )


def _route_rate_limits(prefix: str, item: Mapping[str, Any]) -> dict[str, Any]:
    """The route's own ``max_messages_per_second``, ``burst`` and ``rate_limit_action``, checked by the rules of
    the ``[limits]`` keys they override (so both give the same errors)."""
    rules = {f.name: f.metadata[_RULE] for f in fields(LimitsConfig) if f.name in _RATE_KEYS}
    return {key: rules[key].check(f"{prefix}.{key}", item[key]) for key in _RATE_KEYS if key in item}


def _check_rate_limits(limits: LimitsConfig, routes: tuple[RouteConfig, ...]) -> None:
    """A rate limit needs a bucket of at least one message: ``burst`` >= 1 wherever the rate is on (not 0).
    Where it is off, ``burst`` and ``rate_limit_action`` are ignored."""
    if limits.max_messages_per_second and limits.burst < 1:
        raise ConfigError("limits.burst", f"must be >= 1 when limits.max_messages_per_second is set (the most "
                          f"messages a connection may send at once), got {limits.burst}")
    for i, route in enumerate(routes):
        effective = route.rate_limit(limits)
        rate, burst = effective["max_messages_per_second"], effective["burst"]
        if rate and burst < 1:
            where = "" if route.burst is not None else " (from [limits])"
            raise ConfigError(f"routes[{i}].burst", f"must be >= 1 when max_messages_per_second is set ({_num(rate)} "
                              f"on this route; the most messages a connection may send at once), got {burst}{where}")


def _build_hooks(raw: Any) -> tuple[HookConfig, ...]:
    """Validate ``[[hooks]]`` (absent: none). Secrets are read, and host names resolved, by the application."""
    if raw is None:
        return ()
    if not isinstance(raw, list | tuple):
        raise ConfigError("hooks", f"expected an array of tables ([[hooks]]), got {_type_name(raw)}")
    hooks = []
    for i, item in enumerate(raw):
        prefix = f"hooks[{i}]"
        hook = _build_section(prefix, HookConfig, item, {})
        if not hook.url:
            raise ConfigError(f"{prefix}.url", "missing required key")
        try:
            parts = urlsplit(hook.url)
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError as exc:
            raise ConfigError(f"{prefix}.url", f"invalid URL {hook.url!r}: {exc}") from None
        if parts.scheme not in ("http", "https"):
            raise ConfigError(f"{prefix}.url", f"expected an http:// or https:// URL, got {hook.url!r}")
        if not parts.hostname:
            raise ConfigError(f"{prefix}.url", f"no host in {hook.url!r}")
        if parts.username is not None or parts.fragment:
            raise ConfigError(f"{prefix}.url", f"user names and fragments are not supported in {hook.url!r}")
        if parts.scheme == "http" and hook.ca_file:
            raise ConfigError(f"{prefix}.ca_file", "has no effect with an http:// url")
        if not hook.events:
            raise ConfigError(f"{prefix}.events", f"at least one event is required, of {', '.join(HOOK_EVENTS)}")
        for j, name in enumerate(hook.events):
            if name not in HOOK_EVENTS:
                raise ConfigError(f"{prefix}.events[{j}]", f"unknown event {name!r}{_suggest(name, HOOK_EVENTS)}; "
                                  f"expected one of {', '.join(HOOK_EVENTS)}")
            if name in hook.events[:j]:
                raise ConfigError(f"{prefix}.events[{j}]", f"duplicate event {name!r}")
        if bool(hook.secret_file) == bool(hook.secret_env):
            key = "secret_env" if hook.secret_env else "secret_file"
            raise ConfigError(f"{prefix}.{key}", "exactly one of secret_file and secret_env is required (the "
                              "HMAC secret is never written in the configuration itself)")
        if hook.backoff_max < hook.backoff_min:
            raise ConfigError(f"{prefix}.backoff_max", f"must be >= backoff_min ({hook.backoff_min})")
        hooks.append(hook)
    return tuple(hooks)


def _copy_options(value: Any) -> Any:
    """Deep-copy plain TOML data so the Config never shares mutable state with the caller."""
    if isinstance(value, Mapping):
        return {str(k): _copy_options(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_copy_options(v) for v in value]
    return value


def _check_route_path(key: str, path: str) -> None:
    """Reject paths a router could not match unambiguously.

    The path is compared with the request-target's path component, so it must be absolute and must
    not carry a query, fragment, whitespace or control characters; ``//`` would be an empty segment.
    """
    if not path.startswith("/"):
        raise ConfigError(key, f"route path must start with '/', got {path!r}")
    for ch in path:
        if ch in "?#" or ch.isspace() or not ch.isprintable():
            raise ConfigError(key, f"route path {path!r} must not contain {ch!r}")
    if "//" in path:
        raise ConfigError(key, f"route path {path!r} has an empty segment ('//')")
    names: list[str] = []
    for segment in path.split("/")[1:]:
        match = _PARAM.fullmatch(segment)
        if match is None:
            if "{" in segment or "}" in segment:
                raise ConfigError(key, f"route path {path!r}: parameters must be whole segments like '{{name}}'")
            continue
        name = match.group(1)
        if not _IDENT.fullmatch(name):
            raise ConfigError(key, f"route path {path!r}: parameter name {name!r} is not an ASCII identifier")
        if name in names:
            raise ConfigError(key, f"route path {path!r}: duplicate parameter name {name!r}")
        names.append(name)


def _check_plugin_name(key: str, plugin: str) -> None:
    """Check the plugin reference is well-formed; whether it exists is ``plugin_resolver``'s job."""
    if ":" in plugin:
        module, _, attr = plugin.partition(":")
        if not _DOTTED.fullmatch(module) or not _DOTTED.fullmatch(attr):
            raise ConfigError(key, f"plugin {plugin!r} is not of the form 'package.module:Class'")
        return
    if not plugin or plugin != plugin.strip() or any(ch.isspace() for ch in plugin):
        raise ConfigError(key, f"plugin name {plugin!r} must be a non-empty name without whitespace")
