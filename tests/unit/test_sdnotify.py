"""selectws.transport.sdnotify against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import os
import secrets
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from selectws.transport.sdnotify import Notifier, watchdog_interval


def _short_dir(tmp_path: Path) -> Path:
    """``tmp_path`` unless it is too long for ``sun_path`` (108 bytes)."""
    if len(str(tmp_path)) < 80:
        return tmp_path
    return Path(tempfile.mkdtemp(prefix="sdn", dir="/tmp"))


@pytest.fixture
def path_listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket at a filesystem path, and ``$NOTIFY_SOCKET`` for it."""
    path = str(_short_dir(tmp_path) / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield sock, path
    sock.close()


@pytest.fixture
def abstract_listener() -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket in the abstract namespace, and ``$NOTIFY_SOCKET`` (``@name``)."""
    name = f"selectws-test-{secrets.token_hex(8)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    yield sock, "@" + name
    sock.close()


@pytest.fixture(params=["path", "abstract"])
def listener(
    request: pytest.FixtureRequest,
    path_listener: tuple[socket.socket, str],
    abstract_listener: tuple[socket.socket, str],
) -> tuple[socket.socket, str]:
    return path_listener if request.param == "path" else abstract_listener


def _recv(sock: socket.socket) -> bytes:
    return sock.recv(65536)


# -- addressing --------------------------------------------------------------------------------


def test_from_env_path(path_listener: tuple[socket.socket, str]) -> None:
    _, path = path_listener
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.address == path


def test_from_env_abstract_namespace() -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": "@selectws-x"})
    assert notifier.enabled
    assert notifier.address == "\0selectws-x"


def test_from_env_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/selectws-test/notify")
    assert Notifier.from_env().address == "/run/selectws-test/notify"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not Notifier.from_env().enabled


@pytest.mark.parametrize("value", [None, "", "@", "relative/notify", "vsock:2:1234"])
def test_disabled_notifier_is_a_no_op(value: str | None) -> None:
    env = {} if value is None else {"NOTIFY_SOCKET": value}
    notifier = Notifier.from_env(env)
    assert not notifier.enabled
    assert notifier.address is None
    assert notifier.ready() is False
    assert notifier.ready("up") is False
    assert notifier.reloading() is False
    assert notifier.status("x") is False
    assert notifier.watchdog() is False
    assert notifier.notify("READY=1") is False
    assert notifier.send(READY=1) is False
    assert notifier._sock is None  # no socket was ever created
    notifier.close()


# -- exact datagrams ---------------------------------------------------------------------------


def test_messages(listener: tuple[socket.socket, str]) -> None:
    sock, env_value = listener
    with closing(Notifier.from_env({"NOTIFY_SOCKET": env_value})) as notifier:
        assert notifier.ready() is True
        assert _recv(sock) == b"READY=1"
        assert notifier.ready(status="listening on [::]:8000") is True
        assert _recv(sock) == b"READY=1\nSTATUS=listening on [::]:8000"
        assert notifier.status("3 connections") is True
        assert _recv(sock) == b"STATUS=3 connections"
        assert notifier.watchdog() is True
        assert _recv(sock) == b"WATCHDOG=1"
        assert notifier.send("STOPPING=1", status="draining") is True
        assert _recv(sock) == b"STOPPING=1\nSTATUS=draining"
        assert notifier.notify("FDSTORE=0") is True
        assert _recv(sock) == b"FDSTORE=0"


def test_reloading_carries_monotonic_usec(listener: tuple[socket.socket, str]) -> None:
    sock, env_value = listener
    with closing(Notifier.from_env({"NOTIFY_SOCKET": env_value})) as notifier:
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert notifier.reloading() is True
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        lines = _recv(sock).decode().split("\n")
    assert lines[0] == "RELOADING=1"
    assert len(lines) == 2
    key, _, value = lines[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert value.isdigit()
    assert before <= int(value) <= after


def test_send_fields_and_raw(path_listener: tuple[socket.socket, str]) -> None:
    sock, path = path_listener
    with closing(Notifier.from_env({"NOTIFY_SOCKET": path})) as notifier:
        assert notifier.send(READY=1, status="up") is True
        assert _recv(sock) == b"READY=1\nSTATUS=up"
        assert notifier.send("STATUS=raw", errno=0) is True
        assert _recv(sock) == b"STATUS=raw\nERRNO=0"
        assert notifier.send() is False  # nothing to say: nothing sent


def test_newlines_cannot_forge_assignments(path_listener: tuple[socket.socket, str]) -> None:
    sock, path = path_listener
    with closing(Notifier.from_env({"NOTIFY_SOCKET": path})) as notifier:
        notifier.status("bad\nREADY=1")
        assert _recv(sock) == b"STATUS=bad READY=1"
        notifier.ready("a\r\nb")
        assert _recv(sock) == b"READY=1\nSTATUS=a  b"
        notifier.send(STATUS="x\ny")
        assert _recv(sock) == b"STATUS=x y"


# -- socket lifetime ---------------------------------------------------------------------------


def test_one_lazy_non_blocking_socket_closed_by_close(path_listener: tuple[socket.socket, str]) -> None:
    sock, path = path_listener
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert notifier._sock is None  # lazily created
    notifier.watchdog()
    inner = notifier._sock
    assert inner is not None
    assert inner.getblocking() is False
    assert inner.family == socket.AF_UNIX
    assert inner.type == socket.SOCK_DGRAM
    assert not os.get_inheritable(inner.fileno())
    notifier.watchdog()
    assert notifier._sock is inner  # reused
    assert _recv(sock) == b"WATCHDOG=1"
    assert _recv(sock) == b"WATCHDOG=1"

    notifier.close()
    assert notifier._sock is None
    assert inner.fileno() == -1  # really closed
    notifier.close()  # idempotent
    assert notifier.ready() is True  # reopens on demand
    assert _recv(sock) == b"READY=1"
    notifier.close()


# -- failures never raise ----------------------------------------------------------------------


def test_missing_socket_returns_false(tmp_path: Path) -> None:
    """ENOENT: the path does not exist."""
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(_short_dir(tmp_path) / "missing.sock")})
    assert notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog() is False
    notifier.close()


def test_missing_abstract_socket_returns_false() -> None:
    """ECONNREFUSED: nobody bound the abstract name."""
    notifier = Notifier.from_env({"NOTIFY_SOCKET": f"@selectws-test-{secrets.token_hex(8)}-absent"})
    assert notifier.ready() is False
    notifier.close()


def test_dead_socket_file_returns_false(tmp_path: Path) -> None:
    """ECONNREFUSED: the socket file is left behind by a receiver that is gone."""
    path = str(_short_dir(tmp_path) / "dead.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dead.bind(path)
    dead.close()
    assert os.path.exists(path)
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert notifier.ready() is False
    notifier.close()


def test_full_receiver_queue_returns_false_without_blocking(
    path_listener: tuple[socket.socket, str],
) -> None:
    """EAGAIN: a manager that does not read must not stall the event loop; later sends work."""
    sock, path = path_listener
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
    message = "STATUS=" + "x" * 1000
    started = time.monotonic()
    results = []
    for _ in range(100_000):
        results.append(notifier.notify(message))
        if not results[-1]:
            break
    assert time.monotonic() - started < 10
    assert results[0] is True
    assert results[-1] is False, "the receive queue never filled up"
    # Keeps going: once the manager reads again, notifications get through.
    sock.setblocking(False)
    try:
        while True:
            sock.recv(65536)
    except BlockingIOError:
        pass
    assert notifier.watchdog() is True
    sock.settimeout(5)
    assert _recv(sock) == b"WATCHDOG=1"
    notifier.close()


# -- watchdog ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "1000"}, 0.0005),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "nope"}, None),
        ({}, None),
        ({"WATCHDOG_PID": str(os.getpid())}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "30s"}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(environ) == expected
    assert Notifier.watchdog_interval(environ) == expected


def test_watchdog_interval_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 10.0
    monkeypatch.delenv("WATCHDOG_USEC")
    assert watchdog_interval() is None
