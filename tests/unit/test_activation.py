"""selectws.app.activation with real inherited descriptors.

``inherited_sockets()`` always looks at fd 3 and up (``SD_LISTEN_FDS_START``), which in the
pytest process belong to something else, so every case that touches descriptors runs in a
fresh ``python -c`` child: the test passes its sockets with ``pass_fds`` and the child moves
them onto 3, 4, ... with ``dup2`` and sets ``LISTEN_PID`` to its own pid, exactly what the
service manager does between ``fork`` and ``exec``.  One case uses the real
``systemd-socket-activate`` to do all of that.  Cases that fail before any descriptor is
touched (no/foreign ``LISTEN_PID``, malformed variables) run in-process on a plain dict.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from selectws.app.activation import SD_LISTEN_FDS_START, ActivationError, inherited_sockets

ROOT = Path(__file__).resolve().parents[2]

# Runs in the child.  argv[1] is a JSON object:
#   fds: the passed descriptors, moved onto 3, 4, ... in order
#   env: variables to set (the value "$PID" is replaced by the child's pid)
#   unset: passed to inherited_sockets()
# Prints one JSON line describing the result.
CHILD = r"""
import fcntl, json, os, socket, sys
args = json.loads(sys.argv[1])
# Park the passed descriptors out of the way first, so moving one cannot clobber another.
parked = []
for fd in args["fds"]:
    parked.append(fcntl.fcntl(fd, fcntl.F_DUPFD, 100))
    os.close(fd)
for offset, fd in enumerate(parked):
    target = 3 + offset
    try:
        os.fstat(target)
    except OSError:
        pass
    else:
        sys.exit(f"fd {target} is already in use in the child")
    os.dup2(fd, target)
    os.close(fd)
for key, value in args["env"].items():
    os.environ[key] = str(os.getpid()) if value == "$PID" else value
from selectws.app.activation import ActivationError, inherited_sockets
env_after = None
try:
    result = inherited_sockets(unset=args["unset"])
except ActivationError as exc:
    out = {"error": str(exc), "error_type": type(exc).__name__, "is_value_error": isinstance(exc, ValueError)}
else:
    out = {"sockets": [
        {
            "name": name,
            "fd": sock.fileno(),
            "family": sock.family.name,
            "type": sock.type.name,
            "sockname": sock.getsockname(),
            "blocking": sock.getblocking(),
            "cloexec": bool(fcntl.fcntl(sock.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC),
            "listening": sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN),
        }
        for name, sock in result
    ]}
out["env_after"] = {k: os.environ.get(k) for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")}
open_fds = []
for fd in range(3, 3 + max(1, len(args["fds"]))):
    try:
        os.fstat(fd)
        open_fds.append(fd)
    except OSError:
        pass
out["open_fds"] = open_fds
print(json.dumps(out))
"""


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_child(fds: Sequence[int], env: dict[str, str], unset: bool = True) -> dict[str, Any]:
    args = {"fds": list(fds), "env": env, "unset": unset}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(args)],
        pass_fds=tuple(fds),
        env=_child_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def _listening_tcp() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    return sock


@pytest.fixture
def short_tmp(tmp_path: Path) -> Iterator[Path]:
    """A directory short enough for an AF_UNIX ``sun_path``."""
    if len(str(tmp_path)) < 80:
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="act", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# -- in-process: nothing to adopt ---------------------------------------------------------------


def test_not_activated_returns_empty() -> None:
    environ: dict[str, str] = {}
    assert inherited_sockets(environ) == []


def test_listen_pid_mismatch_returns_empty_and_unsets() -> None:
    environ = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "ws", "OTHER": "x"}
    assert inherited_sockets(environ) == []
    assert environ == {"OTHER": "x"}


def test_listen_pid_mismatch_keeps_variables_without_unset() -> None:
    environ = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1"}
    assert inherited_sockets(environ, unset=False) == []
    assert environ == {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1"}


def test_zero_fds_returns_empty() -> None:
    assert inherited_sockets({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}) == []


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"LISTEN_PID": "self", "LISTEN_FDS": "1"}, "LISTEN_PID"),
        ({"LISTEN_PID": "$PID", "LISTEN_FDS": "one"}, "LISTEN_FDS"),
        ({"LISTEN_PID": "$PID"}, "LISTEN_FDS"),
        ({"LISTEN_PID": "$PID", "LISTEN_FDS": "-1"}, "negative"),
        ({"LISTEN_PID": "$PID", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "ws"}, "LISTEN_FDNAMES"),
    ],
)
def test_malformed_environment_raises(environ: dict[str, str], message: str) -> None:
    environ = {k: str(os.getpid()) if v == "$PID" else v for k, v in environ.items()}
    with pytest.raises(ActivationError, match=message):
        inherited_sockets(environ)
    assert not any(k.startswith("LISTEN_") for k in environ)  # unset even on error


def test_activation_error_is_a_value_error() -> None:
    assert issubclass(ActivationError, ValueError)
    assert SD_LISTEN_FDS_START == 3


# -- child processes: real descriptors ----------------------------------------------------------


def test_inherits_named_sockets(short_tmp: Path) -> None:
    tcp = _listening_tcp()
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(str(short_tmp / "admin.sock"))
    unix.listen(8)
    tcp_address = list(tcp.getsockname())
    with tcp, unix:
        out = run_child(
            [tcp.fileno(), unix.fileno()],
            {"LISTEN_PID": "$PID", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "ws:admin"},
        )
    assert "error" not in out, out
    first, second = out["sockets"]
    assert first["name"] == "ws"
    assert first["fd"] == 3
    assert first["family"] == "AF_INET"
    assert first["sockname"] == tcp_address
    assert second["name"] == "admin"
    assert second["fd"] == 4
    assert second["family"] == "AF_UNIX"
    assert second["sockname"] == str(short_tmp / "admin.sock")
    for info in (first, second):
        assert info["type"] == "SOCK_STREAM"
        assert info["blocking"] is False
        assert info["cloexec"] is True
        assert info["listening"]
    assert out["env_after"] == {"LISTEN_PID": None, "LISTEN_FDS": None, "LISTEN_FDNAMES": None}


def test_unnamed_socket_and_unset_false() -> None:
    tcp = _listening_tcp()
    with tcp:
        out = run_child([tcp.fileno()], {"LISTEN_PID": "$PID", "LISTEN_FDS": "1"}, unset=False)
    assert "error" not in out, out
    [info] = out["sockets"]
    assert info["name"] is None
    assert info["fd"] == 3
    assert out["env_after"]["LISTEN_FDS"] == "1"
    assert out["env_after"]["LISTEN_PID"] is not None


def test_empty_name_is_none() -> None:
    one, two = _listening_tcp(), _listening_tcp()
    with one, two:
        out = run_child(
            [one.fileno(), two.fileno()],
            {"LISTEN_PID": "$PID", "LISTEN_FDS": "2", "LISTEN_FDNAMES": ":ws"},
        )
    assert [info["name"] for info in out["sockets"]] == [None, "ws"]


def test_foreign_listen_pid_in_child_is_ignored() -> None:
    tcp = _listening_tcp()
    with tcp:
        out = run_child([tcp.fileno()], {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "ws"})
    assert out["sockets"] == []
    assert out["env_after"] == {"LISTEN_PID": None, "LISTEN_FDS": None, "LISTEN_FDNAMES": None}
    assert out["open_fds"] == [3]


def _expect_error(fds: Sequence[int], fragment: str) -> dict[str, Any]:
    out = run_child(fds, {"LISTEN_PID": "$PID", "LISTEN_FDS": str(max(1, len(fds))), "LISTEN_FDNAMES": "ws"})
    assert out.get("error_type") == "ActivationError", out
    assert out["is_value_error"] is True
    assert fragment in out["error"]
    assert "fd 3" in out["error"]
    assert "'ws'" in out["error"]
    return out


def test_non_listening_stream_socket_raises() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # bound but never listen()ed
    with sock:
        out = _expect_error([sock.fileno()], "not listening")
    assert out["open_fds"] == [3]  # left open: the error does not close anything


def test_datagram_socket_raises() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    with sock:
        _expect_error([sock.fileno()], "SOCK_DGRAM")


def test_pipe_raises() -> None:
    read_end, write_end = os.pipe()
    try:
        _expect_error([read_end], "not a usable socket")
    finally:
        os.close(read_end)
        os.close(write_end)


def test_missing_descriptor_raises() -> None:
    _expect_error([], "not a usable socket")


def test_second_bad_socket_leaves_the_first_open() -> None:
    good = _listening_tcp()
    bad = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with good, bad:
        out = run_child(
            [good.fileno(), bad.fileno()],
            {"LISTEN_PID": "$PID", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "ws:udp"},
        )
    assert out.get("error_type") == "ActivationError", out
    assert "fd 4 ('udp')" in out["error"]
    assert out["open_fds"] == [3, 4]


# -- the real thing: systemd-socket-activate ------------------------------------------------------

SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")

# Started by systemd-socket-activate on the first connection: adopt the socket the way the
# daemon will, accept that connection and answer it.
SERVER = r"""
import json, os, selectors, socket
from selectws.app.activation import inherited_sockets
pairs = inherited_sockets()
assert "LISTEN_FDS" not in os.environ
[(name, sock)] = pairs
with selectors.DefaultSelector() as sel:
    sel.register(sock, selectors.EVENT_READ)
    assert sel.select(timeout=30), "no connection"
conn, _ = sock.accept()
conn.setblocking(True)
host, port = sock.getsockname()
conn.sendall(f"OK {name} {sock.family.name} {host}:{port} blocking={sock.getblocking()}\n".encode())
conn.close()
print(json.dumps({"name": name, "fd": sock.fileno(), "port": port}))
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _wait_for_line(proc: subprocess.Popen[bytes], needle: bytes, timeout: float) -> bytes:
    """Read ``proc.stderr`` until a line containing ``needle`` (or EOF / timeout)."""
    assert proc.stderr is not None
    seen = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stderr, selectors.EVENT_READ)
        while needle not in seen and time.monotonic() < deadline:
            if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                break
            line = proc.stderr.readline()
            if not line:
                break
            seen += line
    return seen


@pytest.mark.skipif(SOCKET_ACTIVATE is None, reason="systemd-socket-activate is not installed")
def test_systemd_socket_activate() -> None:
    assert SOCKET_ACTIVATE is not None
    for _attempt in range(5):  # the free port can be taken between probe and bind
        port = _free_port()
        proc = subprocess.Popen(
            [
                SOCKET_ACTIVATE,
                f"--listen=127.0.0.1:{port}",
                "--fdname=ws",
                f"--setenv=PYTHONPATH={ROOT}",
                sys.executable,
                "-c",
                SERVER,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_child_env(),
        )
        try:
            log = _wait_for_line(proc, b"Listening on", timeout=30)
            if b"Listening on" not in log:
                proc.kill()
                proc.wait()
                if b"Address already in use" in log:
                    continue
                pytest.fail(f"systemd-socket-activate did not start: {log!r}")
            with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
                reply = client.makefile("rb").readline()
            stdout, stderr = proc.communicate(timeout=30)
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
        break
    else:
        pytest.fail("could not find a free port for systemd-socket-activate")

    assert proc.returncode == 0, stderr
    assert reply == f"OK ws AF_INET 127.0.0.1:{port} blocking=False\n".encode()
    assert json.loads(stdout) == {"name": "ws", "fd": 3, "port": port}
