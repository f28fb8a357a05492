"""The ``selectws`` command line: ``serve``, ``check-config``.

Precedence is flags > file > built-in defaults. A configuration error is one line naming the key, exit status 2,
and nothing listens.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from selectws import __version__
from selectws.ops.config import Config, ConfigError, load_config
from selectws.ops.logging import configure_logging, get_logger
from selectws.plugins.registry import find_plugin

__all__ = ["main"]


def _load(config_path: str | None, overrides: dict[str, Any]) -> Config:
    return load_config(config_path, overrides={k: v for k, v in overrides.items() if v is not None},
                       plugin_resolver=find_plugin)


def _config_error(exc: ConfigError, source: str | None) -> None:
    where = f" in {source}" if source else ""
    click.echo(f"selectws: configuration error{where}: {exc}", err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="selectws")
def main() -> None:
    """selectws: a WebSocket server daemon on one selectors loop."""


@main.command()
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), help="TOML configuration file.")
@click.option("--host", help="Address to listen on (overrides server.host).")
@click.option("--port", type=int, help="Port to listen on, 0 for any free port (overrides server.port).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False))
@click.option("--log-format", type=click.Choice(["auto", "console", "json"], case_sensitive=False))
def serve(config_path: str | None, host: str | None, port: int | None, log_level: str | None,
          log_format: str | None) -> None:
    """Run the daemon (in the foreground; systemd or a terminal supervises it)."""
    overrides = {"server.host": host, "server.port": port, "logging.level": log_level, "logging.format": log_format}
    try:
        config = _load(config_path, overrides)
    except ConfigError as exc:
        _config_error(exc, config_path)
        return
    configure_logging(config.logging.level, config.logging.format)
    log = get_logger("selectws")

    from selectws.ops.activation import ActivationError, inherited_sockets
    from selectws.server.server import Server

    try:
        inherited = [sock for _, sock in inherited_sockets()]
    except ActivationError as exc:
        log.error("socket activation failed", error=str(exc))
        sys.exit(1)
    try:
        server = Server(config, inherited or None)
    except Exception as exc:  # plugin constructors run here
        log.error("cannot start", error=str(exc))
        sys.exit(1)

    def reload() -> Config:
        new = _load(config_path, overrides)
        configure_logging(new.logging.level, new.logging.format)
        return new

    if config_path:
        server.reload_callback = reload  # type: ignore[attr-defined]
    try:
        server.run()
    except OSError as exc:
        log.error("cannot listen", host=config.server.host, port=config.server.port, error=str(exc))
        sys.exit(1)


@main.command("check-config")
@click.argument("config_path", type=click.Path(dir_okay=False))
def check_config(config_path: str) -> None:
    """Validate a configuration file without serving (exit 0 when it is good, 2 when not)."""
    try:
        config = _load(config_path, {})
    except ConfigError as exc:
        _config_error(exc, config_path)
        return
    routes = ", ".join(f"{r.path} -> {r.plugin}" for r in config.routes)
    click.echo(f"{config_path}: OK (listen {config.server.host}:{config.server.port}; routes {routes})")
