"""The ``selectws`` command line: ``serve``, ``check-config``, ``connect``, ``publish``, ``gentoken``.

Precedence is flags > environment (``SELECTWS_<SECTION>_<KEY>``) > file > built-in defaults. A configuration error
is one line naming the key (or ``FILE:LINE:COLUMN:`` for a file that is not TOML), exit status 2, and nothing listens.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import click

from selectws import __version__
from selectws.app.activation import ActivationError, inherited_sockets
from selectws.app.api_client import ApiCallError
from selectws.app.api_client import call as call_api
from selectws.app.api_key import read_api_key, read_secret
from selectws.app.connect import ConnectOptions, parse_header
from selectws.app.connect import run as run_client
from selectws.app.hooks import HookLoader, check_hooks
from selectws.app.jwt_keys import INSTALL_HINT, load_jwt
from selectws.app.workers import run_workers
from selectws.brokers import broker_factory
from selectws.config import Config, ConfigError, load_config
from selectws.config.printing import render_effective
from selectws.plugins.registry import find_plugin
from selectws.protocol.frames import SPEEDUPS
from selectws.server.server import Server
from selectws.transport.logs import configure_logging, get_logger
from selectws.transport.tls import build_context

__all__ = ["main"]


# The flags of serve (and check-config) and the keys they set.
_FLAGS = {"server.host": "--host", "server.port": "--port", "logging.level": "--log-level",
          "logging.format": "--log-format", "server.workers": "--workers"}


def _load(config_path: str | None, overrides: dict[str, Any]) -> Config:
    # The environment is read again on every reload (it is the same: a process's environment does not change).
    config = load_config(config_path, overrides={k: v for k, v in overrides.items() if v is not None},
                         plugin_resolver=find_plugin, environ=os.environ)
    read_api_key(config)  # [api]: a missing or empty key is a configuration error (serve, check-config, reload)
    load_jwt(config)  # [auth] for auth = "jwt" routes: PyJWT installed, the secret or public key readable
    return config


def _reloader(config_path: str, overrides: dict[str, Any]) -> Callable[[], Config]:
    """SIGHUP's reload: read ``config_path`` again (with the same flags on top) and apply its logging settings."""

    def reload() -> Config:
        new = _load(config_path, overrides)
        configure_logging(new.logging.level, new.logging.format, flush_each=False)
        return new

    return reload


def _config_error(exc: ConfigError, source: str | None) -> None:
    if exc.line is not None:  # FILE:LINE:COLUMN: invalid TOML: ... (the form editors and CI annotations jump to)
        click.echo(str(exc), err=True)
    elif exc.key == "<file>":  # cannot read config FILE: no such file | permission denied | is a directory
        click.echo(f"selectws: {exc}", err=True)
    else:
        where = f" in {source}" if source and exc.env is None else ""
        click.echo(f"selectws: configuration error{where}: {exc}", err=True)
    sys.exit(2)


def _config_flags(command: Callable[..., None]) -> Callable[..., None]:
    """serve's flags, shared with check-config (so that it checks, and prints, what serve would run)."""
    options = [
        click.option("--host", help="Address to listen on (overrides server.host)."),
        click.option("--port", type=int, help="Port to listen on, 0 for any free port (overrides server.port)."),
        click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False)),
        click.option("--log-format", type=click.Choice(["auto", "console", "json"], case_sensitive=False)),
        click.option("--workers", type=int, help="Worker processes sharing the port (overrides server.workers; "
                                                 ">1 needs [broker] url)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _overrides(host: str | None, port: int | None, log_level: str | None, log_format: str | None,
               workers: int | None) -> dict[str, Any]:
    return {"server.host": host, "server.port": port, "logging.level": log_level, "logging.format": log_format,
            "server.workers": workers}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(
    __version__, "--version", "-V", prog_name="selectws",
    # Which WebSocket masking is active: "C" (the optional extension) or "off, pure Python (why)".
    message=f"%(prog)s, version %(version)s (speedups: {SPEEDUPS})",
)
def main() -> None:
    """selectws: a WebSocket server daemon on one selectors loop."""


@main.command()
@click.option("-c", "--config", "config_path", metavar="FILE", help="TOML configuration file.")
@_config_flags
def serve(config_path: str | None, host: str | None, port: int | None, log_level: str | None,
          log_format: str | None, workers: int | None) -> None:
    """Run the daemon (in the foreground; systemd or a terminal supervises it).

    Settings come from the built-in defaults, then FILE, then SELECTWS_<SECTION>_<KEY> environment variables,
    then these flags (docs/configuration.md).
    """
    overrides = _overrides(host, port, log_level, log_format, workers)
    hooks = HookLoader()  # [[hooks]]: reads the secrets; resolves host names here, before any loop runs
    try:
        config = _load(config_path, overrides)
        hooks(config, True)
    except ConfigError as exc:
        _config_error(exc, config_path)
        return
    # Lines are flushed once per loop iteration by the server (see selectws.transport.logs.flush_logs).
    configure_logging(config.logging.level, config.logging.format, flush_each=False)
    log = get_logger("selectws")
    reload = _reloader(config_path, overrides) if config_path else None  # nothing to re-read without a file

    try:
        inherited = [sock for _, sock in inherited_sockets()]
    except ActivationError as exc:
        log.error("socket activation failed", error=str(exc))
        sys.exit(1)
    if config.server.workers > 1:
        try:
            sys.exit(run_workers(config, inherited, reload, hooks))
        except OSError as exc:
            log.error("cannot listen", host=config.server.host, port=config.server.port, error=str(exc))
            sys.exit(1)
    try:
        # [broker] takes effect on restart: the broker is built once, here.
        server = Server(config, plugins=find_plugin, sockets=inherited or None, broker=broker_factory(config.broker),
                        reload=reload, hooks=hooks, api_key=read_api_key, jwt=load_jwt)
    except Exception as exc:  # plugin constructors run here, the [tls] certificate and the broker are loaded
        log.error("cannot start", error=str(exc), key=getattr(exc, "key", None))
        sys.exit(1)
    try:
        server.run()
    except OSError as exc:
        log.error("cannot listen", host=config.server.host, port=config.server.port, error=str(exc))
        sys.exit(1)


@main.command("check-config")
@click.argument("config_path", required=False, metavar="[FILE]")
@click.option("-c", "--config", "config_option", metavar="FILE", help="The file (instead of the argument).")
@_config_flags
@click.option("--print", "show", is_flag=True,
              help="Print the effective configuration: every key, its value and where it came from "
                   "(default, file, env VARIABLE, flag --x).")
def check_config(config_path: str | None, config_option: str | None, host: str | None, port: int | None,
                 log_level: str | None, log_format: str | None, workers: int | None, show: bool) -> None:
    """Validate the configuration without serving (exit 0 when it is good, 2 when not).

    It is read as serve reads it: FILE, then SELECTWS_<SECTION>_<KEY> environment variables, then the flags (give
    the same ones as to serve). Without FILE: the defaults, the environment and the flags.
    """
    if config_path and config_option:
        raise click.UsageError("give the file once: FILE or -c FILE")
    config_path = config_path or config_option
    try:
        config = _load(config_path, _overrides(host, port, log_level, log_format, workers))
        if config.tls.enabled:  # load the certificate and key as serve would
            build_context(config.tls, os.path.dirname(os.path.abspath(config_path)) if config_path else None)
        check_hooks(config)  # h11, the secrets and CA files of [[hooks]] (no DNS)
    except ConfigError as exc:
        _config_error(exc, config_path)
        return
    if show:
        click.echo(f"# selectws: effective configuration ({config_path or 'no file'}: OK). After each value, where it "
                   "came from:\n# default, file, env VARIABLE or flag --option (docs/configuration.md).\n")
        click.echo(render_effective(config, _FLAGS), nl=False)
        return
    routes = ", ".join(f"{r.path} -> {r.plugin}" for r in config.routes)
    click.echo(f"{config_path or '(no file)'}: OK (listen {config.server.host}:{config.server.port}; routes {routes})")


def _headers_option(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[tuple[str, str]]:
    try:
        return [parse_header(v) for v in values]
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@main.command()
@click.argument("url")
@click.option("-H", "--header", "headers", multiple=True, callback=_headers_option, metavar="'NAME: VALUE'",
              help="Extra request header for the opening handshake (repeatable).")
@click.option("--subprotocol", "subprotocols", multiple=True, metavar="NAME",
              help="Offer this subprotocol (repeatable, in order of preference).")
@click.option("--origin", help="Origin header to send.")
@click.option("--ping-interval", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="Ping the server this often; no pong before the next ping ends the connection.")
@click.option("--compress/--no-compress", default=True, show_default=True,
              help="Offer permessage-deflate (RFC 7692).")
@click.option("--once", is_flag=True,
              help="Send stdin's lines, then wait for one reply per line (at least one) and close with 1000. "
                   "Exit 1 if they are not all there within --timeout.")
@click.option("--keep-open", is_flag=True, help="Keep printing after stdin ends, until the server closes.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              metavar="SECONDS", help="Limit for connecting and the opening handshake, the closing handshake, "
                                      "and the replies of --once.")
@click.option("--binary", is_flag=True, help="Send each stdin line as a binary message, decoded per --binary-format.")
@click.option("--binary-format", type=click.Choice(["hex", "base64"]), default="hex", show_default=True,
              help="How binary messages are printed (and read with --binary).")
@click.option("-k", "--insecure", is_flag=True, help="wss://: do not verify the server's certificate.")
@click.option("--cafile", type=click.Path(exists=True, dir_okay=False),
              help="wss://: trust the certificates in this PEM file (instead of the system's).")
@click.option("--max-message-size", type=click.IntRange(min=1), default=16 << 20, show_default=True,
              metavar="BYTES", help="Largest message accepted from the server.")
def connect(url: str, headers: list[tuple[str, str]], subprotocols: tuple[str, ...], origin: str | None,
            ping_interval: float | None, compress: bool, once: bool, keep_open: bool, timeout: float,
            binary: bool, binary_format: str, insecure: bool, cafile: str | None, max_message_size: int) -> None:
    """Connect to a WebSocket URL (ws:// or wss://): stdin lines go out as messages, messages come out on stdout.

    \b
      echo hi | selectws connect ws://127.0.0.1:8000/echo --once
      selectws connect ws://127.0.0.1:8000/chat -H 'Authorization: Bearer x'
    """
    options = ConnectOptions(
        url=url, headers=headers, subprotocols=subprotocols, origin=origin, ping_interval=ping_interval,
        compress=compress, once=once, keep_open=keep_open, timeout=timeout, binary=binary,
        binary_format=binary_format, insecure=insecure, cafile=cafile, max_message_size=max_message_size,
    )
    sys.exit(run_client(options))


def _cli_secret(command: str, path: str | None, env: str | None, file_option: str, env_option: str) -> str:
    """A secret for a CLI command, from the file ``path`` or else the environment variable ``env``; exit status 2
    with one line naming the option when it cannot be read."""
    try:
        if path:
            return read_secret(file_option, path=path)
        return read_secret(env_option, env=env or "")
    except ConfigError as exc:
        click.echo(f"selectws {command}: {exc}", err=True)
        sys.exit(2)


@main.command()
@click.argument("group")
@click.argument("message", required=False, default="-")
@click.option("--url", default="http://127.0.0.1:8000", show_default=True,
              help="The daemon's server API listener (the WebSocket port, or [ops] listen).")
@click.option("--key-file", type=click.Path(dir_okay=False), help="File holding the API key.")
@click.option("--key-env", metavar="NAME", help="Environment variable holding the API key "
                                                "(default: SELECTWS_API_KEY when --key-file is not given).")
@click.option("--binary", is_flag=True, help="MESSAGE (or each stdin line) is base64, sent as a binary message.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              metavar="SECONDS", help="Limit for each request.")
@click.option("-v", "--verbose", is_flag=True, help="Print each result (JSON) on stdout.")
def publish(group: str, message: str, url: str, key_file: str | None, key_env: str | None, binary: bool,
            timeout: float, verbose: bool) -> None:
    """Publish MESSAGE to GROUP through the server API (to every member on every instance).

    With MESSAGE "-" (or none), publish each line of stdin as one message. Exit status 1 with the server's error
    message when a publish fails.

    \b
      selectws publish broadcast:news 'hello' --key-file /etc/selectws/api.key
      tail -f events.log | selectws publish broadcast:log - --key-env SELECTWS_API_KEY
    """
    if key_file and key_env:
        raise click.UsageError("give --key-file or --key-env, not both")
    key = _cli_secret("publish", key_file, key_env or "SELECTWS_API_KEY", "--key-file", "--key-env")
    lines = (line.rstrip("\r\n") for line in sys.stdin) if message == "-" else iter([message])
    for line in lines:
        params: dict[str, Any] = {"group": group, "data_b64" if binary else "data": line}
        try:
            result = call_api(url, "publish", params, key, timeout=timeout)
        except ApiCallError as exc:
            click.echo(f"selectws publish: {exc}", err=True)
            sys.exit(1)
        if verbose:
            click.echo(json.dumps(result))


@main.command()
@click.option("--sub", required=True, help="The user: the token's sub claim (the group user:<sub>).")
@click.option("--name", help="A name claim (the chat plugin's name on an auth = \"jwt\" route).")
@click.option("--ttl", type=click.IntRange(min=0), default=3600, show_default=True, metavar="SECONDS",
              help="exp = now + SECONDS; 0: no exp claim (the connection never expires).")
@click.option("--secret-file", type=click.Path(dir_okay=False),
              help="File holding the HMAC secret ([auth] jwt_secret_file), or the PEM private key for RS/PS/ES.")
@click.option("--secret-env", metavar="NAME", help="Environment variable holding the HMAC secret.")
@click.option("--algorithm", default="HS256", show_default=True,
              help="HS256, HS384, HS512, or RS256, ES256, ... with a private key in --secret-file.")
@click.option("--aud", help="The aud claim ([auth] audience).")
@click.option("--iss", help="The iss claim ([auth] issuer).")
def gentoken(sub: str, name: str | None, ttl: int, secret_file: str | None, secret_env: str | None, algorithm: str,
             aud: str | None, iss: str | None) -> None:
    """Print a signed JWT for an auth = "jwt" route (for development and tests; docs/auth.md).

    \b
      selectws gentoken --sub 42 --name alice --secret-file /etc/selectws/jwt.secret
      T=$(selectws gentoken --sub 42 --secret-env SELECTWS_JWT_SECRET --ttl 60)
      selectws connect "ws://127.0.0.1:8000/echo?token=$T"
    """
    if bool(secret_file) == bool(secret_env):
        raise click.UsageError("give --secret-file or --secret-env, one of them")
    try:
        import jwt
    except ImportError:
        click.echo(f"selectws gentoken: PyJWT is not installed: {INSTALL_HINT}", err=True)
        sys.exit(2)
    key = _cli_secret("gentoken", secret_file, secret_env, "--secret-file", "--secret-env")
    now = int(time.time())
    claims: dict[str, Any] = {"sub": sub, "iat": now}
    if ttl:
        claims["exp"] = now + ttl
    if name is not None:
        claims["name"] = name
    if aud:
        claims["aud"] = aud
    if iss:
        claims["iss"] = iss
    try:
        token = jwt.encode(claims, key, algorithm=algorithm)
    except (jwt.PyJWTError, NotImplementedError, ValueError, TypeError) as exc:
        click.echo(f"selectws gentoken: cannot sign with {algorithm}: {exc}", err=True)
        sys.exit(2)
    click.echo(token)
