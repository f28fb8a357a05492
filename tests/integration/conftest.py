"""Fixtures that run the real daemon (``python -m selectws serve``) as a subprocess on an ephemeral port.

* :class:`Daemon` starts the process, learns its port from the JSON ``listening`` log line on stderr, and keeps
  parsing stderr in a background thread into :attr:`Daemon.records`, so tests can wait for and assert log lines.
* On teardown it sends SIGTERM and waits (SIGKILL after 10 s). A daemon that died on its own, did not exit 0 on
  SIGTERM, or logged an unexpected error (level ``error``) fails the test that owned it, unless that test said it
  expects errors (``allow_errors=True``).
* ``write_config`` writes a TOML file under ``tmp_path``; test plugins live in ``plugins_for_tests.py`` and are
  mounted as ``plugins_for_tests:Class`` (this directory is put on the subprocess's ``PYTHONPATH``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
# Test modules import the raw-socket helpers (wstools) by name; pytest runs with --import-mode=importlib, which
# does not put test directories on sys.path.
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0

# Every route the tests need on one daemon: the three built-ins plus the test plugins.
ALL_ROUTES_TOML = """
[[routes]]
path = "/echo"
plugin = "echo"

[[routes]]
path = "/broadcast/{channel}"
plugin = "broadcast"

[[routes]]
path = "/chat"
plugin = "chat"

[[routes]]
path = "/boom"
plugin = "plugins_for_tests:BoomPlugin"

[[routes]]
path = "/token"
plugin = "plugins_for_tests:TokenPlugin"

[[routes]]
path = "/proto"
plugin = "plugins_for_tests:ProtoPlugin"

[[routes]]
path = "/proto-strict"
plugin = "plugins_for_tests:StrictProtoPlugin"

[[routes]]
path = "/proto-override"
plugin = "plugins_for_tests:ProtoPlugin"
subprotocols = ["override.v1"]

[[routes]]
path = "/bye"
plugin = "plugins_for_tests:ByePlugin"
"""


def subprocess_env() -> dict[str, str]:
    """The environment for anything we spawn: test plugins importable, no inherited systemd plumbing."""
    env = dict(os.environ)
    for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        env.pop(name, None)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Daemon:
    """One ``selectws serve`` subprocess and everything it logged."""

    def __init__(self, config: Path | None = None, *, cwd: Path, allow_errors: bool = False,
                 extra_args: tuple[str, ...] = (), env: dict[str, str | None] | None = None) -> None:
        self.config = config
        self.allow_errors = allow_errors
        self.records: list[dict[str, Any]] = []
        self.stdout: list[str] = []
        self._cond = threading.Condition()
        self._stopping = False  # the test (or teardown) asked the daemon to stop
        self._killed = False  # ... by a signal that does not let it exit 0
        args = [sys.executable, "-m", "selectws", "serve", "--port", "0", "--host", "127.0.0.1", "--log-format",
                "json", *extra_args]
        if config is not None:
            args += ["--config", str(config)]
        self.args = args
        environ = subprocess_env()
        for name, value in (env or {}).items():  # extra variables; None removes one
            if value is None:
                environ.pop(name, None)
            else:
                environ[name] = value
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd, env=environ,
        )
        self._threads = [
            threading.Thread(target=self._read_stderr, daemon=True, name="selectws-stderr"),
            threading.Thread(target=self._read_stdout, daemon=True, name="selectws-stdout"),
        ]
        for t in self._threads:
            t.start()
        try:
            listening = self.wait_for(event="listening", timeout=START_TIMEOUT)
        except AssertionError:
            self.kill()
            raise
        host, _, port = listening["addresses"][0].rpartition(":")
        self.host = host
        self.port = int(port)

    # ------------------------------------------------------------------ output
    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError
            except ValueError:
                record = {"event": None, "raw": line}
            with self._cond:
                self.records.append(record)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.stdout.append(raw.decode("utf-8", "replace"))

    @staticmethod
    def _matches(record: dict[str, Any], predicate: Callable[[dict[str, Any]], bool] | None,
                 fields: dict[str, Any]) -> bool:
        if any(record.get(k, object()) != v for k, v in fields.items()):
            return False
        return predicate is None or bool(predicate(record))

    def logs(self, predicate: Callable[[dict[str, Any]], bool] | None = None, **fields: Any) -> list[dict[str, Any]]:
        """Records so far whose fields equal ``fields`` (and satisfy ``predicate``)."""
        with self._cond:
            return [r for r in self.records if self._matches(r, predicate, fields)]

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool] | None = None, *, timeout: float = 5.0,
                 **fields: Any) -> dict[str, Any]:
        """The first record (already logged or to come) matching; fails after ``timeout`` or if the process ends."""
        deadline = time.monotonic() + timeout
        with self._cond:
            seen = 0
            while True:
                reader_done = not self._threads[0].is_alive()  # checked first: its last records are then seen
                for record in self.records[seen:]:
                    if self._matches(record, predicate, fields):
                        return record
                seen = len(self.records)
                left = deadline - time.monotonic()
                if left <= 0 or reader_done:
                    break
                self._cond.wait(min(left, 0.1))
        raise AssertionError(
            f"no log record matching {fields} within {timeout}s (process "
            f"{'exited ' + str(self.proc.poll()) if self.proc.poll() is not None else 'running'}); log:\n"
            + self.dump()
        )

    def dump(self) -> str:
        with self._cond:
            return "\n".join(json.dumps(r) for r in self.records[-60:])

    def errors(self) -> list[dict[str, Any]]:
        return self.logs(lambda r: r.get("level") in ("error", "critical") or "exception" in r)

    # ------------------------------------------------------------------ addresses
    def url(self, path: str = "/echo") -> str:
        return f"ws://{self.host}:{self.port}{path}"

    # ------------------------------------------------------------------ stopping
    def signal(self, signum: int = signal.SIGTERM) -> None:
        """Send ``signum``; after SIGTERM/SIGINT the daemon's exit is expected (and must still be status 0)."""
        if signum in (signal.SIGTERM, signal.SIGINT):
            self._stopping = True
        elif signum in (signal.SIGKILL, signal.SIGQUIT, signal.SIGABRT):
            self._stopping = self._killed = True
        self.proc.send_signal(signum)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        """Wait for the process to exit and for its output to be read; returns the exit status."""
        rc = self.proc.wait(timeout)
        for t in self._threads:
            t.join(5)
        return rc

    def terminate(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM and wait; SIGKILL (and fail) if it does not exit in ``timeout`` seconds."""
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"daemon did not exit within {timeout}s of SIGTERM; log:\n{self.dump()}") from None

    def kill(self) -> None:
        self._stopping = self._killed = True
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass

    def finish(self) -> list[str]:
        """Teardown: stop the daemon; return the problems found (empty when all is well)."""
        problems = []
        if self.proc.poll() is not None and not self._stopping:
            problems.append(f"daemon exited by itself with status {self.proc.returncode}")
        try:
            rc = self.terminate()
        except AssertionError as exc:
            problems.append(str(exc))
        else:
            if rc != 0 and not self._killed:
                problems.append(f"daemon exited with status {rc} after SIGTERM")
        if not self.allow_errors and self.errors():
            problems.append("unexpected error records: " + json.dumps(self.errors())[:4000])
        if problems:
            problems.append("log tail:\n" + self.dump())
        return problems


class DaemonFactory:
    """Starts daemons; stops and checks all of them at teardown."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.daemons: list[Daemon] = []
        self._n = 0

    def write_config(self, text: str, name: str | None = None) -> Path:
        self._n += 1
        path = self.tmp / (name or f"selectws-{self._n}.toml")
        path.write_text(textwrap.dedent(text))
        return path

    def __call__(self, config: str | Path | None = None, *, allow_errors: bool = False,
                 extra_args: tuple[str, ...] = (), env: dict[str, str | None] | None = None) -> Daemon:
        """Start a daemon; ``config`` is a TOML text (written to a file) or a path; ``env`` adds variables to its
        environment (``None`` removes one)."""
        path = self.write_config(config) if isinstance(config, str) else config
        daemon = Daemon(path, cwd=self.tmp, allow_errors=allow_errors, extra_args=extra_args, env=env)
        self.daemons.append(daemon)
        return daemon

    def finish(self) -> None:
        problems = []
        for daemon in self.daemons:
            problems += daemon.finish()
        if problems:
            pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[DaemonFactory]:
    """A factory: ``start_daemon(config_toml_text=None, allow_errors=False)`` -> a running :class:`Daemon`."""
    factory = DaemonFactory(tmp_path)
    yield factory
    factory.finish()


@pytest.fixture(scope="module")
def module_start_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonFactory]:
    """Like ``start_daemon``, for daemons shared by the tests of one module."""
    factory = DaemonFactory(tmp_path_factory.mktemp("module-daemons"))
    yield factory
    factory.finish()


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., Path]:
    """``write_config(toml_text, name=None)`` -> the path of a dedented TOML file under ``tmp_path``."""
    counter = iter(range(1, 1000))

    def write(text: str, name: str | None = None) -> Path:
        path = tmp_path / (name or f"config-{next(counter)}.toml")
        path.write_text(textwrap.dedent(text))
        return path

    return write


def run_cli(*args: str, timeout: float = 30.0, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m selectws ARGS`` to completion, output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "selectws", *args], capture_output=True, text=True, timeout=timeout,
        env=subprocess_env(), cwd=cwd, stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def cli(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """``cli("check-config", path)`` runs ``python -m selectws`` in ``tmp_path`` and returns the finished process."""

    def run(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, timeout=timeout, cwd=tmp_path)

    return run


@pytest.fixture(scope="module")
def daemon(module_start_daemon: DaemonFactory) -> Daemon:
    """One daemon on the built-in defaults (/echo, /broadcast/{channel}, /chat), shared by a test module."""
    return module_start_daemon()


@pytest.fixture(scope="module")
def plugin_daemon(module_start_daemon: DaemonFactory) -> Daemon:
    """One daemon with the built-ins and every test plugin mounted; plugin errors are expected there."""
    return module_start_daemon(ALL_ROUTES_TOML, allow_errors=True)
