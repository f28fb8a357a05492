"""The chat demo recovers what it missed (docs/history.md): Debian's Chromium driven by Playwright, real daemons.

Two daemons, A and B, share one real ``redis-server`` (``[broker] url``) and serve ``/chat`` with
``history_size``. alice is the page, opened from A; bob is a plain WebSocket client on B.

* A is killed (``kill -9``); bob says "during outage" on B; A starts again on the same port: alice's page comes
  back by itself, logs in with ``since`` and shows "during outage" exactly once, in place, then
  "caught up on 1 missed message". Screenshot: ``artifacts/demo-recovery.png``.
* The page is reloaded while bob speaks: the log comes back from ``sessionStorage``, what was said meanwhile shows
  once, and nothing from before shows twice.
* A message the page receives twice shows once (the dedupe by offset), and a room whose history started again
  (a new epoch after ``history_ttl`` of silence, offsets from 1 again) keeps showing new messages.

Skipped, with the reason, without ``/usr/bin/chromium``, the ``playwright`` package, ``redis-server`` or
``hiredis``; under CI a missing one is an error, never a skip.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from browsertools import CHROMIUM, CHROMIUM_ARGS, redis_server, requirements

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page, Route, WebSocketRoute

REPO_ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO_ROOT / "artifacts" / "demo-recovery.png"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STORE_KEY = "selectws.chat.room:lobby"  # the page's sessionStorage record of room "lobby"
START_TIMEOUT = 15.0
WS_TIMEOUT = 15.0  # one message to bob
UI_TIMEOUT_MS = 15_000  # a page event (message, member list)
RECONNECT_TIMEOUT_MS = 30_000  # back online after a restart: a few backoff steps at most


pytestmark = requirements(redis=True, hiredis=True)




def chat_config(broker_url: str = "", *, ttl: float = 300) -> str:
    broker = f"""
[broker]
url = "{broker_url}"
reconnect_min = 0.05
reconnect_max = 0.5
# A killed instance is gone after three missed heartbeats: 1.5 s, not 15.
presence_heartbeat = 0.5
""" if broker_url else ""
    return f"""
{broker}
[[routes]]
path = "/chat"
plugin = "chat"
history_size = 100
history_ttl = {ttl}
"""


# ------------------------------------------------------------------------------------------------ processes


@pytest.fixture
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


class Daemon:
    """``python -m selectws serve --config FILE`` on 127.0.0.1 (port 0: the kernel's choice, read from its JSON
    ``listening`` line; or a given port, to start again where a killed one was)."""

    def __init__(self, config: Path, port: int = 0) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_", "WATCHDOG_"))}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "selectws", "serve", "--config", str(config), "--host", "127.0.0.1",
             "--port", str(port), "--log-format", "json"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
            cwd=config.parent,
        )
        self.records: list[dict[str, Any]] = []
        self.lines: list[str] = []
        self._listening = threading.Event()
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        if not self._listening.wait(START_TIMEOUT) or self.proc.poll() is not None:
            self.kill()
            raise RuntimeError(f"the daemon did not start listening (port {port}):\n" + "\n".join(self.lines[-20:]))
        listening = next(r for r in self.records if r.get("event") == "listening")
        self.port = int(str(listening["addresses"][0]).rsplit(":", 1)[1])

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                self.records.append(record)
                if record.get("event") == "listening":
                    self._listening.set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kill(self) -> None:
        """SIGKILL: a crash (no close frame, no goodbye to the other instances)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._reader.join(5)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(5)
        return self.proc.returncode

    def errors(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("level") in ("error", "critical")]


class Daemons:
    """Starts daemons from a config file; at the end stops them and checks that none logged an error."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started: list[Daemon] = []

    def config(self, text: str) -> Path:
        path = self.tmp / f"selectws-{len(list(self.tmp.glob('selectws-*.toml')))}.toml"
        path.write_text(text)
        return path

    def start(self, config: Path, port: int = 0, deadline: float = 10.0) -> Daemon:
        """On ``port`` again after a kill: retried briefly, since the OS may not have released it yet."""
        end = time.monotonic() + deadline
        while True:
            try:
                daemon = Daemon(config, port)
                break
            except RuntimeError:
                if port == 0 or time.monotonic() > end:
                    raise
                time.sleep(0.2)
        self.started.append(daemon)
        return daemon

    def finish(self) -> None:
        for daemon in self.started:
            daemon.stop()
        errors = [e for d in self.started for e in d.errors()]
        assert not errors, f"the daemons logged errors: {errors}"


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Daemons]:
    d = Daemons(tmp_path)
    try:
        yield d
    finally:
        d.finish()


# ------------------------------------------------------------------------------------------------ the browser


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A page in a context of its own (its own sessionStorage); its uncaught script errors fail the test."""
    context = browser.new_context(viewport={"width": 1000, "height": 640})
    p = context.new_page()
    p.set_default_timeout(UI_TIMEOUT_MS)
    errors: list[str] = []
    p.on("pageerror", lambda exc: errors.append(str(exc)))
    yield p
    context.close()
    assert not errors, f"uncaught script errors in the page: {errors}"


# ------------------------------------------------------------------------------------------------ bob


class Client:
    """A chat client of the ``websockets`` sync API that keeps everything it received, in order."""

    def __init__(self, port: int, name: str, room: str = "lobby") -> None:
        import inspect

        from websockets.sync.client import connect

        known = inspect.signature(connect).parameters
        options: dict[str, Any] = {"open_timeout": WS_TIMEOUT, "close_timeout": 5, "ping_interval": None}
        if "proxy" in known:
            options["proxy"] = None  # never through an HTTP(S)_PROXY from the environment
        if "legacy" in known:
            options["legacy"] = True  # used without "with" (websockets 17.1+ warns otherwise)
        self.ws = connect(f"ws://127.0.0.1:{port}/chat", **options)
        self.received: list[dict[str, Any]] = []
        self.ws.send(json.dumps({"type": "login", "name": name, "room": room}))
        self.welcome = self.wait_for(lambda m: m.get("type") == "welcome")

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = WS_TIMEOUT) -> dict[str, Any]:
        """The first message received (already, or within ``timeout``) that satisfies ``predicate``."""
        for earlier in self.received:
            if predicate(earlier):
                return earlier
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"nothing matching within {timeout} s; received {self.received}"
            message: dict[str, Any] = json.loads(self.ws.recv(timeout=left))
            self.received.append(message)
            if predicate(message):
                return message

    def say(self, text: str) -> dict[str, Any]:
        """Say ``text``; the room's ``said`` of it, as bob received it (with its offset)."""
        self.ws.send(json.dumps({"type": "say", "text": text}))
        return self.wait_for(lambda m: m.get("type") == "said" and m.get("text") == text)

    def close(self) -> None:
        self.ws.close()


# ------------------------------------------------------------------------------------------------ page checks


def say(page: Page, text: str) -> None:
    page.fill("#text", text)
    page.press("#text", "Enter")


def expect_online(page: Page, timeout: float = UI_TIMEOUT_MS) -> None:
    from playwright.sync_api import expect

    expect(page.locator("#status")).to_have_attribute("data-state", "online", timeout=timeout)
    expect(page.locator("#text")).to_be_enabled()


def messages(page: Page, text: str) -> Any:
    """The chat lines (``li.msg``) whose text is exactly ``text``."""
    return page.locator("#log li.msg").filter(has=page.locator(".text", has_text=re.compile(f"^{re.escape(text)}$")))


def system_lines(page: Page, text: str) -> Any:
    return page.locator("#log li.system").filter(
        has=page.locator(".text", has_text=re.compile(f"^{re.escape(text)}$")))


def expect_once(page: Page, sender: str, text: str) -> None:
    from playwright.sync_api import expect

    line = messages(page, text)
    expect(line).to_have_count(1)
    expect(line.locator(".from")).to_have_text(sender)


def log_texts(page: Page) -> list[str]:
    return [t.strip() for t in page.locator("#log li .text").all_inner_texts()]


def stored(page: Page) -> dict[str, Any]:
    raw = page.evaluate(f"sessionStorage.getItem({json.dumps(STORE_KEY)})")
    assert raw, f"nothing in sessionStorage under {STORE_KEY}"
    record = json.loads(raw)
    assert isinstance(record, dict)
    return record


def in_order(texts: list[str], *wanted: str) -> bool:
    """``wanted`` appear in ``texts`` in this order (each matched by its start)."""
    i = 0
    for text in texts:
        if i < len(wanted) and text.startswith(wanted[i]):
            i += 1
    return i == len(wanted)


# ------------------------------------------------------------------------------------------------ tests


def test_page_recovers_what_was_said_on_another_instance_while_its_own_was_down(
        browser: Browser, page: Page, daemons: Daemons, redis_url: str) -> None:
    from playwright.sync_api import expect

    config = daemons.config(chat_config(redis_url))
    a = daemons.start(config)
    b = daemons.start(config)
    port = a.port

    page.goto(f"{a.url}/?name=alice&room=lobby")
    expect_online(page)
    bob = Client(b.port, "bob")
    try:
        assert sorted(bob.welcome["members"]) == ["alice", "bob"]  # alice is on A
        epoch = bob.welcome["epoch"]
        expect(page.locator("#log li.joined .text")).to_have_text(["bob joined"])
        before = bob.say("before the outage")
        expect_once(page, "bob", "before the outage")
        record = stored(page)  # the position, kept per room
        assert (record["epoch"], record["offset"], record["name"]) == (epoch, before["offset"], "alice")

        a.kill()
        expect(page.locator("#status")).to_have_attribute("data-state", "reconnecting")
        during = bob.say("during outage")
        # B gives up on A's members (three missed heartbeats) and tells the room alice left: she is away for good
        # before A is back (her return then cannot race the "left" of her old connection).
        bob.wait_for(lambda m: m.get("type") == "left" and m.get("name") == "alice")

        a = daemons.start(config, port)
        assert a.port == port
        expect_online(page, timeout=RECONNECT_TIMEOUT_MS)

        # The missed message, once, marked as missed, in place: after "connection lost", before "back in".
        line = messages(page, "during outage")
        expect(line).to_have_count(1)
        expect(line).to_have_class(re.compile(r"\bmissed\b"))
        expect(line.locator(".from")).to_have_text("bob")
        expect(system_lines(page, "caught up on 1 missed message")).to_have_count(1)
        expect(system_lines(page, "back in lobby as alice")).to_have_count(1)
        texts = log_texts(page)
        assert in_order(texts, "bob joined", "before the outage", "connection lost", "during outage",
                        "back in lobby as alice", "caught up on 1 missed message"), texts
        expect_once(page, "bob", "before the outage")  # nothing from before shows twice
        expect(page.locator("#log li.left")).to_have_count(0)  # her own "left" (in the replay) is not news to her
        expect(page.locator("#log li.system").filter(has_text="history lost")).to_have_count(0)
        expect(page.locator("#members li")).to_have_count(2)

        # Live again, on both sides.
        after = bob.say("after the restart")
        expect_once(page, "bob", "after the restart")
        expect(messages(page, "after the restart")).not_to_have_class(re.compile(r"\bmissed\b"))
        say(page, "alice is back")
        bob.wait_for(lambda m: m.get("type") == "said" and m.get("text") == "alice is back")
        expect_once(page, "alice", "alice is back")
        assert after["offset"] > during["offset"] > before["offset"]
        record = stored(page)
        assert record["epoch"] == epoch and record["offset"] >= after["offset"]

        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT))
        data = SCREENSHOT.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    finally:
        bob.close()


def test_a_reloaded_page_recovers_what_was_said_meanwhile_and_shows_nothing_twice(
        browser: Browser, page: Page, daemons: Daemons, redis_url: str) -> None:
    from playwright.sync_api import expect

    config = daemons.config(chat_config(redis_url))
    a = daemons.start(config)
    b = daemons.start(config)
    page.goto(f"{a.url}/?name=alice&room=lobby")
    expect_online(page)
    bob = Client(b.port, "bob")
    try:
        bob.say("one")
        bob.say("two")
        say(page, "alice before the reload")
        bob.wait_for(lambda m: m.get("text") == "alice before the reload")
        for sender, text in (("bob", "one"), ("bob", "two"), ("alice", "alice before the reload")):
            expect_once(page, sender, text)

        # Hold the reloaded page's script: the old page is gone (its socket closed), the new one has not logged in.
        # bob speaks meanwhile, then the script goes on.
        held: list[str] = []

        def while_reloading(route: Route) -> None:
            held.append(route.request.url)
            bob.wait_for(lambda m: m.get("type") == "left" and m.get("name") == "alice")
            bob.say("said during the reload")
            route.continue_()

        page.route("**/app.js", while_reloading)
        page.reload()
        expect_online(page)
        assert len(held) == 1, held
        page.unroute("**/app.js")

        line = messages(page, "said during the reload")
        expect(line).to_have_count(1)
        expect(line).to_have_class(re.compile(r"\bmissed\b"))
        expect(system_lines(page, "caught up on 1 missed message")).to_have_count(1)
        expect(system_lines(page, "back in lobby as alice")).to_have_count(1)
        # The log from before the reload is back, each line once, and the missed message comes after it.
        for sender, text in (("bob", "one"), ("bob", "two"), ("alice", "alice before the reload")):
            expect_once(page, sender, text)
        expect(page.locator("#log li.joined")).to_have_count(1)  # "bob joined", from before the reload
        expect(page.locator("#log li.left")).to_have_count(0)
        texts = log_texts(page)
        assert in_order(texts, "you joined lobby as alice", "bob joined", "one", "two", "alice before the reload",
                        "said during the reload", "back in lobby as alice", "caught up on 1 missed message"), texts
        assert page.url.endswith("/?name=alice&room=lobby")

        bob.say("after the reload")
        expect_once(page, "bob", "after the reload")
        expect(page.locator("#members li")).to_have_count(2)
    finally:
        bob.close()


def test_a_message_that_arrives_twice_shows_once_and_a_new_epoch_is_followed(
        browser: Browser, page: Page, daemons: Daemons) -> None:
    """The page's dedupe rule, on one daemon (memory broker): every ``said`` is delivered to the page twice (a
    routed WebSocket forwards it twice); then the room is quiet for longer than ``history_ttl``, its history starts
    again (a new epoch, offsets from 1), and the page must still show what comes next."""
    ttl = 2.0
    a = daemons.start(daemons.config(chat_config(ttl=ttl)))
    doubled: list[str] = []

    def double_said(ws: WebSocketRoute) -> None:
        server = ws.connect_to_server()

        def to_page(message: str | bytes) -> None:
            ws.send(message)
            if isinstance(message, str) and json.loads(message).get("type") == "said":
                doubled.append(message)
                ws.send(message)

        server.on_message(to_page)

    page.route_web_socket(re.compile(r"/chat$"), double_said)
    page.goto(f"{a.url}/?name=alice&room=lobby")
    expect_online(page)
    bob = Client(a.port, "bob")
    try:
        first = bob.say("said once, sent twice")
        second = bob.say("and again")
        expect_once(page, "bob", "and again")
        expect_once(page, "bob", "said once, sent twice")
        say(page, "mine, sent twice too")
        expect_once(page, "alice", "mine, sent twice too")
        assert len(doubled) == 3, doubled  # the page really was sent each of them twice

        time.sleep(ttl + 1.0)  # the scenario, not an assertion: the room stays quiet past history_ttl
        fresh = bob.say("after a quiet spell")
        assert fresh["offset"] <= second["offset"], (first, second, fresh)  # history started again
        expect_once(page, "bob", "after a quiet spell")
        bob.say("and on")
        expect_once(page, "bob", "and on")
    finally:
        bob.close()
