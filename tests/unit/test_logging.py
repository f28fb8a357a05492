"""Tests for selectws.transport.logs: JSON/console output, level filtering, reconfiguration."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
import structlog

from selectws.transport.logs import configure_logging, flush_logs, get_logger


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    """structlog configuration is global; leave it as we found it for other tests."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    lines = stream.getvalue().splitlines()
    return [json.loads(line) for line in lines]


def test_json_output_is_one_valid_line_per_event() -> None:
    out = io.StringIO()
    configure_logging("info", "json", out)
    log = get_logger("selectws.test")
    log.info("hello", peer="127.0.0.1:5555", n=3)
    log.warning("multi\nline\nmessage", detail="a\nb")

    raw = out.getvalue()
    assert raw.count("\n") == 2
    first, second = json_lines(out)
    assert first["event"] == "hello"
    assert first["level"] == "info"
    assert first["peer"] == "127.0.0.1:5555"
    assert first["n"] == 3
    assert first["logger"] == "selectws.test"
    ts = datetime.fromisoformat(first["timestamp"].replace("Z", "+00:00"))
    assert ts.utcoffset() is not None and ts.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    assert second["event"] == "multi\nline\nmessage"
    assert second["level"] == "warning"


def test_default_logger_name() -> None:
    out = io.StringIO()
    configure_logging("info", "json", out)
    get_logger().info("x")
    assert json_lines(out)[0]["logger"] == "selectws"


def test_explicit_logger_field_wins() -> None:
    out = io.StringIO()
    configure_logging("info", "json", out)
    get_logger("a").info("x", logger="b")
    assert json_lines(out)[0]["logger"] == "b"


def test_non_json_values_do_not_break_output() -> None:
    out = io.StringIO()
    configure_logging("info", "json", out)
    get_logger().info("x", obj=object(), raw=b"\x00\xff")
    (event,) = json_lines(out)
    assert "object" in event["obj"]


def test_json_exception_is_formatted_on_one_line() -> None:
    out = io.StringIO()
    configure_logging("info", "json", out)
    log = get_logger()
    try:
        raise RuntimeError("kaboom")
    except RuntimeError:
        log.exception("handler failed")
    assert out.getvalue().count("\n") == 1
    (event,) = json_lines(out)
    assert event["level"] == "error"
    assert event["event"] == "handler failed"
    assert "Traceback" in event["exception"]
    assert "RuntimeError: kaboom" in event["exception"]


@pytest.mark.parametrize(
    ("level", "expected"),
    [
        ("debug", ["d", "i", "w", "e"]),
        ("info", ["i", "w", "e"]),
        ("warning", ["w", "e"]),
        ("error", ["e"]),
        ("WARNING", ["w", "e"]),
    ],
)
def test_level_filtering(level: str, expected: list[str]) -> None:
    out = io.StringIO()
    configure_logging(level, "json", out)
    log = get_logger()
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    assert [e["event"] for e in json_lines(out)] == expected


def test_reconfigure_changes_level_for_existing_logger() -> None:
    """SIGHUP reload: a logger obtained before reconfiguration follows the new level."""
    out = io.StringIO()
    log = get_logger("selectws.server")  # as a module-level logger would be
    configure_logging("info", "json", out)
    log.debug("hidden")
    log.info("shown-1")

    configure_logging("debug", "json", out)
    log.debug("now-visible")

    configure_logging("error", "json", out)
    log.warning("hidden-again")
    log.error("shown-2")

    assert [e["event"] for e in json_lines(out)] == ["shown-1", "now-visible", "shown-2"]


def test_reconfigure_changes_stream_and_format() -> None:
    first, second = io.StringIO(), io.StringIO()
    log = get_logger()
    configure_logging("info", "json", first)
    log.info("one")
    configure_logging("info", "console", second)
    log.info("two")
    assert [e["event"] for e in json_lines(first)] == ["one"]
    text = second.getvalue()
    assert "two" in text
    assert not text.lstrip().startswith("{")


def test_bound_logger_keeps_context() -> None:
    out = io.StringIO()
    configure_logging("info", "json", out)
    log = get_logger().bind(conn_id=7)
    log.info("a")
    (event,) = json_lines(out)
    assert event["conn_id"] == 7


def test_auto_uses_json_when_not_a_tty() -> None:
    out = io.StringIO()
    configure_logging("info", "auto", out)
    get_logger().info("piped")
    assert json_lines(out)[0]["event"] == "piped"


def test_auto_uses_console_on_a_tty() -> None:
    out = FakeTTY()
    configure_logging("info", "auto", out)
    get_logger("selectws.tty").info("interactive", k="v")
    text = out.getvalue()
    assert "interactive" in text
    assert "selectws.tty" in text
    assert "\x1b[" in text  # colours on a terminal
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_console_without_tty_has_no_colours() -> None:
    out = io.StringIO()
    configure_logging("info", "console", out)
    get_logger().info("plain", k="v")
    text = out.getvalue()
    assert "plain" in text
    assert "k=v" in text
    assert "\x1b[" not in text


def test_console_renders_exceptions() -> None:
    out = io.StringIO()
    configure_logging("info", "console", out)
    try:
        raise ValueError("bad frame")
    except ValueError:
        get_logger().exception("oops")
    text = out.getvalue()
    assert "oops" in text
    assert "ValueError: bad frame" in text


def test_defaults_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "json")  # stream=None: sys.stderr as it is now (captured)
    get_logger().info("to-stderr")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert json.loads(captured.err.strip())["event"] == "to-stderr"


@pytest.mark.parametrize(("level", "fmt"), [("verbose", "json"), ("info", "xml"), ("critical", "auto")])
def test_invalid_arguments_raise(level: str, fmt: str) -> None:
    with pytest.raises(ValueError):
        configure_logging(level, fmt, io.StringIO())


def test_closed_stream_is_not_a_tty() -> None:
    out = io.StringIO()
    out.close()
    configure_logging("info", "auto", out)  # must not raise on isatty() of a closed stream


class CountingStream(io.StringIO):
    """Holds written text back until ``flush()``, as a block-buffered file does, and counts the flushes."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[str] = []
        self.flushes = 0

    def write(self, text: str) -> int:
        self.held.append(text)
        return len(text)

    def flush(self) -> None:
        self.flushes += 1
        super().write("".join(self.held))
        self.held.clear()


def test_buffered_lines_leave_at_flush_logs_and_an_idle_iteration_costs_no_flush() -> None:
    """The daemon's mode (``flush_each=False``): a line waits for the end of the loop iteration (flush_logs), and an
    iteration that logged nothing does not call the stream's flush at all (most iterations log nothing)."""
    out = CountingStream()
    configure_logging("info", "json", out, flush_each=False)
    flush_logs()  # whatever an earlier test left pending
    before = out.flushes
    for _ in range(5):
        flush_logs()
    assert out.flushes == before  # nothing written: no flush call
    get_logger().info("one")
    get_logger().info("two")
    assert out.getvalue() == ""  # held until the end of the iteration
    flush_logs()
    assert [line["event"] for line in json_lines(out)] == ["one", "two"]
    assert out.flushes == before + 1  # both lines in one flush
    flush_logs()
    assert out.flushes == before + 1
