"""Plugin options through the real CLI (issue 16): ``check-config``, ``serve`` and a SIGHUP reload check every route's
``options`` table against what its plugin declares, with one-line errors naming the route by index and path.
"""

from __future__ import annotations

import json
import signal
import textwrap

import pytest
from wstools import connect

TIMEOUT = 10.0

ROUTES = """
[[routes]]
path = "/echo"
plugin = "echo"

[[routes]]
path = "/broadcast/{{channel}}"
plugin = "broadcast"
options = {broadcast}

[[routes]]
path = "/chat"
plugin = "chat"
options = {chat}
"""


def _routes(chat: str = "{}", broadcast: str = "{}") -> str:
    return ROUTES.format(chat=chat, broadcast=broadcast)


def _login(daemon, name: str) -> dict:
    with connect(daemon.url("/chat")) as ws:
        ws.send(json.dumps({"type": "login", "name": name}))
        answer = json.loads(ws.recv(timeout=TIMEOUT))
    assert isinstance(answer, dict)
    return answer


@pytest.mark.parametrize(
    ("chat", "broadcast", "line"),
    [
        ('{ max_name_length = "x" }', "{}",
         'routes[2] (/chat).options.max_name_length: expected an integer >= 1, got "x"'),
        ("{ max_name_lenght = 3 }", "{}",
         "routes[2] (/chat).options.max_name_lenght: unknown option; did you mean 'max_name_length'?"),
        ("{ max_name_length = -1 }", "{}",
         "routes[2] (/chat).options.max_name_length: expected an integer >= 1, got -1"),
        ("{ max_text_length = 4096.0 }", "{}",
         "routes[2] (/chat).options.max_text_length: expected an integer >= 1, got 4096.0"),
        ('{ default_room = "" }', "{}", 'routes[2] (/chat).options.default_room: expected a non-empty string, got ""'),
        ("{}", '{ envelope = "yes" }',
         'routes[1] (/broadcast/{channel}).options.envelope: expected a boolean (true or false), got "yes"'),
        ("{}", '{ chanel = "news" }',
         "routes[1] (/broadcast/{channel}).options.chanel: unknown option; did you mean 'channel'?"),
    ],
    ids=["wrong-type", "typo", "below-minimum", "float-for-int", "empty-room", "broadcast-envelope", "broadcast-typo"],
)
def test_check_config_checks_plugin_options(cli, write_config, chat, broadcast, line):
    path = write_config(_routes(chat, broadcast), name="bad.toml")
    proc = cli("check-config", str(path))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr == f"selectws: configuration error in {path}: {line}\n"
    assert proc.stdout == ""


def test_echo_takes_no_options(cli, write_config):
    path = write_config('[[routes]]\npath = "/e"\nplugin = "echo"\noptions = { prefix = ">" }\n', name="echo.toml")
    proc = cli("check-config", str(path))
    assert proc.returncode == 2
    assert proc.stderr.endswith("routes[0] (/e).options.prefix: unknown option (this plugin takes no options)\n")


def test_serve_refuses_bad_options_before_listening(cli, write_config):
    path = write_config(_routes('{ max_name_length = "x" }'), name="bad.toml")
    proc = cli("serve", "--port", "0", "--log-format", "json", "--config", str(path))
    assert proc.returncode == 2, proc.stderr  # a configuration error, not "cannot start" with exit 1 and no key
    assert proc.stderr == (f"selectws: configuration error in {path}: routes[2] (/chat).options.max_name_length: "
                           'expected an integer >= 1, got "x"\n')


def test_plugins_without_a_declaration_take_any_options(cli, write_config):
    path = write_config("""
        [[routes]]
        path = "/token"
        plugin = "plugins_for_tests:TokenPlugin"
        options = { anything = [1, "two"], nested = { deep = true } }
    """)
    proc = cli("check-config", str(path))
    assert proc.returncode == 0, proc.stderr


THIRD_PARTY = '''
from dataclasses import dataclass
import json

from selectws.plugins.api import Plugin, option


@dataclass(frozen=True, kw_only=True)
class TickerOptions:
    interval: float = option(1.0, min=0.1, max=60)
    symbols: tuple[str, ...] = ("ACME",)
    feed: str = option(non_empty=True)


class TickerPlugin(Plugin):
    Options = TickerOptions

    def on_message(self, session, message):
        session.send_text(json.dumps({"opts": [self.opts.interval, list(self.opts.symbols), self.opts.feed],
                                      "options": self.options}))
'''


def test_a_third_party_plugin_declares_options_and_gets_them_checked(cli, write_config, start_daemon, tmp_path):
    (tmp_path / "ticker_with_options.py").write_text(textwrap.dedent(THIRD_PARTY))
    route = '[[routes]]\npath = "/ticker"\nplugin = "ticker_with_options:TickerPlugin"\noptions = {}\n'
    for options, line in [
        ("{ interval = 0 }", "routes[0] (/ticker).options.interval: expected a number between 0.1 and 60, got 0"),
        ('{ feed = "f", symbols = "ACME" }',
         'routes[0] (/ticker).options.symbols: expected an array of strings, got "ACME"'),
        ("{ interval = 2 }", "routes[0] (/ticker).options.feed: missing: the plugin needs it (a non-empty string)"),
    ]:
        path = write_config(route.replace("{}", options))
        proc = cli("check-config", str(path))  # the module is found in the working directory (python -m)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr == f"selectws: configuration error in {path}: {line}\n"

    daemon = start_daemon(route.replace("{}", '{ interval = 2, feed = "f" }'))
    with connect(daemon.url("/ticker")) as ws:
        ws.send("?")
        assert json.loads(ws.recv(timeout=TIMEOUT)) == {"opts": [2.0, ["ACME"], "f"],
                                                        "options": {"interval": 2, "feed": "f"}}


def test_sighup_with_bad_options_names_the_option_and_keeps_the_running_config(start_daemon, write_config):
    path = write_config(_routes("{ max_name_length = 3 }"))
    daemon = start_daemon(path, allow_errors=True)
    assert "longer than 3" in _login(daemon, "abcd")["reason"]

    for chat, key, reason in [
        ('{ max_name_length = "x" }', "routes[2] (/chat).options.max_name_length",
         'expected an integer >= 1, got "x"'),
        ("{ max_name_lenght = 5 }", "routes[2] (/chat).options.max_name_lenght",
         "unknown option; did you mean 'max_name_length'?"),
        ("{ max_name_length = -1 }", "routes[2] (/chat).options.max_name_length", "expected an integer >= 1, got -1"),
    ]:
        path.write_text(_routes(chat))
        daemon.signal(signal.SIGHUP)
        failed = daemon.wait_for(lambda r, reason=reason: r.get("error", "").endswith(reason),
                                 event="reload failed; keeping the running configuration")
        assert failed["key"] == key
        assert failed["error"] == f"{key}: {reason}"
        # The running configuration stays: names are still cut at 3.
        assert "longer than 3" in _login(daemon, "abcd")["reason"]
        assert _login(daemon, "abc")["type"] == "welcome"

    path.write_text(_routes("{ max_name_length = 5 }"))  # a good file is taken, options and all
    daemon.signal(signal.SIGHUP)
    daemon.wait_for(event="configuration reloaded")
    assert _login(daemon, "abcd")["type"] == "welcome"
