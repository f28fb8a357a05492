"""The operator's side of the configuration (issue 16), through the real CLI and daemon as subprocesses.

* a file that is not TOML reads ``FILE:LINE:COLUMN: ...`` (check-config, serve, and a SIGHUP reload's log line);
* a file that cannot be read reads ``selectws: cannot read config F: no such file | permission denied |
  is a directory``, exit status 2, nothing listens;
* ``SELECTWS_<SECTION>_<KEY>`` environment variables, between the file and the flags; bad ones are one line;
* ``check-config --print``: every key, its value and where it came from;
* ``[server] plugin_paths``: a plugin module beside the configuration file, with no PYTHONPATH, for serve,
  check-config, reload and workers.
"""

from __future__ import annotations

import ctypes
import dataclasses
import http.client
import os
import signal
import socket
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path
from typing import Any

import pytest
from conftest import subprocess_env
from wstools import connect

from selectws.config import _SECTIONS  # the tables, in the order check-config --print shows them

TIMEOUT = 10.0
BAD_TOML = '[server]\nhost = "x"\nport = = 9\n'  # tomllib: "Invalid value (at line 3, column 8)"
PLUGIN_MODULE = '''
from selectws.plugins.api import Plugin


class Shout(Plugin):
    def on_message(self, session, message):
        session.send_text("mymod says " + str(message).upper())
'''
PLUGIN_ROUTE = """
[[routes]]
path = "/shout"
plugin = "mymod:Shout"
"""


def _cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 30.0,
         preexec_fn: Any = None) -> subprocess.CompletedProcess[str]:
    environ = subprocess_env()
    environ.update(env or {})
    return subprocess.run([sys.executable, "-m", "selectws", *args], capture_output=True, text=True, timeout=timeout,
                          env=environ, cwd=cwd, stdin=subprocess.DEVNULL, preexec_fn=preexec_fn)


def _serve_once(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
                preexec_fn: Any = None) -> subprocess.CompletedProcess[str]:
    """``selectws serve`` that is expected to refuse to start; a daemon that starts anyway fails the test."""
    try:
        return _cli("serve", "--port", "0", "--log-format", "json", *args, env=env, cwd=cwd, timeout=15,
                    preexec_fn=preexec_fn)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"serve started instead of refusing: {exc.stderr!r}")


def _no_listening(proc: subprocess.CompletedProcess[str]) -> None:
    assert '"listening"' not in proc.stderr and proc.stdout == ""


def _clean_pythonpath() -> dict[str, str | None]:
    """The daemon's PYTHONPATH without the test folders: whatever the test run itself was given (nothing, or the
    tree under test)."""
    return {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}


def _http_status(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


def _shout(port: int) -> str:
    with connect(f"ws://127.0.0.1:{port}/shout") as ws:
        ws.send("hello")
        return str(ws.recv(timeout=TIMEOUT))


def _origins(printed: str) -> dict[str, str]:
    """``check-config --print``'s comments: ``{"server.port": "file", ...}`` (``routes.path``: the last route)."""
    origin = {}
    table = ""
    for line in printed.splitlines():
        if line.startswith("["):
            table = line.split("]")[0].strip("[")
        elif " = " in line and "  # " in line and not line.startswith("#"):
            text, _, where = line.rpartition("  # ")
            origin[f"{table}.{text.split(' = ')[0]}"] = where
    return origin


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ================================================================================== a file that is not TOML
@pytest.mark.parametrize("command", ["check-config", "serve"])
def test_toml_syntax_error_reads_file_line_column(tmp_path: Path, command: str) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(BAD_TOML)
    args = (command, str(bad)) if command == "check-config" else ("-c", str(bad))
    proc = _cli(*args, cwd=tmp_path) if command == "check-config" else _serve_once(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"{bad}:3:8: invalid TOML: Invalid value\n"
    _no_listening(proc)


def test_reload_of_a_file_that_is_not_toml_logs_file_line_column(start_daemon: Any) -> None:
    daemon = start_daemon("[limits]\nmax_message_size = 1000\n", allow_errors=True)  # the failed reload logs one
    assert daemon.config is not None
    daemon.config.write_text(BAD_TOML)
    daemon.signal(signal.SIGHUP)
    failed = daemon.wait_for(event="reload failed; keeping the running configuration", timeout=TIMEOUT)
    assert failed["error"] == f"{daemon.config}:3:8: invalid TOML: Invalid value"
    with connect(daemon.url("/echo")) as ws:  # still serving, on the running configuration
        ws.send("still here")
        assert ws.recv(timeout=TIMEOUT) == "still here"


# ================================================================================ a file that cannot be read
def _drop_file_permission_override() -> None:
    """In the child, before exec: remove CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set, so that
    root, too, is refused a file it has no read permission for."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.mark.parametrize("command", ["serve", "check-config"])
@pytest.mark.parametrize("case", ["missing", "directory", "permission"])
def test_an_unreadable_config_file_is_one_line_in_one_style(tmp_path: Path, command: str, case: str) -> None:
    path = tmp_path / "selectws.toml"
    preexec = None
    if case == "directory":
        path.mkdir()
    elif case == "permission":
        path.write_text("[server]\nport = 0\n")
        path.chmod(0)
        if os.geteuid() == 0:  # root reads any file; without these two capabilities it does not
            preexec = _drop_file_permission_override
            probe = subprocess.run(["cat", str(path)], capture_output=True, preexec_fn=preexec)
            if probe.returncode == 0:
                pytest.skip("running as root and the capabilities that let root read any file cannot be dropped")
    words = {"missing": "no such file", "directory": "is a directory", "permission": "permission denied"}[case]
    if command == "serve":
        proc = _serve_once("-c", str(path), cwd=tmp_path, preexec_fn=preexec)
    else:
        proc = _cli("check-config", str(path), cwd=tmp_path, preexec_fn=preexec)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"selectws: cannot read config {path}: {words}\n"
    _no_listening(proc)


# ====================================================================================== environment variables
def test_environment_sits_between_the_file_and_the_flags(start_daemon: Any) -> None:
    daemon = start_daemon(
        '[ops]\nhealthz_path = "/from-file"\nmetrics_path = "/metrics-from-file"\n',
        env={"SELECTWS_OPS_HEALTHZ_PATH": "/from-env",  # env beats the file
             "SELECTWS_SERVER_PORT": "1",  # the daemon's --port 0 flag beats this
             "SELECTWS_LIMITS_MAX_CONNECTIONS": "10"},
    )
    assert daemon.port != 1
    assert _http_status(daemon.port, "/from-env") == 200
    assert _http_status(daemon.port, "/from-file") == 404
    assert _http_status(daemon.port, "/metrics-from-file") == 200  # the file still beats the default


@pytest.mark.parametrize("command", ["serve", "check-config"])
@pytest.mark.parametrize("var,value,line", [
    ("SELECTWS_SERVER_BACKLOG", "abc", "SELECTWS_SERVER_BACKLOG: server.backlog: expected an integer, got string"),
    ("SELECTWS_LIMITS_MAX_CONNECTIONS", "-1",
     "SELECTWS_LIMITS_MAX_CONNECTIONS: limits.max_connections: must be >= 0, got -1"),
    ("SELECTWS_SERVER_PROT", "9000",
     "SELECTWS_SERVER_PROT: server.prot: not a configuration key; did you mean SELECTWS_SERVER_PORT?"),
], ids=["bad-type", "out-of-range", "unknown-key"])
def test_a_bad_environment_variable_is_one_line_naming_it(tmp_path: Path, command: str, var: str, value: str,
                                                          line: str) -> None:
    config = tmp_path / "selectws.toml"
    config.write_text("[server]\nhost = \"127.0.0.1\"\n")
    if command == "serve":
        proc = _serve_once("-c", str(config), env={var: value}, cwd=tmp_path)
    else:
        proc = _cli("check-config", str(config), env={var: value}, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"selectws: configuration error: {line}\n"
    _no_listening(proc)


def test_only_selectws_section_key_variables_are_configuration(tmp_path: Path) -> None:
    config = tmp_path / "selectws.toml"
    config.write_text('[api]\nkey_env = "SELECTWS_API_TOKEN"\n')
    left_alone = {
        "SELECTWS_API_TOKEN": "k" * 40,  # named by api.key_env: a secret, not a setting
        "SELECTWS_API_KEY": "x",  # publish's default key variable
        "SELECTWS_JWT_SECRET": "y",  # not a section
        "SELECTWS_NO_SPEEDUPS": "1",
        "SELECTWS_COMPRESSION_ENABLED": "false",  # this one is configuration
    }
    proc = _cli("check-config", str(config), "--print", env=left_alone, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert _origins(proc.stdout)["compression.enabled"] == "env SELECTWS_COMPRESSION_ENABLED"
    assert tomllib.loads(proc.stdout)["compression"]["enabled"] is False
    assert "# env SELECTWS_API" not in proc.stdout and "SELECTWS_JWT" not in proc.stdout
    # ... while an unknown key of a known section is an error (routes and hooks cannot come from the environment).
    proc = _cli("check-config", str(config), env={**left_alone, "SELECTWS_ROUTES_0_PATH": "/x"}, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("selectws: configuration error: SELECTWS_ROUTES_0_PATH: routes: [[routes]] cannot "
                                  "be set from the environment")


# ==================================================================================== check-config --print
def test_check_config_print_shows_every_value_and_its_origin(tmp_path: Path) -> None:
    config = tmp_path / "selectws.toml"
    config.write_text(textwrap.dedent("""
        [server]
        port = 9001
        [[routes]]
        path = "/e"
        plugin = "echo"
    """))
    env = {"SELECTWS_LIMITS_MAX_CONNECTIONS": "10", "SELECTWS_TIMEOUTS_HANDSHAKE": "2.5",
           "SELECTWS_SERVER_TRUSTED_PROXIES": '["10.0.0.0/8"]', "SELECTWS_TLS_MIN_VERSION": "1.3",
           "SELECTWS_BROKER_PASSWORD": "hunter2"}
    proc = _cli("check-config", str(config), "--print", "--host", "0.0.0.0", env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    printed = tomllib.loads(proc.stdout)  # the output is TOML
    origin = _origins(proc.stdout)
    assert printed["server"]["host"] == "0.0.0.0" and origin["server.host"] == "flag --host"
    assert printed["server"]["port"] == 9001 and origin["server.port"] == "file"
    assert printed["limits"]["max_connections"] == 10
    assert origin["limits.max_connections"] == "env SELECTWS_LIMITS_MAX_CONNECTIONS"
    assert printed["timeouts"]["handshake"] == 2.5 and origin["timeouts.handshake"] == "env SELECTWS_TIMEOUTS_HANDSHAKE"
    assert printed["server"]["trusted_proxies"] == ["10.0.0.0/8"]
    assert printed["tls"]["min_version"] == "1.3"  # a string key takes the value as it is (not the float 1.3)
    assert printed["server"]["backlog"] == 1024 and origin["server.backlog"] == "default"
    assert printed["broker"]["password"] == "********" and "hunter2" not in proc.stdout
    [route] = printed["routes"]
    assert (route["path"], route["plugin"], origin["routes.path"], origin["routes.auth"]) == \
        ("/e", "echo", "file", "default")
    # Every key of every table is there.
    for name, cls in _SECTIONS.items():
        assert sorted(printed[name]) == sorted(f.name for f in dataclasses.fields(cls)), name


# ======================================================================================= [server] plugin_paths
def _plugin_beside_config(tmp_path: Path, config_text: str) -> Path:
    folder = tmp_path / "conf"  # the daemon runs in tmp_path: mymod.py is not in its working directory
    folder.mkdir()
    (folder / "mymod.py").write_text(PLUGIN_MODULE)
    config = folder / "selectws.toml"
    config.write_text(textwrap.dedent(config_text))
    return config


def test_plugin_paths_finds_a_plugin_beside_the_config_with_no_pythonpath(tmp_path: Path, start_daemon: Any) -> None:
    config = _plugin_beside_config(tmp_path, '[server]\nplugin_paths = ["."]\n' + PLUGIN_ROUTE)
    checked = _cli("check-config", str(config), env={"PYTHONPATH": os.environ.get("PYTHONPATH", "")}, cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    # ... the same with the plugin's folder given by the environment instead (relative to the file too).
    config.write_text(PLUGIN_ROUTE)
    checked = _cli("check-config", str(config), cwd=tmp_path,
                   env={"PYTHONPATH": os.environ.get("PYTHONPATH", ""), "SELECTWS_SERVER_PLUGIN_PATHS": '["."]'})
    assert checked.returncode == 0, checked.stderr
    assert checked.returncode == 0, checked.stderr
    config.write_text('[server]\nplugin_paths = ["."]\n' + PLUGIN_ROUTE)
    daemon = start_daemon(config, env=_clean_pythonpath())
    assert _shout(daemon.port) == "mymod says HELLO"


def test_plugin_paths_on_reload(tmp_path: Path, start_daemon: Any) -> None:
    config = _plugin_beside_config(tmp_path, '[[routes]]\npath = "/echo"\nplugin = "echo"\n')
    daemon = start_daemon(config, env=_clean_pythonpath())
    config.write_text('[server]\nplugin_paths = ["."]\n' + PLUGIN_ROUTE)
    daemon.signal(signal.SIGHUP)
    reloaded = daemon.wait_for(event="configuration reloaded", timeout=TIMEOUT)
    assert "/shout -> mymod:Shout" in reloaded["routes"]
    assert _shout(daemon.port) == "mymod says HELLO"


def test_plugin_paths_and_environment_reach_the_workers(tmp_path: Path, start_daemon: Any) -> None:
    pytest.importorskip("hiredis", reason="the Redis broker (needed by workers > 1) needs hiredis")
    config = _plugin_beside_config(tmp_path, '[server]\nplugin_paths = ["."]\n' + PLUGIN_ROUTE)
    # Two workers, and a broker nobody listens on (it stays down; local delivery is all /shout needs).
    env = {**_clean_pythonpath(), "SELECTWS_SERVER_WORKERS": "2",
           "SELECTWS_BROKER_URL": f"redis://127.0.0.1:{_free_port()}/0"}
    daemon = start_daemon(config, env=env, allow_errors=True)  # the broker being down is logged as errors
    ready = daemon.wait_for(event="workers ready", timeout=TIMEOUT)
    assert ready["workers"] == 2 and len(set(ready["pids"])) == 2  # from SELECTWS_SERVER_WORKERS
    for _ in range(4):
        assert _shout(daemon.port) == "mymod says HELLO"


def test_a_missing_plugin_folder_is_one_error_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "selectws.toml"
    config.write_text('[server]\nplugin_paths = ["plugins"]\n')
    for proc in (_cli("check-config", str(config), cwd=tmp_path), _serve_once("-c", str(config), cwd=tmp_path)):
        assert proc.returncode == 2
        assert proc.stderr == (f"selectws: configuration error in {config}: server.plugin_paths[0]: no such folder: "
                               f"{tmp_path / 'plugins'}\n")
        _no_listening(proc)
