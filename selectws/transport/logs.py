"""Structured logging with structlog, without the stdlib :mod:`logging` machinery.

Why this shape:

* **No stdlib logging** -- the daemon is one thread on one ``selectors`` loop; structlog's
  ``PrintLogger`` writes a line straight to the stream, with no handler/formatter indirection, and a
  filtering bound logger makes a disabled ``log.debug(...)`` a no-op method call.
* **Two renderers** -- people at a terminal get aligned, coloured console lines; anything else
  (systemd/journald, a pipe, a log shipper) gets one JSON object per line. ``"auto"`` picks by
  ``isatty()`` so the same unit file works interactively and as a service.
* **Reconfigurable** -- SIGHUP may change the level or format. Loggers returned by
  :func:`get_logger` are structlog's lazy proxies and caching is off, so every call consults the
  *current* configuration; calling :func:`configure_logging` again takes effect immediately, even
  for module-level loggers created at import time.
"""

from __future__ import annotations

import atexit
import enum
import os
import sys
import time
from typing import IO, Any, Final, TextIO, cast

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = ["FORMATS", "LEVELS", "configure_logging", "flush_logs", "get_logger"]

LEVELS: Final[tuple[str, ...]] = ("debug", "info", "warning", "error")
"""Accepted level names (the same set :class:`selectws.config.LoggingConfig` allows)."""
FORMATS: Final[tuple[str, ...]] = ("auto", "console", "json")
"""Accepted output formats."""

_DEFAULT_NAME: Final = "selectws"


class _Output:
    """Where lines go, and whether each line is flushed at once or by :func:`flush_logs`.

    The daemon writes lines without flushing and flushes once per loop iteration: 10,000 connections opening
    in one burst then cost a few dozen ``write`` calls instead of 20,000, and a line is never older than one
    iteration when it leaves the process.
    """

    stream: IO[str] = sys.stderr
    flush_each = True
    #: A line was written since the last :func:`flush_logs` (most iterations log nothing: no flush call then).
    pending = False


_BUFFERED_STDERR: list[IO[str]] = []


def _buffered_stderr() -> IO[str]:
    """File descriptor 2 with a block buffer (``sys.stderr`` is line-buffered, so it would write per line)."""
    if not _BUFFERED_STDERR:
        stream = os.fdopen(2, "w", buffering=1 << 16, encoding="utf-8", errors="backslashreplace", closefd=False)
        _BUFFERED_STDERR.append(stream)
        atexit.register(flush_logs)
    return _BUFFERED_STDERR[0]


def flush_logs() -> None:
    """Flush log lines written since the last flush (the server calls it at the end of every iteration)."""
    if not _Output.pending:
        return
    _Output.pending = False
    try:
        _Output.stream.flush()
    except (OSError, ValueError):
        pass


_TS_CACHE: list[Any] = [0, ""]


def _timestamp(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """ISO 8601 UTC with microseconds, the date part formatted once per second (cheaper than datetime)."""
    now = time.time()
    sec = int(now)
    cache = _TS_CACHE
    if sec != cache[0]:
        cache[0] = sec
        cache[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    event_dict["timestamp"] = f"{cache[1]}.{int((now - sec) * 1_000_000):06d}Z"
    return event_dict


class _NamedPrintLogger(structlog.PrintLogger):
    """A ``PrintLogger`` that remembers the name it was requested under.

    structlog's ``get_logger(logger=...)`` cannot be used to bind the name (``logger`` collides
    with ``wrap_logger``'s own parameter), and binding on the lazy proxy would freeze the logger to
    the configuration current at bind time -- breaking reload. Instead the name travels as the
    logger factory argument and :func:`_add_logger_name` copies it into every event.
    """

    def __init__(self, file: TextIO | None = None, name: str = _DEFAULT_NAME) -> None:
        super().__init__(file)
        self.name = name

    def msg(self, message: str) -> None:
        file = self._file
        file.write(message + "\n")
        if _Output.flush_each:
            file.flush()
        else:
            _Output.pending = True

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


class _NamedPrintLoggerFactory(structlog.PrintLoggerFactory):
    """``PrintLoggerFactory`` whose first positional argument (from ``get_logger(name)``) is the name."""

    def __init__(self, file: TextIO) -> None:
        super().__init__(file)
        self._stream = file

    def __call__(self, *args: Any) -> _NamedPrintLogger:
        name = str(args[0]) if args else _DEFAULT_NAME
        return _NamedPrintLogger(self._stream, name)


def _add_logger_name(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """Add ``logger=<name>`` unless the call site already set one."""
    event_dict.setdefault("logger", getattr(logger, "name", _DEFAULT_NAME))
    return event_dict


def _plain_enums(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """An :class:`enum.IntEnum` value (a close code) as its number, as the JSON lines print it: the console renderer
    would print its ``repr``, ``<CloseCode.MESSAGE_TOO_BIG: 1009>``."""
    for key, value in event_dict.items():
        if isinstance(value, enum.Enum) and isinstance(value, int):
            event_dict[key] = int(value)
    return event_dict


def _isatty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or the stream is closed
        return False


def configure_logging(
    level: str = "info", fmt: str = "auto", stream: IO[str] | None = None, *, flush_each: bool = True
) -> None:
    """(Re)configure structlog globally.

    ``level`` is one of :data:`LEVELS` (case-insensitive); ``fmt`` is one of :data:`FORMATS`;
    ``stream`` defaults to ``sys.stderr`` as it is *now*. Safe to call repeatedly (SIGHUP reload).
    Raises :class:`ValueError` for an unknown level or format, so a bad reload is refused loudly
    rather than silently logging at the wrong level.
    """
    lvl = level.lower()
    if lvl not in LEVELS:
        raise ValueError(f"unknown log level {level!r}; expected one of {', '.join(LEVELS)}")
    form = fmt.lower()
    if form not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; expected one of {', '.join(FORMATS)}")

    out = stream if stream is not None else sys.stderr if flush_each else _buffered_stderr()
    flush_logs()  # nothing written under the old configuration is left behind
    _Output.stream = out
    _Output.flush_each = flush_each
    tty = _isatty(out)
    if form == "auto":
        form = "console" if tty else "json"

    processors: list[Processor] = [
        structlog.processors.add_log_level,
        _timestamp,
        _add_logger_name,
        structlog.processors.StackInfoRenderer(),
    ]
    if form == "json":
        # Tracebacks become a string field; json.dumps escapes its newlines, so one event = one line.
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        # ConsoleRenderer formats exc_info itself (and warns if format_exc_info ran first).
        processors += [_plain_enums, structlog.dev.ConsoleRenderer(colors=tty)]

    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=_NamedPrintLoggerFactory(cast(TextIO, out)),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str = _DEFAULT_NAME) -> Any:
    """Return a lazy structlog logger whose events carry ``logger=<name>``.

    Cheap to call at import time; it follows whatever :func:`configure_logging` set last.
    """
    return structlog.get_logger(name)
